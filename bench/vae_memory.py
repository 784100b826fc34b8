"""The VAE's GPU memory at full size, per CUDA allocator setting: allocated against reserved.

    python bench/vae_memory.py [--model i2v-14b-480p] [--out DIR]     (writes vae_memory-<card>.json)

The fp8 table row (commit a864666) peaked at 21.8 GB allocated but 30.7 GB reserved, all of the gap in the
encode phase, whose big allocations are the VAE encode of the 81-frame conditioning video (chunks of 1, then
4 frames, with a causal cache). This runs what the pipeline runs there (encode of the first frame plus
zeros, then the tiled and the untiled decode) at the model's sample size with random weights, once per
allocator setting, each in a process of its own (a setting holds for the allocator's lifetime): peak
allocated and reserved per call, and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {"default": "", "expandable": "expandable_segments:True"}


def child(model: str, device: str) -> dict:
    import torch

    from bench.common import random_part, timed_peaks
    from x2v.runtime.config import load_model_config

    cfg = load_model_config(model)
    cuda = device == "cuda"
    vae = random_part("vae", cfg, device)
    gen = torch.Generator(device=device).manual_seed(1)
    f, h, w = cfg.sample.frames, cfg.sample.height, cfg.sample.width
    first = torch.rand(1, 3, 1, h, w, generator=gen, device=device) * 2 - 1
    video = torch.cat([first, first.new_zeros(1, 3, f - 1, h, w)], dim=2).to(torch.bfloat16)
    res = {"video": [f, h, w]}

    def measure(name, fn):
        out, r = timed_peaks(fn, cuda)
        res[name] = r
        print(name, r, file=sys.stderr, flush=True)
        return out

    with torch.no_grad():
        measure("encode_warmup", lambda: vae.encode(video))
        z = measure("encode", lambda: vae.encode(video))
        z = z.to(torch.bfloat16)
        measure("decode_tiled", lambda: vae.decode_tiled(z, tile=32))
        if cuda:
            torch.cuda.empty_cache()
        measure("decode", lambda: vae.decode(z))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.device)))
        return
    from bench.common import write_result

    res = {"model": args.model, "settings": {}}
    for name, setting in SETTINGS.items():
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=setting)
        proc = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--device", args.device],
                              env=env, capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            raise SystemExit(f"{name}: the child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res["settings"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, res["settings"][name], flush=True)
    print(f"wrote {write_result('vae_memory', res, args.out)}")


if __name__ == "__main__":
    main()
