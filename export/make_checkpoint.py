"""Synthetic checkpoints in the official Wan2.1 layout, from a seed.

No weights can be downloaded where x2v is developed and tested, so every command runs on checkpoints this
module writes: the `tiny` model for tests and the offline demo, full-size models (random weights with
realistic scales, same FLOPs and bytes as the real ones) for benchmarks on a GPU host.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from x2v.runtime.checkpoint import save_sharded
from x2v.runtime.config import ModelConfig

# Vocabulary of the synthetic tokenizer: enough pieces to tokenize English prompts without <unk> storms.
_PIECES = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-") + [
    "the", "a", "of", "and", "in", "on", "with", "cat", "dog", "man", "woman", "walks", "runs", "beach", "city",
    "street", "sunset", "night", "camera", "slowly", "red", "blue", "green", "white", "black", "video", "scene",
]  # fmt: skip


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A small Unigram tokenizer shaped like umT5's (<pad>=0, </s>=1, <unk>=2, Metaspace, </s> appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for p in _PIECES:
        pieces += [(p, -3.0 - 0.1 * len(pieces)), (f"▁{p}", -3.0 - 0.1 * len(pieces))]
    pieces = pieces[:vocab_size]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def _std(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a realistic random init for one parameter, from its name and shape."""
    last = key.rsplit(".", 1)[-1]
    if last in ("modulation",) or key.endswith("modulation"):
        return 0.0, shape[-1] ** -0.5
    if last == "gamma" or (last == "weight" and len(shape) == 1):  # norm scales
        return 1.0, 0.05
    if last == "bias" or len(shape) == 1:
        return 0.0, 0.02
    if (
        last in ("cls_embedding", "pos_embedding", "head")
        and len(shape) >= 2
        and "embedding.weight" not in key
    ):
        return 0.0, shape[-1] ** -0.5 if last != "head" else shape[0] ** -0.5
    if "token_embedding" in key or "pos_embedding.embedding" in key:
        return 0.0, 1.0 if "token" in key else 0.1
    return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))


def random_tensors(model: torch.nn.Module, seed: int, dtype: torch.dtype, device: str):
    """Yield (key, tensor on CPU) for every parameter of a meta-device model, deterministic in `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for key, p in model.state_dict().items():
        mean, std = _std(key, tuple(p.shape))
        t = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std + mean
        yield key, t.to(dtype).cpu()


def make_checkpoint(cfg: ModelConfig, out: Path, seed: int = 0, dit_dtype=torch.bfloat16, device: str = "cpu",
                    shard_bytes: int = 5 << 30) -> Path:  # fmt: skip
    """Write DiT shards + index, VAE, umT5, CLIP (I2V) and tokenizer.json under `out`."""
    from x2v.export.load import build

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [("dit", dit_dtype), ("vae", torch.float32), ("t5", torch.bfloat16)]
    if cfg.dit.i2v:
        parts.append(("clip", torch.float16))
    for i, (part, dtype) in enumerate(tqdm(parts, desc=f"make-checkpoint {cfg.name}", unit="part")):
        model = build(part, cfg)
        items = random_tensors(model, seed * 1000 + i, dtype, device)
        if part == "dit":
            save_sharded(items, out, cfg.files.dit, max_shard_bytes=shard_bytes)
        else:
            state = dict(items)
            if (
                part == "clip"
            ):  # the official file also holds the text tower; keep one key of it to prove it is ignored
                state["log_scale"] = torch.tensor(math.log(1 / 0.07))
            torch.save(state, out / {"vae": cfg.files.vae, "t5": cfg.files.t5, "clip": cfg.files.clip}[part])
    write_tokenizer(out / cfg.files.tokenizer, cfg.t5.vocab)
    return out
