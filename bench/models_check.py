"""Every Wan2.1 variant at full size on this GPU, the way a user runs it: a random checkpoint in the official
layout (`x2v-export make-checkpoint`), engines for this card (`x2v-export build --gpu ...`, the config's
attention and backend; bf16 weights, or FP8 after `calibrate` and `quantize` with --fp8), then `Pipeline.from_engines` and a short `generate` with guidance to an
MP4. A check that the shapes, engines, VAE sizes and memory work for the models the speed table does not run
(I2V-14B-720P, T2V-14B, T2V-1.3B), with times and peaks recorded; not a benchmark of them.

    python bench/models_check.py --model i2v-14b-720p --steps 2 --out bench/results     (one model a call)
    python bench/models_check.py --model i2v-14b-720p --fp8 --until calibrate; ... --fp8   (two calls)
    python bench/models_check.py --model i2v-14b-720p --fp8 --calib-prompts 1 --until build; ... (two calls)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import environment, write_result
from bench.table import IMAGE, PROMPT, SEED, request_profile
from x2v.runtime.config import load_model_config


def run(*args: str) -> float:
    """One x2v-export command in a subprocess (as a user would), its seconds; its output streams through."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from x2v.export.cli import main; main()", *args], check=True)
    return time.perf_counter() - t0


STEPS = ("checkpoint", "calibrate", "quantize", "build", "generate")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--fp8", action="store_true", help="also calibrate and quantize (ModelOpt); FP8 engines")
    ap.add_argument("--until", choices=STEPS, default="generate",
                    help="stop after this step; the next call resumes from --work (steps done are not redone): "
                         "one 10-minute device call does not hold all of them at 720P, and /tmp lives while the "
                         "host is warm")  # fmt: skip
    ap.add_argument("--calib-prompts", type=int, default=None,
                    help="calibrate on the first N prompts of the default set (all 4 by default): at 720P each "
                         "takes ~100 s, and the four leave no room for quantize and build in one call")  # fmt: skip
    ap.add_argument("--work", default="/tmp/x2v-models")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = load_model_config(args.model)
    cuda = torch.cuda.is_available()  # without a GPU: ONNX Runtime engines on the CPU (a smoke run)
    gpu = ("h200" if "H200" in torch.cuda.get_device_name() else "h100") if cuda else "cpu"
    device = "cuda" if cuda else "cpu"
    work = Path(args.work)
    ckpt, engines, state = work / "ckpt", work / "engines", work / "state.json"
    res = {"model": args.model, "gpu_config": gpu, "steps": args.steps, "fp8": args.fp8,
           "calib_prompts": args.calib_prompts}  # fmt: skip
    done = json.loads(state.read_text()) if state.is_file() else {}
    if {k: done.get(k) for k in res} == res:
        res = done
        print(f"resuming {args.model} in {work}: done {', '.join(k[:-2] for k in done if k.endswith('_s'))}")
    else:
        shutil.rmtree(work, ignore_errors=True)  # a 14B checkpoint is 45 GB: one model on the disk at a time
    export = lambda step, *a: run(step, "--model", args.model, "--ckpt", str(ckpt), *a)
    for step in STEPS:
        if f"{step}_s" in res or (step in ("calibrate", "quantize") and not args.fp8):
            continue
        if step == "checkpoint":
            res["checkpoint_s"] = run(
                "make-checkpoint", "--model", args.model, "--out", str(ckpt), "--device", device
            )
            res["checkpoint_gb"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1e9
        elif step == "calibrate":  # the table's: 4 steps of the default set's prompts, 2 of them captured
            res["calibrate_s"] = export(
                "calibrate", "--steps", "4", "--steps-per-run", "2", "--device", device,
                *(["--set", str(first_prompts(work, args.calib_prompts))] if args.calib_prompts else []),
            )  # fmt: skip
        elif step == "quantize":
            res["quantize_s"] = export("quantize", "--device", device)
        elif step == "build":
            # the example image's aspect at the model's pixel area (I2V)
            res["profile"] = request_profile(cfg)
            dit = ["--dit", "dit-fp8"] if args.fp8 else []
            res["build_s"] = export("build", "--gpu", gpu, "--out", str(engines), "--no-autotune",
                                    "--profile", res["profile"], *dit)  # fmt: skip
            manifest = json.loads((engines / "manifest.json").read_text())
            res["engines"] = {k: manifest.get(k) for k in ("precision", "attention", "backend", "profiles")}
        else:
            generate(res, cfg, ckpt, engines, work / "out.mp4", args.steps)
        state.write_text(json.dumps(res, default=str))
        if step == args.until:
            break
    if "generate_s" not in res:
        print(json.dumps(res, indent=1, default=str))
        return
    res["env"] = environment()
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1, default=str))
    name = f"models_check_{args.model}" + ("_fp8" if args.fp8 else "")
    print(write_result(name, res, args.out))
    shutil.rmtree(work, ignore_errors=True)


def first_prompts(work: Path, n: int) -> Path:
    """A calibration set of the default set's first `n` samples (image paths absolute), under `work`."""
    import yaml

    from x2v.calibration.capture import DEFAULT_SET, load_set

    samples = [{**s, "image": s["image"] and str(s["image"])} for s in load_set(DEFAULT_SET)[:n]]
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"calib-{n}.yaml"
    path.write_text(yaml.safe_dump({"samples": samples}))
    return path


def generate(res: dict, cfg, ckpt: Path, engines: Path, out: Path, steps: int) -> None:
    from x2v.runtime.pipeline import Pipeline
    from x2v.runtime.video import read_mp4

    t0 = time.perf_counter()
    pipe = Pipeline.from_engines(engines, ckpt)
    res["load_s"], res["load_phases"] = pipe.load_s, pipe.load_phases
    image = IMAGE if cfg.dit.i2v else None
    r = pipe.generate(image=image, prompt=PROMPT, seed=SEED, steps=steps, out=out)
    video = read_mp4(out)
    res["timings"] = r.timings
    res["video"] = {"frames_shape": list(r.frames.shape), "mp4_shape": list(video.shape),
                    "pixel_mean": float(r.frames.mean()), "pixel_std": float(r.frames.std()),
                    "latents_finite": bool(torch.isfinite(r.latents).all()),
                    "latents_std": float(r.latents.float().std())}  # fmt: skip
    res["ok"] = (
        res["video"]["latents_finite"]
        and video.shape == r.frames.shape
        and r.frames.shape[0] == cfg.sample.frames
        and res["video"]["pixel_std"] > 0
    )
    res["generate_s"] = time.perf_counter() - t0


if __name__ == "__main__":
    main()
