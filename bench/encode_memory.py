"""The encode phase's GPU memory at full size: allocated against reserved, per streaming setting.

    python bench/encode_memory.py [--model i2v-14b-480p] [--gpu h200] [--out DIR]   (encode_memory-<card>.json)

The fp8 table rows reserve 27.9 GB in the encode phase for 21.4 GB allocated (commit c755742); the driver
peaks at 28.7 GB, over the 24 GB a 4090 has. This runs `Pipeline.encode` as the engine pipeline does (umT5
and CLIP streamed from pinned host memory, the VAE resident, the GPU config's allocator settings) at the
model's sample size with random weights, beside a stand-in for the DiT's resident FP8 weights, once per
setting, each in a process of its own (the allocator's settings and cache are per process):
  - unbounded: the streamed encoders' host runs ahead of the GPU, and encode keeps their side-stream cache
    (the code before commit 746094a: `stream(bounded=False)`, `torch.cuda.empty_cache` patched out of encode);
  - bounded: the host waits for unit i-1 once unit i is queued, encode still keeps the cache;
  - current: bounded, and encode hands the encoders' cache back before the VAE encode;
  - no_reuse: current without the VAE encode's reuse of repeated frames (CausalConv3d._steady; before 640658b);
  - overlap: current (umT5 on a stream and thread of its own beside CLIP and the VAE encode) against serial (the
    three one after the other, as before this setting was added), alternated in one process for `--rounds`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SETTINGS = ("unbounded", "bounded", "current", "no_reuse", "overlap")
DIT_GB = 16.6  # the FP8 DiT's weights on the GPU in the fp8 rows (table/h200/fp8.json load profile)


def child(model: str, gpu_name: str, setting: str, device: str) -> dict:
    import torch

    from bench.common import random_part, timed_peaks
    from x2v.runtime.config import load_gpu_config, load_model_config
    from x2v.runtime.offload import configure_allocator, stream, stream_units
    from x2v.runtime.pipeline import Pipeline

    cfg, gpu = load_model_config(model), load_gpu_config(gpu_name)
    cuda = device == "cuda"
    if cuda:
        configure_allocator(gpu.expandable_segments)
        # Allocated first, as the engine load does: the encoders' and VAE's blocks come after it.
        dit = torch.empty(int(DIT_GB * 1e9), dtype=torch.uint8, device=device)
    dtype = torch.bfloat16 if cuda else torch.float32  # Pipeline's compute dtype
    parts = {"vae": random_part("vae", cfg, device).to(dtype)}
    for part in ("t5", "clip"):
        module = random_part(part, cfg, device).to("cpu", dtype)  # random on the GPU (fast), then to the host
        parts[part] = stream(module, stream_units(part, module), device, bounded=setting != "unbounded")
    text_len = cfg.dit.text_len
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.t5.vocab, (2, text_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, 64:] = 0  # prompts are short: what a real tokenizer's padding gives
    parts["tokenizer"] = lambda texts: (ids[: len(texts)], mask[: len(texts)])
    pipe = Pipeline(cfg, parts, device)
    if setting in ("unbounded", "bounded"):
        pipe._release_cache = lambda: None
    parts["vae"].reuse_steady = setting != "no_reuse"
    f, h, w = cfg.sample.frames, cfg.sample.height, cfg.sample.width
    image = torch.rand(3, h, w, generator=gen) * 2 - 1
    res = {"setting": setting, "video": [f, h, w], "dit_stand_in_gb": DIT_GB if cuda else 0.0}
    if setting == "overlap":
        return res | alternate(pipe, (image, "a prompt", "a negative prompt", f, h, w), cuda)
    for run in ("warmup", "encode"):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # each run's reserve from the same start
        _, r = timed_peaks(lambda: pipe.encode(image, "a prompt", "a negative prompt", f, h, w), cuda)
        res[run] = r
        print(setting, run, r, file=sys.stderr, flush=True)
    if cuda:
        del dit
    return res


def serial(fn, laps, lap):
    """Pipeline._beside as it was: fn runs now, on the current stream."""
    import time

    t0 = time.perf_counter()
    out = fn()
    laps[lap] = time.perf_counter() - t0
    return lambda: out


def pinned_flag_reads():
    """frames_differ_cuda with its flag read through pinned host memory (an async copy and a stream sync) instead
    of .item()'s pageable copy."""
    import torch

    import x2v.export.vae_kernels as vk

    plain = vk.frames_differ_cuda
    host = torch.empty(1, dtype=torch.int32, pin_memory=torch.cuda.is_available())

    def differ(x, ref):
        b, c, t, h, w = x.shape
        flag = torch.zeros(1, dtype=torch.int32, device=x.device)
        n = c * h * w
        vk.frames_differ_kernel[(vk.triton.cdiv(n, 4096), b)](
            x, ref, flag, n, t, x.stride(0), x.stride(2), ref.stride(0), BLOCK=4096, num_warps=8
        )
        host.copy_(flag, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return bool(host.item())

    return plain, differ


def alternate(pipe, request: tuple, cuda: bool, rounds: int = 3) -> dict:
    """Encodes in turn (a warm-up of each first): seconds, peaks, parts, equal results. serial: umT5 first, as
    before the overlap; overlap: the pipeline's; _switch: with Python's thread switch interval at 0.1 ms instead of
    5 ms (the VAE encode's host hands its flags over 263 times, each time taking the GIL back from umT5's thread);
    _pinned: the VAE's flags read through pinned memory (.item() copies to pageable memory); _no_reuse: without
    the VAE encode's repeated-frame reuse (no flags at all)."""
    import contextlib
    import statistics

    import torch

    import x2v.export.vae_kernels as vk
    from bench.common import timed_peaks

    overlapped = pipe._beside
    plain, pinned = pinned_flag_reads()

    @contextlib.contextmanager
    def setting(name):
        pipe._beside = serial if name.startswith("serial") else overlapped
        interval = sys.getswitchinterval()
        if name.endswith("_switch"):
            sys.setswitchinterval(1e-4)
        if name.endswith("_pinned"):
            vk.frames_differ_cuda = pinned
        pipe.vae.reuse_steady = not name.endswith("_no_reuse")
        try:
            yield
        finally:
            pipe._beside, vk.frames_differ_cuda, pipe.vae.reuse_steady = overlapped, plain, True
            sys.setswitchinterval(interval)

    names = ("serial", "overlap", "overlap_switch", "overlap_pinned", "serial_no_reuse", "overlap_no_reuse")
    runs, ref = {n: [] for n in names}, None
    for i in range(rounds + 1):
        for name in names:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            laps = {}
            with setting(name):
                out, r = timed_peaks(lambda laps=laps: pipe.encode(*request, laps=laps), cuda)
            r |= laps
            cond = out[0]
            ref = ref or (cond.context, cond.y)
            r["same_as_first"] = bool(torch.equal(cond.context, ref[0]) and torch.equal(cond.y, ref[1]))
            print(name, i, r, file=sys.stderr, flush=True)
            if i:
                runs[name].append(r)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
           for n, rs in runs.items()}  # fmt: skip
    return {"runs": runs, "median": med, "profile": profile(pipe, request) if cuda else None}


