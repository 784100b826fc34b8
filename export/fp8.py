"""FP8 E4M3 linears for the DiT blocks, and loading of FP8 checkpoints (x2v's static recipe or LightX2V's).

A quantized linear keeps the official key names: `<name>.weight` in float8_e4m3fn, `<name>.weight_scale`
(float32, one per tensor or one per output channel), `<name>.bias`, and, for statically calibrated
activations, `<name>.input_scale` (one float32). Without `input_scale` activations are quantized per token
at run time (LightX2V's format). The value of a weight is `weight.float() * weight_scale`.

On sm89+ GPUs the product runs on `torch._scaled_mm`; elsewhere the same math runs dequantized in float32
(said once in the log): slower, never different in what is computed except accumulation order.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("x2v")

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_warned: set[str] = set()


def fp8_supported(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to E4M3, saturating at +-448 (a plain cast would turn overflow into NaN). What ONNX's
    QuantizeLinear computes; the reference for quantize_by."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_by(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x * inv_scale rounded to E4M3, saturating: quantize(x, 1 / inv_scale) with the division an element made a
    multiply, as ModelOpt's fake quantization computes it (x * 448 / amax). An IEEE division is ~8 instructions;
    in the compiled block's norm + cast kernel it cost 0.570 against 0.512 ms, and of 788 M bf16 activations not
    one rounded differently (H200, bench/results/quant_recip-h200.json). The GPU path (torch._scaled_mm) uses it.

    Compiled for a GPU the clamp is left out: Inductor casts in Triton, whose float32 -> E4M3 conversion on
    sm89+ is `cvt.rn.satfinite` (+-448 for overflow and +-inf, NaN kept: the clamp's result), while Inductor's
    NaN-propagating clamp costs about eight instructions an element in every norm/GELU + cast kernel. Checked
    bit for bit against this eager form on special values (bench/fp8_cast.py)."""
    y = x.float() * inv_scale
    if SATURATING_CAST and x.is_cuda and torch.compiler.is_compiling():
        return y.to(E4M3)
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


# Benches set it False to build the form with the clamp side by side (bench/common.fp8_cast_before).
SATURATING_CAST = True


def token_scales(x2: torch.Tensor) -> torch.Tensor:
    """[M, K] -> [M, 1] float32 per-token scales amax/448 (LightX2V's dynamic activation scaling)."""
    return (x2.abs().amax(-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)


# Quantize/dequantize as ops of their own, so that an exported graph holds them as ONNX QuantizeLinear /
# DequantizeLinear nodes (export/onnx_ops.py), the form TensorRT builds FP8 GEMMs from.


@torch.library.custom_op("x2v::fp8_quantize", mutates_args=())
def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> E4M3; scale one value, or [M, 1] per row."""
    return quantize(x, scale)


@fp8_quantize.register_fake
def _(x, scale):
    return torch.empty_like(x, dtype=E4M3)


@torch.library.custom_op("x2v::fp8_dequantize", mutates_args=())
def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 [M, K] -> float32 q * scale; scale one value, or [M, 1] per row."""
    return q.float() * scale


@fp8_dequantize.register_fake
def _(q, scale):
    return torch.empty_like(q, dtype=torch.float32)


class FP8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, channel: bool = False,
                 static: bool = True, bias_dtype=torch.bfloat16):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.channel, self.static = channel, static
        self.impl = "dequant"
        self.fast_accum = False  # see configure_fp8
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=E4M3))
        self.register_buffer("weight_scale", torch.empty((out_features,) if channel else ()))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype) if bias else None)
        self.register_buffer("input_scale", torch.empty(()) if static else None)

    def extra_repr(self) -> str:
        acts = "static per-tensor" if self.static else "dynamic per-token"
        weights = "per-channel" if self.channel else "per-tensor"
        return f"{self.in_features}, {self.out_features}, weights {weights}, activations {acts}, {self.impl}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xs = self.input_scale.float() if self.static else token_scales(x2)
        if self.impl == "scaled_mm":
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            out = self.product(quantize_by(x2, 1.0 / xs), xs, out_dtype)
        else:
            ws = self.weight_scale.float()
            xq = fp8_dequantize(fp8_quantize(x2, xs), xs)
            w = fp8_dequantize(self.weight, ws[:, None] if self.channel else ws)
            out = F.linear(xq, w, None if self.bias is None else self.bias.float())
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def takes_fp8(self) -> bool:
        """Whether forward_fp8 can run: the GPU product with a static input scale."""
        return self.impl == "scaled_mm" and self.static

    def forward_fp8(self, q: torch.Tensor, dtype) -> torch.Tensor:
        """forward() of an input its producer already quantized with 1 / input_scale (see takes_fp8):
        [..., K] E4M3 -> [..., N] dtype, as forward() of the unquantized input gives."""
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        out = self.product(q.reshape(-1, q.shape[-1]), self.input_scale.float(), out_dtype)
        return out.to(dtype).reshape(*q.shape[:-1], self.out_features)

    def product(self, q: torch.Tensor, xs: torch.Tensor, out_dtype) -> torch.Tensor:
        """[M, K] E4M3 input quantized with scale xs (one value or [M, 1]) -> [M, N] out_dtype, bias added.

        The bias is added in the GEMM's epilogue, before the one rounding to out_dtype (as a bf16 nn.Linear
        does): a separate add would cost a pass over the output wherever no later kernel takes it in (V before
        the attention op). torch._scaled_mm takes a bf16/fp16 bias for a bf16/fp16 output only."""
        ws = self.weight_scale.float()
        rowwise = self.channel or xs.numel() > 1
        m, n = q.shape[0], self.out_features
        epilogue = self.bias is not None and out_dtype in (torch.bfloat16, torch.float16)
        out = torch._scaled_mm(
            q,
            self.weight.t(),
            scale_a=xs.expand(m, 1).contiguous() if rowwise else xs,  # cuBLAS wants it dense
            scale_b=(ws[None] if self.channel else ws.expand(1, n)) if rowwise else ws,
            bias=self.bias.to(out_dtype) if epilogue else None,
            out_dtype=out_dtype,
            use_fast_accum=self.fast_accum,
        )
        return out if self.bias is None or epilogue else out + self.bias.to(out_dtype)


