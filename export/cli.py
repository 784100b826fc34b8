"""`x2v-export`: the export side. Each command is thin and imports torch only when it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Export Wan2.1 checkpoints to per-GPU engines."""


@main.command("make-checkpoint")
@click.option("--model", default="tiny", show_default=True, help="model config name or YAML path")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="checkpoint directory to write")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--device", default="cpu", show_default=True, help="where random weights are drawn (cuda is faster)"
)
@click.option("--dit-dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
def make_checkpoint_cmd(model, out, seed, device, dit_dtype):
    """Write a random checkpoint in the official Wan2.1 layout (the offline stand-in for real weights)."""
    import torch

    from x2v.export.make_checkpoint import make_checkpoint
    from x2v.runtime.config import ConfigError, load_model_config

    try:
        cfg = load_model_config(model)
    except ConfigError as e:
        _fail(e)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dit_dtype]
    path = make_checkpoint(cfg, out, seed=seed, dit_dtype=dtype, device=device)
    click.echo(f"wrote {cfg.name} checkpoint to {path}")


@main.command()
@click.option("--model", default="tiny", show_default=True, help="model config name or YAML path")
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="checkpoint directory")
@click.option("--set", "calib_set", type=click.Path(path_type=Path), default=None,
              help="calibration set YAML (prompts + images)  [default: calibration/sets/default.yaml]")  # fmt: skip
@click.option(
    "--steps-per-run",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="captured steps per prompt, spread over the schedule",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="sampling steps per run (default: the model's)"
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="default: <ckpt>/calibration.safetensors"
)
@click.option("--device", default="cpu", show_default=True)
def calibrate(model, ckpt, calib_set, steps_per_run, steps, out, device):
    """Capture DiT inputs along real denoising trajectories (both guidance branches) for FP8 PTQ."""
    from tqdm import tqdm

    from x2v.calibration import capture
    from x2v.runtime.checkpoint import CheckpointError
    from x2v.runtime.config import ConfigError, load_model_config
    from x2v.runtime.pipeline import InputError, Pipeline

    calib_set = calib_set or capture.DEFAULT_SET
    out = out or Path(ckpt) / "calibration.safetensors"
    try:
        cfg = load_model_config(model)
        samples = capture.load_set(calib_set)
        pipe = Pipeline.load(ckpt, cfg, device=device)
        with tqdm(total=len(samples), desc="calibrate", unit="prompt") as bar:
            records = capture.capture(pipe, samples, steps_per_run, steps, progress=lambda i: bar.update())
    except (ConfigError, CheckpointError, InputError, capture.CalibrationError, FileNotFoundError) as e:
        _fail(e)
    digest = capture.save(
        records, out, {"model": cfg.name, "set": str(calib_set), "steps": steps or cfg.sample.num_steps}
    )
    click.echo(f"wrote {out}: {len(records)} DiT inputs from {len(samples)} prompts (sha256 {digest[:12]})")


@main.command()
@click.option("--model", default="tiny", show_default=True, help="model config name or YAML path")
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="checkpoint directory")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="capture from `x2v-export calibrate`  [default: <ckpt>/calibration.safetensors]")  # fmt: skip
@click.option(
    "--out", "stem", default="dit-fp8", show_default=True, help="output name in <ckpt> (safetensors stem)"
)
@click.option(
    "--report", is_flag=True, help="print per-layer amax ranges and the per-forward error against bf16"
)
@click.option("--device", default="cpu", show_default=True)
def quantize(model, ckpt, calib, stem, report, device):
    """FP8 PTQ of the DiT with NVIDIA ModelOpt; writes an FP8 checkpoint that loads without ModelOpt."""
    import torch
    from tqdm import tqdm

    from x2v.calibration import capture, ptq
    from x2v.export.load import load_dit
    from x2v.runtime.checkpoint import CheckpointError
    from x2v.runtime.config import ConfigError, load_model_config
    from x2v.runtime.engines import sha256_file

    try:
        import modelopt
    except ImportError:
        _fail(ImportError("x2v-export quantize needs nvidia-modelopt: pip install 'x2v[export]'"))
    calib = calib or Path(ckpt) / "calibration.safetensors"
    try:
        cfg = load_model_config(model)
        records, meta = capture.load(calib)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        dit = load_dit(ckpt, cfg, dtype=dtype, device=device)
    except (ConfigError, CheckpointError, capture.CalibrationError) as e:
        _fail(e)
    targets = cfg.fp8.targets(cfg.dit.num_layers)
    fields = capture.FIELDS
    first = [None if records[0][f] is None else records[0][f].to(device) for f in fields]
    with torch.no_grad():
        reference = dit(*first) if report else None
    with tqdm(total=len(records), desc="modelopt max calibration", unit="input") as bar:
        ptq.calibrate(dit, targets, records, cfg.fp8.weight == "channel", progress=lambda i: bar.update())
    state = ptq.fp8_state(dit, targets)
    recipe = {"model": cfg.name, "weights": cfg.fp8.weight, "activations": "static per-tensor",
              "calibration": {"file": str(calib), "sha256": sha256_file(calib), "inputs": len(records)},
              "modelopt": modelopt.__version__, "keep_first_blocks": cfg.fp8.keep_first_blocks,
              "keep_last_blocks": cfg.fp8.keep_last_blocks}  # fmt: skip
    path = ptq.save_quantized(state, ckpt, stem, recipe)
    click.echo(f"wrote {path} ({len(targets)} FP8 linears) and {Path(ckpt) / (stem + '.recipe.json')}")
    if report:
        for name, a_in, a_w in ptq.ranges(dit, targets):
            click.echo(f"  {name:32s} input amax {a_in:10.4g}  weight amax {a_w:10.4g}")
        del dit
        fp8 = load_dit(ckpt, cfg, dtype=dtype, device=device, dit_file=stem)
        with torch.no_grad():
            err = ptq.compare(fp8(*first), reference)
        click.echo(f"per-forward error against {str(dtype).split('.')[-1]} (first calibration input): "
                   f"rel L2 {err['rel_l2']:.4f}, cos {err['cos']:.6f}")  # fmt: skip


