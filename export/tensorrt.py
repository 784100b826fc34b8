"""TensorRT plans from the ONNX engines (official TensorRT Python API; TensorRT-RTX has the same calls).

Strongly typed networks: the precision of every layer is the one in the ONNX graph (FP8 from its
QuantizeLinear/DequantizeLinear pairs, bf16 elsewhere), so TensorRT never picks a precision of its own.
Weights are network inputs (one block plan serves every block), so plans hold no weights and need no refit.
One optimization profile per engine: the engine's shapes are the profile's (x2v builds one engine per
declared resolution). A timing cache next to the plans makes rebuilds fast.

Where this ran: see README ("What was verified where").
"""

from __future__ import annotations

from pathlib import Path


class TensorRTError(RuntimeError):
    """The TensorRT builder refused the network; the message carries its log."""


def typed_network(trt, logger):
    """(builder, strongly typed network): every layer runs in the precision its inputs have."""
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT-RTX: always
    return builder, builder.create_network(0 if flag is None else 1 << int(flag))


def build_plan(onnx_path: Path, plan_path: Path, gpu, workspace_gb: float = 8.0) -> Path:
    import onnx

    from x2v.plugins.tensorrt_plugin import register, trt_module

    trt = trt_module()
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    if any(n.domain == "x2v" for n in graph.node):
        register()  # the parser maps x2v::SageAttention nodes to this plugin
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network = typed_network(trt, logger)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{onnx_path}: the TensorRT ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        profile.set_shape(t.name, shape, shape, shape)  # static per resolution: one engine per profile
    config.add_optimization_profile(profile)
    cache_path = Path(plan_path).parent / "timing.cache"
    timing = hasattr(config, "create_timing_cache")  # TensorRT-RTX has no builder timing cache
    if timing:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"{onnx_path}: TensorRT could not build the network (see the log above)")
    Path(plan_path).write_bytes(bytes(plan))
    if timing:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return Path(plan_path)
