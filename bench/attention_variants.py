"""Attention-kernel variants of x2v's SageAttention at 1x40x32760x128, side by side with SDPA bf16.

    python bench/attention_variants.py [--out DIR]     (writes attention_variants-<card>.json)

Each variant (software-pipelined Q.K^T, lazy rescaling, grouped two-level accumulation) runs at fixed tile
configs, so the numbers say what each change does; the quantization pass is timed once on its own (it is the
same for all). Accuracy of every variant against fp32 attention of the same inputs (4 heads), and the
compiler's register/shared-memory/spill counts, go in the JSON; so does an opcode histogram of the SASS of
the first two variants, to see where the issue slots go.
"""

from __future__ import annotations

import argparse
import collections
import re

import torch

from bench.attention import make_inputs, reference, sdpa
from bench.common import rel_err, time_cuda, write_result
from x2v.plugins import sage_kernels as K
from x2v.plugins.sage_attention import BLOCK_N, quantize_pass, triton_cdiv

VARIANTS = {
    "base": {},
    "bn64": {"BLOCK_N": 64},
    "ws": {"WS": True},
    "bn64_ws": {"BLOCK_N": 64, "WS": True},
    "pipe": {"PIPE": True},
    "lazy_g1": {"TAU": 2.0},
    "lazy_g4": {"TAU": 2.0, "GROUP": 4},
    "pipe_lazy_g1": {"PIPE": True, "TAU": 2.0},
    "pipe_lazy_g4": {"PIPE": True, "TAU": 2.0, "GROUP": 4},
}
CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 8, 2), (128, 8, 3)]  # BLOCK_M, num_warps, num_stages


def launch(q8, qs, k8, ks, v8, vs, out, bm, warps, stages, opts):
    b, h, lq, d = q8.shape
    return K.attn_body[(triton_cdiv(lq, bm), b * h)](
        q8, k8, v8, qs, ks, vs, out, lq, k8.shape[2], v8.shape[-1], h, ks.shape[-1],
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        out.stride(0), out.stride(1), out.stride(2), D=d, BLOCK_M=bm, KS_BLOCK=BLOCK_N,
        num_warps=warps, num_stages=stages, **{"BLOCK_N": BLOCK_N, **opts})  # fmt: skip


def opcode_histogram(sass: str) -> dict:
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    return dict(ops.most_common(40))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shape", default="1,40,32760,128")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    args = ap.parse_args()
    b, h, n, d = map(int, args.shape.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = make_inputs(b, h, n, d, "realistic", gen)
    ref = reference(q, k, v, heads=4)
    flops = 4 * b * h * n * n * d
    t_sdpa = time_cuda(lambda: sdpa(q, k, v), reps=args.reps)
    packed = quantize_pass(q, k, v)
    t_quant = time_cuda(lambda: quantize_pass(q, k, v), reps=args.reps)
    q8, qs, k8, ks, v8, vs = packed
    print(f"sdpa {t_sdpa['median_ms']:.2f} ms, quantize {t_quant['median_ms']:.2f} ms", flush=True)
    rows = []
    for name in args.variants.split(","):
        opts = VARIANTS[name]
        for bm, warps, stages in CONFIGS:
            row = {"variant": name, "options": opts, "block_m": bm, "num_warps": warps, "num_stages": stages}
            out = torch.empty_like(q)
            try:
                kern = launch(q8, qs, k8, ks, v8, vs, out, bm, warps, stages, opts)
            except Exception as e:  # a config the compiler rejects (shared memory, registers) is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(name, bm, warps, stages, row["error"], flush=True)
                rows.append(row)
                continue
            row.update(n_regs=kern.n_regs, n_spills=kern.n_spills, shared=kern.metadata.shared)
            row["accuracy"] = rel_err(out[:, :, :4], ref)
            cfg = (out, bm, warps, stages, opts)
            t = time_cuda(lambda cfg=cfg: launch(q8, qs, k8, ks, v8, vs, *cfg), reps=args.reps)
            row["attention"] = t
            total = t["median_ms"] + t_quant["median_ms"]
            row["with_quantize_ms"] = total
            row["speedup_vs_sdpa"] = t_sdpa["median_ms"] / total
            row["tops"] = flops / t["median_ms"] / 1e9
            if name in ("base", "pipe_lazy_g4") and (bm, warps, stages) == CONFIGS[1]:
                try:
                    row["sass_opcodes"] = opcode_histogram(kern.asm["sass"])
                except Exception as e:
                    row["sass_opcodes"] = f"unavailable: {e}"
            print(f"{name:14s} bm {bm:3d} w {warps} s {stages}: {t['median_ms']:.2f} ms ({row['tops']:.0f} TOPS) "
                  f"+quant = {row['speedup_vs_sdpa']:.3f}x sdpa; regs {kern.n_regs} spills {kern.n_spills} "
                  f"smem {kern.metadata.shared}; cos {row['accuracy']['cos']:.5f} rel {row['accuracy']['rel_l2']:.4f}",
                  flush=True)  # fmt: skip
            rows.append(row)
    ok = [
        r
        for r in rows
        if "attention" in r and r["accuracy"]["cos"] >= 0.999 and r["accuracy"]["rel_l2"] <= 0.03
    ]
    best = min(ok, key=lambda r: r["with_quantize_ms"]) if ok else None
    if best:
        print(f"best: {best['variant']} {best['block_m']}/{best['num_warps']}/{best['num_stages']} "
              f"{best['with_quantize_ms']:.2f} ms = {best['speedup_vs_sdpa']:.3f}x sdpa")  # fmt: skip
    payload = {"shape": [b, h, n, d], "sdpa_bf16": t_sdpa, "quantize": t_quant, "rows": rows, "best": best,
               "flop_formula": "4*B*H*L^2*D"}  # fmt: skip
    print(f"wrote {write_result('attention_variants', payload, args.out)}")


if __name__ == "__main__":
    main()
