"""How x2v's custom torch ops appear in ONNX.

`x2v::sage_attention` becomes one node `SageAttention` in domain `x2v` (inputs q, k, v [B, L, H, D];
output [B, L, H, D]); its meaning is `sage_reference` in plugins/sage_attention.py. FP8 linears
(export/fp8.py) become QuantizeLinear -> DequantizeLinear on the activation and DequantizeLinear on the
E4M3 weight, per tensor or per output channel (axis 0), ahead of a MatMul. TensorRT's ONNX parser
maps a node it has no importer for to the plugin of the same name in the namespace given by the node's
`plugin_namespace` attribute: "x2v::SageAttention", registered in plugins/tensorrt_plugin.py.
"""

from __future__ import annotations

import torch

DOMAIN = "x2v"
FLOAT8E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN


def _register_schema() -> None:
    """Declare x2v::SageAttention to ONNX (so the exporter and onnx.checker know its inputs and types)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("SageAttention", DOMAIN):
        return
    T = "T"
    schema = OpSchema(
        "SageAttention", DOMAIN, 1,
        doc="Non-causal attention with INT8 Q.K^T (smoothed K, per-block scales) and FP8 P.V; "
            "q, k, v and the output are [B, L, H, D]. Reference: x2v.plugins.sage_attention.sage_reference.",
        inputs=[OpSchema.FormalParameter(n, T) for n in ("q", "k", "v")],
        outputs=[OpSchema.FormalParameter("out", T)],
        type_constraints=[(T, ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")],
        attributes=[OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING,
                                       "TensorRT: the namespace of the plugin this node maps to", required=False)],
    )  # fmt: skip
    onnx.defs.register_schema(schema)


def translation_table() -> dict:
    import onnxscript

    import x2v.export.fp8
    import x2v.plugins.sage_attention  # noqa: F401  (both register their ops)

    _register_schema()
    x2v = onnxscript.values.Opset(DOMAIN, 1)
    from onnxscript import opset21 as op

    def sage_attention(q, k, v):
        return x2v.SageAttention(q, k, v, plugin_namespace=DOMAIN)

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
