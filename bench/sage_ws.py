"""Experiment: the SageAttention loop warp-specialized in Gluon (Triton 3.6), FA3's structure on Hopper.

    python bench/sage_ws.py --compile [--stages 4] [--pingpong]   (no GPU: registers per partition, SASS mix)
    python bench/sage_ws.py [--out DIR]      (GPU: accuracy against fp32 and attn_body, speed beside SDPA)

One CTA per 2 x BLOCK_M query rows of one head, three partitions:
  - a load warp (24 registers) issues TMA copies: the two Q tiles once, then K and V^T key blocks into a ring of
    NUM_STAGES shared buffers, each slot refilled when both consumers have released it (mbarriers);
  - two consumer warpgroups (240 registers each, `setmaxnreg`), one per Q tile, run the loop of
    `sage_kernels.attn_body` on the shared K/V tiles: INT8 Q.K^T, online softmax in fp32, P * 2^8 in FP8 (keys
    in V^T's order, `key_slots`), P.V into a fresh accumulator added to the running one.
The consumers no longer compute addresses or issue copies (about 50 of the Triton loop's 569 instructions per
key block, bench/NOTES.md) and read each K/V tile from one shared copy. With --pingpong the two consumers
take turns issuing their MMAs (an mbarrier pair), so one warpgroup's softmax runs while the other's MMAs do,
as FA3 schedules them; without it the warp schedulers interleave them freely.
With --overlap, FA3's intra-warpgroup overlap: Q.K^T of block j+1 and P.V of block j issued together, block
j+1's softmax while P.V runs. Same inputs and arithmetic as attn_body (V from `quantize_pass`, keys in
`key_slots` order). Measured on an H200: every config correct, none faster than the Triton kernel at 32760
tokens (bench/NOTES.md); not used by the engines.
"""

from __future__ import annotations

import argparse

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from bench.sage_gluon import _softmax, _step, check_variants, loop_state, p_operand


