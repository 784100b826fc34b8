"""x2v's SageAttention: one op for torch eager, torch.compile, AOTInductor, ONNX and TensorRT.

`sage_attention(q, k, v)` takes [B, L, H, D] tensors (the DiT's layout) and returns the same shape. On a
GPU the kernels cover (sm89+, bf16/fp16, head dim 64 or 128) it runs `torch.ops.x2v.sage_attention`, a
`torch.library.triton_op` whose Triton kernels (plugins/sage_kernels.py) trace into compiled graphs and
AOTInductor packages; elsewhere it falls back to SDPA and says so once in the log.

`sage_reference` computes the same quantized math in plain torch (any device): it is the specification
the kernels are tested against, and what the ONNX custom node means.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger("x2v.sage")

BLOCK_N = 128  # key block of the attention kernel and granularity of K's scales
P_SCALE = 256.0  # P's scale before the FP8 cast (a power of two, folded into exp2 in the kernel)
V_FP8_MAX = 448.0
SUPPORTED_HEAD_DIMS = (64, 128)
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("SageAttention not used (%s): falling back to SDPA", reason)


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on these inputs, or None if they can."""
    if q.device.type != "cuda":
        return f"device {q.device.type}"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]}"
    major, minor = torch.cuda.get_device_capability(q.device)
    if (major, minor) < (8, 9):
        return f"compute capability {major}.{minor} has no FP8 tensor cores"
    return None


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention, q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D]."""
    reason = unsupported_reason(q)
    if reason is None:
        return torch.ops.x2v.sage_attention(q, k, v)
    _warn_once(reason)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )


# The quantized math, in plain torch: the reference for the kernels and the meaning of the ONNX node.


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def quantize_q(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, L, H, D] -> int8 values [B, H, L, D] and per-token scales [B, H, L] (softmax scale * log2 e folded in)."""
    x = q.float().transpose(1, 2) * (q.shape[-1] ** -0.5 * math.log2(math.e))
    scale = x.abs().amax(-1).clamp(min=1e-12) / 127.0
    return round_half_away(x / scale[..., None]).to(torch.int8), scale


