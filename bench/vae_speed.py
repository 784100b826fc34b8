"""VAE encode and whole-frame decode at full size, per setting, side by side in one process.

    python bench/vae_speed.py [--model i2v-14b-480p] [--settings a,b] [--profile] [--out DIR]
    (writes vae_speed-<card>.json)

What the pipeline runs (encode of the first frame plus 80 zero frames, then the decode one latent frame at a
time) with random bf16 weights, in three settings: the default (export/vae.py as the runtime runs it on a GPU:
channels-last weights, so cuDNN runs NDHWC kernels on channels-last activations, and the RMS norm and SiLU
before each causal convolution fused into one Triton kernel that writes into the convolution's input buffer),
`channel_first` (the same with channel-first weights: cuDNN transposes around each convolution), and
`torch_norm` (channel-first, norm, SiLU and the convolutions' bias as torch ops: the VAE before either change,
but for the spatial padding, now the convolution's own), and `no_reuse` (the default without reusing a causal
convolution's result on repeated frames, CausalConv3d._steady: the encode before that change; its latents must
equal the default's bit for bit). Per setting: seconds of a first and a second call of each,
peak memory, and the outputs' error against the default's and against the same VAE in float32 with torch ops
(the official VAE's precision; before this commit the float32 run used the fused kernels too, in float32), so
a faster setting is also seen to be no less exact. `--profile` adds each decode's GPU
time by kernel kind.

Earlier settings, measured and dropped (bench/NOTES.md): `cudnn.benchmark` (no change), and every causal 3D
convolution as one 2D convolution over stacked frames (slower for every shape of the decode;
vae_speed_conv2d-h200.json, commit 1a0b5d3).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import kernel_breakdown, rel_err, timed_peaks, write_result
from x2v.export import vae as vae_module
from x2v.export.load import build
from x2v.export.make_checkpoint import random_tensors
from x2v.runtime.config import load_model_config

SETTINGS = {
    "default": True,
    "no_reuse": True,
    "channel_first": False,
    "torch_norm": False,
}  # name: channels-last weights
FUSED = vae_module.rms_silu, vae_module.add_bias_residual


def torch_rms_silu(x, norm, out=None, bias=None):
    y = F.silu(norm(x if bias is None else x + bias.view(1, -1, 1, 1, 1)))
    return y if out is None else out.copy_(y)


def torch_add_bias_residual(y, bias, h):
    return y.add_(bias.view(1, -1, 1, 1, 1)).add_(h)


def convolutions(fn) -> int:
    """How many causal convolutions one call of fn runs (CausalConv3d._steady skips repeated ones)."""
    count, conv = [0], vae_module.CausalConv3d._conv

    def counted(self, x, bias):
        count[0] += 1
        return conv(self, x, bias)

    vae_module.CausalConv3d._conv = counted
    try:
        fn()
    finally:
        vae_module.CausalConv3d._conv = conv
    return count[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument(
        "--profile", action="store_true", help="also each decode's and encode's GPU time by kernel"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    cfg = load_model_config(args.model)
    f, h, w = args.frames or cfg.sample.frames, cfg.sample.height, cfg.sample.width
    # weights at make-checkpoint's realistic scales (norm gammas near 1): activations keep their size through
    # the network, so the error against float32 means what it would on real weights
    vae = build("vae", cfg).to_empty(device=args.device)
    vae.load_state_dict(dict(random_tensors(vae, 0, torch.float32, args.device)))
    vae = vae.eval().requires_grad_(False)
    gen = torch.Generator(device=args.device).manual_seed(1)
    first = torch.rand(1, 3, 1, h, w, generator=gen, device=args.device) * 2 - 1
    video = torch.cat([first, first.new_zeros(1, 3, f - 1, h, w)], dim=2).to(torch.bfloat16)
    res = {"model": cfg.name, "video": [f, h, w], "settings": {}}
    torch_ops = torch_rms_silu, torch_add_bias_residual
    with torch.no_grad():
        # the float32 reference in torch ops (independent of the kernels timed), then bf16 for the settings
        vae_module.rms_silu, vae_module.add_bias_residual = torch_ops
        ref32 = {"latents": vae.encode(video.float())}
        ref32["video"] = vae.decode(ref32["latents"])
        vae = vae.to(torch.bfloat16)
        ref = {}
        for name in args.settings.split(","):
            channels_last = SETTINGS[name]
            vae_module.rms_silu, vae_module.add_bias_residual = torch_ops if name == "torch_norm" else FUSED
            if channels_last:
                vae.to_channels_last()
            else:
                for p in vae.parameters():
                    p.data = p.data.contiguous()
            vae.reuse_steady = name != "no_reuse"
            r = {}
            for call in ("first", "second"):
                z, r[f"encode_{call}"] = timed_peaks(lambda: vae.encode(video), cuda)
                z = z.to(torch.bfloat16)
                x, r[f"decode_{call}"] = timed_peaks(lambda z=z: vae.decode(z), cuda)
            if not ref:
                ref = {"latents": z.float(), "video": x.float()}
            r["latents_equal_default"] = torch.equal(z.float(), ref["latents"])
            r["latents_vs_default"] = rel_err(z.float(), ref["latents"])
            r["video_vs_default"] = rel_err(x.float(), ref["video"])
            r["latents_vs_fp32"] = rel_err(z.float(), ref32["latents"])
            r["video_vs_fp32"] = rel_err(x.float(), ref32["video"])
            r["encode_convolutions"] = convolutions(lambda: vae.encode(video))
            if args.profile and cuda:
                r["decode_kernels"] = kernel_breakdown(lambda z=z: vae.decode(z), top=16)
                r["encode_kernels"] = kernel_breakdown(lambda: vae.encode(video), top=8)
            res["settings"][name] = r
            print(name, {k: v for k, v in r.items() if not k.endswith("_kernels")}, flush=True)
            if "decode_kernels" in r:
                print(
                    "  decode by kind (ms):",
                    {k: round(v, 1) for k, v in r["decode_kernels"]["by_kind_ms"].items()},
                )
                for row in r["decode_kernels"]["top_ms"]:
                    print(f"    {row['ms']:8.1f} {row['kind']:12s} {row['kernel'][:100]}")
            write_result("vae_speed", res, args.out)
        vae_module.rms_silu, vae_module.add_bias_residual = FUSED
    print(f"wrote {write_result('vae_speed', res, args.out)}")


if __name__ == "__main__":
    main()
