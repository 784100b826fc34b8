"""SageAttention with the softmax's row sums on the tensor cores, against the kernel as it is.

    python bench/sage_rowsum.py --sass          (no GPU: instruction mix of each variant's key loop, sm90)
    python bench/sage_rowsum.py [--out DIR]     (GPU: writes sage_rowsum-<card>.json)

Why: bench/attention_exp2.py (b93684e) showed the key loop is bound by issue slots, not MUFU: 20 % more
instructions per key block made it 9 % slower. Of the 569 instructions a warp issues per key block, 64 FADDs
(and the quad shuffles) sum P's rows. Here P (already FP8 for the P.V MMA) also multiplies a 128 x 16 FP8 tile
whose first column is ones: the MMA returns the row sums of the FP8-rounded P (the very values P.V used, so
numerator and denominator agree), and the thread reduces 8 values instead of 64. The cost is a second, small
MMA per key block. `hoist`: the ones tile loaded once before the loop instead of with every key block.
"""

from __future__ import annotations

import argparse
import statistics

import triton
import triton.language as tl

from x2v.plugins.sage_kernels import MAGIC, key_slots

ONES_N = 16  # the smallest N of an FP8 wgmma that Triton emits


@triton.jit
def _step_rowsum(acc, l_i, m_i, s_int, scale, v, ones, valid, MASK: tl.constexpr):
    magic = MAGIC
    s = (s_int + 0x4B400000).to(tl.float32, bitcast=True)
    if MASK:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, (tl.max(s, axis=1) - magic) * scale)
    alpha = tl.math.exp2(m_i - m_new)
    bias = magic * scale + m_new - 8.0
    p8 = key_slots(tl.math.exp2(s * scale[:, None] - bias[:, None]).to(tl.float8e4nv))
    acc = acc * alpha[:, None] + tl.dot(p8, v)
    l_i = l_i * alpha + tl.sum(tl.dot(p8, ones), axis=1)  # only column 0 of `ones` is non-zero
    return acc, l_i, m_new


