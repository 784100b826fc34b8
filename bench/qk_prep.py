"""Q and K prepared for SageAttention in one pass each: RMSNorm + RoPE (+ Q's INT8) fused (an experiment).

    TRITON_INTERPRET=1 python bench/qk_prep.py --check     (CPU: against the model's ops, small shapes)
    python bench/qk_prep.py [--out DIR]      (GPU, full size: against the engines' path; writes qk_prep-<card>.json)
    python bench/block_engine.py --variants fp8-sage-tile-fast,fp8-sage-tile-fast-qkprep   (GPU)

Why: in the FP8 block engine, preparing Q, K and V for the op takes about 2.0 ms of a 49.8 ms block
(`block_quant_kernels-h200.json`): RMS statistics of q and k (0.22 ms), Q norm + RoPE writing q in bf16 (0.54),
the same for K (0.45), K's mean over tokens, for which Inductor reads k again and recomputes RoPE (0.29), and
the Q/K quantization kernels reading q and k back (0.29). Here one kernel per tensor reads each row once (a
program holds BLOCK_L whole 5120-channel rows in registers, as two power-of-two head groups, 32 + 8 heads):
Q leaves as INT8 with its per-token scales (no bf16 q written or read back), K as bf16 plus per-program sums
for its mean. The arithmetic is the model's (export/dit.py WanRMSNorm and apply_rope, roundings included), so
the INT8 Q equals the current path's up to the order of the sum of squares.

Not in the engines: measured first (`block_engine.py` variant `fp8-sage-tile-fast-qkprep`, which swaps
SelfAttention.forward for `patched_forward`). Going into the product would make the op take the projections,
the norm weights and the RoPE tables, and the ONNX node and TensorRT plugin with it.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl

from x2v.plugins import sage_attention as sage
from x2v.plugins.sage_kernels import _round_half_away


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
def _finish(x, rstd, W, COS, SIN, OUT, SCALE, b, offs_l, lmask, L, s_ob, s_oh, s_ol, pre_scale,
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
def qk_prep_kernel(X, W, COS, SIN, OUT, SCALE, KSUM, L, s_xb, s_xl, s_ob, s_oh, s_ol, eps, pre_scale,
                   H: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                   TILES: tl.constexpr, QUANT: tl.constexpr):
    """TILES x BLOCK_L tokens of batch b, all H heads, BLOCK_L rows [H * D] at a time, each read once, as head
    groups H1 + H2 (powers of two, H2 masked past H). K: the tokens' sum per channel into KSUM [B, programs, H, D]."""
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
        acc1 += _finish(x1, rstd, W, COS, SIN, OUT, SCALE, b, offs_l, lmask, L, s_ob, s_oh, s_ol, pre_scale,
                        0, H1, D, H, BLOCK_L, QUANT)
        if H2 > 0:
            acc2 += _finish(x2, rstd, W, COS, SIN, OUT, SCALE, b, offs_l, lmask, L, s_ob, s_oh, s_ol, pre_scale,
                            H1, H2, D, H, BLOCK_L, QUANT)
    if not QUANT:
        base = KSUM + (b * tl.num_programs(0) + pid_l) * H * D
        tl.store(base + tl.arange(0, H1)[:, None] * D + offs_d[None, :], acc1)
        if H2 > 0:
            offs_h = H1 + tl.arange(0, H2)
            tl.store(base + offs_h[:, None] * D + offs_d[None, :], acc2, mask=(offs_h < H)[:, None])
# fmt: on


def head_groups(h: int) -> tuple[int, int]:
    h1 = 1 << (h.bit_length() - 1)
    return h1, 0 if h == h1 else triton.next_power_of_2(h - h1)


