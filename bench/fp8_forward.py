"""FP8 DiT against bf16 at full size on one GPU, then the AOTInductor engines built from it.

    python bench/fp8_forward.py [--model i2v-14b-480p] [--ckpt /tmp/x2v-fp8] [--out DIR]

In one process, on the same random weights (realistic scales) and the same inputs:
1. bf16 eager forward (SDPA), and its linear-and-elementwise part (self-attention replaced by identity);
2. calibration: DiT inputs captured along a short real denoising trajectory (both guidance branches), then
   ModelOpt max calibration over them; the FP8 checkpoint is written to --ckpt (official layout + scales);
3. FP8 eager forward (SDPA, and SageAttention), its linear part, peak memory with weights, error vs bf16;
4. `x2v-export build --gpu <this card>` from that checkpoint (AOTInductor, FP8 + SageAttention): build time,
   engine size; then the runtime loads the engine directory (load time from local disk) and runs one forward:
   time and parity against the bf16 eager forward.
Writes fp8_forward-<card>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import rel_err, time_cuda, write_result
from bench.dit_forward import inputs, random_dit
from x2v.export import dit as dit_mod
from x2v.runtime.config import load_model_config

ARGS = ("x", "t", "context", "clip_fea", "y")


def timed(model, x, reps):
    torch.cuda.reset_peak_memory_stats()
    r = time_cuda(lambda: model(**x), warmup=1, reps=reps)
    r["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return r


def linear_part(model, x, reps):
    """The forward with self-attention replaced by identity (q passes through): what FP8 linears change."""
    real = dit_mod.attention

    def identity_self_attention(q, k, v, impl="sdpa"):
        return q.flatten(2) if q.shape[1] == k.shape[1] and q.shape[1] > 4096 else real(q, k, v, impl)

    dit_mod.attention = identity_self_attention
    try:
        return time_cuda(lambda: model(**x), warmup=1, reps=reps)
    finally:
        dit_mod.attention = real


def capture_records(model, cfg, steps: int, captured: int):
    """DiT inputs along a real UniPC trajectory of `steps` steps (batched CFG), `captured` steps kept."""
    from x2v.calibration.capture import Recorder, spread
    from x2v.runtime.denoise import Conditioning, denoise
    from x2v.runtime.sampler import make_sampler, unipc_schedule

    x = inputs(cfg, batch=2, seed=7)
    cond = Conditioning(x["context"][:1], x["clip_fea"][:1], x["y"][:1])
    uncond = Conditioning(x["context"][1:], x["clip_fea"][:1], x["y"][:1])
    schedule = unipc_schedule(steps, cfg.sample.shift)
    rec = Recorder(model, spread(steps, captured))
    denoise(rec, x["x"][:1], schedule, make_sampler("unipc", schedule), cond, uncond, 5.0, None, True)
    return rec.samples


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--ckpt", default="/tmp/x2v-fp8")
    ap.add_argument("--cal-steps", type=int, default=4, help="steps of the calibration trajectory")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--autotune", action="store_true", help="AOTInductor max-autotune (slower build)")
    args = ap.parse_args()
    from x2v.calibration import ptq
    from x2v.export.fp8 import configure_fp8, swap_linears
    from x2v.export.load import build
    from x2v.runtime.checkpoint import load_strict

    cfg = load_model_config(args.model)
    targets = cfg.fp8.targets(cfg.dit.num_layers)
    res = {"model": cfg.name, "fp8_linears": len(targets), "steps": {}}
    log = lambda k, v: (res.__setitem__(k, v), print(k, json.dumps(v), flush=True))
    torch.manual_seed(0)
    model = random_dit(cfg)
    x = inputs(cfg)
    with torch.no_grad():
        model.configure(torch.bfloat16, "sdpa")
        log("bf16_sdpa", timed(model, x, args.reps))
        ref = model(**x).float()
        log("bf16_linear_part", linear_part(model, x, args.reps))
        model.configure(torch.bfloat16, "sage")
        log("bf16_sage", timed(model, x, args.reps))
        model.configure(torch.bfloat16, "sdpa")

        t0 = time.perf_counter()
        records = capture_records(model, cfg, args.cal_steps, args.cal_steps)
        t1 = time.perf_counter()
        ptq.calibrate(model, targets, records)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        log("calibration", {"inputs": len(records), "trajectory_steps": args.cal_steps, "capture_s": t1 - t0,
                            "modelopt_calibrate_s": t2 - t1})  # fmt: skip
        fake = model(**x).float()
        state = ptq.fp8_state(model, targets)
        del model
        torch.cuda.empty_cache()
        t3 = time.perf_counter()
        Path(args.ckpt).mkdir(parents=True, exist_ok=True)
        ptq.save_quantized(
            state, args.ckpt, "dit-fp8", {"model": cfg.name, "calibration": {"inputs": len(records)}}
        )
        log("fp8_checkpoint", {"write_s": time.perf_counter() - t3, "gb": sum(
            v.numel() * v.element_size() for v in state.values()) / 1e9})  # fmt: skip

        fp8 = build("dit", cfg)
        swap_linears(fp8, targets, False, True)
        fp8 = load_strict(fp8, state, {}).cuda().eval().configure(torch.bfloat16, "sdpa")
        del state
        configure_fp8(fp8, "cuda")
        torch.cuda.empty_cache()
        log("fp8_sdpa", timed(fp8, x, args.reps))
        out = fp8(**x).float()
        log("fp8_vs_bf16", rel_err(out, ref))
        log("fp8_vs_modelopt_fakequant", rel_err(out, fake))
        log("fp8_linear_part", linear_part(fp8, x, args.reps))
        fp8.configure(torch.bfloat16, "sage")
        log("fp8_sage", timed(fp8, x, args.reps))
        log("fp8_sage_vs_bf16", rel_err(fp8(**x).float(), ref))
        del fp8, fake
        torch.cuda.empty_cache()
    res["ratios"] = {
        "fp8_sdpa/bf16_sdpa": res["fp8_sdpa"]["median_ms"] / res["bf16_sdpa"]["median_ms"],
        "linear_part fp8/bf16": res["fp8_linear_part"]["median_ms"] / res["bf16_linear_part"]["median_ms"],
        "fp8_sage/bf16_sdpa": res["fp8_sage"]["median_ms"] / res["bf16_sdpa"]["median_ms"],
    }
    print("ratios", json.dumps(res["ratios"]), flush=True)
    write_result("fp8_forward", res, args.out)
    if not args.skip_engine:
        engine(cfg, args, x, ref, res)
    print(f"wrote {write_result('fp8_forward', res, args.out)}")


def engine(cfg, args, x, ref, res):
    """Build the AOTInductor engines from the FP8 checkpoint on disk, load them as a production node would."""
    from x2v.export.build import build
    from x2v.runtime import engines as E
    from x2v.runtime.denoise import Conditioning, dit_call

    gpu = "h200" if "H200" in torch.cuda.get_device_name() else "h100"
    out = Path(args.ckpt) / f"engines-{gpu}"
    t0 = time.perf_counter()
    m = build(
        cfg.name,
        args.ckpt,
        gpu,
        out,
        precision="fp8",
        attn="sage",
        dit_file="dit-fp8",
        autotune=args.autotune,
    )
    res["engine_build"] = {"s": time.perf_counter() - t0, "mb": sum(e["bytes"] for e in m["engines"].values()) / 1e6,
                           "per_engine_s": {k: e["build_s"] for k, e in m["engines"].items()}}  # fmt: skip
    print("engine_build", json.dumps(res["engine_build"]), flush=True)
    write_result("fp8_forward", res, args.out)
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    dit, m, _, _ = E.load(out)
    torch.cuda.synchronize()
    res["engine_load_s"] = time.perf_counter() - t0
    cond = Conditioning(x["context"], x["clip_fea"], x["y"])
    with torch.no_grad():
        torch.cuda.reset_peak_memory_stats()
        run = lambda: dit_call(dit, x["x"], x["t"], cond, None, True)
        res["engine_forward"] = time_cuda(run, warmup=1, reps=args.reps)
        res["engine_forward"]["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        res["engine_vs_bf16"] = rel_err(run().float(), ref)
    res["ratios"]["engine/bf16_eager"] = res["engine_forward"]["median_ms"] / res["bf16_sdpa"]["median_ms"]
    for k in ("engine_load_s", "engine_forward", "engine_vs_bf16"):
        print(k, json.dumps(res[k]), flush=True)
    print("ratios", json.dumps(res["ratios"]), flush=True)


if __name__ == "__main__":
    main()
