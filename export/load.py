"""Build the torch models of a config on the meta device and load a checkpoint directory into them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from x2v.runtime.checkpoint import CheckpointError, load_strict, read_state_dict, resolve, to_official_dit
from x2v.runtime.config import ModelConfig


class _SkipFills(TorchFunctionMode):
    """In-place fills of meta tensors (nn.init, reset_parameters) skipped: every parameter of a built model comes
    from a checkpoint or from make-checkpoint's own random values, and on the meta device a fill runs as a Python
    reference op whose first call imports torch._dynamo (sympy, FSDP, ...): 3.5-4.8 s of an engine load on the
    H200 image (the fp8 row's load profile)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # nn.init functions pass their tensor by keyword, Tensor methods positionally
        target = args[0] if args else kwargs.get("tensor")
        if name.endswith("_") and not name.startswith("__") and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


def build(part: str, cfg: ModelConfig) -> torch.nn.Module:
    """An uninitialized model of one part ('dit', 'vae', 't5', 'clip') on the meta device."""
    from x2v.export.clip import CLIPVision
    from x2v.export.dit import WanDiT
    from x2v.export.t5 import T5Encoder
    from x2v.export.vae import WanVAE

    makers = {"dit": lambda: WanDiT(cfg.dit), "vae": lambda: WanVAE(cfg.vae), "t5": lambda: T5Encoder(cfg.t5),
              "clip": lambda: CLIPVision(cfg.clip)}  # fmt: skip
    if part == "clip" and cfg.clip is None:
        raise ValueError(f"model {cfg.name} has no image encoder")
    with torch.device("meta"), _SkipFills():
        return makers[part]()


def load_dit(ckpt: Path, cfg: ModelConfig, dtype=torch.bfloat16, sensitive_fp32=False, device="cpu", attn="sdpa",
             dit_file: str | None = None, fp8_fast_accum: bool = False,
             fp8_gelu_epilogue: bool = False):  # fmt: skip
    """The DiT with weights converted to `dtype` as they are read (float32 for the sensitive layers if asked).

    dit_file overrides the config's DiT file (a stem or file name in `ckpt`, or a path): for example the
    FP8 checkpoint `x2v-export quantize` wrote, or a LightX2V FP8 file. FP8 checkpoints are recognized by
    their `.weight_scale` keys; their linears become FP8Linear modules (fp8_fast_accum, fp8_gelu_epilogue: see
    configure_fp8).
    """
    from x2v.export.dit import is_sensitive
    from x2v.export.fp8 import (
        check_fp8_state,
        configure_fp8,
        is_fp8_state,
        normalize_fp8_state,
        quantized_names,
        swap_linears,
    )

    def pick(key: str):
        if key.endswith(("_scale", "_amax")):
            return torch.float32
        return torch.float32 if sensitive_fp32 and is_sensitive(key) else dtype

    state, sources = read_state_dict(resolve(ckpt, dit_file or cfg.files.dit), pick)
    state, sources = to_official_dit(state, sources)
    model = build("dit", cfg)
    if is_fp8_state(state):
        check_fp8_state(state, sources, CheckpointError)
        state = normalize_fp8_state(state)
        names = quantized_names(state)
        channel = {n: state[f"{n}.weight_scale"].dim() == 1 for n in names}
        swap_linears(model, names, channel, static=f"{names[0]}.input_scale" in state, bias_dtype=dtype)
    model = load_strict(model, state, sources)
    model = model.to(device).eval().requires_grad_(False).configure(dtype=dtype, attn=attn)
    configure_fp8(model, device, fast_accum=fp8_fast_accum, gelu_epilogue=fp8_gelu_epilogue)
    return model


def load_part(part: str, ckpt: Path, cfg: ModelConfig, dtype=torch.float32, device="cpu") -> torch.nn.Module:
    """VAE, umT5 or CLIP vision from the official .pth files."""
    from x2v.export.clip import CLIPVision

    name = {"vae": cfg.files.vae, "t5": cfg.files.t5, "clip": cfg.files.clip}[part]
    if name is None:
        raise ValueError(f"model {cfg.name} has no {part} file in its config")
    state, sources = read_state_dict(resolve(ckpt, name), dtype)
    ignore = CLIPVision.IGNORED_PREFIXES if part == "clip" else ()
    model = load_strict(build(part, cfg), state, sources, ignore=ignore).to(device)
    model = model.eval().requires_grad_(False)
    if part == "vae" and torch.device(device).type == "cuda":
        model.to_channels_last()  # warmed by the loaders: WanVAE.warm_up (engine loader), Pipeline.warm_up
    return model
