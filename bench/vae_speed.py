"""VAE encode and whole-frame decode at full size, per convolution setting, side by side in one process.

    python bench/vae_speed.py [--model i2v-14b-480p] [--out DIR]     (writes vae_speed-<card>.json)

What the pipeline runs (encode of the first frame plus 80 zero frames, then the decode one latent frame at a
time) with random bf16 weights, in four settings, in this order: the default (channel-first tensors, cuDNN's
heuristic algorithm), channels-last-3d weights (cuDNN's NDHWC kernels), then with `cudnn.benchmark` on
(cuDNN times its algorithms on each new shape, so the first call pays for the search) for both formats.
Per setting: seconds of a first and a second call of each, peak memory, and the outputs' error against the
default's (different algorithms round differently in bf16).
"""

from __future__ import annotations

import argparse

import torch

from bench.common import random_part, rel_err, timed_peaks, write_result
from x2v.runtime.config import load_model_config

FORMATS = {
    (5, True): torch.channels_last_3d,
    (4, True): torch.channels_last,
    (5, False): torch.contiguous_format,
    (4, False): torch.contiguous_format,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    cfg = load_model_config(args.model)
    f, h, w = args.frames or cfg.sample.frames, cfg.sample.height, cfg.sample.width
    vae = random_part("vae", cfg, args.device)
    gen = torch.Generator(device=args.device).manual_seed(1)
    first = torch.rand(1, 3, 1, h, w, generator=gen, device=args.device) * 2 - 1
    video = torch.cat([first, first.new_zeros(1, 3, f - 1, h, w)], dim=2).to(torch.bfloat16)
    res = {"model": cfg.name, "video": [f, h, w], "settings": {}}
    ref = {}
    with torch.no_grad():
        for name, channels_last, benchmark in (
            ("default", False, False),
            ("channels_last", True, False),
            ("benchmark", False, True),
            ("channels_last+benchmark", True, True),
        ):
            torch.backends.cudnn.benchmark = benchmark
            fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
            for p in vae.parameters():  # Conv3d weights NDHWC, the Resample's Conv2d weights NHWC
                if p.dim() in (4, 5):
                    p.data = p.data.contiguous(memory_format=FORMATS[p.dim(), channels_last])
            r = {}
            v = video.contiguous(memory_format=fmt)
            for call in ("first", "second"):
                z, r[f"encode_{call}"] = timed_peaks(lambda v=v: vae.encode(v), cuda)
                z = z.to(torch.bfloat16).contiguous(memory_format=fmt)
                x, r[f"decode_{call}"] = timed_peaks(lambda z=z: vae.decode(z), cuda)
            if not ref:
                ref = {"latents": z.float(), "video": x.float()}
            r["latents_vs_default"] = rel_err(z.float(), ref["latents"])
            r["video_vs_default"] = rel_err(x.float(), ref["video"])
            res["settings"][name] = r
            print(name, r, flush=True)
            write_result("vae_speed", res, args.out)
    print(f"wrote {write_result('vae_speed', res, args.out)}")


if __name__ == "__main__":
    main()
