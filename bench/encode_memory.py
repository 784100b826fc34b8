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
  - no_reuse: current without the VAE encode's reuse of repeated frames (CausalConv3d._steady; before 640658b).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SETTINGS = ("unbounded", "bounded", "current", "no_reuse")
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
