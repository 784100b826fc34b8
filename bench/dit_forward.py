"""One full-size Wan2.1 DiT forward on one GPU, random weights with realistic scales (same FLOPs).

    python bench/dit_forward.py [--model i2v-14b-480p] [--out DIR]   (writes dit_forward-<card>.json)

Times the bf16 model with SDPA and with x2v's SageAttention in the same run, on the same inputs, and
records peak memory and the output difference between the two.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import rel_err, time_cuda, write_result
from x2v.export.load import build
from x2v.export.make_checkpoint import _std
from x2v.runtime.config import load_model_config


def random_dit(cfg, dtype=torch.bfloat16, seed=0):
    """The DiT with random weights drawn on the GPU (no checkpoint on disk needed for a speed check)."""
    model = build("dit", cfg).to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for key, p in model.state_dict().items():
            mean, std = _std(key, tuple(p.shape))
            p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * std + mean)
    return model.to(dtype).eval().requires_grad_(False)


def inputs(cfg, frames=81, height=480, width=832, batch=1, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")
    t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    d = cfg.dit
    args = dict(x=r(batch, 16, t, h, w), t=torch.full((batch,), 900.0, device="cuda"),
                context=r(batch, d.text_len, d.text_dim).bfloat16())  # fmt: skip
    if d.i2v:
        args.update(
            clip_fea=r(batch, d.clip_tokens, d.clip_dim).bfloat16(), y=r(batch, d.in_dim - 16, t, h, w)
        )
    return args


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = load_model_config(args.model)
    t0 = time.perf_counter()
    model = random_dit(cfg)
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    x = inputs(cfg, args.frames, cfg.sample.height, cfg.sample.width)
    tokens = model.grid(x["x"].shape)
    result = {"model": cfg.name, "tokens": tokens[0] * tokens[1] * tokens[2], "weights_gb": sum(
        p.numel() * p.element_size() for p in model.parameters()) / 1e9, "init_s": init_s, "runs": {}}  # fmt: skip
    outs = {}
    with torch.no_grad():
        for attn in ("sdpa", "sage"):
            model.configure(dtype=torch.bfloat16, attn=attn)
            torch.cuda.reset_peak_memory_stats()
            timing = time_cuda(lambda: model(**x), warmup=1, reps=args.reps)
            timing["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            outs[attn] = model(**x).float()
            result["runs"][attn] = timing
            print(
                f"{attn}: {timing['median_ms'] / 1000:.3f} s a forward, peak {timing['peak_gb']:.1f} GB",
                flush=True,
            )
    result["sage_vs_sdpa"] = rel_err(outs["sage"], outs["sdpa"])
    result["speedup"] = result["runs"]["sdpa"]["median_ms"] / result["runs"]["sage"]["median_ms"]
    print(f"sage/sdpa speedup {result['speedup']:.3f}x, output diff {result['sage_vs_sdpa']}")
    print(f"wrote {write_result('dit_forward', result, args.out)}")


if __name__ == "__main__":
    main()
