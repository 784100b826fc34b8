"""SageAttention as a TensorRT plugin: an `IPluginV3` implemented in Python (TensorRT's Python plugin interface).

The ONNX node `x2v::SageAttention` (export/onnx_ops.py) carries `plugin_namespace="x2v"`; TensorRT's ONNX parser
maps a node it has no importer for to the plugin creator registered under that op type, version "1" and that
namespace. The plugin's `enqueue` runs the same Triton kernels as torch (`torch.ops.x2v.sage_attention`) on
TensorRT's stream, so a plan holding it needs Python, torch and this module at run time (the x2v runtime has
all three) and no workspace.

`IPluginV3` rather than the decorator API (`tensorrt.plugin`): TensorRT-RTX 1.7's wheels ship the decorator
module without its bindings, while both TensorRT and TensorRT-RTX bind the `IPluginV3` classes used here.
"""

from __future__ import annotations

import importlib
import os
import sys

NAMESPACE, TYPE, VERSION = "x2v", "SageAttention", "1"
NAME = f"{NAMESPACE}::{TYPE}"


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


class _Device:
    """A device pointer as a torch tensor (via __cuda_array_interface__, which has no bfloat16: 16-bit ints,
    viewed as the real dtype afterwards)."""

    def __init__(self, ptr: int, shape):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": "<i2", "data": (ptr, False),
                                         "version": 3}  # fmt: skip


def _plugin_classes(trt):
    import torch

    dtypes = {trt.DataType.BF16: torch.bfloat16, trt.DataType.HALF: torch.float16}

    class SagePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = TYPE, NAMESPACE, VERSION
            self.num_outputs, self.timing_cache_id, self.phase = 1, "", phase

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            other = SagePlugin(self.phase)
            other.__dict__.update(self.__dict__)
            return other

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([])

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]  # [B, Lq, H, D], like q

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR or desc.type not in dtypes:
                return False
            return pos == 0 or desc.type == in_out[0].desc.type  # q, k, v and out share one dtype

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import x2v.plugins.sage_attention  # noqa: F401  (registers the op)

            dtype = dtypes[input_desc[0].type]
            q, k, v = (torch.as_tensor(_Device(p, d.dims), device="cuda").view(dtype)
                       for p, d in zip(inputs, input_desc))  # fmt: skip
            out = torch.as_tensor(_Device(outputs[0], output_desc[0].dims), device="cuda").view(dtype)
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                out.copy_(torch.ops.x2v.sage_attention(q, k, v))

    class SageCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = TYPE, NAMESPACE, VERSION
            self.field_names = trt.PluginFieldCollection([])

        def create_plugin(self, name, fields, phase):
            return SagePlugin(phase)

    if os.environ.get("X2V_TRT_TRACE"):  # print every call TensorRT makes into the plugin (debugging aborts)
        for cls in (SagePlugin, SageCreator):
            for attr, fn in list(vars(cls).items()):
                if callable(fn) and not attr.startswith("__"):
                    setattr(cls, attr, _traced(f"{cls.__name__}.{attr}", fn))
    return SagePlugin, SageCreator


def _traced(name, fn):
    def call(*args, **kwargs):
        print(f"[x2v trt] {name}", file=sys.stderr, flush=True)
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            print(f"[x2v trt] {name} raised {e!r}", file=sys.stderr, flush=True)
            raise

    return call


def register() -> None:
    """Register the plugin creator with TensorRT's registry (idempotent)."""
    if getattr(register, "_creator", None) is not None:
        return
    trt = trt_module()
    _, creator_class = _plugin_classes(trt)
    creator = creator_class()
    if not trt.get_plugin_registry().register_creator(creator, NAMESPACE):
        raise RuntimeError(f"TensorRT refused to register the {NAME} plugin creator")
    register._creator = creator  # the registry holds a reference the Python side must keep alive