def quantized_names(state) -> list[str]:
    """Module names that carry FP8 weights in a state dict (those with a `.weight_scale`)."""
    return sorted(k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale"))


def is_fp8_state(state) -> bool:
    return any(k.endswith(".weight_scale") for k in state)


def check_fp8_state(state, sources, error=ValueError) -> None:
    """Refuse corrupt or mismatched scales with the key and file in the message."""
    for name in quantized_names(state):
        w, ws = state.get(f"{name}.weight"), state[f"{name}.weight_scale"]
        where = sources.get(f"{name}.weight_scale", "<memory>")
        if w is None:
            raise error(f"{where}: {name}.weight_scale has no {name}.weight next to it")
        if w.dtype != E4M3:
            raise error(f"{where}: {name}.weight is {w.dtype}, expected float8_e4m3fn next to a weight_scale")
        if ws.numel() not in (1, w.shape[0]) or (ws.numel() > 1 and ws.dim() > 1 and ws.shape[1:] != (1,)):
            raise error(
                f"{where}: {name}.weight_scale has shape {list(ws.shape)}; expected [], [1], "
                f"[{w.shape[0]}] or [{w.shape[0]}, 1] for a weight of shape {list(w.shape)}"
            )
        scales = [(f"{name}.weight_scale", ws)]
        if f"{name}.input_scale" in state:
            xs = state[f"{name}.input_scale"]
            if xs.numel() != 1:
                raise error(f"{where}: {name}.input_scale has shape {list(xs.shape)}; expected one value")
            scales.append((f"{name}.input_scale", xs))
        for key, s in scales:
            if not torch.isfinite(s.float()).all() or (s.float() <= 0).any():
                raise error(f"{where}: {key} holds non-finite or non-positive values: a corrupt checkpoint")
    statics = {f"{n}.input_scale" in state for n in quantized_names(state)}
    if len(statics) > 1:
        raise error("the FP8 checkpoint mixes static (input_scale) and dynamic linears; expected one kind")


def normalize_fp8_state(state) -> dict:
    """Scales to the module's shapes: per-tensor scales as [], per-channel as [out]; floats as float32."""
    out = dict(state)
    for name in quantized_names(state):
        ws = state[f"{name}.weight_scale"].float()
        out[f"{name}.weight_scale"] = ws.reshape(()) if ws.numel() == 1 else ws.reshape(-1)
        if f"{name}.input_scale" in state:
            out[f"{name}.input_scale"] = state[f"{name}.input_scale"].float().reshape(())
    return out


def swap_linears(model: nn.Module, names, channel, static: bool, bias_dtype=torch.bfloat16) -> nn.Module:
    """Replace the named nn.Linear modules by (empty) FP8Linear modules, in place; works on meta models.

    channel: one bool for all, or a dict name -> bool (a checkpoint may mix per-tensor and per-channel).
    """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name} is not a linear of this model ({type(old).__name__})")
        ch = channel[name] if isinstance(channel, dict) else channel
        with torch.device(old.weight.device):
            new = FP8Linear(old.in_features, old.out_features, old.bias is not None, ch, static, bias_dtype)
        setattr(parent, child, new)
    return model


