"""SageAttention as a TensorRT plugin (`tensorrt.plugin`, the quickly deployable Python plugin API).

The ONNX node `x2v::SageAttention` (export/onnx_ops.py) carries `plugin_namespace="x2v"`, which is how the
TensorRT ONNX parser maps a node to the plugin registered as "x2v::SageAttention". The implementation runs
the same Triton kernels as torch (`torch.ops.x2v.sage_attention`) on TensorRT's stream, so a plan with this
plugin needs Python, torch and this module at run time (the x2v runtime has all three).

Works with full TensorRT (`tensorrt`) and with TensorRT-RTX (`tensorrt_rtx`), whichever is importable.
"""

from __future__ import annotations

import importlib

NAME = "x2v::SageAttention"


def trt_module():
    """`tensorrt`, else `tensorrt_rtx` (same Python API for what x2v uses), else an ImportError that says so."""
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(
        "the tensorrt backend needs TensorRT (pip install tensorrt) or TensorRT-RTX (tensorrt-rtx)"
    )


def register() -> None:
    """Register the plugin with TensorRT's registry (idempotent)."""
    trt = trt_module()
    trtp = importlib.import_module(f"{trt.__name__}.plugin")
    if getattr(register, "_done", False):
        return

    @trtp.register(NAME)
    def _desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(NAME)
    def _formats(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, outputs) -> list:
        return [trtp.AutoTuneCombination("BF16|FP16, BF16|FP16, BF16|FP16, BF16|FP16")]

    @trtp.impl(NAME)
    def _run(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, outputs, stream: int) -> None:
        import torch

        import x2v.plugins.sage_attention  # noqa: F401  (registers the op)

        tq, tk, tv, out = (torch.as_tensor(t, device="cuda") for t in (q, k, v, outputs[0]))
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out.copy_(torch.ops.x2v.sage_attention(tq, tk, tv))

    register._done = True
