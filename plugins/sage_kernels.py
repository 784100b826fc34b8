"""Triton kernels of x2v's SageAttention (sm89/sm90): quantize Q, K, V, then attend.

- Q: INT8, one scale per token, softmax scale and log2(e) folded in (so the kernel uses exp2).
- K: mean over tokens subtracted (softmax is invariant to it), then INT8 with one scale per BLOCK_N tokens.
- V: FP8 E4M3 with one scale per channel, stored transposed ([D, L]) because Hopper's FP8 MMA wants the
  reduction dimension contiguous in both operands, keys permuted within each group of 16 (`key_slots`) so
  that P goes from the Q.K^T accumulator's registers into the P.V MMA's operand registers without moving
  between threads (P.V sums over keys, so P's columns and V's rows may be permuted alike).
- Attention: Q.K^T as an INT8 dot (exact int32), online softmax in fp32, P scaled by 256 into FP8, P.V as
  an FP8 dot into a fresh accumulator that is added to the fp32 running sum once per key block: the
  two-level accumulation that keeps Hopper's reduced-precision FP8 accumulator from drifting.

- Q and K prepared from their projections (norm_rope_kernel): RMSNorm, RoPE and Q's quantization in one
  pass, for the op that takes the projections (x2v::sage_attention_rope).

Imported only where Triton and a CUDA GPU exist; x2v.plugins.sage_attention is the entry point.
"""

from __future__ import annotations

import triton
import triton.language as tl

# P in [0, 1] is scaled by 2^8 (P_SCALE in sage_attention.py) before the FP8 cast, folded into the exp2 bias
# in _step (exact for a power of two), so small probabilities stay clear of E4M3's subnormal range at no cost
# per element.


@triton.jit
def _round_half_away(x):
    return tl.where(x >= 0, x + 0.5, x - 0.5)


@triton.jit
def _load_tokens(X, L, H, s_xb, s_xl, s_xh, BLOCK: tl.constexpr, D: tl.constexpr):
    """This program's tile of BLOCK tokens x D channels of head (b, h), as float32 (zeros past L)."""
    pid_l, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_l = pid_l * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    x = tl.load(
        X + b * s_xb + h * s_xh + offs_l[:, None] * s_xl + offs_d[None, :],
        mask=offs_l[:, None] < L,
        other=0.0,
    )
    return x.to(tl.float32), b, h, pid_l, pid_bh, offs_l, offs_d


@triton.jit
def quant_int8_kernel(X, Mean, Out, Scale, L, H, n_scales, s_xb, s_xl, s_xh, s_ob, s_oh, s_ol, pre_scale,
                      SMOOTH: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """[B, L, H, D] (last dim contiguous) -> int8 [B, H, L, D] and scales [B, H, n_scales].

    Q: PER_TOKEN scales (n_scales = L), softmax scale folded in through `pre_scale`.
    K: SMOOTH (the per-channel mean `Mean` [B, H, D] subtracted) and one scale per BLOCK tokens.
    """
    x, b, h, pid_l, pid_bh, offs_l, offs_d = _load_tokens(X, L, H, s_xb, s_xl, s_xh, BLOCK, D)
    mask = offs_l[:, None] < L
    x = x * tl.cast(pre_scale, tl.float32)  # Inductor passes Python floats as fp64: the tile would follow
    if SMOOTH:
        x = tl.where(mask, x - tl.load(Mean + pid_bh * D + offs_d)[None, :], 0.0)
    if PER_TOKEN:
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 127.0
        vals = _round_half_away(x / scale[:, None]).to(tl.int8)
        tl.store(Scale + pid_bh * n_scales + offs_l, scale, mask=offs_l < L)
    else:
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-12) / 127.0
        vals = _round_half_away(x / scale).to(tl.int8)
        tl.store(Scale + pid_bh * n_scales + pid_l, scale)
    tl.store(Out + b * s_ob + h * s_oh + offs_l[:, None] * s_ol + offs_d[None, :], vals, mask=mask)


