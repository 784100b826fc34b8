"""Model configs: small YAML files under configs/models, read into frozen dataclasses.

A key the dataclass does not know is an error naming the key and the file, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Wan's default negative prompt (wan/configs/shared_config.py), used when the caller gives none.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class ConfigError(ValueError):
    """A config file or name is wrong; the message says which and where."""


@dataclass(frozen=True)
class Files:
    dit: str = "diffusion_pytorch_model"
    vae: str = "Wan2.1_VAE.pth"
    t5: str = "models_t5_umt5-xxl-enc-bf16.pth"
    clip: str | None = None
    tokenizer: str = "google/umt5-xxl/tokenizer.json"


@dataclass(frozen=True)
class DiTConfig:
    model_type: str = "t2v"  # "t2v" or "i2v"
    in_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    text_len: int = 512
    clip_dim: int = 1280
    clip_tokens: int = 257
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def i2v(self) -> bool:
        return self.model_type == "i2v"


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)


@dataclass(frozen=True)
class T5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32


@dataclass(frozen=True)
class CLIPConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    num_heads: int = 16
    num_layers: int = 32
    out_dim: int = 1024


@dataclass(frozen=True)
class SampleConfig:
    solver: str = "unipc"  # "unipc" (flow-matching UniPC, bh2) or "euler" (step-distilled models)
    steps: int = 50
    timesteps: tuple[int, ...] = ()  # euler only: the distilled timesteps out of 1000
    shift: float = 5.0
    guide_scale: float = 5.0  # 1.0: no classifier-free guidance (one DiT pass a step)
    height: int = 480
    width: int = 832
    frames: int = 81
    fps: int = 16
    teacache: str | None = None  # coefficient set in configs/teacache/wan2.1.yaml

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) if self.solver == "euler" else self.steps


@dataclass(frozen=True)
class FP8Config:
    """Which DiT linears the FP8 recipe quantizes: data, so a recipe change is a config change.

    `quantize` names linears inside a block (e.g. "self_attn.q", "ffn.0"); every block gets them except
    the first and last `keep_*_blocks`. Everything else (embeddings, time projection, modulation, norms,
    head) stays in high precision.
    """

    quantize: tuple[str, ...] = (
        "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
        "ffn.0", "ffn.2",
    )  # fmt: skip
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0
    weight: str = "tensor"  # weight scales: "tensor" or "channel" (per output channel)

    def targets(self, num_layers: int) -> list[str]:
        """Full module names of the quantized linears, in block order."""
        keep = set(range(self.keep_first_blocks)) | set(range(num_layers - self.keep_last_blocks, num_layers))
        return [f"blocks.{i}.{name}" for i in range(num_layers) if i not in keep for name in self.quantize]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    description: str = ""
    files: Files = field(default_factory=Files)
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPConfig | None = None
    sample: SampleConfig = field(default_factory=SampleConfig)
    fp8: FP8Config = field(default_factory=FP8Config)


def _build(cls, data, where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys; nested dataclasses are built the same way."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} for {cls.__name__} (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        target = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner else None)
        if target is not None and value is not None:
            value = _build(target, value, f"{where}: {key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def known_models() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A model by name (configs/models/<name>.yaml) or by path to a YAML file."""
    import yaml

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "models" / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown model {str(name_or_path)!r}; known models: {', '.join(known_models())}"
            )
    elif not path.exists():
        raise ConfigError(f"model config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = {"name": path.stem, **(data or {})}
    if data.get("clip") is not None and data["clip"] == {}:
        data["clip"] = {}
    cfg = _build(ModelConfig, data, str(path))
    _check(cfg, path)
    return cfg


def _check(cfg: ModelConfig, path: Path) -> None:
    d = cfg.dit
    if d.model_type not in ("t2v", "i2v"):
        raise ConfigError(f"{path}: dit.model_type must be 't2v' or 'i2v', found {d.model_type!r}")
    if d.dim % d.num_heads or d.head_dim % 2:
        raise ConfigError(f"{path}: dit.dim {d.dim} must split into {d.num_heads} heads of even size")
    if d.i2v and (cfg.clip is None or cfg.files.clip is None):
        raise ConfigError(f"{path}: an i2v model needs a clip section and files.clip")
    if cfg.sample.solver not in ("unipc", "euler"):
        raise ConfigError(f"{path}: sample.solver must be 'unipc' or 'euler', found {cfg.sample.solver!r}")
    if cfg.sample.solver == "euler" and not cfg.sample.timesteps:
        raise ConfigError(f"{path}: sample.timesteps is required with the euler solver")
    q = cfg.fp8
    if q.weight not in ("tensor", "channel"):
        raise ConfigError(f"{path}: fp8.weight must be 'tensor' or 'channel', found {q.weight!r}")
    if (
        q.keep_first_blocks < 0
        or q.keep_last_blocks < 0
        or q.keep_first_blocks + q.keep_last_blocks > d.num_layers
    ):
        raise ConfigError(
            f"{path}: fp8.keep_first_blocks + keep_last_blocks must fit in {d.num_layers} blocks"
        )
    linears = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"} | ({"cross_attn.k_img", "cross_attn.v_img"} if d.i2v else set())  # fmt: skip
    bad = [n for n in q.quantize if n not in linears]
    if bad:
        raise ConfigError(f"{path}: fp8.quantize names {bad[0]!r}, not a linear of this model's blocks "
                          f"(known: {', '.join(sorted(linears))})")  # fmt: skip


def load_teacache_coefficients(name: str, signal: str) -> tuple[float, ...]:
    """Published TeaCache polynomial for a model family; signal is 'e' or 'e0'."""
    import yaml

    path = CONFIG_DIR / "teacache" / "wan2.1.yaml"
    sets = yaml.safe_load(path.read_text())
    if name not in sets:
        raise ConfigError(f"{path}: no TeaCache coefficients {name!r} (known: {', '.join(sorted(sets))})")
    return tuple(float(c) for c in sets[name][signal])


@dataclass(frozen=True)
class GPUConfig:
    """What a target GPU supports; engines are built for exactly one (configs/gpus/<name>.yaml)."""

    name: str
    description: str = ""
    match: tuple[str, ...] = ()  # substrings of the CUDA device name
    capability: tuple[int, int] | None = None  # None: CPU
    memory_gb: float | None = None
    precisions: tuple[str, ...] = ("bf16",)  # "fp8", "bf16", "fp32"
    attention: tuple[str, ...] = ("sdpa",)  # "sage", "sdpa"
    backend: str = "aoti"  # "aoti", "tensorrt" or "onnx"
    autotune: bool = False
    vae_chunk: int = 1
    # VAE decode in spatial tiles of at most N x N latents in area (None: whole frames)
    vae_tile: int | None = None
    encoders: str = "resident"  # umT5/CLIP weights: resident on the GPU, stream (host, a block at a time), host (run on CPU)
    # DiT block weights: resident on the GPU, or stream (pinned host memory, two blocks on the GPU at a time)
    dit_weights: str = "resident"
    # SageAttention tile {BLOCK_M, num_warps, num_stages} the engines compile with; None autotunes at each build
    sage_tile: dict | None = None
    # CUDA caching allocator with expandable segments: freed memory serves requests of any size, so the
    # reserve follows the allocated peak more closely (bench/results/vae_memory-h200.json)
    expandable_segments: bool = False
    # FP8 GEMMs of the engines accumulate in the tensor cores instead of promoting to FP32 every few K-steps
    # (torch._scaled_mm's use_fast_accum; TensorRT picks its own accumulation)
    fp8_fast_accum: bool = False
    # The FFN's up-projection GEMM writes the down-projection's FP8 input from its epilogue (bias, GELU, FP8
    # cast) instead of a bf16 activation a separate kernel reads back (export/fp8_kernels.py; static FP8 scales)
    fp8_gelu_epilogue: bool = False
    # How AOTInductor engines prepare Q and K for SageAttention: "kernels" (Inductor's norm/RoPE kernels, then
    # the op's quantization kernels) or "fused" (the op takes the projections: norm, RoPE and Q's INT8 in one
    # pass, x2v::sage_attention_rope). ONNX/TensorRT engines take the x2v::SageAttention node either way.
    sage_prep: str = "kernels"

    @property
    def device(self) -> str:
        return "cpu" if self.capability is None else "cuda"

    def fp8_options(self) -> dict:
        """The FP8 GEMM settings as export.load.load_dit's keyword arguments (engine builds and the torch backend)."""
        return {"fp8_fast_accum": self.fp8_fast_accum, "fp8_gelu_epilogue": self.fp8_gelu_epilogue}

    def matches(self, device_name: str, capability: tuple[int, int] | None) -> bool:
        if self.capability is None:
            return capability is None
        return tuple(self.capability) == tuple(capability or ()) and any(m in device_name for m in self.match)


def known_gpus() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "gpus").glob("*.yaml"))


