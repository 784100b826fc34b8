"""Checkpoint IO: sharded or single safetensors, `.pth` files, strict loading with errors that say where.

Tensors are read one at a time and converted to the target dtype as they are read, so an fp32 checkpoint
loads as bf16 without a second full copy in memory. `.pth` files are read with `weights_only=True` and
memory-mapped: no arbitrary object is ever unpickled from a checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the model; the message names key and file."""


def resolve(directory: Path, stem_or_name: str) -> Path:
    """The file for a config's `files.*` entry: a sharded index, a single safetensors, or the named file."""
    directory = Path(directory)
    candidates = [directory / stem_or_name]
    if not stem_or_name.endswith((".pth", ".pt", ".safetensors", ".json")):
        candidates = [
            directory / f"{stem_or_name}.safetensors.index.json",
            directory / f"{stem_or_name}.safetensors",
        ]
    for path in candidates:
        if path.exists():
            return path
    raise CheckpointError(f"missing checkpoint file: looked for {' or '.join(str(p) for p in candidates)}")


def read_state_dict(
    path: Path, dtype: Callable[[str], torch.dtype | None] | torch.dtype | None = None, device: str = "cpu"
):
    """Read every tensor of a checkpoint -> (state dict, {key: file it came from}).

    dtype: None keeps the stored dtype; a dtype converts floating tensors; a function of the key picks per key.
    device: where safetensors tensors are read to (straight from the file, no host copy first); .pth files
    are read to the CPU.
    """
    path = Path(path)
    pick = dtype if callable(dtype) else (lambda key: dtype)
    if not path.exists():
        raise CheckpointError(f"missing checkpoint file: {path}")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a safetensors index (needs a 'weight_map'): {e}") from None
        state, sources = {}, {}
        for shard in sorted(set(weight_map.values())):
            part, where = _read_safetensors(path.parent / shard, pick, device)
            expected = {k for k, v in weight_map.items() if v == shard}
            if set(part) != expected:
                extra = sorted(set(part) ^ expected)[0]
                raise CheckpointError(f"{path.parent / shard}: key {extra!r} disagrees with the index {path}")
            state.update(part)
            sources.update(where)
        return state, sources
    if path.suffix == ".safetensors":
        return _read_safetensors(path, pick, device)
    if path.suffix in (".pth", ".pt"):
        return _read_pth(path, pick)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, .safetensors.index.json or .pth)"
    )


