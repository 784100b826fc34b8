"""VAE encode and whole-frame decode at full size, per convolution setting, side by side in one process.

    python bench/vae_speed.py [--model i2v-14b-480p] [--settings a,b] [--out DIR]   (writes vae_speed-<card>.json)

What the pipeline runs (encode of the first frame plus 80 zero frames, then the decode one latent frame at a
time) with random bf16 weights, in four settings, in this order: the default (channel-first tensors, cuDNN's
heuristic algorithm), channels-last-3d weights (cuDNN's NDHWC kernels), then with `cudnn.benchmark` on
(cuDNN times its algorithms on each new shape, so the first call pays for the search) for both formats.
Per setting: seconds of a first and a second call of each, peak memory, and the outputs' error against the
default's (different algorithms round differently in bf16).

Two more settings run every causal 3D convolution as one 2D convolution: the kt frames each output frame sees
are stacked along channels (a copy of kt times the input), the weight reshaped to [out, kt * in, kh, kw]; the
same sums in another order (`conv2d`: NCHW, `conv2d_nhwc`: stacked straight into NHWC). cuDNN's 2D kernels are
its most tuned; its 3D ones ran the VAE at about 170 TFLOP/s (bench/NOTES.md). `--shapes` also times each
distinct convolution of the decode alone, 3D against stacked 2D, with its count in one decode.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

import torch
import torch.nn.functional as F

from bench.common import random_part, rel_err, time_cuda, timed_peaks, write_result
from x2v.export.load import build
from x2v.export.vae import CausalConv3d
from x2v.runtime.config import load_model_config

SETTINGS = {  # name: (channels-last weights, cudnn.benchmark, 2D convolutions: None, "nchw" or "nhwc")
    "default": (False, False, None),
    "channels_last": (True, False, None),
    "benchmark": (False, True, None),
    "channels_last+benchmark": (True, True, None),
    "conv2d": (False, False, "nchw"),
    "conv2d_nhwc": (False, False, "nhwc"),
}


def stacked_conv2d(x, weight, bias, stride, layout: str):
    """F.conv3d(x, weight, bias, stride) (no padding) as one conv2d over the frames each output frame sees."""
    b, c, t, h, w = x.shape
    co, ci, kt, kh, kw = weight.shape
    to = (t - kt) // stride[0] + 1
    taps = torch.stack([x[:, :, i : i + stride[0] * (to - 1) + 1 : stride[0]] for i in range(kt)], dim=1)
    w2 = weight.transpose(1, 2).reshape(co, kt * ci, kh, kw)  # [out, kt, in, kh, kw]: tap-major, as stacked
    if (
        layout == "nhwc"
    ):  # [b, kt, c, to, h, w] -> [b * to, h, w, kt * c], seen as NCHW with channels-last strides
        xs = taps.permute(0, 3, 4, 5, 1, 2).reshape(b * to, h, w, kt * c).permute(0, 3, 1, 2)
        w2 = w2.contiguous(memory_format=torch.channels_last)
    else:
        xs = taps.permute(0, 3, 1, 2, 4, 5).reshape(b * to, kt * c, h, w)
    y = F.conv2d(xs, w2, bias, stride=stride[1:])
    return y.unflatten(0, (b, to)).transpose(1, 2)


def use_conv2d(layout: str | None) -> None:
    """Route every CausalConv3d's convolution through stacked_conv2d (None: back to nn.Conv3d's)."""
    if layout is None:
        CausalConv3d._conv_forward = torch.nn.Conv3d._conv_forward
    else:
        CausalConv3d._conv_forward = lambda self, x, w, b: stacked_conv2d(x, w, b, self.stride, layout)


def conv_shapes(vae, z) -> Counter:
    """(input shape, weight shape, stride) of every convolution one decode of z runs, with counts; vae on the
    meta device (as `build` makes it), so nothing is computed."""
    seen = Counter()

    def record(self, x, w, b):
        seen[tuple(x.shape), tuple(w.shape), tuple(self.stride)] += 1
        return torch.nn.Conv3d._conv_forward(self, x, w, b)

    CausalConv3d._conv_forward = record
    try:
        vae.decode(z.to("meta"))
    finally:
        use_conv2d(None)
    return seen


def time_shapes(shapes: Counter, device: str) -> list:
    rows = []
    for (xs, ws, stride), n in shapes.most_common():
        x = torch.randn(xs, device=device, dtype=torch.bfloat16)
        w = torch.randn(ws, device=device, dtype=torch.bfloat16) * 0.02
        ref = F.conv3d(x, w, None, stride).float()
        # one multiply-add per output element and weight of its filter
        flop = 2 * ref.numel() * math.prod(ws[1:])
        r = {"input": xs, "weight": ws, "stride": stride, "count": n, "gflop": flop / 1e9}
        for name, fn in (
            ("conv3d", lambda x=x, w=w, s=stride: F.conv3d(x, w, None, s)),
            ("conv2d", lambda x=x, w=w, s=stride: stacked_conv2d(x, w, None, s, "nchw")),
            ("conv2d_nhwc", lambda x=x, w=w, s=stride: stacked_conv2d(x, w, None, s, "nhwc")),
        ):
            r[f"{name}_ms"] = time_cuda(fn, 2, 5)["median_ms"] if device == "cuda" else None
            r[f"{name}_vs_conv3d"] = rel_err(fn().float(), ref)["rel_l2"]
        rows.append(r)
        print("shape", r, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--shapes", action="store_true", help="also time each distinct convolution of the decode")
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
        for name in args.settings.split(","):
            channels_last, benchmark, conv2d = SETTINGS[name]
            use_conv2d(conv2d)
            torch.backends.cudnn.benchmark = benchmark
            fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
            for p in vae.parameters():  # Conv3d weights NDHWC, the Resample's Conv2d weights NHWC
                if p.dim() in (4, 5):
                    last = torch.channels_last_3d if p.dim() == 5 else torch.channels_last
                    p.data = p.data.contiguous(
                        memory_format=last if channels_last else torch.contiguous_format
                    )
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
        use_conv2d(None)
        if args.shapes:
            z = torch.zeros(1, cfg.vae.z_dim, (f - 1) // 4 + 1, h // 8, w // 8, dtype=torch.bfloat16)
            res["decode_convolutions"] = time_shapes(
                conv_shapes(build("vae", cfg).to(torch.bfloat16), z), args.device
            )
            write_result("vae_speed", res, args.out)
    print(f"wrote {write_result('vae_speed', res, args.out)}")


if __name__ == "__main__":
    main()
