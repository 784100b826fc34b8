"""Capture DiT inputs along real denoising trajectories, for FP8 calibration.

The runtime's own loop runs each prompt of a calibration set; a recorder in front of the DiT keeps the
inputs of chosen steps, both guidance branches, and the file it writes (safetensors) lets calibration be
re-run without re-sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from x2v.runtime.engines import sha256_file

FIELDS = ("x", "t", "context", "clip_fea", "y")
DEFAULT_SET = (
    Path(__file__).resolve().parent / "sets" / "default.yaml"
)  # the small set tests and GPU checks use


class CalibrationError(ValueError):
    """A calibration set or capture file is wrong; the message says which and where."""


def load_set(path: Path) -> list[dict]:
    """[{prompt, image (absolute path or None)}] from a YAML calibration set; images relative to the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration set not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    samples = data.get("samples") if isinstance(data, dict) else None
    if not samples:
        raise CalibrationError(f"{path}: expected a 'samples' list of {{prompt, image}}")
    out = []
    for i, s in enumerate(samples):
        if not isinstance(s, dict) or not str(s.get("prompt", "")).strip():
            raise CalibrationError(f"{path}: sample {i} has no prompt")
        image = s.get("image")
        if image is not None:
            image = (path.parent / image).resolve()
            if not image.is_file():
                raise CalibrationError(f"{path}: sample {i}: image not found: {image}")
        out.append({"prompt": s["prompt"], "image": image})
    return out


def spread(num_steps: int, count: int) -> list[int]:
    """`count` step indices spread evenly over a schedule of `num_steps`, first and last included."""
    count = max(1, min(count, num_steps))
    return sorted({int(round(i)) for i in np.linspace(0, num_steps - 1, count)})


class Recorder:
    """Stands in front of a DiT callable; keeps the `pre` inputs of chosen steps, one sample per branch."""

    def __init__(self, dit, steps: list[int]):
        self.dit, self.steps, self.step, self.samples = dit, set(steps), 0, []

    def __getattr__(self, name):
        return getattr(self.dit, name)

    def pre(self, x, t, context, clip_fea=None, y=None):
        if self.step in self.steps:
            for b in range(x.shape[0]):  # batched CFG: row 0 conditional, row 1 unconditional
                row = lambda v, b=b: None if v is None else v[b : b + 1].detach().float().cpu()
                self.samples.append(
                    {
                        "x": row(x),
                        "t": row(t),
                        "context": row(context),
                        "clip_fea": row(clip_fea),
                        "y": row(y),
                        "step": self.step,
                        "branch": b,
                    }  # fmt: skip
                )
        self.step += 1
        return self.dit.pre(x, t, context, clip_fea, y)


def capture(pipe, samples: list[dict], steps_per_run: int, num_steps: int | None = None, seed: int = 0,
            progress=None) -> list[dict]:  # fmt: skip
    """Run the pipeline on each calibration sample and keep the DiT inputs of `steps_per_run` steps each."""
    n = num_steps or pipe.cfg.sample.num_steps
    if steps_per_run > n:
        raise CalibrationError(f"{steps_per_run} captured steps per prompt asked of a {n}-step schedule")
    out, dit = [], pipe.dit
    try:
        for i, s in enumerate(samples):
            rec = Recorder(dit, spread(n, steps_per_run))
            pipe.dit = rec
            image = s["image"] if pipe.cfg.dit.i2v else None
            pipe.generate(image=image, prompt=s["prompt"], steps=num_steps, seed=seed + i, batch_cfg=True)
            out += [dict(r, sample=i) for r in rec.samples]
            if progress is not None:
                progress(i)
    finally:
        pipe.dit = dit
    return out


def save(records: list[dict], path: Path, meta: dict) -> str:
    """Write captured inputs as one safetensors file; returns its sha256 (the calibration set's identity)."""
    from safetensors.torch import save_file

    tensors = {}
    for f in FIELDS:
        if records[0][f] is not None:
            tensors[f] = torch.cat([r[f] for r in records]).contiguous()
    index = [{"sample": r["sample"], "step": r["step"], "branch": r["branch"]} for r in records]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"x2v": json.dumps({**meta, "records": index})})
    return sha256_file(path)


def load(path: Path) -> tuple[list[dict], dict]:
    """-> (one dict of batch-1 DiT inputs per record, metadata) from a capture file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration capture not found: {path} (run `x2v-export calibrate` first)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("x2v", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "x" not in tensors or "records" not in meta:
        raise CalibrationError(f"{path}: not an x2v calibration capture")
    n = tensors["x"].shape[0]
    records = [{f: (tensors[f][i : i + 1] if f in tensors else None) for f in FIELDS} for i in range(n)]
    return records, meta
