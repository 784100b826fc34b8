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


if __name__ == "__main__":
    main()
