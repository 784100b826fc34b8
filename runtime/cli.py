"""`x2v`: the runtime side. `x2v generate` turns an image and a prompt into an MP4."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Run Wan2.1 video generation from a checkpoint or prebuilt engines."""


@main.command()
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="checkpoint directory (official layout); with --engines default: the one they were built from")  # fmt: skip
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="engine directory from `x2v-export build` (default: run the torch models)")  # fmt: skip
@click.option("--model", default="tiny", show_default=True,
              help="model config name or YAML path (with --engines: the engines' own)")  # fmt: skip
@click.option("--image", type=click.Path(path_type=Path), default=None, help="first frame (I2V models)")
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default=None, help="default: Wan's negative prompt")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out.mp4"), show_default=True)
@click.option("--steps", type=int, default=None, help="default: the model's")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--frames", type=int, default=None, help="4k+1; default: the model's")
@click.option("--height", type=int, default=None, help="multiple of 16 (I2V: sets the pixel area)")
@click.option("--width", type=int, default=None, help="multiple of 16 (I2V: sets the pixel area)")
@click.option("--teacache", type=float, default=0.0, show_default=True, help="TeaCache threshold (0: off)")
@click.option("--teacache-signal", type=click.Choice(["e", "e0"]), default="e", show_default=True)
@click.option(
    "--sequential-cfg", is_flag=True, help="run the two guidance passes one after the other (less memory)"
)
@click.option("--dit", "dit_file", default=None,
              help="DiT file in --ckpt or a path (e.g. dit-fp8 from `x2v-export quantize`, or a LightX2V FP8 file)")  # fmt: skip
@click.option(
    "--vae-tile",
    type=int,
    default=None,
    help="decode in spatial tiles of at most N x N latents (less memory)",
)
@click.option("--device", default=None, help="torch backend: cpu or cuda (default cpu); engines: their GPU")
@click.option("--attn", type=click.Choice(["sdpa", "sage"]), default="sdpa", show_default=True)
@click.option(
    "--save-latents",
    type=click.Path(path_type=Path),
    default=None,
    help="also save final latents (.safetensors)",
)
def generate(ckpt, engines, model, image, prompt, negative_prompt, out, steps, seed, frames, height, width, teacache,
             teacache_signal, sequential_cfg, dit_file, vae_tile, device, attn, save_latents):  # fmt: skip
    """Generate a video and write it as MP4."""
    from tqdm import tqdm

    from x2v.runtime.checkpoint import CheckpointError
    from x2v.runtime.config import ConfigError, load_model_config
    from x2v.runtime.engines import EngineError, read_manifest
    from x2v.runtime.pipeline import InputError, Pipeline, check_output, check_request

    try:  # everything cheap first: a bad request fails before any weight is read
        if engines is not None:  # the engines say which model they are
            if not Path(engines).is_dir():
                raise InputError(f"engine directory not found: {engines}")
            model = read_manifest(engines)["model"]
        cfg = load_model_config(model)
        s = cfg.sample
        check_request(
            cfg,
            image,
            prompt,
            frames or s.frames,
            height or s.height,
            width or s.width,
            steps,
            teacache,
            vae_tile,
        )
        check_output(out)
        if engines is not None:
            pipe = Pipeline.from_engines(engines, ckpt, device)
        else:
            if ckpt is None:
                raise InputError("give --ckpt (a checkpoint directory) or --engines (an engine directory)")
            pipe = Pipeline.load(ckpt, cfg, device=device or "cpu", attn=attn, dit_file=dit_file)
        bars = []

        def on_phase(name: str) -> None:  # the step bar covers the denoising steps only, not encode or decode
            if bars:
                bars.pop().close()
            if name == "denoise":
                bars.append(tqdm(total=steps or s.num_steps, desc="denoise", unit="step"))
            else:
                click.echo(f"{name} ...", err=True)

        try:
            result = pipe.generate(image=image, prompt=prompt, negative_prompt=negative_prompt, steps=steps, seed=seed,
                                   teacache=teacache, teacache_signal=teacache_signal, frames=frames, height=height,
                                   width=width, batch_cfg=not sequential_cfg, decode_tile=vae_tile,
                                   progress=lambda i: bars[0].update(), on_phase=on_phase, out=out)  # fmt: skip
        finally:
            for bar in bars:
                bar.close()
    except (ConfigError, CheckpointError, InputError, EngineError, FileNotFoundError) as e:
        _fail(e)
    if save_latents:
        from safetensors.torch import save_file

        save_file({"latents": result.latents.cpu().contiguous()}, str(save_latents))
    if result.teacache:
        click.echo(result.teacache)
    t, h, w, _ = result.frames.shape
    click.echo(f"wrote {out} ({t} frames {w}x{h}): {result.summary()}")


if __name__ == "__main__":
    main()
