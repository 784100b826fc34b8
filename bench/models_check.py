"""Every Wan2.1 variant at full size on this GPU, the way a user runs it: a random checkpoint in the official
layout (`x2v-export make-checkpoint`), engines for this card (`x2v-export build --gpu ...`, the config's
attention and backend, bf16 weights), then `Pipeline.from_engines` and a short `generate` with guidance to an
MP4. A check that the shapes, engines, VAE sizes and memory work for the models the speed table does not run
(I2V-14B-720P, T2V-14B, T2V-1.3B), with times and peaks recorded; not a benchmark of them.

    python bench/models_check.py --model i2v-14b-720p --steps 2 --out bench/results     (one model a call)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import environment, write_result
from bench.table import IMAGE, PROMPT, SEED, request_profile
from x2v.runtime.config import load_model_config


def run(*args: str) -> float:
    """One x2v-export command in a subprocess (as a user would), its seconds; its output streams through."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from x2v.export.cli import main; main()", *args], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", default="/tmp/x2v-models")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from x2v.runtime.pipeline import Pipeline
    from x2v.runtime.video import read_mp4

    cfg = load_model_config(args.model)
    cuda = (
        torch.cuda.is_available()
    )  # without a GPU: ONNX Runtime engines on the CPU (a smoke run of the script)
    gpu = ("h200" if "H200" in torch.cuda.get_device_name() else "h100") if cuda else "cpu"
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)  # a 14B checkpoint is 45 GB: one model on the disk at a time
    ckpt, engines = work / "ckpt", work / "engines"
    res = {"model": args.model, "gpu_config": gpu, "steps": args.steps}
    device = "cuda" if cuda else "cpu"
    res["make_checkpoint_s"] = run(
        "make-checkpoint", "--model", args.model, "--out", str(ckpt), "--device", device
    )
    res["checkpoint_gb"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1e9
    res["profile"] = request_profile(cfg)  # the example image's aspect at the model's pixel area (I2V)
    res["build_s"] = run("build", "--model", args.model, "--ckpt", str(ckpt), "--gpu", gpu, "--out", str(engines),
                         "--no-autotune", "--profile", res["profile"])  # fmt: skip
    manifest = json.loads((engines / "manifest.json").read_text())
    res["engines"] = {k: manifest.get(k) for k in ("precision", "attention", "backend", "profiles")}

    pipe = Pipeline.from_engines(engines, ckpt)
    res["load_s"], res["load_phases"] = pipe.load_s, pipe.load_phases
    image = IMAGE if cfg.dit.i2v else None
    r = pipe.generate(image=image, prompt=PROMPT, seed=SEED, steps=args.steps, out=work / "out.mp4")
    video = read_mp4(work / "out.mp4")
    res["timings"] = r.timings
    res["video"] = {"frames_shape": list(r.frames.shape), "mp4_shape": list(video.shape),
                    "pixel_mean": float(r.frames.mean()), "pixel_std": float(r.frames.std()),
                    "latents_finite": bool(torch.isfinite(r.latents).all()),
                    "latents_std": float(r.latents.float().std())}  # fmt: skip
    res["ok"] = (
        res["video"]["latents_finite"]
        and video.shape == r.frames.shape
        and r.frames.shape[0] == cfg.sample.frames
        and float(np.std(r.frames)) > 0
    )
    res["env"] = environment()
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1, default=str))
    print(write_result(f"models_check_{args.model}", res, args.out))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
