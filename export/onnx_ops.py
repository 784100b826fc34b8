"""How x2v's custom torch ops appear in ONNX.

`x2v::sage_attention` becomes one node `SageAttention` in domain `x2v` (inputs q, k, v [B, L, H, D];
output [B, L, H, D]); its meaning is `sage_reference` in plugins/sage_attention.py. FP8 linears
(export/fp8.py) become QuantizeLinear -> DequantizeLinear on the activation and DequantizeLinear on the
E4M3 weight, per tensor or per output channel (axis 0), ahead of a MatMul. TensorRT's ONNX parser
maps a node it has no importer for to the plugin registered under the same name (plugins/tensorrt_plugin.py).
"""

from __future__ import annotations

import torch

DOMAIN = "x2v"
FLOAT8E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN


def translation_table() -> dict:
    import onnxscript

    import x2v.export.fp8
    import x2v.plugins.sage_attention  # noqa: F401  (both register their ops)

    x2v = onnxscript.values.Opset(DOMAIN, 1)

    def sage_attention(q, k, v):
        return x2v.SageAttention(q, k, v)

    from onnxscript import opset21 as op

    def per_row(scale):  # [M, 1] per-row scales -> QuantizeLinear's per-axis form; a scalar stays
        return op.Reshape(scale, op.Constant(value_ints=[-1])), 0

    def fp8_quantize(x, scale):
        if len(scale.shape) == 0:
            return op.QuantizeLinear(x, scale, output_dtype=FLOAT8E4M3FN)
        s, axis = per_row(scale)
        return op.QuantizeLinear(x, s, axis=axis, output_dtype=FLOAT8E4M3FN)

    def fp8_dequantize(q, scale):
        if len(scale.shape) == 0:
            return op.DequantizeLinear(q, scale)
        s, axis = per_row(scale)
        return op.DequantizeLinear(q, s, axis=axis)

    return {
        torch.ops.x2v.sage_attention.default: sage_attention,
        torch.ops.x2v.fp8_quantize.default: fp8_quantize,
        torch.ops.x2v.fp8_dequantize.default: fp8_dequantize,
    }