def load_gpu_config(name: str) -> GPUConfig:
    import yaml

    path = CONFIG_DIR / "gpus" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown GPU {name!r}; known GPUs: {', '.join(known_gpus())}")
    cfg = _build(GPUConfig, {"name": name, **(yaml.safe_load(path.read_text()) or {})}, str(path))
    if cfg.backend not in ("aoti", "tensorrt", "onnx"):
        raise ConfigError(f"{path}: backend must be aoti, tensorrt or onnx, found {cfg.backend!r}")
    if cfg.encoders not in ("resident", "stream", "host"):
        raise ConfigError(f"{path}: encoders must be resident, stream or host, found {cfg.encoders!r}")
    if cfg.dit_weights not in ("resident", "stream"):
        raise ConfigError(f"{path}: dit_weights must be resident or stream, found {cfg.dit_weights!r}")
    if cfg.sage_prep not in ("kernels", "fused"):
        raise ConfigError(f"{path}: sage_prep must be kernels or fused, found {cfg.sage_prep!r}")
    for flag in ("expandable_segments", "fp8_fast_accum", "fp8_gelu_epilogue"):
        if not isinstance(getattr(cfg, flag), bool):
            raise ConfigError(f"{path}: {flag} must be true or false, found {getattr(cfg, flag)!r}")
    tile = cfg.sage_tile
    if tile is not None and (
        not isinstance(tile, dict)
        or set(tile) != {"BLOCK_M", "num_warps", "num_stages"}
        or not all(isinstance(v, int) and v > 0 for v in tile.values())
    ):
        raise ConfigError(
            f"{path}: sage_tile must map BLOCK_M, num_warps and num_stages to integers, found {tile!r}"
        )
    return cfg


def gpu_config_of(device_name: str, capability: tuple[int, int] | None) -> GPUConfig | None:
    """The GPU config whose `match` and capability identify this device, or None for an unknown card."""
    for name in known_gpus():
        cfg = load_gpu_config(name)
        if cfg.capability is not None and cfg.matches(device_name, capability):
            return cfg
    return None


def current_gpu() -> tuple[str, tuple[int, int] | None]:
    """(device name, compute capability) of the CUDA device in use, or ('cpu', None)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    return torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())
