"""x2v's SageAttention attention kernel at each tile config, at 1x40x32760x128, side by side with SDPA bf16.

    python bench/attention_tiles.py [--out DIR]     (writes attention_tiles-<card>.json)

Every tile config (BLOCK_M, warps, pipeline stages) runs fixed rather than autotuned, with the compiler's
register, spill and shared-memory counts and the accuracy against fp32 attention of the same inputs (4
heads); the quantization pass is timed once on its own. The loop variants of bench/NOTES.md (pipelined
Q.K^T, lazy rescaling, grouped accumulation, BLOCK_N 64, warp specialization) were measured by this script's
predecessor, bench/attention_variants.py at commits e3fa3c2 and 52206eb (results/attention_variants_loop-h200.json,
results/attention_variants-h200.json), and removed from the kernel when none was faster.
"""

from __future__ import annotations

import argparse

import torch

from bench.attention import make_inputs, reference, sdpa
from bench.common import rel_err, time_cuda, write_result
from x2v.plugins import sage_kernels as K
from x2v.plugins.sage_attention import attend, quantize_pass

# BLOCK_M, num_warps, num_stages, BLOCK_N, maxnreg. The last two: BLOCK_N 64 capped at 168 registers compiles
# with 16 bytes of spill and would fit 3 CTAs per SM instead of 2 (bench/sage_sass.py), to hide more latency.
CONFIGS = [(64, 4, 2, 128, None), (64, 4, 3, 128, None), (64, 4, 4, 128, None), (128, 8, 2, 128, None),
           (128, 8, 3, 128, None), (64, 4, 3, 64, 168), (64, 4, 4, 64, 168)]  # fmt: skip


def launch(packed, out, bm, warps, stages, bn, maxnreg):
    return attend(*packed, out, lambda f: f, K.attn_body, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                  num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shape", default="1,40,32760,128")
    args = ap.parse_args()
    b, h, n, d = map(int, args.shape.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = make_inputs(b, h, n, d, "realistic", gen)
    ref = reference(q, k, v, heads=4)
    flops = 4 * b * h * n * n * d
    t_sdpa = time_cuda(lambda: sdpa(q, k, v), reps=args.reps, hide_launch=True)
    packed = quantize_pass(q, k, v)
    t_quant = time_cuda(lambda: quantize_pass(q, k, v), reps=args.reps, hide_launch=True)
    print(f"sdpa {t_sdpa['median_ms']:.2f} ms, quantize {t_quant['median_ms']:.2f} ms", flush=True)
    rows = []
    for bm, warps, stages, bn, maxnreg in CONFIGS:
        row = {"block_m": bm, "num_warps": warps, "num_stages": stages, "block_n": bn, "maxnreg": maxnreg}
        out = torch.empty_like(q)
        try:
            kern = launch(packed, out, bm, warps, stages, bn, maxnreg)
        except Exception as e:  # a config the compiler rejects (shared memory, registers) is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(bm, warps, stages, bn, maxnreg, row["error"], flush=True)
            rows.append(row)
            continue
        row.update(n_regs=kern.n_regs, n_spills=kern.n_spills, shared=kern.metadata.shared)
        row["accuracy"] = rel_err(out[:, :, :4], ref)
        cfg = (out, bm, warps, stages, bn, maxnreg)
        t = time_cuda(lambda cfg=cfg: launch(packed, *cfg), reps=args.reps, hide_launch=True)
        total = t["median_ms"] + t_quant["median_ms"]
        row.update(attention=t, with_quantize_ms=total, speedup_vs_sdpa=t_sdpa["median_ms"] / total,
                   tops=flops / t["median_ms"] / 1e9)  # fmt: skip
        print(f"bm {bm:3d} w {warps} s {stages} bn {bn} maxnreg {maxnreg}: {t['median_ms']:.2f} ms ({row['tops']:.0f} TOPS) +quant = "
              f"{row['speedup_vs_sdpa']:.3f}x sdpa; regs {kern.n_regs} spills {kern.n_spills} smem "
              f"{kern.metadata.shared}; cos {row['accuracy']['cos']:.5f} rel {row['accuracy']['rel_l2']:.4f}", flush=True)  # fmt: skip
        rows.append(row)
    good = lambda r: "attention" in r and r["accuracy"]["cos"] >= 0.999 and r["accuracy"]["rel_l2"] <= 0.03  # noqa: E731
    best = min(filter(good, rows), key=lambda r: r["with_quantize_ms"], default=None)
    if best:
        print(f"best: {best['block_m']}/{best['num_warps']}/{best['num_stages']}/{best['block_n']}/{best['maxnreg']} {best['with_quantize_ms']:.2f} ms "
              f"= {best['speedup_vs_sdpa']:.3f}x sdpa")  # fmt: skip
    payload = {"shape": [b, h, n, d], "sdpa_bf16": t_sdpa, "quantize": t_quant, "rows": rows, "best": best,
               "flop_formula": "4*B*H*L^2*D"}  # fmt: skip
    print(f"wrote {write_result('attention_tiles', payload, args.out)}")


if __name__ == "__main__":
    main()