def quantize_k(k: torch.Tensor, block: int = BLOCK_N) -> tuple[torch.Tensor, torch.Tensor]:
    """k [B, L, H, D] -> smoothed int8 values [B, H, L, D] and one scale per `block` tokens [B, H, L/block]."""
    x = k.float().transpose(1, 2)
    x = x - x.mean(dim=2, keepdim=True)
    b, h, n, d = x.shape
    pad = -n % block
    blocks = F.pad(x, (0, 0, 0, pad)).view(b, h, -1, block, d)
    scale = blocks.abs().amax(dim=(-1, -2)).clamp(min=1e-12) / 127.0
    vals = round_half_away(blocks / scale[..., None, None]).to(torch.int8).view(b, h, -1, d)[:, :, :n]
    return vals, scale


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B, L, H, D] -> FP8 E4M3 values [B, H, L, D] and per-channel scales [B, H, D]."""
    x = v.float().transpose(1, 2)
    scale = x.abs().amax(dim=2).clamp(min=1e-12) / V_FP8_MAX
    return (x / scale[:, :, None]).to(torch.float8_e4m3fn), scale


def sage_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = BLOCK_N) -> torch.Tensor:
    """What the kernels compute (up to summation order), materializing the score matrix: for tests."""
    qi, qs = quantize_q(q)
    ki, ks = quantize_k(k, block)
    vf, vs = quantize_v(v)
    ks_tok = ks.repeat_interleave(block, dim=-1)[..., : k.shape[1]]
    s = (qi.float() @ ki.float().transpose(-1, -2)) * qs[..., None] * ks_tok[..., None, :]  # log2 domain
    p = torch.exp2(s - s.amax(-1, keepdim=True))
    l_sum = p.sum(-1, keepdim=True)
    p8 = (p * P_SCALE).to(torch.float8_e4m3fn).float()
    out = (p8 @ vf.float()) * vs[:, :, None] / (l_sum * P_SCALE)
    return out.transpose(1, 2).to(q.dtype)


# The registered op. Its body only runs on CUDA tensors; the fake implementation gives shapes for tracing.


def quantize_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wrap=None):
    """Launch the three quantization kernels -> (q8, q_scale, k8, k_scale, v8 transposed, v_scale).

    wrap: how kernels are launched, torch.library.wrap_triton by default (tests pass `lambda f: f` to run them
    in Triton's CPU interpreter)."""
    from torch.library import wrap_triton

    from x2v.plugins import sage_kernels as K

    wrap = wrap or wrap_triton
    b, lq, h, d = q.shape
    q8 = torch.empty((b, h, lq, d), dtype=torch.int8, device=q.device)
    qs = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    k_mean = k.mean(dim=1, dtype=torch.float32).contiguous()  # [B, H, D]
    sm = d**-0.5 * math.log2(math.e)
    wrap(K.quant_int8_kernel)[(triton_cdiv(lq, 128), b * h)](
        q, k_mean, q8, qs, lq, h, lq, q.stride(0), q.stride(1), q.stride(2), q8.stride(0), q8.stride(1), q8.stride(2),
        sm, SMOOTH=False, PER_TOKEN=True, BLOCK=128, D=d)  # fmt: skip
    return (q8, qs, *_quantize_k_v(k, k_mean, v, wrap))


def _quantize_k_v(k, k_mean, v, wrap):
    """K (bf16 [B, L, H, D], smoothed by k_mean [B, H, D]) and V -> (k8, k_scale, v8 transposed, v_scale)."""
    from x2v.plugins import sage_kernels as K

    b, lk, h, d = k.shape
    nkb = triton_cdiv(lk, BLOCK_N)
    k8 = torch.empty((b, h, lk, d), dtype=torch.int8, device=k.device)
    ks = torch.empty((b, h, nkb), dtype=torch.float32, device=k.device)
    v8 = torch.empty((b, h, d, nkb * BLOCK_N), dtype=torch.float8_e4m3fn, device=k.device)
    # max |v| in one reduction (abs().amax() writes |v| out first)
    v_scale = (torch.linalg.vector_norm(v, math.inf, dim=1).float().clamp(min=1e-12) / V_FP8_MAX).contiguous()
    wrap(K.quant_int8_kernel)[(nkb, b * h)](
        k, k_mean, k8, ks, lk, h, nkb, k.stride(0), k.stride(1), k.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        1.0, SMOOTH=True, PER_TOKEN=False, BLOCK=BLOCK_N, D=d)  # fmt: skip
    wrap(K.quant_v_kernel)[(nkb, b * h)](
        v, v_scale, v8, lk, nkb * BLOCK_N, h, v.stride(0), v.stride(1), v.stride(2), BLOCK=BLOCK_N, D=d)  # fmt: skip
    return k8, ks, v8, v_scale


def head_groups(h: int) -> tuple[int, int]:
    """H heads as two power-of-two groups for norm_rope_kernel: 40 -> (32, 8), 12 -> (8, 4), 2 -> (2, 0)."""
    h1 = 1 << (h.bit_length() - 1)
    return h1, 0 if h == h1 else 1 << (h - h1 - 1).bit_length()


def prepare_pass(qp, kp, v, wq, wk, cos, sin, num_heads: int, eps: float, wrap=None, block_l: int = 2,
                 tiles: int = 16, num_warps: int = 8):  # fmt: skip
    """quantize_pass's six tensors from the q/k projections [B, L, H * D] (before norm and RoPE) and v
    [B, L, H, D]: Q normalized, rotated and quantized in one pass, K normalized and rotated with its mean's
    partial sums, then K's and V's quantization kernels."""
    from torch.library import wrap_triton

    from x2v.plugins import sage_kernels as K

    wrap = wrap or wrap_triton
    b, n, c = qp.shape
    h, d = num_heads, c // num_heads
    h1, h2 = head_groups(h)
    tiles = max(1, min(tiles, triton_cdiv(n, block_l)))
    grid = (triton_cdiv(n, block_l * tiles), b)
    q8 = torch.empty((b, h, n, d), dtype=torch.int8, device=qp.device)
    qs = torch.empty((b, h, n), dtype=torch.float32, device=qp.device)
    sm = d**-0.5 * math.log2(math.e)
    unused = torch.empty(1, dtype=torch.float32, device=qp.device)  # the pointer the other variant writes
    wrap(K.norm_rope_kernel)[grid](qp, wq, cos, sin, q8, qs, unused, n, qp.stride(0), qp.stride(1),
                                   q8.stride(0), q8.stride(1), q8.stride(2), eps, sm, H=h, H1=h1, H2=h2, D=d,
                                   BLOCK_L=block_l, TILES=tiles, QUANT=True, num_warps=num_warps)  # fmt: skip
    k = torch.empty((b, n, h, d), dtype=kp.dtype, device=kp.device)
    ksum = torch.empty((b, grid[0], h, d), dtype=torch.float32, device=kp.device)
    wrap(K.norm_rope_kernel)[grid](kp, wk, cos, sin, k, unused, ksum, n, kp.stride(0), kp.stride(1),
                                   k.stride(0), 0, k.stride(1), eps, 1.0, H=h, H1=h1, H2=h2, D=d,
                                   BLOCK_L=block_l, TILES=tiles, QUANT=False, num_warps=num_warps)  # fmt: skip
    k_mean = (ksum.sum(1) / n).contiguous()  # [B, H, D]
    return (q8, qs, *_quantize_k_v(k, k_mean, v, wrap))


def norm_rope_reference(qp, kp, wq, wk, cos, sin, num_heads: int, eps: float):
    """What norm_rope_kernel computes before quantizing: the DiT's own RMSNorm and apply_rope."""
    from x2v.export.dit import apply_rope, rms_norm

    rope = lambda x: apply_rope(x.unflatten(-1, (num_heads, -1)), cos, sin)  # noqa: E731
    return rope(rms_norm(qp, wq, eps)), rope(rms_norm(kp, wk, eps))


def quantize_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """quantize_pass's outputs computed with torch ops (the reference math): what the op traces to under a
    compiler with TRACED_QUANT = "fused", so Inductor fuses the quantization into the kernels that produce q and
    k (norm, RoPE) instead of writing them in bf16 for quantization kernels to read back (slower than the
    kernels in the FP8 block, see TRACED_QUANT)."""
    lk = k.shape[1]
    q8, qs = quantize_q(q)
    k8, ks = quantize_k(k)
    x = v.float()
    v_scale = x.abs().amax(dim=1).clamp(min=1e-12) / V_FP8_MAX  # [B, H, D]
    vt = (x / v_scale[:, None]).permute(0, 2, 3, 1)  # [B, H, D, L]
    v8 = key_slots(F.pad(vt, (0, -lk % BLOCK_N))).to(torch.float8_e4m3fn).contiguous()
    return q8, qs.contiguous(), k8, ks.contiguous(), v8, v_scale.contiguous()


def key_slots(x: torch.Tensor) -> torch.Tensor:
    """The last dim (keys, a multiple of 16) in the order the kernels keep V^T in (sage_kernels.key_slots):
    key 8h + 2c + e of each 16 at 4c + 2h + e."""
    *lead, n = x.shape
    return x.reshape(*lead, n // 16, 2, 4, 2).transpose(-3, -2).reshape(*lead, n)


def attend(q8, qs, k8, ks, v8, v_scale, out, wrap, kernel, out_scale=None, **config):
    """Launch the attention kernel on quantize_pass's tensors, writing `out` [B, Lq, H, D]; returns what the
    launch returns (the compiled kernel, for a plain JIT launch). config: BLOCK_M, num_warps, ... for
    sage_kernels.attn_body (attn_kernel autotunes them); BLOCK_N defaults to K's scale block. out_scale (one
    float32, the reciprocal of the next linear's input scale): `out` is float8_e4m3fn and `kernel` one of
    attn_body_fp8 / attn_kernel_fp8."""
    b, h, lq, d = q8.shape

    def grid(meta):
        return (triton_cdiv(lq, meta["BLOCK_M"]), b * h)

    scale = () if out_scale is None else (out_scale,)
    return wrap(kernel)[grid](
        q8, k8, v8, qs, ks, v_scale, out, *scale, lq, k8.shape[2], v8.shape[-1], h, ks.shape[-1],
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        out.stride(0), out.stride(1), out.stride(2), D=d, KS_BLOCK=BLOCK_N, **{"BLOCK_N": BLOCK_N, **config})  # fmt: skip


def launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wrap, kernel, quant=None, out_scale=None, **config
) -> torch.Tensor:
    """Quantize (`quant`: quantize_pass by default), then attend with `kernel` (sage_kernels.attn_kernel,
    autotuned; attn_body with `config`; the *_fp8 kernels with `out_scale`, see attend)."""
    out = torch.empty_like(q, dtype=torch.float8_e4m3fn if out_scale is not None else None)
    packed = quant(q, k, v) if quant is not None else quantize_pass(q, k, v, wrap)
    attend(*packed, out, wrap, kernel, out_scale, **config)
    return out


# How the op runs, set before a graph holding it is compiled (export/build.py sets TILE from the GPU config):
# TILE: the attention kernel's tile ({"BLOCK_M", "num_warps", "num_stages"}); None autotunes in compiled graphs
# and takes the tile of the card's GPU config in eager calls (device_tile); AUTOTUNE autotunes in both;
# TRACED_QUANT: "kernels" (quantize_pass) or "fused" (torch ops the compiler fuses into the norm/RoPE
# kernels, quantize_fused) when a compiler traces the op. Eager calls always use the quantization kernels.
# In the FP8 block engine on an H200 the kernels are 1.1 ms a block faster (49.8 against 51.0 ms,
# bench/results/block_quant_kernels-h200.json).
AUTOTUNE = "autotune"
TILE: dict | str | None = None
TRACED_QUANT = "kernels"


@contextlib.contextmanager
def pinned_tile(tile: dict | str | None):
    """Run and compile the op with this attention tile (None: autotune inside each compiled graph, the card's
    configured tile in eager calls; AUTOTUNE: autotune everywhere)."""
    global TILE
    old, TILE = TILE, tile
    try:
        yield
    finally:
        TILE = old


_device_tiles: dict[int, dict | None] = {}


def device_tile(device: torch.device) -> dict | None:
    """The `sage_tile` of the GPU config that matches this card (None: unknown card or no tile pinned). Eager
    calls use it so that the torch backend runs the engines' tile instead of autotuning: autotuning every new
    (Lq, Lk, D) took the first denoising step of the eager Sage rows from about 6 s to 16 and 35 s in the
    f31eee6 speed table sitting (bench/results/table/h200/sage-*.json)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_tiles:
        from x2v.runtime.config import gpu_config_of

        name = torch.cuda.get_device_name(index)
        cfg = gpu_config_of(name, torch.cuda.get_device_capability(index))
        _device_tiles[index] = None if cfg is None else cfg.sage_tile
        if _device_tiles[index] is None:
            log.warning(
                "SageAttention: no GPU config pins a tile for %s; the kernel autotunes on the first call of "
                "each shape (seconds each)",
                name,
            )
    return _device_tiles[index]


def _traced(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))


@torch.library.triton_op("x2v::sage_attention", mutates_args={})
def _sage_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.library import wrap_triton

    traced = _traced(q)
    quant = quantize_fused if TRACED_QUANT == "fused" and traced else None
    kernel, config = _kernel(q, traced)
    return launch(q, k, v, wrap_triton, kernel, quant, **config)


# The op that hands an FP8 linear its input (AOTInductor engines of FP8 models, export.dit.SelfAttention): the
# attention rounded to bf16 and quantized with the o projection's static scale inside the kernel, which is
# what FP8Linear computes from the bf16 output, without writing and reading that output (0.33 GB a block at
# 480P). ONNX and TensorRT keep x2v::sage_attention followed by QuantizeLinear.
@torch.library.triton_op("x2v::sage_attention_fp8", mutates_args={})
def _sage_attention_fp8_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_scale: torch.Tensor
) -> torch.Tensor:
    """q, k, v [B, L, H, D] bf16, inv_scale one float32 (1 / the linear's input scale) -> [B, L, H, D] E4M3."""
    from torch.library import wrap_triton

    if q.dtype != torch.bfloat16:
        raise ValueError(
            f"x2v::sage_attention_fp8 takes bf16 q, k, v (the FP8 engines' dtype), got {q.dtype}"
        )
    traced = _traced(q)
    quant = quantize_fused if TRACED_QUANT == "fused" and traced else None
    kernel, config = _kernel(q, traced, fp8_out=True)
    return launch(q, k, v, wrap_triton, kernel, quant, inv_scale.float(), **config)


@_sage_attention_fp8_op.register_fake
def _(q, k, v, inv_scale):
    return torch.empty_like(q, dtype=torch.float8_e4m3fn)


@_sage_attention_fp8_op.register_kernel("cpu")
def _(q, k, v, inv_scale):  # the reference, then FP8Linear's cast
    from x2v.export.fp8 import quantize_by

    return quantize_by(sage_reference(q, k, v), inv_scale.float())


def _tile(q: torch.Tensor, traced: bool) -> dict | None:
    """The attention tile for this call (TILE's rules above); None autotunes."""
    if TILE == AUTOTUNE:
        return None
    return TILE if TILE is not None or traced else device_tile(q.device)


def _kernel(q: torch.Tensor, traced: bool, fp8_out: bool = False):
    """(attention kernel, launch config) for this call: attn_body at the tile, or attn_kernel to autotune
    (their *_fp8 forms with fp8_out)."""
    from x2v.plugins import sage_kernels as K

    tile = _tile(q, traced)
    if fp8_out:
        return (K.attn_kernel_fp8, {}) if tile is None else (K.attn_body_fp8, tile)
    return (K.attn_kernel, {}) if tile is None else (K.attn_body, tile)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@_sage_attention_op.register_fake
def _(q, k, v):
    return torch.empty_like(q)


# On the CPU the op computes its specification, so graphs holding it (ONNX, exported programs) run anywhere.
_sage_attention_op.register_kernel("cpu")(sage_reference)


# The op from the projections (AOTInductor engines with the GPU config's `sage_prep: fused`): q and k before
# the DiT's RMSNorm and RoPE, which it applies itself, so Q is quantized in the pass that normalizes it.
@torch.library.triton_op("x2v::sage_attention_rope", mutates_args={})
def _sage_attention_rope_op(qp: torch.Tensor, kp: torch.Tensor, v: torch.Tensor, wq: torch.Tensor,
                            wk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                            eps: float) -> torch.Tensor:  # fmt: skip
    """qp, kp [B, L, H * D] projections, v [B, L, H, D], wq/wk the norms' weights [H * D], cos/sin [L, D / 2]
    -> [B, L, H, D]."""
    from torch.library import wrap_triton

    out = torch.empty_like(v)
    packed = prepare_pass(qp, kp, v, wq, wk, cos, sin, num_heads, eps)
    kernel, config = _kernel(v, _traced(v))
    attend(*packed, out, wrap_triton, kernel, **config)
    return out


@_sage_attention_rope_op.register_fake
def _(qp, kp, v, wq, wk, cos, sin, num_heads, eps):
    return torch.empty_like(v)


@_sage_attention_rope_op.register_kernel("cpu")
def _(qp, kp, v, wq, wk, cos, sin, num_heads, eps):
    return sage_reference(*norm_rope_reference(qp, kp, wq, wk, cos, sin, num_heads, eps), v)