@main.command("build")
@click.option("--model", default="tiny", show_default=True, help="model config name or YAML path")
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="checkpoint directory")
@click.option(
    "--gpu",
    required=True,
    help="target GPU config (configs/gpus/<name>.yaml): h200, h100, rtx4090, a100, cpu",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="engine directory to write")
@click.option("--precision", type=click.Choice(["fp8", "bf16", "fp32"]), default=None,
              help="default: fp8 when --dit names an FP8 checkpoint, else the GPU's high-precision type")  # fmt: skip
@click.option("--attn", type=click.Choice(["sage", "sdpa"]), default=None, help="default: the GPU's first")
@click.option(
    "--backend", type=click.Choice(["aoti", "onnx", "tensorrt"]), default=None, help="default: the GPU's"
)
@click.option("--dit", "dit_file", default=None, help="DiT file in --ckpt (e.g. dit-fp8) or a path")
@click.option(
    "--profile", "profiles", multiple=True, help="FRAMESxHEIGHTxWIDTH, repeatable (default: the model's)"
)
@click.option(
    "--dit-only", is_flag=True, help="skip the umT5, CLIP and VAE engines (they then run as torch modules)"
)
@click.option(
    "--autotune/--no-autotune", default=None, help="AOTInductor max-autotune (default: the GPU config's)"
)
def build_cmd(model, ckpt, gpu, out, precision, attn, backend, dit_file, profiles, dit_only, autotune):
    """Build the engines for one GPU and write manifest.json: DiT (time, pre, block, post) and, for the ONNX
    and TensorRT backends, umT5, CLIP and VAE encode/decode."""
    from x2v.export.build import BuildError, CheckpointError, ConfigError, build

    try:
        m = build(model, ckpt, gpu, out, precision, attn, backend, dit_file, list(profiles) or None, autotune,
                  dit_only, log=lambda s: click.echo(s, err=True))  # fmt: skip
    except (BuildError, CheckpointError, ConfigError) as e:
        _fail(e)
    size = sum(e["bytes"] for e in m["engines"].values())
    click.echo(f"wrote {out}: {len(m['engines'])} {m['backend']} engines ({size / 1e6:.1f} MB, {m['precision']}, "
               f"attention {m['attention']}) for {m['gpu']}, profiles {', '.join(m['profiles'])}")  # fmt: skip


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="default: the manifest's")
@click.option("--verify", is_flag=True, help="also hash the checkpoint's weight files in full")
def inspect(directory, ckpt, verify):
    """Print an engine directory's manifest and check its hashes (and, with --verify, the weights)."""
    from x2v.runtime.checkpoint import files_of, resolve
    from x2v.runtime.engines import EngineError, check, read_manifest, sha256_file

    try:
        m = read_manifest(directory)
    except EngineError as e:
        _fail(e)
    click.echo(
        f"{directory}: {m['model']} for {m['gpu']} ({m['backend']}, {m['precision']}, attention {m['attention']})"
    )
    click.echo(f"  profiles: {', '.join(m['profiles'])}; built {m['built']}")
    click.echo("  versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    click.echo(f"  checkpoint: {m['checkpoint']['dir']} / {m['checkpoint']['dit_file']}")
    bad = 0
    for key, e in m["engines"].items():
        path = Path(directory) / e["file"]
        ok = path.is_file() and sha256_file(path) == e["sha256"]
        bad += not ok
        click.echo(
            f"  {key:24s} {e['file']:28s} {e['bytes'] / 1e6:8.2f} MB  {'ok' if ok else 'HASH MISMATCH'}"
        )
    ckpt = Path(ckpt or m["checkpoint"]["dir"])
    try:
        check(m, directory, ckpt, verify_engines=False)
        click.echo("  checkpoint and this node: ok")
    except (EngineError, ValueError) as e:
        click.echo(f"  not loadable here: {e}")
        bad += 1
    if verify:
        for f in files_of(resolve(ckpt, m["checkpoint"]["dit_file"])):
            click.echo(f"  sha256 {sha256_file(f)}  {f.name}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
