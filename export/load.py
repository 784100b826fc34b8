"""Build the torch models of a config on the meta device and load a checkpoint directory into them."""

from __future__ import annotations

from pathlib import Path

import torch

from x2v.runtime.checkpoint import load_strict, read_state_dict, resolve, to_official_dit
from x2v.runtime.config import ModelConfig


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
    with torch.device("meta"):
        return makers[part]()


def load_dit(
    ckpt: Path, cfg: ModelConfig, dtype=torch.bfloat16, sensitive_fp32=False, device="cpu", attn="sdpa"
):
    """The DiT with weights converted to `dtype` as they are read (float32 for the sensitive layers if asked)."""
    from x2v.export.dit import is_sensitive

    pick = (lambda k: torch.float32 if is_sensitive(k) else dtype) if sensitive_fp32 else dtype
    state, sources = read_state_dict(resolve(ckpt, cfg.files.dit), pick)
    state, sources = to_official_dit(state, sources)
    model = load_strict(build("dit", cfg), state, sources)
    return model.to(device).eval().requires_grad_(False).configure(dtype=dtype, attn=attn)


def load_part(part: str, ckpt: Path, cfg: ModelConfig, dtype=torch.float32, device="cpu") -> torch.nn.Module:
    """VAE, umT5 or CLIP vision from the official .pth files."""
    from x2v.export.clip import CLIPVision

    name = {"vae": cfg.files.vae, "t5": cfg.files.t5, "clip": cfg.files.clip}[part]
    if name is None:
        raise ValueError(f"model {cfg.name} has no {part} file in its config")
    state, sources = read_state_dict(resolve(ckpt, name), dtype)
    ignore = CLIPVision.IGNORED_PREFIXES if part == "clip" else ()
    model = load_strict(build(part, cfg), state, sources, ignore=ignore)
    return model.to(device).eval().requires_grad_(False)
