"""bench/table.py end to end on the tiny model (CPU): rows measured, fidelity against the baseline, render."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from x2v.export.build import build

ROOT = Path(__file__).resolve().parent.parent


def table(*args):
    out = subprocess.run(
        [sys.executable, "-m", "bench.table", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_table_rows_and_render(tiny_ckpt, tiny_cfg, tmp_path):
    from x2v.calibration import capture, ptq
    from x2v.export.load import load_dit
    from x2v.runtime import __version__
    from x2v.runtime.config import CONFIG_DIR
    from x2v.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_ckpt, tiny_cfg)
    records = capture.capture(
        pipe, [{"prompt": "a cat", "image": CONFIG_DIR / "example.png"}], steps_per_run=2
    )
    targets = tiny_cfg.fp8.targets(tiny_cfg.dit.num_layers)
    model = ptq.calibrate(load_dit(tiny_ckpt, tiny_cfg, torch.float32), targets, records)
    ptq.save_quantized(ptq.fp8_state(model, targets), tiny_ckpt, "dit-fp8-table", {})
    engines = tmp_path / "engines"
    build("tiny", tiny_ckpt, "cpu", engines, dit_file="dit-fp8-table", dit_only=True, log=lambda s: None)
    # the sitting script builds the profile the rows ask for
    manifest = json.loads((engines / "manifest.json").read_text())
    assert table("--print-profile", "--model", "tiny").strip() in manifest["profiles"]
    assert manifest["versions"]["x2v"] == __version__

    common = ["--model", "tiny", "--distill-model", "tiny-distill", "--ckpt", str(tiny_ckpt),
              "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results")]  # fmt: skip
    for row in ("baseline", "sage-bf16", "fp8", "fp8-teacache-published", "distill"):
        table("--row", row, *common, "--engines", str(engines), "--steps", "4")
    rows = tmp_path / "results" / "table" / "cpu"
    fp8 = json.loads((rows / "fp8.json").read_text())
    assert fp8["steps"] == 4 and fp8["full_steps"] == 8 and fp8["e2e_projected_s"] > fp8["e2e_s"]
    assert {"check_s", "dit_weights_s", "engines_s", "encoders_s", "vae_s"} <= set(fp8["load_phases"])
    parts = fp8["encode_s"] + fp8["denoise_s"] + fp8["decode_s"] + fp8["write_s"]
    assert 0 < fp8["write_s"] and parts <= fp8["e2e_s"]  # the end-to-end time is its phases plus small change
    assert fp8["text_s"] + fp8["image_s"] + fp8["vae_encode_s"] <= fp8["encode_s"]
    assert 0 < fp8["latents_rel_l2_vs_baseline"] < 0.5 and fp8["video_psnr_vs_baseline_db"] > 10
    sage = json.loads((rows / "sage-bf16.json").read_text())  # on the CPU SageAttention falls back to SDPA
    assert sage["latents_rel_l2_vs_baseline"] < 1e-5
    assert json.loads((rows / "fp8-teacache-published.json").read_text())["steps_computed"] == 2
    distill = json.loads((rows / "distill.json").read_text())
    assert distill["steps"] == distill["full_steps"] == 4 and "e2e_projected_s" not in distill
    md = table("--render", "--out", str(tmp_path / "results"))
    assert "| fp8 | 4/4 of 8 |" in md and (tmp_path / "results" / "table-cpu.md").is_file()
    assert "left out: sage-mixed, fp8-teacache." in md  # rows not run are named, not silently missing
    assert "Encode parts (s): baseline text " in md
    assert f"x2v {__version__}, commits " in md  # the rows' x2v version beside their commits


def test_projection_adds_missing_computed_and_skipped_steps_apart():
    from bench.table import projected_s

    # 10 of 40 steps run, 6 computed (4 s each), 4 skipped (0.1 s); the published plan computes 22 of 40
    r = {"row": "fp8-teacache-published", "full_steps": 40, "steps": 10, "steps_computed": 6, "e2e_s": 40.0,
         "step_s": [4.0, 0.1, 4.0, 0.1, 4.0, 0.1, 4.0, 0.1, 4.0]}  # fmt: skip
    assert projected_s(r) == pytest.approx(40.0 + 16 * 4.0 + 14 * 0.1)
    assert projected_s({**r, "row": "fp8-teacache"}) is None  # random-weight TeaCache: no honest projection
    assert projected_s({**r, "steps": 40}) is None  # the full schedule ran: nothing to project
