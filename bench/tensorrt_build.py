"""Does the TensorRT backend's network build? ONNX engine (FP8 Q/DQ + SageAttention plugin node) -> plan.

    python bench/tensorrt_build.py [--out DIR]        (writes tensorrt_build-<card>.json)

Runs with full TensorRT where installed, else TensorRT-RTX, whose builder works on Hopper but whose runtime
refuses compute capability 9.0: there this proves the network builds, not that the plan runs. The block is
a small DiT block with the real head size (128) and FP8 linears calibrated by max on one forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
from pathlib import Path

import onnx
import torch

from bench.common import write_result
from bench.engine_forward import max_calibrated_fp8
from x2v.runtime.config import load_model_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/x2v-trt")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from x2v.export import engines as E
    from x2v.export.load import build
    from x2v.export.tensorrt import build_plan
    from x2v.plugins.tensorrt_plugin import trt_module

    trt = trt_module()
    res = {"tensorrt_module": trt.__name__, "tensorrt_version": trt.__version__, "steps": {}}
    base = load_model_config("tiny")
    cfg = dataclasses.replace(
        base, dit=dataclasses.replace(base.dit, dim=256, num_heads=2, ffn_dim=512, num_layers=1)
    )
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    model = build("dit", cfg).to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model = model.to(torch.bfloat16).eval().configure(torch.bfloat16, "sage_op")
    shape = (1, 16, 5, 16, 16)
    x = {"x": torch.randn(shape, device="cuda"), "t": torch.full((1,), 500.0, device="cuda"),
         "context": torch.randn(1, cfg.dit.text_len, cfg.dit.text_dim, device="cuda").bfloat16(),
         "clip_fea": torch.randn(1, cfg.dit.clip_tokens, cfg.dit.clip_dim, device="cuda").bfloat16(),
         "y": torch.randn(1, 20, *shape[2:], device="cuda")}  # fmt: skip
    fp8 = max_calibrated_fp8(model.configure(torch.bfloat16, "sdpa"), cfg, x).configure(
        torch.bfloat16, "sage_op"
    )
    variants = [
        ("block-fp8-sdpa", fp8, "sdpa"),
        ("block-fp8-sage", fp8, "sage_op"),
        ("block-bf16-sdpa", model, "sdpa"),
    ]
    for name, m, attn in variants:
        m.configure(torch.bfloat16, attn)
        step = {}
        try:
            t0 = time.perf_counter()
            E.export_onnx(m, "block", shape, d / f"{name}.onnx", "cuda")
            g = onnx.load(str(d / f"{name}.onnx"))
            step["onnx_ops"] = sorted(
                {f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in g.graph.node}
            )
            step["export_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            build_plan(d / f"{name}.onnx", d / f"{name}.plan", None)
            step.update(
                built=True, build_s=time.perf_counter() - t0, plan_bytes=(d / f"{name}.plan").stat().st_size
            )
        except Exception as e:  # the point of the script is to record what happens
            step.update(
                built=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:]
            )
        res["steps"][name] = step
        print(name, {k: v for k, v in step.items() if k != "trace"}, flush=True)
        write_result("tensorrt_build", res, args.out)  # after every step: a builder crash kills the process
    print(f"wrote {write_result('tensorrt_build', res, args.out)}")


if __name__ == "__main__":
    main()
