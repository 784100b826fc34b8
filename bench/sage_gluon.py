"""Experiment: the SageAttention loop in Gluon (Triton 3.6), with Q.K^T of key block j+1 in flight during the
softmax of block j, the overlap Triton's `tl` layer does not produce (bench/NOTES.md).

    python bench/sage_gluon.py --compile [--block-n 64] [--stages 3]    (no GPU: registers, spills, SASS mix)
    python bench/sage_gluon.py [--out DIR]     (GPU: every config in CONFIGS, accuracy and speed, writes JSON)

Same inputs and arithmetic as `x2v.plugins.sage_kernels.attn_body` (INT8 Q.K^T with exact int32 results,
online softmax in fp32 with exp2, P * 2^8 in FP8, P.V as an FP8 MMA into a fresh accumulator added to the
fp32 running sum), launched through `sage_attention.attend` on `quantize_pass`'s tensors. What differs:
  - K and V^T tiles are copied to shared memory with cp.async into a ring of NUM_STAGES buffers, issued
    NUM_STAGES - 1 key blocks ahead;
  - both MMAs are asynchronous (`warpgroup_mma(is_async=True)`): Q.K^T of block j+1 is issued before the
    softmax of block j and waited for together with block j's P.V;
  - BLOCK_N 64 by default, so that the two score tiles, the running accumulator and the fresh P.V
    accumulator fit the register file (4 x 64 registers at BLOCK_N 128 would not).
Not used by the engines: measured on an H200, correct and not faster (bench/NOTES.md). Without --compile it
compares every config with attn_body and SDPA.
"""

from __future__ import annotations

import argparse

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.constexpr_function
def copy_layout(rows, cols, num_warps):
    """Registers of a [rows, cols] 8-bit tile for 16-byte cp.async copies along its contiguous last dim."""
    vec = 16
    tpw_c = min(32, cols // vec)
    return gl.BlockedLayout([1, vec], [32 // tpw_c, tpw_c], [num_warps, 1], [1, 0])


@gluon.jit
def _issue(K, V, k_buf, v_buf, kb, Lk, L_pad, k_base, v_base, s_kn,
           D: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, KL: gl.constexpr, VL: gl.constexpr):  # fmt: skip
    """cp.async of key block kb (K rows, V^T columns) into its ring slot, as one commit group; rows past Lk
    and columns past L_pad are zero-filled."""
    stage = kb % NUM_STAGES
    rk = kb * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, KL))
    ck = gl.arange(0, D, layout=gl.SliceLayout(0, KL))
    async_copy.async_copy_global_to_shared(
        k_buf.index(stage), K + k_base + rk[:, None] * s_kn + ck[None, :], mask=rk[:, None] < Lk
    )
    rv = gl.arange(0, D, layout=gl.SliceLayout(1, VL))
    cv = kb * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, VL))
    async_copy.async_copy_global_to_shared(
        v_buf.index(stage), V + v_base + rv[:, None] * L_pad + cv[None, :], mask=cv[None, :] < L_pad
    )
    async_copy.commit_group()


@gluon.jit
def _softmax(s_int, m_i, l_i, scale, valid, MASK: gl.constexpr):
    """Online softmax of one key block: (P * 2^8 as fp32, alpha, l_i, m_i), as sage_kernels._step."""
    magic: gl.constexpr = 12582912.0  # 1.5 * 2^23: int32 -> fp32 by bitcast, exact for |x| < 2^22
    s = (s_int + 0x4B400000).to(gl.float32, bitcast=True)
    if MASK:
        s = gl.where(valid[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, (gl.max(s, axis=1) - magic) * scale)
    alpha = gl.exp2(m_i - m_new)
    bias = magic * scale + m_new - 8.0
    p = gl.exp2(s * scale[:, None] - bias[:, None])
    return p, alpha, l_i * alpha + gl.sum(p, axis=1), m_new


@gluon.jit
def p_operand(p, P_L: gl.constexpr):
    """P (fp32) as the FP8 register operand of P.V, its columns in V^T's key order (sage_kernels.key_slots):
    the layout conversion stays inside each thread."""
    p8 = p.to(gl.float8e4nv)
    BM: gl.constexpr = p8.shape[0]
    BN: gl.constexpr = p8.shape[1]
    return gl.convert_layout(p8.reshape(BM, BN // 16, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(BM, BN), P_L)


@gluon.jit
def loop_state(QS, KS, pid_bh, Lq, n_kblocks, row0, S_L: gl.constexpr, O_L: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_N: gl.constexpr, D: gl.constexpr):  # fmt: skip
    """What the key loop of a Q tile starting at row0 starts from: (Q's row scales, K's scales of this head,
    running max, running sum, accumulator, zero score and output tiles for the MMAs, key offsets)."""
    offs_m = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, S_L))
    qs = gl.load(QS + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, S_L))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, S_L))
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=O_L)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=S_L)
    o_zero = gl.zeros([BLOCK_M, D], gl.float32, layout=O_L)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
    return qs, KS + pid_bh * n_kblocks, m_i, l_i, acc, s_zero, o_zero, offs_n