def _convert(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # FP8 tensors are data of a quantized checkpoint, never "a float to upcast".
    if dtype is None or not t.is_floating_point() or t.element_size() == 1:
        return t
    return t.to(dtype)


def _read_safetensors(path: Path, pick, device: str = "cpu") -> tuple[StateDict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise CheckpointError(f"missing checkpoint shard: {path}")
    try:
        state = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = _convert(f.get_tensor(key), pick(key))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None
    return state, dict.fromkeys(state, str(path))


def _read_pth(path: Path, pick) -> tuple[StateDict, dict[str, str]]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        raise CheckpointError(
            f"{path}: unreadable .pth checkpoint (truncated, corrupt or not weights-only): {e}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    state = {k: _convert(v, pick(k)) for k, v in obj.items()}
    return state, dict.fromkeys(state, str(path))


def load_strict(
    model: torch.nn.Module, state: StateDict, sources: dict[str, str], ignore: tuple[str, ...] = ()
):
    """Load `state` into a (meta-device) model by assignment; any missing, unexpected or misshapen key is an
    error naming the key, both shapes and the file. Keys starting with an `ignore` prefix are dropped by name.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files = sorted(set(sources.values())) or ["<memory>"]
    where = files[0] if len(files) == 1 else f"{Path(files[0]).parent} ({len(files)} files)"
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{where}: missing key {missing[0]!r} (expected shape {list(expected[missing[0]])}); "
            f"{len(missing)} keys missing in all{_variant_hint(model, state)}"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(
            f"{sources.get(k, where)}: unexpected key {k!r} (shape {list(state[k].shape)}); "
            f"{len(unexpected)} unexpected in all{_variant_hint(model, state)}"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"{sources.get(k, where)}: key {k!r} has shape {list(state[k].shape)}, the model expects {list(shape)}"
                f"{_variant_hint(model, state)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _variant_hint(model, state) -> str:
    cfg = getattr(model, "cfg", None)
    w = state.get("patch_embedding.weight")
    if cfg is None or w is None or not hasattr(cfg, "in_dim"):
        return ""
    n_blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return (
        f" -- the checkpoint looks like a DiT with dim {w.shape[0]}, in_dim {w.shape[1]}, {n_blocks} blocks, while "
        f"the model config has dim {cfg.dim}, in_dim {cfg.in_dim}, {cfg.num_layers} blocks: a checkpoint of another variant?"
    )


# Diffusers' WanTransformer3DModel names -> official Wan2.1 names. Applied when a checkpoint uses them.
DIFFUSERS_DIT_RULES = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.self_attn.q."),
    (r"^blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.self_attn.k."),
    (r"^blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.self_attn.v."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_q\.", r"blocks.\1.self_attn.norm_q."),
    (r"^blocks\.(\d+)\.attn1\.norm_k\.", r"blocks.\1.self_attn.norm_k."),
    (r"^blocks\.(\d+)\.attn2\.to_q\.", r"blocks.\1.cross_attn.q."),
    (r"^blocks\.(\d+)\.attn2\.to_k\.", r"blocks.\1.cross_attn.k."),
    (r"^blocks\.(\d+)\.attn2\.to_v\.", r"blocks.\1.cross_attn.v."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_q\.", r"blocks.\1.cross_attn.norm_q."),
    (r"^blocks\.(\d+)\.attn2\.norm_k\.", r"blocks.\1.cross_attn.norm_k."),
    (r"^blocks\.(\d+)\.attn2\.add_k_proj\.", r"blocks.\1.cross_attn.k_img."),
    (r"^blocks\.(\d+)\.attn2\.add_v_proj\.", r"blocks.\1.cross_attn.v_img."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]
_DIFFUSERS_RULES = [(re.compile(a), b) for a, b in DIFFUSERS_DIT_RULES]


def is_diffusers_dit(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def official_dit_key(key: str) -> str:
    """The official Wan2.1 name of a diffusers DiT key (unchanged if it is official already)."""
    for pattern, repl in _DIFFUSERS_RULES:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def to_official_dit(state: StateDict, sources: dict[str, str]) -> tuple[StateDict, dict[str, str]]:
    if not is_diffusers_dit(state):
        return state, sources
    renamed = {official_dit_key(k): v for k, v in state.items()}
    return renamed, {official_dit_key(k): v for k, v in sources.items()}


def save_sharded(items, directory: Path, stem: str, max_shard_bytes: int = 5 << 30) -> Path:
    """Write (key, tensor) pairs as <stem>-0000i-of-0000n.safetensors plus <stem>.safetensors.index.json.

    `items` may be a generator: shards are written as they fill, so a 33 GB checkpoint never sits in memory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written, current, size, total = [], {}, 0, 0

    def flush():
        tmp = directory / f".{stem}-part{len(written)}.safetensors"
        save_file({k: v.contiguous() for k, v in current.items()}, str(tmp))
        written.append((tmp, list(current)))

    for key, t in items:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[key] = t
        size, total = size + nbytes, total + nbytes
    flush()
    weight_map = {}
    for i, (tmp, keys) in enumerate(written):
        name = f"{stem}-{i + 1:05d}-of-{len(written):05d}.safetensors"
        tmp.rename(directory / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = directory / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return index


def files_of(path: Path) -> list[Path]:
    """The files a resolved checkpoint path consists of: the index and its shards, or the one file."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return [path] + [path.parent / s for s in shards]
    return [path]


def identity(path: Path) -> list[dict]:
    """A cheap fingerprint of a checkpoint: per file its name, size and the sha256 of its safetensors header
    (every key, dtype, shape and offset). Changing any tensor's layout changes it; `x2v-export inspect
    --verify` compares full-content hashes too."""
    import hashlib

    out = []
    for f in files_of(path):
        data = f.read_bytes() if f.suffix == ".json" else _header_bytes(f)
        out.append(
            {"file": f.name, "bytes": f.stat().st_size, "header_sha256": hashlib.sha256(data).hexdigest()}
        )
    return out


def _header_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return fh.read(n) if n < (1 << 28) else b""
