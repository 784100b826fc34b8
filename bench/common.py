"""Shared by the benchmark scripts: environment facts, timing with device events, JSON results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from x2v.runtime import __version__

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    env["git_commit"] = os.environ.get("X2V_GIT_COMMIT") or _git_commit()
    env["x2v"] = __version__
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()  # fmt: skip
        except OSError:
            env["driver"] = "unknown"
    else:
        env["card"] = "cpu"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:
        return "unknown"
    commit = out.stdout.strip()
    return commit if len(commit) == 40 else "unknown"


def random_part(part: str, cfg, device: str = "cuda", std: float = 0.02, seed: int = 0):
    """A model part ('t5', 'vae', ...) at its config's full size with N(0, std) weights, bf16, for inference:
    copy and compute costs do not depend on the values."""
    from x2v.export.load import build

    module = build(part, cfg).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * std)
    return module.to(torch.bfloat16).eval().requires_grad_(False)


def timed_peaks(fn, cuda: bool):
    """(fn(), {"s": seconds[, "allocated_gb", "reserved_gb": the allocator's peaks during the call]})."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    r = {"s": time.perf_counter() - t0}
    if cuda:
        r.update(allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
                 reserved_gb=torch.cuda.max_memory_reserved() / 1e9)  # fmt: skip
    return out, r


def card_slug(env: dict) -> str:
    return env["card"].lower().replace("nvidia ", "").replace(" ", "-")


def event_ms(fn, hide_launch: bool = False) -> float:
    """Milliseconds of one call of `fn` on the current stream, timed with CUDA events.

    hide_launch: first queue ~10 ms of GPU sleep, so the host has queued all of fn's launches before the start
    event fires and the time is the GPU's alone (as in a denoising loop, where the host runs ahead); otherwise
    the host's launch latency of a multi-kernel call counts too."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if hide_launch:
        torch.cuda._sleep(20_000_000)  # cycles
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_cuda(fn, warmup: int = 3, reps: int = 10, hide_launch: bool = False) -> dict:
    """Median and spread of `reps` runs timed with CUDA events (after `warmup` untimed runs); see event_ms."""
    for _ in range(warmup):
        fn()
    times = [event_ms(fn, hide_launch) for _ in range(reps)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps,
            "host_launch": "hidden" if hide_launch else "counted"}  # fmt: skip


def interleaved(calls: dict, reps: int, rotate: bool = True, hide_launch: bool = False) -> dict:
    """Median ms of each call over `reps` rounds that run every call once, in turn (device events).

    Each round starts one call further along: at the card's power limit the clock a call starts at depends on
    what ran just before it, and in a fixed order every call has the same predecessor in every round (an FP8
    block always after the bf16 one). Rotating gives each call every predecessor equally often; `rotate=False`
    is the fixed order measured before. hide_launch: as in event_ms (the GPU's time alone)."""
    names = list(calls)
    times = {k: [] for k in names}
    for r in range(reps):
        start = r % len(names) if rotate else 0
        for k in names[start:] + names[:start]:
            times[k].append(event_ms(calls[k], hide_launch=hide_launch))
    return {k: statistics.median(t) for k, t in times.items()}


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    env = payload.setdefault("env", environment())
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{card_slug(env)}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.double(), ref.double()
    return {
        "rel_l2": ((out - ref).norm() / ref.norm()).item(),
        "cos": torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item(),
        "nan": bool(torch.isnan(out).any()),
    }


def fp8_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two float8_e4m3fn tensors in E4M3 steps (codes of one sign are ordered like their values)."""
    ia, ib = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    return torch.where((ia >> 7) == (ib >> 7), (ia - ib).abs(), (ia & 127) + (ib & 127))


KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("sage attention", ("attn_body", "attn_kernel", "quant_int8_kernel", "quant_v_kernel")),
    ("sdpa attention", ("flash", "fmha", "sdpa", "attention")),
    ("convolution", ("fprop", "convolve", "conv2d", "conv3d")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "scaled_mm", "sm90_", "sm80_", "cublas")),
    ("fused elementwise/reduction", ("triton_",)),
    ("copy", ("copy", "memcpy", "memset", "fill")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_breakdown(fn, top: int = 12) -> dict:
    """GPU kernel time of one call of `fn` by kind (ms) and its `top` kernels, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds, kernels = {}, {}
    for ev in prof.events():
        dt = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)  # us
        if ev.device_type.name != "CUDA" or not dt:
            continue
        kind = kernel_kind(ev.name)
        kinds[kind] = kinds.get(kind, 0.0) + dt / 1e3
        kernels[ev.name] = kernels.get(ev.name, 0.0) + dt / 1e3
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    # the attention kernels themselves (cuDNN/flash SDPA, SageAttention's body), not the Inductor kernels that
    # kernel_kind counts with them because they feed them: what is left is the linear-and-elementwise part
    attn = sum(v for k, v in kernels.items() if any(a in k.lower() for a in ATTENTION_KERNELS))
    return {"by_kind_ms": kinds, "total_ms": sum(kinds.values()), "attention_kernels_ms": attn,
            "top_ms": [{"kernel": k[:160], "kind": kernel_kind(k), "ms": v} for k, v in ranked]}  # fmt: skip


ATTENTION_KERNELS = ("cudnn_generated", "sdpa_sm90", "flash_fwd", "fmha", "attn_body")


@contextlib.contextmanager
def fp8_linear_before():
    """FP8Linear's GPU path as it was until 2026-11-29 (static per-tensor scales): `x / scale` an element, and
    the bias added to the GEMM's rounded output; the SageAttention op's output in bf16, cast by the o projection
    (SelfAttention.fp8_out off). For benches that measure the changes side by side."""
    from x2v.export.dit import SelfAttention
    from x2v.export.fp8 import FP8Linear, quantize

    saved = FP8Linear.forward, FP8Linear.product, SelfAttention.fp8_out

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        xs = self.input_scale.float()
        out = self.product(quantize(x2, xs), xs, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def product(self, q, xs, out_dtype):
        out = torch._scaled_mm(q, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.float(),
                               out_dtype=out_dtype, use_fast_accum=self.fast_accum)  # fmt: skip
        return out if self.bias is None else out + self.bias.to(out_dtype)

    FP8Linear.forward, FP8Linear.product, SelfAttention.fp8_out = forward, product, False
    try:
        yield
    finally:
        FP8Linear.forward, FP8Linear.product, SelfAttention.fp8_out = saved


@contextlib.contextmanager
def fp8_cast_before():
    """The FP8 casts as compiled until 2026-11-29 (commit 005f17d): Inductor's clamp before every E4M3 cast, and
    q, k and v each quantizing the self-attention input. For benches that measure the change side by side."""
    from x2v.export import fp8

    saved = fp8.SATURATING_CAST, fp8.same_input_scale
    fp8.SATURATING_CAST, fp8.same_input_scale = False, lambda linears: False
    try:
        yield
    finally:
        fp8.SATURATING_CAST, fp8.same_input_scale = saved
