"""Triton kernels of the VAE (export/vae.py's rms_silu and add_bias_residual), for GPUs.

- rms_silu_kernel: the residual blocks normalize across the channels of [B, C, T, H, W], scale by gamma and
  apply SiLU before each causal convolution, after the previous convolution's bias. In torch that is six ops
  and thirteen trips of the activation through memory; here each program holds every channel of a few dozen
  positions in registers, so x is read once and the result written once (into the convolution's input
  buffer), in float32 until the final rounding.
- add_bias_residual_kernel: a block's last convolution's bias and the residual in one pass (torch adds a
  convolution's bias in a broadcast pass of its own).

Imported only where Triton and a CUDA GPU exist.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Sizes are not specialized: Triton would compile a variant per pattern of which of them are 1 or multiples
# of 16, and a VAE call meets dozens (frame sizes x first / later chunks); loading each from Triton's disk
# cache in a fresh process cost ~0.8 s of a 0.65 s encode. Strides stay specialized (multiples of 16 let
# loads be vectorized; unspecialized, the encode took 0.76 s instead of 0.65), and channels-last strides
# share one pattern. Channels-last (the GPU runtime's layout) is a constexpr: channels known contiguous.
@triton.jit(do_not_specialize=["C", "H", "W", "S"])
def rms_silu_kernel(X, Bias, G, Out, C, H, W, S, s_xb, s_xc, s_xt, s_xh, s_xw, s_ob, s_oc, s_ot, s_oh, s_ow, scale,
                    eps, HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, DENSE: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """Positions (t, h, w) flattened to S = T*H*W; each program: BLOCK_S positions x all C channels. Any
    strides; CHANNELS_LAST: the channel strides are 1 (s_xc, s_oc unused)."""
    pid_s, b = tl.program_id(0), tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    if DENSE:  # positions at one stride (s_w) in x and out alike: no division by runtime sizes
        px = offs_s * s_xw
        po = offs_s * s_ow
    else:
        t = offs_s // (H * W)
        hh = offs_s // W % H
        ww = offs_s % W
        px = t * s_xt + hh * s_xh + ww * s_xw
        po = t * s_ot + hh * s_oh + ww * s_ow
    cx = offs_c if CHANNELS_LAST else offs_c * s_xc
    co = offs_c if CHANNELS_LAST else offs_c * s_oc
    mask = (offs_c[:, None] < C) & (offs_s[None, :] < S)
    x = tl.load(X + b * s_xb + cx[:, None] + px[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_BIAS:
        x += tl.load(Bias + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[:, None]
    # F.normalize: x / max(||x||, eps), then * sqrt(C) * gamma
    inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), eps)
    g = tl.load(G + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    y = x * inv[None, :] * g[:, None]
    y = y * tl.sigmoid(y)
    o = Out + b * s_ob + co[:, None] + po[None, :]
    tl.store(o, y.to(Out.dtype.element_ty), mask=mask)


def rms_silu_cuda(
    x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor | None = None, bias=None
):
    b, c, t, h, w = x.shape
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape:
        raise ValueError(f"rms_silu: out has shape {tuple(out.shape)}, x {tuple(x.shape)}")
    channels_last = x.stride(1) == 1 and out.stride(1) == 1

    def dense(a):  # frames, rows and columns at one stride
        return a.stride(2) == h * a.stride(3) and a.stride(3) == w * a.stride(4)

    block_c = triton.next_power_of_2(c)
    block_s = max(16, 8192 // block_c)  # 8192 values a program: 32 a thread at 8 warps
    s = t * h * w
    grid = (triton.cdiv(s, block_s), b)
    rms_silu_kernel[grid](x, gamma if bias is None else bias, gamma.reshape(-1), out, c, h, w, s, *x.stride(),
                          *out.stride(), scale, 1e-12, HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last,
                          DENSE=dense(x) and dense(out), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=8)  # fmt: skip
    return out


@triton.jit
def add_bias_residual_kernel(Y, Bias, Hres, N, C, THW, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Y += Bias[channel] + Hres over N elements of two dense tensors laid out alike (Y's memory order)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = offs % C if CHANNELS_LAST else offs // THW % C
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(Hres + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bias + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (y + b + r).to(Y.dtype.element_ty), mask=mask)


def add_bias_residual_cuda(y: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    b, c, t, hh, w = y.shape
    channels_last = y.is_contiguous(memory_format=torch.channels_last_3d) and c > 1 and y.stride(1) == 1
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    if not y.is_contiguous(memory_format=fmt):
        raise ValueError(f"add_bias_residual: y must be dense, got strides {y.stride()}")
    if h.stride() != y.stride():  # a residual laid out otherwise (rare: a view from another layout)
        h = h.contiguous(memory_format=fmt)
    n = y.numel()
    add_bias_residual_kernel[(triton.cdiv(n, 2048),)](y, bias, h, n, c, t * hh * w, CHANNELS_LAST=channels_last,
                                                      BLOCK=2048, num_warps=8)  # fmt: skip
    return y


@triton.jit(do_not_specialize=["N", "T"])
def frames_differ_kernel(X, Ref, Flag, N, T, s_xb, s_xt, s_rb, BLOCK: tl.constexpr):
    """Flag[0] = 1 if any of the T frames of X differs from Ref; frame (b, t) is N contiguous integers (the
    values' bits) at X + b * s_xb + t * s_xt, Ref's frame b at Ref + b * s_rb. A program stops at its first
    differing frame: most inputs that are not repeats differ in their first frames, so they are not read
    through."""
    pid, b = tl.program_id(0), tl.program_id(1)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    ref = tl.load(Ref + b * s_rb + offs, mask=mask, other=0)
    t, differ = 0, 0
    while (t < T) & (differ == 0):
        differ = tl.max(
            (tl.load(X + b * s_xb + t * s_xt + offs, mask=mask, other=0) != ref).to(tl.int32), axis=0
        )
        t += 1
    if differ > 0:
        tl.atomic_max(Flag, 1)


def frames_differ_cuda(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether any frame of x [B, C, T, H, W] differs from ref [B, C, 1, H, W]; integer views of the values (so
    their bits are compared), both channels-last with each frame dense (vae.frames_dense)."""
    b, c, t, h, w = x.shape
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    n = c * h * w
    frames_differ_kernel[(triton.cdiv(n, 4096), b)](x, ref, flag, n, t, x.stride(0), x.stride(2), ref.stride(0),
                                                    BLOCK=4096, num_warps=8)  # fmt: skip
    return bool(flag.item())
