"""Smoke check of the torch backend's load-time warm-up on a GPU, on the tiny model (seconds):

    python bench/warm_up_smoke.py

For SDPA and SageAttention: Pipeline.load warms up (pre, block 0 and post of the DiT at the request's shapes), the
caller's CUDA generator state is what it was before the load, and two requests with one seed give the same latents.
Prints one JSON line; what it printed on an H200 is in bench/results/warm_up_smoke-h200.log.
"""

import json
import tempfile
import time
from pathlib import Path

import torch
from click.testing import CliRunner

from x2v.export.cli import main
from x2v.runtime.pipeline import Pipeline

ckpt = Path(tempfile.mkdtemp()) / "tiny"
assert CliRunner().invoke(main, ["make-checkpoint", "--model", "tiny", "--out", str(ckpt)]).exit_code == 0
out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
for attn in ("sdpa", "sage"):
    torch.manual_seed(1)
    before = torch.cuda.get_rng_state()
    t0 = time.perf_counter()
    pipe = Pipeline.load(ckpt, "tiny", device="cuda", attn=attn)
    r = {"load_s": time.perf_counter() - t0, "warm_up_s": pipe.load_phases.get("warm_up_s"),
         "cuda_rng_unchanged": bool(torch.equal(before, torch.cuda.get_rng_state()))}  # fmt: skip
    a, b = (pipe.generate(image="configs/example.png", prompt="a cat", seed=3, steps=4) for _ in range(2))
    out[attn] = {**r, "repeatable": bool(torch.equal(a.latents, b.latents))}
print(json.dumps(out))
