"""Shared by the benchmark scripts: environment facts, timing with device events, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    env["git_commit"] = os.environ.get("X2V_GIT_COMMIT") or _git_commit()
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()  # fmt: skip
        except OSError:
            env["driver"] = "unknown"
    else:
        env["card"] = "cpu"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:
        return "unknown"
    commit = out.stdout.strip()
    return commit if len(commit) == 40 else "unknown"


def card_slug(env: dict) -> str:
    return env["card"].lower().replace("nvidia ", "").replace(" ", "-")


def time_cuda(fn, warmup: int = 3, reps: int = 10) -> dict:
    """Median and spread of `reps` runs timed with CUDA events (after `warmup` untimed runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    env = payload.setdefault("env", environment())
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{card_slug(env)}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.double(), ref.double()
    return {
        "rel_l2": ((out - ref).norm() / ref.norm()).item(),
        "cos": torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item(),
        "nan": bool(torch.isnan(out).any()),
    }
