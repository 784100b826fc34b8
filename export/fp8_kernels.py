"""The FFN's up-projection as one FP8 GEMM that writes the down-projection's FP8 input (GPU configs'
`fp8_gelu_epilogue`; off in every config, see the measurement below).

Unfused, the FFN runs cuBLAS FP8 -> bf16 [L, 13824] (906 MB at 480P), then one kernel that reads it back,
adds the bias, applies GELU and casts to FP8 with ffn.2's static scale (453 MB): 0.62-0.70 ms a block on
an H200, where the GEMM itself is 3.0 ms. Here the GEMM's epilogue does that work on the accumulator tile,
so the bf16 activation is never written. The arithmetic is the unfused graph's, operation for operation
(`gelu_fp8_reference`): the product scaled and the bias added in float32, rounded to bf16 (what cuBLAS's bias
epilogue hands over), GELU taken in float32, rounded to bf16 (the module's output dtype), divided by the scale,
saturated, cast.
Only the GEMM's summation order differs (H200: ffn.2's input at most one FP8 step from the unfused one, on
1.6 % of its elements).

Measured on H200s (bench/results/ffn_epilogue-h200.json, engine_forward_gelu-h200.json): the kernel takes
3.38-3.43 ms where cuBLAS's GEMM alone takes 2.96-3.03 (the epilogue runs between tiles, tensor cores idle),
so the compiled FFN goes 6.74-6.88 -> 6.56-6.65 ms and a block engine's GEMM + elementwise kernels 16.75 ->
16.44 ms; a whole engine forward does not move (2351 vs 2353 ms, interleaved): at the 700 W cap the time
saved comes back as attention time.

A persistent kernel: one program per SM walks the output tiles in grouped order; A and W are loaded with
pointers (K-major both, as FP8 MMAs want them). TMA descriptors made on the device were 0.6 % faster in an
FFN-only package but failed with an illegal address inside the block engine (engine_forward_gelu_tma.log);
torch 2.11 does not trace host-side descriptors through a triton_op. `torch.ops.x2v.fp8_gelu_linear` is a
`torch.library.triton_op`, so AOTInductor compiles the kernel into the block engine like any of its own.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
GELU_C = 1.5957691216057308  # 2 * sqrt(2 / pi): 0.5 (1 + tanh z) = sigmoid(2 z)
# Inductor's best FP8 template tile at these shapes on an H200 (block_autotune.log); best of the tiles in
# ffn_epilogue.log too, where two programs an SM (128 x 128 or 64 x 256 tiles) were 16-70 % slower
TILE = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the reference below is all that runs there
    triton = None

if triton is not None:
    _C, _MAX = tl.constexpr(GELU_C), tl.constexpr(E4M3_MAX)

    @triton.jit
    def gelu_fp8_gemm(a, w, c, x_scale, w_scale, bias, out_scale, M, N, K,
                      CHANNEL: tl.constexpr, FAST_ACCUM: tl.constexpr, NUM_SMS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):  # fmt: skip
        """c [M, N] = quantize(gelu(bf16(a [M, K] . w [N, K]^T * x_scale * w_scale + bias)) / out_scale)."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        xs = tl.load(x_scale)
        # Triton's fp32 `/` is div.full.f32: x * rcp.approx(y), plus range fix-ups for |y| outside
        # [2^-126, 2^126] that it repeats for every element; a static scale lies inside, where g * (1 / so)
        # gives the same bits without them.
        inv_so = 1.0 / tl.load(out_scale)
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            # GROUP_M row tiles share each column of W while it is in L2
            group = tile // (GROUP_M * num_n)
            size_m = min(num_m - group * GROUP_M, GROUP_M)
            pid_m = group * GROUP_M + (tile % (GROUP_M * num_n)) % size_m
            pid_n = (tile % (GROUP_M * num_n)) // size_m
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            # rows past the end read row 0 (their results are not stored); K is whole blocks
            ks = tl.arange(0, BLOCK_K)
            a_ptrs = a + tl.where(rows < M, rows, 0)[:, None] * K + ks[None, :]
            w_ptrs = w + tl.where(cols < N, cols, 0)[:, None] * K + ks[None, :]
            for ki in range(k_tiles):
                a_tile = tl.load(a_ptrs + ki * BLOCK_K)
                w_tile = tl.load(w_ptrs + ki * BLOCK_K)
                if FAST_ACCUM:  # partial sums stay in the tensor cores' accumulator (Triton's sm90 default)
                    acc = tl.dot(a_tile, w_tile.T, acc)
                else:  # added into float32 registers after every MMA
                    acc = tl.dot(a_tile, w_tile.T, acc, max_num_imprecise_acc=0)
            if CHANNEL:
                ws = tl.load(w_scale + cols, mask=cols < N, other=1.0)[None, :]
            else:
                ws = tl.load(w_scale)
            y = acc * (xs * ws) + tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            y = y.to(tl.bfloat16).to(tl.float32)
            g = (y * tl.sigmoid(_C * (y + 0.044715 * y * y * y))).to(tl.bfloat16).to(tl.float32)
            q = tl.clamp(g * inv_so, -_MAX, _MAX)
            mask = (rows < M)[:, None] & (cols < N)[None, :]
            tl.store(c + rows[:, None] * N + cols[None, :], q.to(tl.float8e4nv), mask=mask)