def configure_fp8(model: nn.Module, device, impl: str | None = None, fast_accum: bool = False,
                  gelu_epilogue: bool = False) -> str:  # fmt: skip
    """Pick the FP8 product for every FP8Linear: `torch._scaled_mm` where the GPU has FP8 units.

    fast_accum: let the GEMM keep its partial sums in the tensor cores' FP8 accumulator (about 22 bits of
    mantissa on Hopper) instead of adding them into FP32 registers every few K-steps; fewer instructions
    and less energy per GEMM, which counts at the power limit (GPU configs' `fp8_fast_accum`).
    gelu_epilogue: the FFN's up-projection writes the down-projection's FP8 input from its GEMM's epilogue
    (export/fp8_kernels.py; GPU configs' `fp8_gelu_epilogue`). Needs static activation scales and FP8 tensor
    cores; where either is missing the FFN runs unfused and the log says why.
    """
    impl = impl or ("scaled_mm" if fp8_supported(device) else "dequant")
    if (
        impl == "dequant"
        and str(device) not in _warned
        and any(isinstance(m, FP8Linear) for m in model.modules())
    ):
        _warned.add(str(device))
        log.warning("FP8 matmul is not supported on %s: FP8 weights run dequantized in float32", device)
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.impl, m.fast_accum = impl, fast_accum
    # One quantization of the self-attention input for q, k and v, where every block allows it: an engine is
    # traced from block 0 and serves all blocks (the engine's checkpoint identity pins the scales it binds).
    attns = [m for m in model.modules() if hasattr(m, "shared_fp8_input")]
    share = bool(attns) and all(same_input_scale((a.q, a.k, a.v)) for a in attns)
    for a in attns:
        a.shared_fp8_input = share
    # FFNs whose two linears are both FP8 (blocks kept in high precision have plain ones)
    ffns = [m for m in model.modules() if hasattr(m, "gelu_epilogue")]
    fp8_ffns = [m for m in ffns if isinstance(m[0], FP8Linear) and isinstance(m[2], FP8Linear)]
    for m in ffns:
        m.gelu_epilogue = False
    if gelu_epilogue and fp8_ffns:
        reason = epilogue_unsupported(fp8_ffns, device, impl)
        if reason:
            log.warning("FP8 GELU epilogue not used (%s): the FFN casts in a kernel of its own", reason)
        else:
            for m in fp8_ffns:
                m.gelu_epilogue = True
    return impl


def same_input_scale(linears) -> bool:
    """Whether these linears take FP8 inputs quantized with one static scale (bit-equal values)."""
    if not all(isinstance(m, FP8Linear) and m.takes_fp8 for m in linears):
        return False
    first = linears[0].input_scale
    return not first.is_meta and all(torch.equal(m.input_scale, first) for m in linears[1:])


def epilogue_unsupported(ffns, device, impl: str) -> str | None:
    """Why these FP8 FFNs cannot take the fused GELU epilogue, or None if they can."""
    if any(f[0].bias is None for f in ffns):
        return "ffn.0 has no bias"
    if not all(f[0].static and f[2].static for f in ffns):
        return (
            "activations are quantized per token at run time; the epilogue needs ffn.2's static input scale"
        )
    if impl != "scaled_mm":
        return f"FP8 runs dequantized on {device}"
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return f"its kernel needs FP8 tensor cores (sm89+), not on {device}"
    from x2v.export.fp8_kernels import TILE

    if any(f[0].in_features % TILE["BLOCK_K"] for f in ffns):
        return f"the model width is not a multiple of the kernel's K block ({TILE['BLOCK_K']})"
    return None