@gluon.jit
def _step(s_int, m_i, l_i, scale, valid, acc, v_tile, o_zero, P_L: gl.constexpr, MASK: gl.constexpr):
    """Softmax of one key block, the running accumulator rescaled, and that block's P.V issued asynchronously
    into a fresh accumulator (the caller waits for it): (acc, P.V token, l_i, m_i)."""
    p, alpha, l_i, m_i = _softmax(s_int, m_i, l_i, scale, valid, MASK)
    p8 = p_operand(p, P_L)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    o_j = warpgroup_mma(p8, v_tile.permute((1, 0)), o_zero, use_acc=False, is_async=True)
    return acc, o_j, l_i, m_i


@gluon.jit
def attn_gluon(Q, K, V, QS, KS, VS, Out, Lq, Lk, L_pad, H, n_kblocks,
               s_qb, s_qh, s_ql, s_kb, s_kh, s_kn, s_ob, s_ol, s_oh,
               D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KS_BLOCK: gl.constexpr,
               NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    gl.static_assert(NUM_STAGES >= 3, "block j+1 must have landed before block j+NUM_STAGES-1 is issued")
    pid_m, pid_bh = gl.program_id(0), gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 32])  # fmt: skip
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, D, 32])  # fmt: skip
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=4)
    QL: gl.constexpr = copy_layout(BLOCK_M, D, num_warps)
    KL: gl.constexpr = copy_layout(BLOCK_N, D, num_warps)
    VL: gl.constexpr = copy_layout(D, BLOCK_N, num_warps)
    q_smem = gl.allocate_shared_memory(
        gl.int8, [BLOCK_M, D], gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.int8)
    )
    k_buf = gl.allocate_shared_memory(gl.int8, [NUM_STAGES, BLOCK_N, D],
                                      gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl.int8))  # fmt: skip
    v_buf = gl.allocate_shared_memory(gl.float8e4nv, [NUM_STAGES, D, BLOCK_N],
                                      gl.NVMMASharedLayout.get_default_for([D, BLOCK_N], gl.float8e4nv))  # fmt: skip

    k_base = b * s_kb + h * s_kh
    v_base = pid_bh * D * L_pad
    n_kb = gl.cdiv(Lk, BLOCK_N)
    # Q (once) travels in the first key block's commit group.
    rq = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, QL))
    cq = gl.arange(0, D, layout=gl.SliceLayout(0, QL))
    async_copy.async_copy_global_to_shared(
        q_smem, Q + b * s_qb + h * s_qh + rq[:, None] * s_ql + cq[None, :], mask=rq[:, None] < Lq
    )
    for kb in gl.static_range(NUM_STAGES - 1):
        _issue(K, V, k_buf, v_buf, kb, Lk, L_pad, k_base, v_base, s_kn, D, BLOCK_N, NUM_STAGES, KL, VL)
    # Writers fence their cp.async data for the MMAs' async proxy, then the CTA syncs: the canonical order.
    async_copy.wait_group(NUM_STAGES - 2)
    fence_async_shared()
    gl.thread_barrier()

    qs, ks_ptr, m_i, l_i, acc, s_zero, o_zero, offs_n = loop_state(
        QS, KS, pid_bh, Lq, n_kblocks, pid_m * BLOCK_M, S_L, O_L, BLOCK_M, BLOCK_N, D
    )

    s_cur = warpgroup_mma(q_smem, k_buf.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(s_cur,))
    for j in range(0, n_kb - 1):  # every block but the last is full
        # Block j+1 landed: its group is the oldest of the NUM_STAGES - 2 in flight.
        async_copy.wait_group(NUM_STAGES - 3)
        fence_async_shared()
        gl.thread_barrier()  # also: every warp is past block j-1's MMAs, so its slot can be refilled
        _issue(K, V, k_buf, v_buf, j + NUM_STAGES - 1, Lk, L_pad, k_base, v_base, s_kn, D, BLOCK_N, NUM_STAGES,
               KL, VL)  # fmt: skip
        s_next = warpgroup_mma(q_smem, k_buf.index((j + 1) % NUM_STAGES).permute((1, 0)), s_zero, use_acc=False,
                               is_async=True)  # fmt: skip
        acc, o_j, l_i, m_i = _step(s_cur, m_i, l_i, qs * gl.load(ks_ptr + j * BLOCK_N // KS_BLOCK), offs_n, acc,
                                   v_buf.index(j % NUM_STAGES), o_zero, P_L, False)  # fmt: skip
        s_cur, o_j = warpgroup_mma_wait(num_outstanding=0, deps=(s_next, o_j))
        acc = acc + o_j
    last = n_kb - 1
    valid = (last * BLOCK_N + offs_n) < Lk
    acc, o_j, l_i, m_i = _step(s_cur, m_i, l_i, qs * gl.load(ks_ptr + last * BLOCK_N // KS_BLOCK), valid, acc,
                               v_buf.index(last % NUM_STAGES), o_zero, P_L, True)  # fmt: skip
    o_j = warpgroup_mma_wait(num_outstanding=0, deps=(o_j,))
    acc = acc + o_j
    async_copy.wait_group(0)

    offs_mo = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, O_L))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, O_L))
    vs = gl.load(VS + pid_bh * D + offs_d)
    out = acc * vs[None, :] / gl.convert_layout(l_i, gl.SliceLayout(1, O_L))[:, None]
    o_ptrs = Out + b * s_ob + h * s_oh + offs_mo[:, None] * s_ol + offs_d[None, :]
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_mo[:, None] < Lq)