@triton.jit
def attn_rowsum(Q, K, V, QS, KS, VS, Out, Ones, Lq, Lk, L_pad, H, n_kblocks,
                s_qb, s_qh, s_ql, s_kb, s_kh, s_kn, s_ob, s_ol, s_oh,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KS_BLOCK: tl.constexpr,
                HOIST: tl.constexpr):  # fmt: skip
    """sage_kernels.attn_body with the row sums from an MMA (Ones: [BLOCK_N, 16] FP8, column 0 ones)."""
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
    ones_ptrs = Ones + offs_n[:, None] * 16 + tl.arange(0, 16)[None, :]
    ones = tl.load(ones_ptrs)
    ks_ptr = KS + pid_bh * n_kblocks
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_full = Lk // BLOCK_N
    for i in range(0, n_full):
        s_int = tl.dot(q, tl.load(k_ptrs + i * BLOCK_N * s_kn))
        if not HOIST:
            ones = tl.load(ones_ptrs + (i % 2) * 0)  # a load in the loop, pipelined like V's
        acc, l_i, m_i = _step_rowsum(acc, l_i, m_i, s_int, qs * tl.load(ks_ptr + i * BLOCK_N // KS_BLOCK),
                                     tl.load(v_ptrs + i * BLOCK_N), ones, offs_n, False)  # fmt: skip
    if n_full * BLOCK_N < Lk:
        valid = (n_full * BLOCK_N + offs_n) < Lk
        s_int = tl.dot(q, tl.load(k_ptrs + n_full * BLOCK_N * s_kn, mask=valid[None, :], other=0))
        acc, l_i, m_i = _step_rowsum(acc, l_i, m_i, s_int, qs * tl.load(ks_ptr + n_full * BLOCK_N // KS_BLOCK),
                                     tl.load(v_ptrs + n_full * BLOCK_N), ones, valid, True)  # fmt: skip
    vs = tl.load(VS + pid_bh * D + offs_d)
    out = acc * vs[None, :] / l_i[:, None]
    o_ptrs = Out + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)


def ones_tile(device):
    import torch

    t = torch.zeros(128, ONES_N, device=device)
    t[:, 0] = 1
    return t.to(torch.float8_e4m3fn)


def launch_rowsum(packed, out, ones, hoist: bool, BLOCK_M=64, num_warps=4, num_stages=3):
    from x2v.plugins.sage_attention import BLOCK_N, triton_cdiv

    q8, qs, k8, ks, v8, v_scale = packed
    b, h, lq, d = q8.shape
    return attn_rowsum[(triton_cdiv(lq, BLOCK_M), b * h)](
        q8, k8, v8, qs, ks, v_scale, out, ones, lq, k8.shape[2], v8.shape[-1], h, ks.shape[-1],
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        out.stride(0), out.stride(1), out.stride(2), D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, KS_BLOCK=BLOCK_N,
        HOIST=hoist, num_warps=num_warps, num_stages=num_stages)  # fmt: skip


def sass_report():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.sage_sass import ALIGNED, SIGNATURE, compile_for, cuobjdump, loop_mix

    sig = dict(SIGNATURE)
    sig = {**{k: sig[k] for k in list(sig)[:7]}, "Ones": "*fp8e4nv", **{k: sig[k] for k in list(sig)[7:]}}
    names = list(sig)
    kernels = {"base": compile_for(90, 64, 4, 3)}
    for hoist in (False, True):
        const = {"D": 128, "BLOCK_M": 64, "BLOCK_N": 128, "KS_BLOCK": 128, "HOIST": hoist}
        src = ASTSource(fn=attn_rowsum, signature={**sig, **dict.fromkeys(const, "constexpr")}, constexprs=const,
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in (*ALIGNED, "Ones")})  # fmt: skip
        kernels[f"rowsum{'-hoist' if hoist else ''}"] = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}
        )
    for name, k in kernels.items():
        usage = cuobjdump(k.asm["cubin"], "-res-usage").strip().splitlines()[-1].strip().split()[0]
        ops, n = loop_mix(cuobjdump(k.asm["cubin"], "-sass"))
        print(f"{name}: {usage}, shared {k.metadata.shared} B; key loop {n} instructions per key block")
        print("  " + ", ".join(f"{op} {c}" for op, c in ops.most_common(18)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--sass", action="store_true", help="compile for sm90 offline and print instruction mixes"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    if args.sass:
        return sass_report()

    import torch

    from bench.attention import make_inputs, reference, sdpa
    from bench.attention_context import gemms_of_a_block, timed
    from bench.common import event_ms, rel_err, time_cuda, write_result
    from x2v.plugins import sage_kernels as K
    from x2v.plugins.sage_attention import attend, quantize_pass

    tile = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}
    res = {"tile": tile, "shapes": {}}
    ones = ones_tile("cuda")
    for shape in ("1,40,32760,128", "1,40,75600,128"):
        b, h, n, d = map(int, shape.split(","))
        gen = torch.Generator(device="cuda").manual_seed(0)
        r, runs = {"variants": {}}, {}
        for kind in ("realistic", "gaussian"):
            q, k, v = make_inputs(b, h, n, d, kind, gen)
            ref = reference(q, k, v, heads=4)
            packed = quantize_pass(q, k, v)
            outs = {name: torch.empty_like(q) for name in ("base", "rowsum", "rowsum-hoist")}
            fns = {
                "base": lambda o=outs["base"], p=packed: attend(*p, o, lambda f: f, K.attn_body, **tile),
                "rowsum": lambda o=outs["rowsum"], p=packed: launch_rowsum(p, o, ones, False),
                "rowsum-hoist": lambda o=outs["rowsum-hoist"], p=packed: launch_rowsum(p, o, ones, True),
            }
            for name, fn in fns.items():
                kern = fn()
                row = r["variants"].setdefault(name, {"n_regs": kern.n_regs, "n_spills": kern.n_spills})
                row[f"accuracy_{kind}"] = rel_err(outs[name][:, :, :4], ref)
                row[f"vs_base_{kind}"] = rel_err(outs[name], outs["base"])
            runs = fns
        qkv = (q, k, v)
        r["sdpa_ms"] = time_cuda(lambda qkv=qkv: sdpa(*qkv), reps=args.reps, hide_launch=True)["median_ms"]
        r["quantize_ms"] = time_cuda(lambda qkv=qkv: quantize_pass(*qkv), reps=args.reps, hide_launch=True)[
            "median_ms"
        ]
        times = {name: [] for name in runs}
        for _ in range(args.reps):  # interleaved: the clock drifts between sequential timings
            for name, fn in runs.items():
                times[name].append(event_ms(fn, hide_launch=True))
        for name, t in times.items():
            row = r["variants"][name]
            row["alone_ms"] = statistics.median(t)
            row["speedup_vs_sdpa"] = r["sdpa_ms"] / (row["alone_ms"] + r["quantize_ms"])
        if n <= 40000:
            gemms = gemms_of_a_block(torch.float8_e4m3fn)
            for _ in range(2):
                for name, fn in runs.items():
                    r["variants"][name].setdefault("between_gemms", []).append(timed(fn, gemms, rounds=8))
        for name, row in r["variants"].items():
            ctx = " / ".join(f"{c['median_ms']:.2f}" for c in row.get("between_gemms", []))
            print(f"{shape} {name}: {row['alone_ms']:.2f} ms alone ({row['speedup_vs_sdpa']:.3f}x SDPA "
                  f"{r['sdpa_ms']:.2f} + quant {r['quantize_ms']:.2f}); between GEMMs {ctx}; regs {row['n_regs']} "
                  f"spills {row['n_spills']}; realistic {row['accuracy_realistic']['rel_l2']:.4f} gaussian "
                  f"{row['accuracy_gaussian']['rel_l2']:.4f}; vs base {row['vs_base_realistic']['rel_l2']:.4f}",
                  flush=True)  # fmt: skip
        res["shapes"][shape] = r
        write_result("sage_rowsum", res, args.out)
    print(f"wrote {write_result('sage_rowsum', res, args.out)}")


if __name__ == "__main__":
    main()
