"""SageAttention with part of the softmax's exp2 on the FMA pipe instead of MUFU, side by side with SDPA.

    python bench/attention_exp2.py [--out DIR]     (writes attention_exp2-<card>.json)

Why: per score the kernel's key loop issues one MUFU exp2, and MUFU runs 16 lanes a clock per SM: at INT8/FP8
tensor rates the MMAs (~0.068 clock per score per SM at the datasheet rate), MUFU (0.0625) and the issue slots
(0.070 at 569 instructions per key block) are about equal, and the measured loop (~0.15) is near the MMA and
MUFU times added. `EXP2_POLY` 4 (2) moves a quarter (half) of each tile's exp2s to a degree-3 polynomial
(sage_kernels._exp2_fma, ~7 FMA/ALU instructions each): 682 (796) instructions per key block instead of 569,
MUFU 50 (34) instead of 66 (bench/sage_sass.py --poly). Whether that pays depends on which unit bounds the
loop; this measures it, alone and between one block's FP8 GEMMs (the engines' power-limited context,
bench/NOTES.md "The power limit").

Per variant: accuracy against fp32 attention (realistic and Gaussian inputs, 4 heads) and against the exp2
kernel's output, registers/spills, and GPU time (medians; variants interleaved round by round, alone and
between GEMMs), each with the quantization pass added for the ratio to SDPA.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.attention import make_inputs, reference, sdpa
from bench.attention_context import gemms_of_a_block, timed
from bench.common import event_ms, rel_err, time_cuda, write_result
from x2v.plugins import sage_kernels as K
from x2v.plugins.sage_attention import attend, quantize_pass

TILE = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}
POLYS = (0, 4, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--shapes", default="1,40,32760,128;1,40,75600,128")
    args = ap.parse_args()
    res = {"tile": TILE, "shapes": {}}
    for shape in args.shapes.split(";"):
        b, h, n, d = map(int, shape.split(","))
        gen = torch.Generator(device="cuda").manual_seed(0)
        r = {"variants": {}}
        runs = {}
        for kind in ("realistic", "gaussian"):
            q, k, v = make_inputs(b, h, n, d, kind, gen)
            ref = reference(q, k, v, heads=4)
            packed = quantize_pass(q, k, v)
            base = None
            for poly in POLYS:
                out = torch.empty_like(q)
                kern = attend(*packed, out, lambda f: f, K.attn_body, EXP2_POLY=poly, **TILE)
                row = r["variants"].setdefault(str(poly), {"n_regs": kern.n_regs, "n_spills": kern.n_spills})
                row[f"accuracy_{kind}"] = rel_err(out[:, :, :4], ref)
                if base is None:
                    base = out
                else:
                    row[f"vs_exp2_{kind}"] = rel_err(out, base)
                if kind == "realistic":
                    runs[poly] = lambda out=out, poly=poly, p=packed: attend(
                        *p, out, lambda f: f, K.attn_body, EXP2_POLY=poly, **TILE
                    )
        qkv = (q, k, v)
        r["sdpa_ms"] = time_cuda(lambda qkv=qkv: sdpa(*qkv), reps=args.reps, hide_launch=True)["median_ms"]
        r["quantize_ms"] = time_cuda(lambda qkv=qkv: quantize_pass(*qkv), reps=args.reps, hide_launch=True)[
            "median_ms"
        ]
        # alone: every variant once a round, in turn (the card's clock drifts between sequential timings)
        times = {p: [] for p in runs}
        for fn in runs.values():
            fn()
        for _ in range(args.reps):
            for p, fn in runs.items():
                times[p].append(event_ms(fn, hide_launch=True))
        flops = 4 * b * h * n * n * d
        for p, t in times.items():
            row = r["variants"][str(p)]
            row["alone_ms"] = statistics.median(t)
            row["tops"] = flops / row["alone_ms"] / 1e9
            row["speedup_vs_sdpa"] = r["sdpa_ms"] / (row["alone_ms"] + r["quantize_ms"])
        if n <= 40000:  # the engines' context: between a block's FP8 GEMMs
            gemms = gemms_of_a_block(torch.float8_e4m3fn)
            for _ in range(2):
                for p, fn in runs.items():
                    r["variants"][str(p)].setdefault("between_gemms", []).append(timed(fn, gemms, rounds=8))
        for p, row in r["variants"].items():
            ctx = ", between GEMMs " + " / ".join(
                f"{c['median_ms']:.2f}" for c in row.get("between_gemms", [])
            )
            print(f"{shape} poly {p}: {row['alone_ms']:.2f} ms alone ({row['tops']:.0f} TOPS, "
                  f"{row['speedup_vs_sdpa']:.3f}x SDPA {r['sdpa_ms']:.2f} ms with quant {r['quantize_ms']:.2f}){ctx}; "
                  f"regs {row['n_regs']} spills {row['n_spills']}; realistic rel {row['accuracy_realistic']['rel_l2']:.4f} "
                  f"gaussian rel {row['accuracy_gaussian']['rel_l2']:.4f}", flush=True)  # fmt: skip
        res["shapes"][shape] = r
        write_result("attention_exp2", res, args.out)
    print(f"wrote {write_result('attention_exp2', res, args.out)}")


if __name__ == "__main__":
    main()