def gelu_fp8_reference(q, w, x_scale, w_scale, bias, out_scale):
    """The unfused graph's arithmetic in torch (any device): the kernel's specification."""
    ws = w_scale.float()[:, None] if w_scale.numel() > 1 else w_scale.float()
    y = (q.float() @ (w.float() * ws).t() * x_scale.float() + bias.float()).bfloat16().float()
    g = (y * torch.sigmoid(GELU_C * (y + 0.044715 * y * y * y))).bfloat16().float()
    return (g / out_scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def launch(q, w, x_scale, w_scale, bias, out_scale, fast_accum, wrap=None, num_sms=None, tile=None):
    """Run the kernel. wrap: torch.library.wrap_triton inside the op; tests pass `lambda f: f` for the
    interpreter. num_sms: the persistent grid (the device's SM count by default)."""
    t = dict(TILE, **(tile or {}))
    bm, bn, bk = t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]
    m, k = q.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=q.device)
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    (wrap or torch.library.wrap_triton)(gelu_fp8_gemm)[(min(num_sms, tiles),)](
        q, w, out, x_scale, w_scale, bias, out_scale, m, n, k,
        CHANNEL=w_scale.numel() > 1, FAST_ACCUM=fast_accum, NUM_SMS=num_sms,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=t["GROUP_M"],
        num_warps=t["num_warps"], num_stages=t["num_stages"],
    )  # fmt: skip
    return out


def check_inputs(q, w, x_scale, w_scale, bias, out_scale) -> None:
    """The kernel's preconditions, with the offending input named."""
    f8 = torch.float8_e4m3fn
    if q.dtype != f8 or w.dtype != f8:
        raise ValueError(f"fp8_gelu_linear: input {q.dtype} and weight {w.dtype} must both be float8_e4m3fn")
    if q.dim() != 2 or w.dim() != 2 or q.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_gelu_linear: input {list(q.shape)} and weight {list(w.shape)} do not multiply")
    if w.shape[0] % 16:
        raise ValueError(f"fp8_gelu_linear: N must be a multiple of 16, got weight {list(w.shape)}")
    if not (q.is_contiguous() and w.is_contiguous()):
        raise ValueError("fp8_gelu_linear: input and weight must be contiguous (K-major)")
    if bias.shape != (w.shape[0],) or w_scale.numel() not in (1, w.shape[0]):
        raise ValueError(f"fp8_gelu_linear: bias {list(bias.shape)} / weight_scale {list(w_scale.shape)} "
                         f"do not match {w.shape[0]} outputs")  # fmt: skip
    if x_scale.numel() != 1 or out_scale.numel() != 1:
        raise ValueError("fp8_gelu_linear: input and output scales must be single values (static per-tensor)")


@torch.library.triton_op("x2v::fp8_gelu_linear", mutates_args={})
def fp8_gelu_linear(q: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor, out_scale: torch.Tensor,
                    fast_accum: bool) -> torch.Tensor:  # fmt: skip
    """q [M, K] and w [N, K] float8_e4m3fn; x_scale, out_scale one float32 each; w_scale one or [N]; bias [N]
    -> [M, N] float8_e4m3fn: ffn.2's quantized input, straight from ffn.0's product."""
    check_inputs(q, w, x_scale, w_scale, bias, out_scale)
    if q.shape[1] % TILE["BLOCK_K"]:
        raise ValueError(
            f"fp8_gelu_linear: K must be a multiple of {TILE['BLOCK_K']}, got weight {list(w.shape)}"
        )
    return launch(q, w, x_scale.float(), w_scale.float(), bias, out_scale.float(), fast_accum)


@fp8_gelu_linear.register_fake
def _(q, w, x_scale, w_scale, bias, out_scale, fast_accum):
    return q.new_empty(q.shape[0], w.shape[0])


@fp8_gelu_linear.register_kernel("cpu")
def _(q, w, x_scale, w_scale, bias, out_scale, fast_accum):
    check_inputs(q, w, x_scale, w_scale, bias, out_scale)
    return gelu_fp8_reference(q, w, x_scale, w_scale, bias, out_scale)
