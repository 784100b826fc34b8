"""Does the TensorRT backend's network build? ONNX engine (FP8 Q/DQ + SageAttention plugin node) -> plan.

    python bench/tensorrt_build.py [--out DIR]        (writes tensorrt_build-<card>.json)

Runs with full TensorRT where installed, else TensorRT-RTX, whose builder works on Hopper but whose runtime
refuses compute capability 9.0: there this proves the network builds, not that the plan runs. The block is
a small DiT block with the real head size (128) and FP8 linears calibrated by max on one forward.

Every step runs in a process of its own, so a builder that aborts (TensorRT-RTX 1.7 did, on the plugin
network, commit 53c5ece) is recorded with its exit status and log tail and the other steps still run. The
`plugin-only` step adds the plugin through the network API (`add_plugin_v3`), without the ONNX parser, to
tell a parser problem from a plugin or builder one. Expect the plugin steps to fail with TensorRT-RTX: NVIDIA's
porting guide says TensorRT-RTX does not support plugins (quoted in NVIDIA/TensorRT-RTX issue 4, open), and
its 1.7 bindings' INetworkDefinition has no plugin method; they need full TensorRT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

STEPS = ("plugin-only", "block-fp8-sdpa", "block-fp8-sage", "block-bf16-sdpa")


def plugin_only(d: Path) -> dict:
    """q, k, v inputs -> the SageAttention plugin -> output, built through the network API."""
    from x2v.export.tensorrt import typed_network
    from x2v.plugins.tensorrt_plugin import NAMESPACE, TYPE, VERSION, register, trt_module

    trt = trt_module()
    register()
    builder, network = typed_network(trt, trt.Logger(trt.Logger.WARNING))
    qkv = [network.add_input(n, trt.DataType.BF16, (1, 256, 2, 128)) for n in ("q", "k", "v")]
    creator = trt.get_plugin_registry().get_creator(TYPE, VERSION, NAMESPACE)
    if creator is None:
        raise RuntimeError(f"no plugin creator {NAMESPACE}::{TYPE} v{VERSION} in the registry")
    plugin = creator.create_plugin("sage", trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)
    layer = network.add_plugin_v3(qkv, [], plugin)
    network.mark_output(layer.get_output(0))
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    if plan is None:
        raise RuntimeError("build_serialized_network returned None (see the log)")
    (d / "plugin-only.plan").write_bytes(bytes(plan))
    return {"built": True, "plan_bytes": len(bytes(plan))}


def block(name: str, d: Path) -> dict:
    import onnx
    import torch

    from bench.engine_forward import max_calibrated_fp8
    from x2v.export import engines as E
    from x2v.export.load import build
    from x2v.export.tensorrt import build_plan
    from x2v.runtime.config import load_model_config

    base = load_model_config("tiny")
    cfg = dataclasses.replace(
        base, dit=dataclasses.replace(base.dit, dim=256, num_heads=2, ffn_dim=512, num_layers=1)
    )
    torch.manual_seed(0)
    model = build("dit", cfg).to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model = model.to(torch.bfloat16).eval().configure(torch.bfloat16, "sdpa")
    shape = (1, 16, 5, 16, 16)
    x = {"x": torch.randn(shape, device="cuda"), "t": torch.full((1,), 500.0, device="cuda"),
         "context": torch.randn(1, cfg.dit.text_len, cfg.dit.text_dim, device="cuda").bfloat16(),
         "clip_fea": torch.randn(1, cfg.dit.clip_tokens, cfg.dit.clip_dim, device="cuda").bfloat16(),
         "y": torch.randn(1, 20, *shape[2:], device="cuda")}  # fmt: skip
    m = max_calibrated_fp8(model, cfg, x) if "fp8" in name else model
    m.configure(torch.bfloat16, "sage_op" if name.endswith("sage") else "sdpa")
    step = {}
    t0 = time.perf_counter()
    E.export_onnx(m, "block", shape, d / f"{name}.onnx", "cuda")
    g = onnx.load(str(d / f"{name}.onnx"))
    step["onnx_ops"] = sorted({f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in g.graph.node})
    step["export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_plan(d / f"{name}.onnx", d / f"{name}.plan", None)
    step.update(built=True, build_s=time.perf_counter() - t0, plan_bytes=(d / f"{name}.plan").stat().st_size)
    return step


def child(name: str, d: Path) -> None:
    try:
        step = plugin_only(d) if name == "plugin-only" else block(name, d)
    except Exception as e:  # the point of the script is to record what happens
        step = {
            "built": False,
            "error": f"{type(e).__name__}: {e}"[:2000],
            "trace": traceback.format_exc()[-3000:],
        }
    (d / f"{name}.json").write_text(json.dumps(step))


def main():
    from bench.common import write_result

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/x2v-trt")
    ap.add_argument("--out", default=None)
    ap.add_argument("--step", choices=STEPS, help="run one step in this process (the parent runs each so)")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    if args.step:
        return child(args.step, d)
    from x2v.plugins.tensorrt_plugin import trt_module

    trt = trt_module()
    res = {"tensorrt_module": trt.__name__, "tensorrt_version": trt.__version__, "steps": {}}
    for name in STEPS:
        (d / f"{name}.json").unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, __file__, "--step", name, "--dir", str(d)], capture_output=True,
                              text=True)  # fmt: skip
        result = d / f"{name}.json"
        step = json.loads(result.read_text()) if result.exists() else {"built": False}
        if proc.returncode:
            step.update(exit_status=proc.returncode, log_tail=(proc.stdout + proc.stderr)[-2000:])
        res["steps"][name] = step
        print(name, {k: v for k, v in step.items() if k != "trace"}, flush=True)
        write_result("tensorrt_build", res, args.out)


if __name__ == "__main__":
    main()