def prepare(
    qp,
    kp,
    v,
    wq,
    wk,
    cos,
    sin,
    num_heads: int,
    eps: float,
    wrap,
    block_l: int = 2,
    tiles: int = 16,
    num_warps: int = 8,
):
    """-> quantize_pass's six tensors, from the q/k projections [B, L, C] (bf16) and v [B, L, H, D]."""
    from x2v.plugins import sage_kernels as K

    b, n, c = qp.shape
    h, d = num_heads, c // num_heads
    h1, h2 = head_groups(h)
    tiles = max(1, min(tiles, triton.cdiv(n, block_l)))
    grid = (triton.cdiv(n, block_l * tiles), b)
    q8 = torch.empty((b, h, n, d), dtype=torch.int8, device=qp.device)
    qs = torch.empty((b, h, n), dtype=torch.float32, device=qp.device)
    sm = d**-0.5 * math.log2(math.e)
    wrap(qk_prep_kernel)[grid](qp, wq, cos, sin, q8, qs, qs, n, qp.stride(0), qp.stride(1),
                               q8.stride(0), q8.stride(1), q8.stride(2), eps, sm,
                               H=h, H1=h1, H2=h2, D=d, BLOCK_L=block_l, TILES=tiles, QUANT=True, num_warps=num_warps)  # fmt: skip
    k = torch.empty((b, n, h, d), dtype=kp.dtype, device=kp.device)
    ksum = torch.empty((b, grid[0], h, d), dtype=torch.float32, device=kp.device)
    wrap(qk_prep_kernel)[grid](kp, wk, cos, sin, k, qs, ksum, n, kp.stride(0), kp.stride(1),
                               k.stride(0), 0, k.stride(1), eps, 1.0,
                               H=h, H1=h1, H2=h2, D=d, BLOCK_L=block_l, TILES=tiles, QUANT=False, num_warps=num_warps)  # fmt: skip
    k_mean = (ksum.sum(1) / n).contiguous()  # [B, H, D]
    nkb = sage.triton_cdiv(n, sage.BLOCK_N)
    k8 = torch.empty((b, h, n, d), dtype=torch.int8, device=kp.device)
    ks = torch.empty((b, h, nkb), dtype=torch.float32, device=kp.device)
    wrap(K.quant_int8_kernel)[(nkb, b * h)](
        k, k_mean, k8, ks, n, h, nkb, k.stride(0), k.stride(1), k.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        1.0, SMOOTH=True, PER_TOKEN=False, BLOCK=sage.BLOCK_N, D=d)  # fmt: skip
    v8 = torch.empty((b, h, d, nkb * sage.BLOCK_N), dtype=torch.float8_e4m3fn, device=v.device)
    v_scale = (
        torch.linalg.vector_norm(v, math.inf, dim=1).float().clamp(min=1e-12) / sage.V_FP8_MAX
    ).contiguous()
    wrap(K.quant_v_kernel)[(nkb, b * h)](
        v, v_scale, v8, n, nkb * sage.BLOCK_N, h, v.stride(0), v.stride(1), v.stride(2), BLOCK=sage.BLOCK_N, D=d)  # fmt: skip
    return q8, qs, k8, ks, v8, v_scale


