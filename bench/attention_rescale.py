"""What the attention loop's per-block accumulator update costs at the 700 W cap (GPU, full size; a bound).

    python bench/attention_rescale.py [--out DIR] [--seconds 5]     (writes attention_rescale-<card>.json)

Why: at the power cap, time follows energy, and the softmax's data-path instructions are where the kernel's
energy goes (bench/NOTES.md: exp2 on the FMA pipe, +114 of them a key block, cost +8 % between FP8 GEMMs).
Of each key block's ~470 data-path instructions, 64 are the fp32 update of the running accumulator,
acc * alpha + P.V (the two-level accumulation). A loop that took two key blocks per softmax step (one max,
one alpha, both P.V into one MMA accumulator) would do that update half as often; Triton's `tl` cannot
express it at the H200 tile's shared-memory budget (two blocks per stage), Gluon could. Before writing that,
this measures the most it could give: `chain` is attn_body with the update removed entirely (P.V accumulated
in the MMA across all key blocks, no alpha), which is NOT correct attention; same inputs, same P, same
MMAs. Its saving bounds the two-block loop's (which keeps half the updates) from above.

Each kernel runs back to back for --seconds after 2 s idle (bench/power.py's protocol), alone and between FP8
GEMMs (one attention, then the block's four 32760 x 5120 x 5120 and two FFN GEMMs, as in a block).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from bench.common import write_result
from bench.power import cool_and_sample
from x2v.plugins import sage_attention as sage
from x2v.plugins.sage_kernels import MAGIC, attn_body, key_slots
from x2v.runtime.config import load_gpu_config


@triton.jit
def attn_chain(Q, K, V, QS, KS, VS, Out, Lq, Lk, L_pad, H, n_kblocks,
               s_qb, s_qh, s_ql, s_kb, s_kh, s_kn, s_ob, s_ol, s_oh,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KS_BLOCK: tl.constexpr):  # fmt: skip
    """attn_body without the accumulator update (full key blocks only: 32760 = 255 x 128 + 120 is padded)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :], mask=offs_m[:, None] < Lq, other=0
    )
    qs = tl.load(QS + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_ptrs = K + b * s_kb + h * s_kh + offs_d[:, None] + offs_n[None, :] * s_kn
    v_ptrs = V + pid_bh * D * L_pad + offs_d[None, :] * L_pad + offs_n[:, None]
    ks_ptr = KS + pid_bh * n_kblocks
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for i in range(0, Lk // BLOCK_N):
        s_int = tl.dot(q, tl.load(k_ptrs + i * BLOCK_N * s_kn))
        scale = qs * tl.load(ks_ptr + i * BLOCK_N // KS_BLOCK)
        s = (s_int + 0x4B400000).to(tl.float32, bitcast=True)
        m_new = tl.maximum(m_i, (tl.max(s, axis=1) - MAGIC) * scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * scale[:, None] - (MAGIC * scale + m_new - 8.0)[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(
            key_slots(p.to(tl.float8e4nv)), tl.load(v_ptrs + i * BLOCK_N), acc
        )  # no acc * alpha + ...
        m_i = m_new
    vs = tl.load(VS + pid_bh * D + offs_d)
    out = acc * vs[None, :] / l_i[:, None]
    tl.store(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < Lq)  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    torch.manual_seed(0)
    n, h, d = 32768, 40, 128  # a multiple of the key block: attn_chain has no partial-block path
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    tile = load_gpu_config("h200").sage_tile
    packed = sage.quantize_pass(q, k, v)
    out = torch.empty_like(q)
    x8 = torch.randn(n, 5120, device="cuda").to(torch.float8_e4m3fn)
    h8 = torch.randn(n, 13824, device="cuda").to(torch.float8_e4m3fn)
    w = {n_: torch.randn(*s, device="cuda").to(torch.float8_e4m3fn) for n_, s in
         {"attn": (5120, 5120), "ffn0": (13824, 5120), "ffn2": (5120, 13824)}.items()}  # fmt: skip
    one = torch.ones((), device="cuda")
    mm = lambda a, b: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True)  # noqa: E731

    def gemms():  # a block's FP8 GEMMs but the cross-attention's small K/V ones
        for _ in range(6):  # self q, k, v, o and cross q, o
            mm(x8, w["attn"])
        mm(x8, w["ffn0"])
        mm(h8, w["ffn2"])

    kernels = {"attn_body": attn_body, "chain (no accumulator update; not attention)": attn_chain}
    res = {"shape": [1, h, n, d], "tile": tile, "seconds": args.seconds}
    ref = None
    for name, kern in kernels.items():
        attend = lambda kern=kern: sage.attend(*packed, out, lambda f: f, kern, **tile)  # noqa: E731
        attend()
        ref = out.float().clone() if ref is None else ref
        r = {"rel_l2_vs_attn_body": float((out.float() - ref).norm() / ref.norm())}
        r["alone"] = cool_and_sample(attend, args.seconds)
        r["with_gemms"] = cool_and_sample(lambda attend=attend: (attend(), gemms()), args.seconds)
        res[name] = r
        print(name, json.dumps(r), flush=True)
    res["gemms_alone"] = cool_and_sample(gemms, args.seconds)
    print("gemms", json.dumps(res["gemms_alone"]), flush=True)
    print(f"wrote {write_result('attention_rescale', res, args.out)}")


if __name__ == "__main__":
    main()
