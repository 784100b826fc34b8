"""Energy of a full-size DiT block call and of its parts, at the card's steady state (GPU).

    python bench/energy.py [--model i2v-14b-480p] [--size 81x544x720] [--out DIR]   (writes <--name, energy>-<card>.json)

Why: the card runs its tensor-core kernels at the 700 W limit, so a denoising step takes about its energy over
700 W, and kernel time taken out of one part has come back as time in another (bench/NOTES.md). What a speed goal
asks of the code is then a number of joules a block call. This measures them with the board's energy counter
(NVML `nvmlDeviceGetTotalEnergyConsumption`, millijoules) while each workload runs back to back after a warm-up
of the same workload, so the board is in the steady state of a denoising loop:

  block-<variant>   one block engine call (AOTInductor, weights as inputs), as the engines run it; -before:
                    FP8Linear as it was before 2026-11-29, -bf16-out: the Sage op's output in bf16 (BLOCKS)
  sage              the self-attention through the SageAttention op, its quantization kernels included
  sdpa              the self-attention through SDPA (bf16)
  gemms-fp8         the block's twelve FP8 GEMMs (`torch._scaled_mm`, fast accumulation as the H200 builds)
  gemms-bf16        the same GEMMs in bf16 (bias in cuBLAS's epilogue)
  cross             the text (512 keys) and image (257 keys) cross-attentions, cuDNN SDPA as in the engines
  idle              nothing queued

Per workload: ms a call, joules a call, mean watts, and the SM clock sampled every 50 ms. Then each block's
joules less those of its attention, GEMMs and cross-attention: what its norms, casts, RoPE and residual adds cost.
Last, a profile of 10 back-to-back calls of the first block engine: the fraction of the span with a kernel
running (gaps between engine calls would be time the energy does not explain).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention import make_inputs
from bench.common import fp8_linear_before as before
from bench.common import rel_err, write_result
from bench.dit_forward import inputs, random_dit
from bench.engine_forward import ORDER, load_pt2, max_calibrated_fp8
from x2v.export.dit import GELUTanh
from x2v.export.fp8 import FP8Linear, configure_fp8
from x2v.plugins import sage_attention as sage
from x2v.runtime.config import load_model_config

TILE = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}  # the H200 config's sage_tile
BLOCKS = {  # name: (model, attention, FP8 fast accumulation); the first is the H200 engines' block
    "fp8-sage": ("fp8", "sage_op", True),
    "fp8-sdpa": ("fp8", "sdpa", True),
    "bf16-sdpa": ("bf16", "sdpa", False),
    # FP8Linear as built before 2026-11-29 (bench.common.fp8_linear_before), the attention's output in bf16
    "fp8-sage-before": ("fp8", "sage_op", True),
    "fp8-sdpa-before": ("fp8", "sdpa", True),
    # the Sage op's bf16 output through the o projection's own FP8 cast (SelfAttention.fp8_out = False)
    "fp8-sage-bf16-out": ("fp8", "sage_op", True),
}


@contextlib.contextmanager
def as_built(name: str):
    """Build and run the block `name` as its suffix says (-before, -bf16-out; see BLOCKS)."""
    from x2v.export.dit import SelfAttention

    with contextlib.ExitStack() as stack:
        if name.endswith("-before"):
            stack.enter_context(before())
        elif name.endswith("-bf16-out"):
            stack.callback(setattr, SelfAttention, "fp8_out", SelfAttention.fp8_out)
            SelfAttention.fp8_out = False
        yield


class Board:
    """The GPU's energy counter, power and SM clock through NVML (the driver's library; no Python package)."""

    def __init__(self, index: int = 0):
        self.nvml = ctypes.CDLL("libnvidia-ml.so.1")
        self._ok(self.nvml.nvmlInit_v2())
        count = ctypes.c_uint()
        self._ok(self.nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)))
        if count.value != 1 and index == 0:
            raise SystemExit(f"{count.value} GPUs visible to NVML: pass --nvml-index for the one CUDA uses")
        self.h = ctypes.c_void_p()
        self._ok(self.nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.h)))

    @staticmethod
    def _ok(rc: int):
        if rc != 0:
            raise RuntimeError(f"NVML call failed with code {rc}")

    def energy_j(self) -> float:
        mj = ctypes.c_ulonglong()
        self._ok(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.h, ctypes.byref(mj)))
        return mj.value / 1e3

    def sample(self) -> tuple[float, int]:
        mw, mhz = ctypes.c_uint(), ctypes.c_uint()
        self._ok(self.nvml.nvmlDeviceGetPowerUsage(self.h, ctypes.byref(mw)))
        self._ok(self.nvml.nvmlDeviceGetClockInfo(self.h, 1, ctypes.byref(mhz)))  # NVML_CLOCK_SM
        return mw.value / 1e3, mhz.value

    def limit_w(self) -> float:
        mw = ctypes.c_uint()
        self._ok(self.nvml.nvmlDeviceGetEnforcedPowerLimit(self.h, ctypes.byref(mw)))
        return mw.value / 1e3


def back_to_back(fn, seconds: float) -> int:
    """Call fn for about `seconds`, the host kept within a few calls of the GPU; -> calls."""
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
        if calls % 4 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return calls


def steady(board: Board, fn, seconds: float, warm_s: float) -> dict:
    """fn back to back for warm_s, then measured for `seconds`: ms and joules a call, watts, SM clock."""
    back_to_back(fn, warm_s)
    samples, stop = [], threading.Event()

    def sampler():
        while not stop.wait(0.05):
            samples.append(board.sample())

    thread = threading.Thread(target=sampler, daemon=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0 = board.energy_j()
    start.record()
    thread.start()
    calls = back_to_back(fn, seconds)
    end.record()
    torch.cuda.synchronize()
    e1 = board.energy_j()
    stop.set()
    thread.join()
    ms = start.elapsed_time(end)
    clocks = sorted(c for _, c in samples)
    return {"calls": calls, "ms": ms / calls, "j": (e1 - e0) / calls, "w": (e1 - e0) / (ms / 1e3),
            "sm_mhz_median": clocks[len(clocks) // 2] if clocks else None, "samples": len(samples)}  # fmt: skip


def idle(board: Board, seconds: float) -> dict:
    torch.cuda.synchronize()
    e0, t0 = board.energy_j(), time.perf_counter()
    time.sleep(seconds)
    return {"w": (board.energy_j() - e0) / (time.perf_counter() - t0)}


def gemm_calls(block, n: int, ctx_len: int, img_len: int, fp8: bool):
    """(a callable running every linear of `block` once on random inputs of its call's shape, [(name, rows)]):
    FP8 as the engines call `torch._scaled_mm` (input already quantized), bf16 through F.linear."""

    def rows(name: str) -> int:
        if name.endswith("_img"):
            return img_len
        return ctx_len if name in ("cross_attn.k", "cross_attn.v") else n

    gen = torch.Generator(device="cuda").manual_seed(3)
    kind = FP8Linear if fp8 else torch.nn.Linear
    work = [(name, mod, torch.randn(rows(name), mod.in_features, generator=gen, device="cuda"))
            for name, mod in block.named_modules() if isinstance(mod, kind)]  # fmt: skip
    if fp8:
        one = torch.ones((), device="cuda")
        work = [(name, mod, (x * 64).clamp(-448, 448).to(torch.float8_e4m3fn)) for name, mod, x in work]

        def run():
            for _, mod, x in work:
                torch._scaled_mm(x, mod.weight.t(), scale_a=one, scale_b=mod.weight_scale.float(),
                                 out_dtype=torch.bfloat16, use_fast_accum=mod.fast_accum)  # fmt: skip
    else:
        work = [(name, mod, x.bfloat16()) for name, mod, x in work]

        def run():
            for _, mod, x in work:
                F.linear(x, mod.weight, mod.bias)

    return run, [[name, x.shape[0]] for name, _, x in work]


def busy_fraction(fn, calls: int = 10) -> dict:
    """Profile `calls` back-to-back calls: the share of the span with at least one kernel running."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    spans = sorted((ev.time_range.start, ev.time_range.end) for ev in prof.events()
                   if ev.device_type.name == "CUDA" and ev.time_range.end > ev.time_range.start)  # fmt: skip
    busy, cur_s, cur_e = 0.0, *spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = spans[-1][1] - spans[0][0]
    return {"calls": calls, "kernels": len(spans), "span_ms": span / 1e3, "busy_ms": busy / 1e3,
            "busy_fraction": busy / span}  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument(
        "--size", default="81x544x720", help="frames x height x width (the speed table's request)"
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per workload")
    ap.add_argument("--warm-s", type=float, default=2.0, help="back-to-back warm-up before each measurement")
    ap.add_argument("--blocks", default=",".join(BLOCKS), help=f"block engines to build, of {list(BLOCKS)}")
    ap.add_argument("--rounds", type=int, default=2, help="measurements of each block, in turn")
    ap.add_argument("--nvml-index", type=int, default=0)
    ap.add_argument("--dir", default="/tmp/x2v-energy")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="energy", help="result file name (<name>-<card>.json)")
    args = ap.parse_args()
    from x2v.export import engines as E

    board = Board(args.nvml_index)
    frames, height, width = (int(v) for v in args.size.split("x"))
    cfg = load_model_config(args.model)
    cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, num_layers=1))
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    res = {"model": cfg.name, "size": args.size, "power_limit_w": board.limit_w(), "seconds": args.seconds,
           "warm_s": args.warm_s, "tile": TILE, "workloads": {}, "blocks": {}}  # fmt: skip
    torch.manual_seed(0)
    models = {"bf16": random_dit(cfg)}
    x = inputs(cfg, frames, height, width)
    shape = x["x"].shape
    run, outs = {}, {}
    with torch.no_grad():
        tokens, e, e0, ctx, cos, sin = models["bf16"].pre(*(x[a] for a in ORDER))
        n, heads, hd = tokens.shape[1], cfg.dit.num_heads, cfg.dit.head_dim
        res["tokens"] = n
        models["fp8"] = max_calibrated_fp8(models["bf16"], cfg, x)
        block_args = (tokens, e0, ctx, cos, sin)
        for name in args.blocks.split(","):
            kind, attn, fast = BLOCKS[name]
            model = models[kind].configure(torch.bfloat16, attn)
            for b in model.blocks:
                b.ffn[1] = GELUTanh()
                b.cross_attn.attn_impl = "sdpa"
            if kind == "fp8":
                configure_fp8(model, "cuda", fast_accum=fast)
            sage.TILE, sage.TRACED_QUANT = TILE, "kernels"
            with as_built(name):
                eager = model.blocks[0](*block_args).float()
                t0 = time.perf_counter()
                path = d / f"block-{name}.pt2"
                E.export_aoti(model, "block", shape, path, "cuda")
            blk = load_pt2(path)
            a = (*block_args, *E.engine_weights(model, "block"))
            outs[name] = blk(*a)
            res["blocks"][name] = {
                "build_s": time.perf_counter() - t0,
                "vs_eager": rel_err(outs[name].float(), eager),
            }
            run[f"block-{name}"] = lambda blk=blk, a=a: blk(*a)
            print(name, json.dumps(res["blocks"][name]), flush=True)
        if "fp8-sage" in outs and "fp8-sage-bf16-out" in outs:  # the same math, so the same bits
            a, b = outs["fp8-sage"], outs["fp8-sage-bf16-out"]
            res["fp8_out_vs_bf16_out"] = {"equal": bool(torch.equal(a, b)), **rel_err(a.float(), b.float())}
            print("fp8_out_vs_bf16_out", res["fp8_out_vs_bf16_out"], flush=True)
        del outs
        block = models["fp8"].blocks[0]
        run["gemms-fp8"], res["gemms_fp8"] = gemm_calls(block, n, ctx.shape[1] - cfg.dit.clip_tokens,
                                                        cfg.dit.clip_tokens, True)  # fmt: skip
        run["gemms-bf16"], res["gemms_bf16"] = gemm_calls(models["bf16"].blocks[0], n,
                                                          ctx.shape[1] - cfg.dit.clip_tokens, cfg.dit.clip_tokens,
                                                          False)  # fmt: skip
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (t.transpose(1, 2) for t in make_inputs(1, heads, n, hd, "realistic", gen))  # [B, H, L, D]
        txt, img = ctx.shape[1] - cfg.dit.clip_tokens, cfg.dit.clip_tokens
        sage.TILE = TILE
        attend = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)

        def cudnn(fn):  # the engines' SDPA calls ran cuDNN's kernels (block_engine-h200.json)
            def call():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    fn()

            return call

        run["sage"] = lambda: sage.sage_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        run["sdpa"] = cudnn(lambda: attend(q, k, v))
        run["cross"] = cudnn(
            lambda: (attend(q, k[:, :, :txt], v[:, :, :txt]), attend(q, k[:, :, :img], v[:, :, :img]))
        )
        res["workloads"]["idle"] = idle(board, 2.0)
        blocks = [k for k in run if k.startswith("block-")]
        for name in [k for k in run if k not in blocks]:
            res["workloads"][name] = steady(board, run[name], args.seconds, args.warm_s)
            print(name, json.dumps(res["workloads"][name]), flush=True)
            write_result(args.name, res, args.out)
        # the blocks in rounds, each round one further along, so that a drift of the board over the run (its
        # temperature) does not favour the ones measured first; the mean of the rounds
        rounds = {k: [] for k in blocks}
        for r in range(args.rounds):
            for name in blocks[r % len(blocks) :] + blocks[: r % len(blocks)]:
                rounds[name].append(steady(board, run[name], args.seconds, args.warm_s))
                print(name, r, json.dumps(rounds[name][-1]), flush=True)
        for name, rs in rounds.items():
            res["workloads"][name] = {u: sum(x[u] for x in rs) / len(rs) for u in ("ms", "j", "w")}
            res["workloads"][name]["rounds"] = rs
        first = next(iter(run))
        res["busy"] = {first: busy_fraction(run[first])}
        print("busy", json.dumps(res["busy"]), flush=True)
    w = res["workloads"]
    parts = {
        "fp8-sage": ("sage", "gemms-fp8"),
        "fp8-sdpa": ("sdpa", "gemms-fp8"),
        "bf16-sdpa": ("sdpa", "gemms-bf16"),
    }
    res["split"] = {}
    for name in res["blocks"]:
        attn, gemms = parts[name.removesuffix("-before").removesuffix("-bf16-out")]
        blk = w[f"block-{name}"]
        rest = {u: blk[u] - w[attn][u] - w[gemms][u] - w["cross"][u] for u in ("j", "ms")}
        res["split"][name] = {"block_j": blk["j"], "attention_j": w[attn]["j"], "gemms_j": w[gemms]["j"],
                              "cross_j": w["cross"]["j"], "rest_j": rest["j"], "block_ms": blk["ms"],
                              "rest_ms": rest["ms"], "w": blk["w"]}  # fmt: skip
    for name, other in (("fp8-sage", "fp8-sage-before"), ("fp8-sdpa", "fp8-sdpa-before"),
                        ("fp8-sage", "fp8-sage-bf16-out"), ("fp8-sage-bf16-out", "fp8-sage-before")):  # fmt: skip
        if name in res["split"] and other in res["split"]:
            new, old = res["split"][name], res["split"][other]
            res["split"][f"{name} / {other}"] = {u: new[u] / old[u] for u in ("block_j", "block_ms")}
    for name in ("fp8-sdpa", "fp8-sdpa-before"):
        if name in res["split"] and "bf16-sdpa" in res["split"]:
            f, b = res["split"][name], res["split"]["bf16-sdpa"]
            res["split"][f"{name} / bf16-sdpa"] = {
                "block_j": f["block_j"] / b["block_j"], "block_ms": f["block_ms"] / b["block_ms"],
                "without_attention_j": (f["block_j"] - f["attention_j"]) / (b["block_j"] - b["attention_j"]),
            }  # fmt: skip
    print("split", json.dumps(res["split"]), flush=True)
    print(f"wrote {write_result(args.name, res, args.out)}")


if __name__ == "__main__":
    main()