def model_path(qp, kp, v, wq, wk, cos, sin, num_heads: int, eps: float, truncate: bool = False):
    """What the DiT computes today: WanRMSNorm and apply_rope as torch ops, then the op's inputs. truncate:
    round float32 -> bf16 toward zero, as Triton's CPU interpreter does (for the check)."""
    from x2v.export.dit import apply_rope

    if not truncate:
        bf16 = lambda x: x.bfloat16()  # noqa: E731
    else:
        bf16 = lambda x: (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32).bfloat16()  # noqa: E731

    def norm(x, w):
        xf = x.float()
        return bf16(bf16(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).float() * w.float())

    def rope(x):
        xf = x.float().unflatten(-1, (num_heads, -1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        c, s = cos[None, :, None], sin[None, :, None]
        return bf16(torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2))

    if not truncate:  # the model's own functions, so this path is the DiT's
        rope = lambda x: apply_rope(x.unflatten(-1, (num_heads, -1)), cos, sin)  # noqa: E731
    return rope(norm(qp, wq)), rope(norm(kp, wk)), v


@torch.library.triton_op("x2v_bench::sage_attention_rope", mutates_args={})
def sage_attention_rope(qp: torch.Tensor, kp: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float) -> torch.Tensor:  # fmt: skip
    """SageAttention of RMSNorm + RoPE'd q and k, from the projections: [B, L, C] x2, v [B, L, H, D] -> [B, L, H, D]."""
    from torch.library import wrap_triton

    from x2v.plugins import sage_kernels as K

    out = torch.empty_like(v)
    packed = prepare(qp, kp, v, wq, wk, cos, sin, num_heads, eps, wrap_triton)
    sage.attend(
        *packed,
        out,
        wrap_triton,
        K.attn_body,
        **(sage.TILE or {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}),
    )
    return out


@sage_attention_rope.register_fake
def _(qp, kp, v, wq, wk, cos, sin, num_heads, eps):
    return torch.empty_like(v)


@sage_attention_rope.register_kernel("cpu")
def _(qp, kp, v, wq, wk, cos, sin, num_heads, eps):
    return sage.sage_reference(*model_path(qp, kp, v, wq, wk, cos, sin, num_heads, eps))


def patched_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """SelfAttention.forward with the op taking the projections (for block_engine's -qkprep variant)."""
    n = self.num_heads
    out = torch.ops.x2v_bench.sage_attention_rope(self.q(x), self.k(x), self.v(x).unflatten(-1, (n, -1)),
                                                  self.norm_q.weight, self.norm_k.weight, cos, sin, n,
                                                  self.norm_q.eps)  # fmt: skip
    return self.o(out.flatten(2))


def check():
    """CPU, Triton's interpreter (TRITON_INTERPRET=1): the fused preparation against the model's ops."""
    torch.manual_seed(0)
    for b, n, h, d in ((1, 37, 2, 64), (2, 20, 5, 64), (1, 130, 3, 128)):  # partial token blocks, H2 masked
        c = h * d
        qp, kp = (torch.randn(b, n, c) * 3).bfloat16(), (torch.randn(b, n, c) + 2).bfloat16()
        v = torch.randn(b, n, h, d).bfloat16()
        wq, wk = (1 + 0.3 * torch.randn(c)).bfloat16(), (1 + 0.3 * torch.randn(c)).bfloat16()
        ang = torch.rand(n, d // 2) * 6
        cos, sin = ang.cos(), ang.sin()
        got = prepare(qp, kp, v, wq, wk, cos, sin, h, 1e-6, lambda f: f, tiles=4)  # partial last program
        ref = sage.quantize_pass(
            *model_path(qp, kp, v, wq, wk, cos, sin, h, 1e-6, truncate=True), lambda f: f
        )

        # Triton's interpreter truncates float32 -> bf16 where the GPU rounds to nearest: the reference does the
        # same here, so what remains is the order of the sum of squares (an INT8 step, rarely)
        def deq(t, n=n):
            return t[0].float() * t[1][..., None], t[2].float() * t[3].repeat_interleave(128, -1)[
                ..., :n, None
            ]

        for name, a, r in zip(("q", "k"), deq(got), deq(ref)):
            err = ((a - r).norm() / r.norm()).item()
            print(f"{(b, n, h, d)} {name}: rel L2 {err:.2e}")
            assert err < 1e-3, name
        assert torch.equal(got[4].float(), ref[4].float()) and torch.equal(
            got[5], ref[5]
        )  # V: the same kernels


def gpu(out_dir, reps: int):
    """Full size (1 x 32760 tokens x 40 heads x 128): the fused preparation against the model's ops compiled by
    Inductor followed by the quantization kernels (the engines' path), same inputs, interleaved GPU times."""
    from bench.common import event_ms, rel_err, write_result

    torch.manual_seed(0)
    b, n, h, d = 1, 32760, 40, 128
    c = h * d
    qp, kp = (
        (torch.randn(b, n, c, device="cuda") * 3).bfloat16(),
        (torch.randn(b, n, c, device="cuda") + 2).bfloat16(),
    )
    v = torch.randn(b, n, h, d, device="cuda").bfloat16()
    wq, wk = (
        (1 + 0.3 * torch.randn(c, device="cuda")).bfloat16(),
        (1 + 0.3 * torch.randn(c, device="cuda")).bfloat16(),
    )
    ang = torch.rand(n, d // 2, device="cuda") * 6
    cos, sin = ang.cos(), ang.sin()
    args = (qp, kp, v, wq, wk, cos, sin, h, 1e-6)
    compiled = torch.compile(model_path)
    calls = {
        "inductor_ops_then_kernels": lambda: sage.quantize_pass(*compiled(*args)),
        "fused": lambda: prepare(*args, lambda f: f),
    }
    got, ref = calls["fused"](), calls["inductor_ops_then_kernels"]()
    res = {"shape": [b, n, h, d], "accuracy": {}}
    for name, i in (("q8", 0), ("q_scale", 1), ("k8", 2), ("k_scale", 3)):
        res["accuracy"][name] = rel_err(got[i].float(), ref[i].float())
    times = {k: [] for k in calls}
    for fn in calls.values():
        fn()
    for _ in range(reps):
        for k, fn in calls.items():
            times[k].append(event_ms(fn, hide_launch=True))
    res["ms"] = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
    print(json.dumps(res), flush=True)
    print(f"wrote {write_result('qk_prep', res, out_dir)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--check", action="store_true", help="CPU check in Triton's interpreter (set TRITON_INTERPRET=1)"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    if args.check:
        return check()
    gpu(args.out, args.reps)


if __name__ == "__main__":
    main()