def compile_for(arch: int, block_m: int, block_n: int, stages: int, warps: int = 4, head_dim: int = 128):
    """Compile offline (Triton's bundled ptxas), arguments specialized as bench/sage_sass.py does."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench.sage_sass import ALIGNED, SIGNATURE  # the same arguments as attn_body

    const = {"D": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "KS_BLOCK": 128, "NUM_STAGES": stages,
             "num_warps": warps}  # fmt: skip
    names = list(SIGNATURE)
    src = GluonASTSource(fn=attn_gluon, signature={**SIGNATURE, **dict.fromkeys(const, "constexpr")}, constexprs=const,
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED})  # fmt: skip
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--block-m", type=int, default=64)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--sass", default=None, help="write the SASS here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.compile:
        from bench.sage_sass import cuobjdump, loop_mix

        k = compile_for(90, args.block_m, args.block_n, args.stages, args.warps)
        usage = cuobjdump(k.asm["cubin"], "-res-usage").strip().splitlines()[-1].strip()
        sass = cuobjdump(k.asm["cubin"], "-sass")
        if args.sass:
            open(args.sass, "w").write(sass)
        print(f"sm90, BLOCK_M {args.block_m}, BLOCK_N {args.block_n}, {args.stages} stages: {usage}; "
              f"shared {k.metadata.shared} B")  # fmt: skip
        ops, n = loop_mix(sass, markers=("QGMMA",))  # the prologue issues the first IGMMA, outside the loop
        scores = args.block_m * args.block_n // (32 * args.warps)  # per thread per key block (4 warps)
        print(f"key loop: {n} instructions per warp per key block, {n / scores:.1f} per score")
        print("  " + ", ".join(f"{op} {c}" for op, c in ops.most_common(16)))
    else:
        check(args)


CONFIGS = [  # (BLOCK_M, BLOCK_N, NUM_STAGES, warps): all compile for sm90 without spills (--compile)
    (64, 64, 3, 4),
    (64, 64, 4, 4),
    (64, 128, 3, 4),
    (128, 64, 3, 8),
    (128, 128, 3, 8),
]


def check(args):
    """Every config against fp32 attention and the Triton kernel (attn_body at its H200 tile), then timed at
    the Wan shapes beside attn_body and SDPA, all in this one process."""
    from x2v.plugins import sage_attention as sage

    variants = {
        f"gluon-{bm}x{bn}-s{st}-w{w}": lambda *a, bm=bm, bn=bn, st=st, w=w: sage.attend(
            *a, lambda f: f, attn_gluon, BLOCK_M=bm, BLOCK_N=bn, NUM_STAGES=st, num_warps=w
        )
        for bm, bn, st, w in CONFIGS
    }
    check_variants("sage_gluon", variants, CONFIGS, args.out)


def check_variants(name: str, variants: dict, configs: list, out_dir) -> None:
    """Attention kernels that take quantize_pass's tensors and the output (`variants`: name -> launch(q8, qs, k8,
    ks, v8, v_scale, out)) against fp32 attention and attn_body at its H200 tile, then timed beside attn_body and
    SDPA at the Wan shapes, GPU time (bench/NOTES.md), in this one process; writes `name`-<card>.json."""
    import torch

    from bench.common import write_result

    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"configs": [list(c) for c in configs], "rows": []}
    for shape in [(1, 4, 1000, 128), (1, 40, 32760, 128), (1, 40, 75600, 128)]:
        res["rows"].append(check_shape(*shape, gen, variants))
        print(res["rows"][-1], flush=True)
        torch.cuda.empty_cache()
    print(f"wrote {write_result(name, res, out_dir)}")


def check_shape(b, h, n, d, gen, variants: dict) -> dict:
    import torch

    from bench.attention import make_inputs, reference, sdpa
    from bench.common import rel_err, time_cuda
    from x2v.plugins import sage_attention as sage
    from x2v.plugins import sage_kernels

    q, k, v = make_inputs(b, h, n, d, "realistic", gen)
    packed = sage.quantize_pass(q, k, v)

    def run(launch):
        out = torch.empty_like(q)
        launch(*packed, out)
        return out

    def triton(*packed_out):
        return sage.attend(
            *packed_out, lambda f: f, sage_kernels.attn_body, BLOCK_M=64, num_warps=4, num_stages=3
        )

    calls = {"triton": triton, **variants}
    ref = reference(q, k, v, heads=min(h, 4))
    base = run(triton).float()
    row = {"shape": [b, h, n, d], "accuracy": {}, "ms": {}}
    gpu_ms = lambda fn: time_cuda(fn, hide_launch=True)["median_ms"]  # noqa: E731
    for name, launch in calls.items():
        try:
            out = run(launch)
            torch.cuda.synchronize()
        except Exception as e:  # a config the card or compiler refuses: recorded, not fatal
            row["accuracy"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        row["accuracy"][name] = {
            "vs_fp32": rel_err(out[:, :, :4], ref),
            "vs_triton": rel_err(out.float(), base),
        }
        if n >= 32760:
            row["ms"][name] = gpu_ms(lambda launch=launch: run(launch))
    if n >= 32760:
        row["ms"]["sdpa"] = gpu_ms(lambda: sdpa(q, k, v))
        row["ms"]["quantize"] = gpu_ms(lambda: sage.quantize_pass(q, k, v))
        kernels = [name for name in row["ms"] if name not in ("sdpa", "quantize")]
        row["speedup_vs_sdpa_with_quantize"] = {
            name: row["ms"]["sdpa"] / (row["ms"][name] + row["ms"]["quantize"]) for name in kernels
        }
    return row


if __name__ == "__main__":
    main()