def profile(pipe, request) -> dict:
    """One overlapped encode under torch.profiler: per thread, the CUDA runtime/driver calls that took longest
    in all; per stream, kernel time and the span from first to last kernel."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe.encode(*request)
        torch.cuda.synchronize()
    calls, streams = collections.defaultdict(float), collections.defaultdict(lambda: [0.0, None, None, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            st = streams[f"stream {getattr(e, 'device_resource_id', '?')}"]
            st[0] += e.time_range.elapsed_us() / 1e3
            st[1] = e.time_range.start if st[1] is None else min(st[1], e.time_range.start)
            st[2] = e.time_range.end if st[2] is None else max(st[2], e.time_range.end)
            st[3] += 1
        elif e.name.startswith(("cuda", "cu")) and not e.name.startswith("cudnn"):
            calls[(e.thread, e.name)] += e.time_range.elapsed_us() / 1e3
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:20]
    out = {
        "runtime_calls_ms": [{"thread": t, "call": n, "ms": ms} for (t, n), ms in top],
        "streams": {
            k: {"kernel_ms": v[0], "span_ms": (v[2] - v[1]) / 1e3, "kernels": v[3]}
            for k, v in streams.items()
        },
    }
    print(out, file=sys.stderr, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--gpu", default="h200", help="GPU config whose allocator settings apply")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--child", default=None, choices=SETTINGS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.gpu, args.child, args.device)))
        return
    from bench.common import write_result

    res = {"model": args.model, "gpu_config": args.gpu, "runs": []}
    for setting in args.settings.split(","):
        cmd = [sys.executable, "-m", "bench.encode_memory", "--child", setting, "--model", args.model,
               "--gpu", args.gpu, "--device", args.device]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(out.stderr[-2000:])
        if out.returncode:
            raise SystemExit(f"{setting}: the child process failed (exit {out.returncode}), see above")
        res["runs"].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(res["runs"], indent=1))
    if args.device == "cuda":
        print(f"wrote {write_result('encode_memory', res, args.out)}")


if __name__ == "__main__":
    main()