@gluon.jit
def _load(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, q_row, k_row, v_row, n_kb,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):  # fmt: skip
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + BLOCK_M, 0], q_bar, q_smem.index(1))
    for j in range(n_kb):
        s = j % NUM_STAGES
        # A fresh mbarrier counts as having completed the phase before phase 0: the first pass does not wait.
        mbarrier.wait(empty.index(s), ((j // NUM_STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row + j * BLOCK_N, 0], bar, k_bufs.index(s))
        tma.async_copy_global_to_shared(v_desc, [v_row, j * BLOCK_N], bar, v_bufs.index(s))


@gluon.jit
def _block(q_tile, k_bufs, v_bufs, ready, empty, turn, j, acc, l_i, m_i, qs, ks_ptr, offs_n, Lk, s_zero, o_zero,
           P_L: gl.constexpr, WG: gl.constexpr, BLOCK_N: gl.constexpr, KS_BLOCK: gl.constexpr,
           NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr, MASK: gl.constexpr):  # fmt: skip
    """Key block j: wait for its slot, Q.K^T, softmax, P.V, release the slot -> (acc, l_i, m_i)."""
    s = j % NUM_STAGES
    mbarrier.wait(ready.index(s), (j // NUM_STAGES) & 1)
    _issue_turn(turn, j, WG, PINGPONG)  # the other warpgroup has issued its Q.K^T of the previous block
    s_tok = warpgroup_mma(q_tile, k_bufs.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _pass_turn(turn, WG, PINGPONG)
    s_int = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    valid = (j * BLOCK_N + offs_n) < Lk
    acc, o_tok, l_i, m_i = _step(s_int, m_i, l_i, qs * gl.load(ks_ptr + j * BLOCK_N // KS_BLOCK), valid, acc,
                                 v_bufs.index(s), o_zero, P_L, MASK)  # fmt: skip
    o_j = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
    mbarrier.arrive(empty.index(s), count=1)  # both MMAs reading slot s are done
    return acc + o_j, l_i, m_i


@gluon.jit
def _issue_turn(turn, i, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong: wait until the other warpgroup has issued its MMAs of issue point i - 1 (FA3's scheduler barrier)."""
    if PINGPONG:
        mbarrier.wait(turn.index(WG), i & 1)


@gluon.jit
def _pass_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG), count=1)


@gluon.jit
def _overlap_step(q_tile, k_bufs, v_bufs, ready, empty, turn, j, s_int, o_tok, acc, alpha, l_i, m_i, scale, ks_ptr,
                  s_zero, o_zero, P_L: gl.constexpr, WG: gl.constexpr, BLOCK_N: gl.constexpr, KS_BLOCK: gl.constexpr,
                  NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr):  # fmt: skip
    """FA3's intra-warpgroup overlap, key block j (1 <= j < n_kb - 1): its scores S_j have landed and block j-1's
    P.V is in flight. Softmax of S_j, then block j-1's P.V into acc (acc was relative to the row max before block
    j-1, so its alpha rescales: one FMA), then Q.K^T of block j+1 and P.V of block j issued together; returns
    with S_j+1 landed and P.V of block j in flight. P is built and issued within one step: an 8-bit tensor
    carried around the loop is kept one byte per register."""
    p, alpha_j, l_i, m_i = _softmax(s_int, m_i, l_i, scale, scale, False)  # a full block: no mask
    o = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
    mbarrier.arrive(empty.index((j - 1) % NUM_STAGES), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None] + o
    p8 = p_operand(p, P_L)
    s = (j + 1) % NUM_STAGES
    mbarrier.wait(ready.index(s), ((j + 1) // NUM_STAGES) & 1)
    _issue_turn(turn, j + 1, WG, PINGPONG)
    s_tok = warpgroup_mma(q_tile, k_bufs.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    o_tok = warpgroup_mma(
        p8, v_bufs.index(j % NUM_STAGES).permute((1, 0)), o_zero, use_acc=False, is_async=True
    )
    _pass_turn(turn, WG, PINGPONG)
    ks = gl.load(ks_ptr + (j + 1) * BLOCK_N // KS_BLOCK)
    s_int = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
    return s_int, o_tok, acc, alpha_j, l_i, m_i, ks


@gluon.jit
def _attend(q_smem, k_bufs, v_bufs, q_bar, ready, empty, turn, QS, KS, VS, Out, Lq, Lk, n_kblocks, n_kb, pid_m,
            pid_bh, H, s_ob, s_ol, s_oh, WG: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
            BLOCK_N: gl.constexpr, KS_BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr,
            OVERLAP: gl.constexpr):  # fmt: skip
    """One consumer warpgroup: Q tile WG of this CTA against every key block."""
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_N, 32])  # fmt: skip
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, D, 32])  # fmt: skip
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=4)
    row0 = (pid_m * 2 + WG) * BLOCK_M
    qs, ks_ptr, m_i, l_i, acc, s_zero, o_zero, offs_n = loop_state(
        QS, KS, pid_bh, Lq, n_kblocks, row0, S_L, O_L, BLOCK_M, BLOCK_N, D
    )
    q_tile = q_smem.index(WG)
    mbarrier.wait(q_bar, 0)
    if OVERLAP:  # needs n_kb >= 2 (attend_ws checks)
        # Block 0: Q.K^T, softmax; then Q.K^T of block 1 and P.V of block 0 (issue points 0 .. n_kb take turns).
        mbarrier.wait(ready.index(0), 0)
        _issue_turn(turn, 0, WG, PINGPONG)
        s_tok = warpgroup_mma(q_tile, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        s_int = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
        p, alpha, l_i, m_i = _softmax(s_int, m_i, l_i, qs * gl.load(ks_ptr), offs_n, False)
        p8 = p_operand(p, P_L)
        mbarrier.wait(ready.index(1 % NUM_STAGES), (1 // NUM_STAGES) & 1)
        _issue_turn(turn, 1, WG, PINGPONG)
        s_tok = warpgroup_mma(q_tile, k_bufs.index(1 % NUM_STAGES).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)  # fmt: skip
        o_tok = warpgroup_mma(p8, v_bufs.index(0).permute((1, 0)), o_zero, use_acc=False, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        ks = gl.load(ks_ptr + BLOCK_N // KS_BLOCK)
        s_int = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
        for j in range(1, n_kb - 1):
            s_int, o_tok, acc, alpha, l_i, m_i, ks = _overlap_step(
                q_tile, k_bufs, v_bufs, ready, empty, turn, j, s_int, o_tok, acc, alpha, l_i, m_i, qs * ks, ks_ptr,
                s_zero, o_zero, P_L, WG, BLOCK_N, KS_BLOCK, NUM_STAGES, PINGPONG)  # fmt: skip
        # The last block (masked), then the last two P.Vs.
        last = n_kb - 1
        p, alpha_l, l_i, m_i = _softmax(s_int, m_i, l_i, qs * ks, (last * BLOCK_N + offs_n) < Lk, True)
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
        mbarrier.arrive(empty.index((last - 1) % NUM_STAGES), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None] + o
        p8 = p_operand(p, P_L)
        _issue_turn(turn, n_kb, WG, PINGPONG)
        o_tok = warpgroup_mma(p8, v_bufs.index(last % NUM_STAGES).permute((1, 0)), o_zero, use_acc=False,
                              is_async=True)  # fmt: skip
        _pass_turn(turn, WG, PINGPONG)
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
        mbarrier.arrive(empty.index(last % NUM_STAGES), count=1)
        acc = acc * gl.convert_layout(alpha_l, gl.SliceLayout(1, O_L))[:, None] + o
    else:
        for j in range(n_kb - 1):  # every block but the last is full
            acc, l_i, m_i = _block(q_tile, k_bufs, v_bufs, ready, empty, turn, j, acc, l_i, m_i, qs, ks_ptr, offs_n,
                                   Lk, s_zero, o_zero, P_L, WG, BLOCK_N, KS_BLOCK, NUM_STAGES, PINGPONG, False)  # fmt: skip
        acc, l_i, m_i = _block(q_tile, k_bufs, v_bufs, ready, empty, turn, n_kb - 1, acc, l_i, m_i, qs, ks_ptr,
                               offs_n, Lk, s_zero, o_zero, P_L, WG, BLOCK_N, KS_BLOCK, NUM_STAGES, PINGPONG, True)  # fmt: skip
    offs_mo = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, O_L))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, O_L))
    vs = gl.load(VS + pid_bh * D + offs_d)
    out = acc * vs[None, :] / gl.convert_layout(l_i, gl.SliceLayout(1, O_L))[:, None]
    b = pid_bh // H
    h = pid_bh % H
    o_ptrs = Out + b * s_ob + h * s_oh + offs_mo[:, None] * s_ol + offs_d[None, :]
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_mo[:, None] < Lq)


@gluon.jit
def attn_ws(q_desc, k_desc, v_desc, QS, KS, VS, Out, Lq, Lk, H, n_kblocks, s_ob, s_ol, s_oh,
            D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KS_BLOCK: gl.constexpr,
            NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr):  # fmt: skip
    """Grid (cdiv(Lq, 2 * BLOCK_M), B * H); q_desc over Q [B*H*Lq, D], k_desc over K [B*H*Lk, D], v_desc over
    V^T [B*H*D, L_pad]. Rows a tile reads past its head belong to the next head (or are zero past the tensor):
    query rows past Lq are not stored, keys past Lk are masked."""
    pid_m, pid_bh = gl.program_id(0), gl.program_id(1)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # released by both consumers
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    if PINGPONG:
        mbarrier.arrive(turn.index(0), count=1)  # consumer 0 issues first
    n_kb = gl.cdiv(Lk, BLOCK_N)
    # Each partition's arguments spelled out in the call: tuples built or joined in a kernel lose constexpr-ness.
    gl.warp_specialize(
        [(_attend, (q_smem, k_bufs, v_bufs, q_bar, ready, empty, turn, QS, KS, VS, Out, Lq, Lk, n_kblocks, n_kb,
                    pid_m, pid_bh, H, s_ob, s_ol, s_oh, 0, D, BLOCK_M, BLOCK_N, KS_BLOCK, NUM_STAGES, PINGPONG, OVERLAP)),
         (_load, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty,
                  pid_bh * Lq + pid_m * 2 * BLOCK_M, pid_bh * Lk, pid_bh * D, n_kb, BLOCK_M, BLOCK_N, NUM_STAGES)),
         (_attend, (q_smem, k_bufs, v_bufs, q_bar, ready, empty, turn, QS, KS, VS, Out, Lq, Lk, n_kblocks, n_kb,
                    pid_m, pid_bh, H, s_ob, s_ol, s_oh, 1, D, BLOCK_M, BLOCK_N, KS_BLOCK, NUM_STAGES, PINGPONG, OVERLAP))],
        [1, 4], [24, 240])  # fmt: skip


# 12 warps (3 warpgroups) x 32 x 168 = the 64K register file: 240, 24 and 240 per thread by partition.
MAXNREG = 168


def descriptors(q8, k8, v8, block_m: int, block_n: int):
    """TMA descriptors over quantize_pass's tensors, viewed 2D."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    b, h, lq, d = q8.shape
    shared = lambda shape, dt: gl.NVMMASharedLayout.get_default_for(shape, dt)  # noqa: E731
    return (
        TensorDescriptor.from_tensor(q8.view(-1, d), [block_m, d], shared([block_m, d], gl.int8)),
        TensorDescriptor.from_tensor(k8.view(-1, d), [block_n, d], shared([block_n, d], gl.int8)),
        TensorDescriptor.from_tensor(
            v8.view(-1, v8.shape[-1]), [d, block_n], shared([d, block_n], gl.float8e4nv)
        ),
    )


def attend_ws(q8, qs, k8, ks, v8, v_scale, out, block_m=64, stages=4, pingpong=False, overlap=False):
    from x2v.plugins.sage_attention import BLOCK_N

    if overlap and k8.shape[2] <= BLOCK_N:
        raise ValueError(f"the overlapped loop needs more than one key block ({k8.shape[2]} keys)")
    b, h, lq, d = q8.shape
    grid = (triton.cdiv(lq, 2 * block_m), b * h)
    attn_ws[grid](*descriptors(q8, k8, v8, block_m, BLOCK_N), qs, ks, v_scale, out, lq, k8.shape[2], h,
                  ks.shape[-1], out.stride(0), out.stride(1), out.stride(2), D=d, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
                  KS_BLOCK=BLOCK_N, NUM_STAGES=stages, PINGPONG=pingpong, OVERLAP=overlap, num_warps=4, maxnreg=MAXNREG)  # fmt: skip


def compile_for(
    arch: int, stages: int, pingpong: bool, overlap: bool, block_m: int = 64, head_dim: int = 128
):
    """Compile offline (Triton's bundled ptxas), with the argument types a launch at Wan shapes gives."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from x2v.plugins.sage_attention import BLOCK_N

    q8 = torch.zeros(1, 2, 256, head_dim, dtype=torch.int8)
    v8 = torch.zeros(1, 2, head_dim, 256, dtype=torch.float8_e4m3fn)
    qd, kd, vd = (mangle_type(x) for x in descriptors(q8, q8, v8, block_m, BLOCK_N))
    sig = {"q_desc": qd, "k_desc": kd, "v_desc": vd, "QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "Out": "*bf16",
           "Lq": "i32", "Lk": "i32", "H": "i32", "n_kblocks": "i32", "s_ob": "i32", "s_ol": "i32", "s_oh": "i32"}  # fmt: skip
    const = {"D": head_dim, "BLOCK_M": block_m, "BLOCK_N": BLOCK_N, "KS_BLOCK": BLOCK_N, "NUM_STAGES": stages,
             "PINGPONG": pingpong, "OVERLAP": overlap}  # fmt: skip
    names = list(sig)
    aligned = ("QS", "KS", "VS", "Out", "n_kblocks", "s_ob", "s_ol", "s_oh")
    src = GluonASTSource(fn=attn_ws, signature={**sig, **dict.fromkeys(const, "constexpr")}, constexprs=const,
                         attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})  # fmt: skip
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "maxnreg": MAXNREG}
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--pingpong", action="store_true")
    ap.add_argument("--overlap", action="store_true")
    ap.add_argument("--sass", default=None, help="write the SASS here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.compile:
        from bench.sage_sass import cuobjdump, loop_mix

        k = compile_for(90, args.stages, args.pingpong, args.overlap)
        usage = cuobjdump(k.asm["cubin"], "-res-usage").strip().splitlines()[-1].strip()
        sass = cuobjdump(k.asm["cubin"], "-sass")
        if args.sass:
            open(args.sass, "w").write(sass)
        print(
            f"sm90, {args.stages} stages, pingpong {args.pingpong}, overlap {args.overlap}: {usage}; shared {k.metadata.shared} B"
        )
        ops, n = loop_mix(sass, markers=("IGMMA",))
        print(f"first consumer key loop: {n} instructions per warp per key block, {n / 64:.1f} per score")
        print("  " + ", ".join(f"{op} {c}" for op, c in ops.most_common(18)))
    else:
        check(args)


CONFIGS = [
    (3, False, False),
    (3, False, True),
    (3, True, True),
    (4, True, True),
]  # (NUM_STAGES, PINGPONG, OVERLAP)


def check(args):
    """Every config against fp32 attention and attn_body, then timed beside it and SDPA (sage_gluon.check_variants)."""
    variants = {
        f"ws-s{st}{'-pingpong' if pp else ''}{'-overlap' if ov else ''}": lambda *a, st=st, pp=pp, ov=ov: (
            attend_ws(*a, stages=st, pingpong=pp, overlap=ov)
        )
        for st, pp, ov in CONFIGS
    }
    check_variants("sage_ws", variants, CONFIGS, args.out)


if __name__ == "__main__":
    main()
