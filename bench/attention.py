"""SageAttention kernel vs SDPA bf16 at Wan shapes, on one GPU: accuracy and speed, side by side.

    python bench/attention.py [--out DIR]     (writes attention-<card>.json)

Accuracy is against fp32 attention of the same inputs, on fresh inputs per check, for two input kinds:
`realistic` (K with a large shared per-channel offset, Q with outlier channels, V with channel offsets)
and `gaussian` (unit normal). Times include the quantization pass; the op runs autotuned (`sage`) and at the
tile this card's GPU config pins for the engines (`sage_pinned`, what export/build.py compiles in). Times are
the GPU's: a GPU sleep queued before each timed call lets the host queue every launch first (the op is
eight launches, SDPA one); `sage_host_launch_counted` is the op timed with the host's launch latency inside,
as this script timed everything until commit 0a7f5ca.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import rel_err, time_cuda, write_result
from x2v.plugins import sage_attention as sage
from x2v.plugins.sage_attention import quantize_pass, sage_attention
from x2v.runtime.config import current_gpu, gpu_config_of

SHAPES = [
    (1, 40, 32760, 128),
    (1, 40, 75600, 128),
    (1, 12, 32760, 128),
    (2, 40, 32760, 128),
    (1, 40, 32760, 64),
]


def make_inputs(b, h, n, d, kind: str, gen):
    r = lambda: torch.randn(b, n, h, d, device="cuda", generator=gen)
    q, k, v = r(), r(), r()
    if kind == "realistic":
        q[..., : d // 32] *= 8  # a few outlier channels
        k = k + 6 * torch.randn(1, 1, h, d, device="cuda", generator=gen)  # shared per-channel offset
        v = v + 2 * torch.randn(1, 1, h, d, device="cuda", generator=gen)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )


def reference(q, k, v, heads: int):
    """fp32 attention of the first `heads` heads (memory-efficient kernel; the full score matrix never exists)."""
    sl = slice(0, heads)
    return sdpa(q[:, :, sl].float(), k[:, :, sl].float(), v[:, :, sl].float())


def pinned_tile() -> tuple[str | None, dict | None]:
    """(GPU config name, its sage_tile) for the card in use."""
    cfg = gpu_config_of(*current_gpu())
    return (None, None) if cfg is None else (cfg.name, cfg.sage_tile)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    gpu, tile = pinned_tile()
    print(f"GPU config {gpu}: sage_tile {tile}")
    rows = []
    for b, h, n, d in SHAPES:
        row = {"shape": [b, h, n, d], "accuracy": {}}
        for kind in ("realistic", "gaussian"):
            q, k, v = make_inputs(b, h, n, d, kind, gen)
            ref = reference(q, k, v, heads=4)
            out = sage_attention(q, k, v)
            row["accuracy"][kind] = {
                "sage": rel_err(out[:, :, :4], ref),
                "sdpa_bf16": rel_err(sdpa(q, k, v)[:, :, :4], ref),
            }
            del ref, out
        flops = 4 * b * h * n * n * d
        timing = dict(reps=args.reps, hide_launch=True)
        t_sdpa = time_cuda(lambda q=q, k=k, v=v: sdpa(q, k, v), **timing)
        with sage.pinned_tile(sage.AUTOTUNE):  # eager calls would take the card's configured tile
            t_sage = time_cuda(lambda q=q, k=k, v=v: sage_attention(q, k, v), **timing)
            t_host = time_cuda(lambda q=q, k=k, v=v: sage_attention(q, k, v), reps=args.reps)
        t_quant = time_cuda(lambda q=q, k=k, v=v: quantize_pass(q, k, v), **timing)
        with sage.pinned_tile(tile):
            t_pin = time_cuda(lambda q=q, k=k, v=v: sage_attention(q, k, v), **timing) if tile else None
        row.update(sdpa_bf16=t_sdpa, sage=t_sage, sage_host_launch_counted=t_host, sage_quantize_only=t_quant,
                   speedup=t_sdpa["median_ms"] / t_sage["median_ms"],
                   sdpa_tflops=flops / t_sdpa["median_ms"] / 1e9, sage_tflops=flops / t_sage["median_ms"] / 1e9)  # fmt: skip
        if t_pin:
            row.update(sage_pinned=t_pin, speedup_pinned=t_sdpa["median_ms"] / t_pin["median_ms"])
        rows.append(row)
        a = row["accuracy"]
        print(f"{b}x{h}x{n}x{d}: sdpa {t_sdpa['median_ms']:.2f} ms ({row['sdpa_tflops']:.0f} TF/s), sage {t_sage['median_ms']:.2f} ms "
              f"({row['sage_tflops']:.0f} TF/s, quantize {t_quant['median_ms']:.2f} ms) = {row['speedup']:.3f}x; realistic cos {a['realistic']['sage']['cos']:.5f} "
              f"rel {a['realistic']['sage']['rel_l2']:.4f}; gaussian cos {a['gaussian']['sage']['cos']:.5f} "
              f"rel {a['gaussian']['sage']['rel_l2']:.4f}", flush=True)  # fmt: skip
        print(f"  with the host's launches inside the timing: sage {t_host['median_ms']:.2f} ms", flush=True)
        if t_pin:
            print(
                f"  pinned tile: sage {t_pin['median_ms']:.2f} ms = {row['speedup_pinned']:.3f}x", flush=True
            )
        del q, k, v
        torch.cuda.empty_cache()
    # The same op under torch.compile must give the eager result (it traces the Triton kernels).
    q, k, v = make_inputs(1, 4, 4096, 128, "realistic", gen)
    compiled = torch.compile(lambda a, b_, c: sage_attention(a, b_, c), fullgraph=True)
    diff = (compiled(q, k, v).float() - sage_attention(q, k, v).float()).abs().max().item()
    same = {"max_abs_diff": diff, "bit_identical": diff == 0.0}
    print(f"torch.compile vs eager: max abs diff {diff:.3g} (autotuning may pick another tile config)")
    path = write_result("attention", {"rows": rows, "compile_matches_eager": same, "flop_formula": "4*B*H*L^2*D",
                                      "gpu_config": gpu, "pinned_tile": tile}, args.out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