@triton.jit
def quant_v_kernel(X, Scale, Out, L, L_pad, H, s_xb, s_xl, s_xh, BLOCK: tl.constexpr, D: tl.constexpr):
    """V / per-channel scale -> FP8 E4M3, transposed to [B, H, D, L_pad] (tokens contiguous, in key_slots
    order within each 16)."""
    x, b, h, pid_l, pid_bh, offs_l, offs_d = _load_tokens(X, L, H, s_xb, s_xl, s_xh, BLOCK, D)
    scale = tl.load(Scale + pid_bh * D + offs_d)
    v = (x / scale[None, :]).to(tl.float8e4nv)
    # Rows reordered in registers (the kernel is memory-bound), so the transposed store stays contiguous.
    v = v.reshape(BLOCK // 16, 2, 4, 2, D).permute(0, 2, 1, 3, 4).reshape(BLOCK, D)
    tl.store(
        Out + pid_bh * D * L_pad + offs_d[None, :] * L_pad + offs_l[:, None], v, mask=offs_l[:, None] < L_pad
    )


# Q and K straight from their projections: one read of each row instead of Inductor's norm and RoPE kernels, a
# bf16 Q written and read back for its quantization, and a second read of K for its mean (bench/NOTES.md).
# fmt: off
@triton.jit
def _load_rows(X, b, offs_l, lmask, s_xb, s_xl, H0: tl.constexpr, NH: tl.constexpr, D: tl.constexpr,
               H: tl.constexpr):
    offs_h = H0 + tl.arange(0, NH)
    offs_d = tl.arange(0, D)
    ptr = X + b * s_xb + offs_l[:, None, None] * s_xl + offs_h[None, :, None] * D + offs_d[None, None, :]
    x = tl.load(ptr, mask=lmask[:, None, None] & (offs_h < H)[None, :, None], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _norm_rope_out(x, rstd, W, COS, SIN, OUT, SCALE, b, offs_l, lmask, L, s_ob, s_oh, s_ol, pre_scale,
                   H0: tl.constexpr, NH: tl.constexpr, D: tl.constexpr, H: tl.constexpr, BLOCK_L: tl.constexpr,
                   QUANT: tl.constexpr):
    """Norm weight, RoPE and the output of one head group [BLOCK_L, NH, D]; returns its sum over tokens (K)."""
    offs_h = H0 + tl.arange(0, NH)
    offs_d = tl.arange(0, D)
    hmask = offs_h < H
    w = tl.load(W + offs_h[:, None] * D + offs_d[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
    # WanRMSNorm: (x * rstd) rounded to bf16, times the bf16 weight, rounded again
    xn = ((x * rstd[:, None, None]).to(tl.bfloat16).to(tl.float32) * w[None]).to(tl.bfloat16).to(tl.float32)
    re, im = tl.split(xn.reshape(BLOCK_L, NH, D // 2, 2))  # adjacent channel pairs
    rope = offs_l[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :]
    c = tl.load(COS + rope, mask=lmask[:, None], other=0.0)[:, None, :]
    s = tl.load(SIN + rope, mask=lmask[:, None], other=0.0)[:, None, :]
    y = tl.join(re * c - im * s, re * s + im * c).reshape(BLOCK_L, NH, D).to(tl.bfloat16)
    mask = lmask[:, None, None] & hmask[None, :, None]
    if QUANT:  # Q: INT8, one scale per (token, head), softmax scale folded in (as sage_kernels.quant_int8_kernel)
        yq = y.to(tl.float32) * tl.cast(pre_scale, tl.float32)
        scale = tl.maximum(tl.max(tl.abs(yq), axis=2), 1e-12) / 127.0
        vals = _round_half_away(yq / scale[:, :, None]).to(tl.int8)
        o = OUT + b * s_ob + offs_h[None, :, None] * s_oh + offs_l[:, None, None] * s_ol + offs_d[None, None, :]
        tl.store(o, vals, mask=mask)
        tl.store(SCALE + (b * H + offs_h[None, :]) * L + offs_l[:, None], scale, mask=lmask[:, None] & hmask[None, :])
    else:  # K: bf16 in the DiT's [B, L, H, D] layout
        o = OUT + b * s_ob + offs_l[:, None, None] * s_ol + offs_h[None, :, None] * D + offs_d[None, None, :]
        tl.store(o, y, mask=mask)
    return tl.sum(tl.where(mask, y.to(tl.float32), 0.0), axis=0)


@triton.jit
def norm_rope_kernel(X, W, COS, SIN, OUT, SCALE, KSUM, L, s_xb, s_xl, s_ob, s_oh, s_ol, eps, pre_scale,
                   H: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                   TILES: tl.constexpr, QUANT: tl.constexpr):
    """Q or K from its projection [B, L, H * D]: the DiT's RMSNorm over all H * D channels (weight W), RoPE on
    adjacent channel pairs (tables COS, SIN [L, D / 2]), then Q (QUANT) as INT8 [B, H, L, D] with per-token
    scales SCALE [B, H, L] (softmax scale folded in through pre_scale), K as bf16 [B, L, H, D] plus each
    program's sum over its tokens in KSUM [B, programs, H, D] (for K's mean). TILES x BLOCK_L tokens of batch b
    per program, BLOCK_L whole rows at a time, each read once, as head groups H1 + H2 (powers of two, H2
    masked past H). The arithmetic is export/dit.py's WanRMSNorm and apply_rope, roundings included."""
    pid_l, b = tl.program_id(0), tl.program_id(1)
    offs_d = tl.arange(0, D)
    acc1 = tl.zeros([H1, D], tl.float32)
    acc2 = tl.zeros([H2 if H2 > 0 else 1, D], tl.float32)
    for i in range(TILES):
        offs_l = (pid_l * TILES + i) * BLOCK_L + tl.arange(0, BLOCK_L)
        lmask = offs_l < L
        x1 = _load_rows(X, b, offs_l, lmask, s_xb, s_xl, 0, H1, D, H)
        ss = tl.sum(tl.sum(x1 * x1, axis=2), axis=1)
        if H2 > 0:
            x2 = _load_rows(X, b, offs_l, lmask, s_xb, s_xl, H1, H2, D, H)
            ss += tl.sum(tl.sum(x2 * x2, axis=2), axis=1)
        rstd = tl.math.rsqrt(ss / (H * D) + tl.cast(eps, tl.float32))
        acc1 += _norm_rope_out(x1, rstd, W, COS, SIN, OUT, SCALE, b, offs_l, lmask, L, s_ob, s_oh, s_ol,
                               pre_scale, 0, H1, D, H, BLOCK_L, QUANT)
        if H2 > 0:
            acc2 += _norm_rope_out(x2, rstd, W, COS, SIN, OUT, SCALE, b, offs_l, lmask, L, s_ob, s_oh, s_ol,
                                   pre_scale, H1, H2, D, H, BLOCK_L, QUANT)
    if not QUANT:
        base = KSUM + (b * tl.num_programs(0) + pid_l) * H * D
        tl.store(base + tl.arange(0, H1)[:, None] * D + offs_d[None, :], acc1)
        if H2 > 0:
            offs_h = H1 + tl.arange(0, H2)
            tl.store(base + offs_h[:, None] * D + offs_d[None, :], acc2, mask=(offs_h < H)[:, None])
# fmt: on


MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23


@triton.jit
def key_slots(p):
    """P's columns in V^T's key order: inside each group of 16 keys, key 8h + 2c + e (h, e in {0, 1}, c in
    0..3) moves to 4c + 2h + e. A thread of the Q.K^T accumulator holds columns 2c, 2c+1, 2c+8, 2c+9 of every
    16; the 8-bit MMA operand wants 4c..4c+3 from that thread (wgmma and mma.sync alike). So this is a
    permutation of registers inside each thread, where the accumulator's own order would cost shuffles."""
    BM: tl.constexpr = p.shape[0]
    BN: tl.constexpr = p.shape[1]
    return p.reshape(BM, BN // 16, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(BM, BN)


@triton.jit
def _step(acc, l_i, m_i, s_int, scale, v, valid, MASK: tl.constexpr):
    """Online softmax of one key block and its P.V; returns the updated (acc, l_i, m_i)."""
    magic = MAGIC
    # Exact int32 Q.K^T, turned into float32 without the quarter-rate I2F: for |x| < 2^22 the bits of
    # x + 0x4B400000 read as a float are exactly 1.5 * 2^23 + x (|x| <= 127 * 127 * 128 < 2^21).
    s = (s_int + 0x4B400000).to(tl.float32, bitcast=True)
    if MASK:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, (tl.max(s, axis=1) - magic) * scale)
    alpha = tl.math.exp2(m_i - m_new)
    # One FMA per score: (s - MAGIC) * scale - m + 8 = s * scale - (MAGIC * scale + m - 8); P * 2^8 in [0, 256].
    bias = magic * scale + m_new - 8.0
    p = tl.math.exp2(s * scale[:, None] - bias[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # A fresh fp32 accumulator per key block, added to the running sum: the two-level accumulation (letting
    # the FP8 MMA accumulate across blocks measured 0.83 % error instead of 0.34 %, bench/NOTES.md).
    acc = acc * alpha[:, None] + tl.dot(key_slots(p.to(tl.float8e4nv)), v)
    return acc, l_i, m_new


def _configs():
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
        if not (bm == 64 and w == 8)
    ]


@triton.jit
def _attend(Q, K, V, QS, KS, VS, Out, OS, Lq, Lk, L_pad, H, n_kblocks,
            s_qb, s_qh, s_ql, s_kb, s_kh, s_kn, s_ob, s_ol, s_oh,
            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KS_BLOCK: tl.constexpr,
            OUT_FP8: tl.constexpr):  # fmt: skip
    """One BLOCK_M tile of queries of head (b, h) against all keys; K has one scale per KS_BLOCK tokens (a
    multiple of BLOCK_N). OUT_FP8: Out is float8_e4m3fn and gets what an FP8 linear's input cast makes of the
    bf16 output: rounded to bf16, times the reciprocal scale at OS, saturated at +-448, rounded to E4M3."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :], mask=offs_m[:, None] < Lq, other=0
    )
    qs = tl.load(QS + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_ptrs = K + b * s_kb + h * s_kh + offs_d[:, None] + offs_n[None, :] * s_kn  # [D, N] view of K
    v_ptrs = V + pid_bh * D * L_pad + offs_d[None, :] * L_pad + offs_n[:, None]  # [N, D] view of V^T
    ks_ptr = KS + pid_bh * n_kblocks
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_full = Lk // BLOCK_N
    for i in range(0, n_full):
        s_int = tl.dot(q, tl.load(k_ptrs + i * BLOCK_N * s_kn))
        acc, l_i, m_i = _step(acc, l_i, m_i, s_int, qs * tl.load(ks_ptr + i * BLOCK_N // KS_BLOCK),
                              tl.load(v_ptrs + i * BLOCK_N), offs_n, False)  # fmt: skip
    if n_full * BLOCK_N < Lk:  # the last, partial key block (V^T is zero-padded to L_pad)
        valid = (n_full * BLOCK_N + offs_n) < Lk
        s_int = tl.dot(q, tl.load(k_ptrs + n_full * BLOCK_N * s_kn, mask=valid[None, :], other=0))
        acc, l_i, m_i = _step(acc, l_i, m_i, s_int, qs * tl.load(ks_ptr + n_full * BLOCK_N // KS_BLOCK),
                              tl.load(v_ptrs + n_full * BLOCK_N), valid, True)  # fmt: skip
    vs = tl.load(VS + pid_bh * D + offs_d)
    out = acc * vs[None, :] / l_i[:, None]  # l_i carries the same 2^8 as P
    o_ptrs = Out + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :]
    if OUT_FP8:
        y = out.to(tl.bfloat16).to(tl.float32) * tl.load(OS)
        tl.store(o_ptrs, tl.clamp(y, -448.0, 448.0).to(tl.float8e4nv), mask=offs_m[:, None] < Lq)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)


@triton.jit
def attn_body(Q, K, V, QS, KS, VS, Out, Lq, Lk, L_pad, H, n_kblocks,
              s_qb, s_qh, s_ql, s_kb, s_kh, s_kn, s_ob, s_ol, s_oh,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KS_BLOCK: tl.constexpr):  # fmt: skip
    """The attention, Out in q's dtype (see _attend)."""
    _attend(Q, K, V, QS, KS, VS, Out, VS, Lq, Lk, L_pad, H, n_kblocks, s_qb, s_qh, s_ql, s_kb, s_kh, s_kn,
            s_ob, s_ol, s_oh, D, BLOCK_M, BLOCK_N, KS_BLOCK, False)  # fmt: skip


@triton.jit
def attn_body_fp8(Q, K, V, QS, KS, VS, Out, OS, Lq, Lk, L_pad, H, n_kblocks,
                  s_qb, s_qh, s_ql, s_kb, s_kh, s_kn, s_ob, s_ol, s_oh,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KS_BLOCK: tl.constexpr):  # fmt: skip
    """The attention written as the next FP8 linear's input, quantized with 1 / scale at OS (see _attend)."""
    _attend(Q, K, V, QS, KS, VS, Out, OS, Lq, Lk, L_pad, H, n_kblocks, s_qb, s_qh, s_ql, s_kb, s_kh, s_kn,
            s_ob, s_ol, s_oh, D, BLOCK_M, BLOCK_N, KS_BLOCK, True)  # fmt: skip


attn_kernel = triton.autotune(configs=_configs(), key=["Lq", "Lk", "D"])(attn_body)
attn_kernel_fp8 = triton.autotune(configs=_configs(), key=["Lq", "Lk", "D"])(attn_body_fp8)
