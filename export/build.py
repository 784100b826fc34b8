"""`x2v-export build`: a checkpoint -> an engine directory for one GPU (engines + manifest.json).

Every engine carries a key: the hash of everything it was built from (model config, profile, precision,
attention, backend and its versions, the checkpoint's tensor layout, x2v's export source). A rebuild reuses
an engine only when its key and file hash match, so a stale artifact is never picked up silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from x2v.export import engines as E
from x2v.plugins import sage_attention as sage
from x2v.runtime import __version__
from x2v.runtime.checkpoint import CheckpointError, identity, resolve
from x2v.runtime.config import ConfigError, current_gpu, load_gpu_config, load_model_config
from x2v.runtime.engines import FORMAT, MANIFEST, dtype_name, sha256_file

SOURCES = ("export/dit.py", "export/engines.py", "export/fp8.py", "export/onnx_ops.py",
           "plugins/sage_attention.py", "plugins/sage_kernels.py")  # fmt: skip
# What the encoder and VAE engines are traced from, besides SOURCES: a change there rebuilds only them.
PART_SOURCES = {"t5": ("export/t5.py",), "clip": ("export/clip.py",), "vae": ("export/vae.py",)}
ROOT = Path(__file__).resolve().parent.parent
# GPU-config settings the runtime applies (VAE decode chunk and tile, where encoder and DiT weights live):
# changing them rebuilds no engine.
RUNTIME_ONLY = ("vae_chunk", "vae_tile", "encoders", "dit_weights", "expandable_segments")


class BuildError(ValueError):
    """A build request cannot be honoured; the message says why and what to do."""


def parse_profile(text: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BuildError(f"profile {text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 81x480x832") from None
    if (f - 1) % 4 or h % 16 or w % 16:
        raise BuildError(f"profile {text!r}: frames must be 4k+1, height and width multiples of 16")
    return f, h, w


def versions(backend: str) -> dict:
    v = {"x2v": __version__, "torch": torch.__version__}
    for mod in ("triton", "onnx", "onnxruntime", "modelopt", "tensorrt"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return v


def source_hash(sources: tuple[str, ...] = SOURCES) -> str:
    h = hashlib.sha256()
    for rel in sources:
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()


def latent_shape(cfg, profile: tuple[int, int, int]) -> tuple[int, ...]:
    """[1, z, T, h, w] of a (frames, height, width) profile."""
    f, h, w = profile
    return (1, cfg.vae.z_dim, (f - 1) // 4 + 1, h // 8, w // 8)


def job(name: str, profile, ext: str, key_data: dict) -> tuple[str, str, str]:
    """(manifest key, file name, build key) of one engine; the build key hashes everything it is built from."""
    prof = None if profile is None else "x".join(map(str, profile))
    key = name if prof is None else f"{name}@{prof}"
    digest = hashlib.sha256(
        json.dumps({**key_data, "engine": key}, sort_keys=True, default=str).encode()
    ).hexdigest()
    return key, f"{name}{'' if prof is None else '-' + prof}.{ext}", digest


def reuse(old: dict, key: str, digest: str, path: Path, log) -> dict | None:
    """The previous manifest entry when its build key and file hash still hold, else None (rebuild)."""
    prev = old.get(key)
    if prev and prev.get("key") == digest and path.is_file() and sha256_file(path) == prev["sha256"]:
        log(f"{key}: up to date")
        return prev
    return None


def compile_onnx(onnx_path: Path, plan_path: Path, g) -> None:
    """The TensorRT plan of an exported ONNX engine (tensorrt backend)."""
    from x2v.export.tensorrt import build_plan

    try:
        build_plan(onnx_path, plan_path, g)
    except ImportError as e:
        raise BuildError(str(e)) from None


def entry(path: Path, digest: str, names, examples, outputs, weights, build_s: float, log, key: str) -> dict:
    e = {
        "file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "key": digest,
        "inputs": [[n, dtype_name(a.dtype), list(a.shape)] for n, a in zip(names, examples)],
        "outputs": outputs, "weights": weights, "build_s": round(build_s, 2),
    }  # fmt: skip
    log(f"{key}: built {path.name} in {build_s:.1f} s ({e['bytes'] / 1e6:.1f} MB)")
    return e


def build(model: str, ckpt: Path, gpu: str, out: Path, precision: str | None = None, attn: str | None = None,
          backend: str | None = None, dit_file: str | None = None, profiles: list[str] | None = None,
          autotune: bool | None = None, dit_only: bool = False, log=print) -> dict:  # fmt: skip
    from x2v.export.load import load_dit

    cfg, g = load_model_config(model), load_gpu_config(gpu)
    backend = backend or g.backend
    if backend not in ("aoti", "onnx", "tensorrt"):
        raise BuildError(f"unknown backend {backend!r}; choose aoti, onnx or tensorrt")
    if backend == "tensorrt":  # before the DiT is read (16 GB at full size), not after
        from x2v.plugins.tensorrt_plugin import trt_module

        try:
            trt_module()
        except ImportError as e:
            raise BuildError(str(e)) from None
    high = [p for p in g.precisions if p != "fp8"]
    precision = precision or ("fp8" if (dit_file and "fp8" in g.precisions) or not high else high[0])
    if precision not in g.precisions:
        raise BuildError(
            f"{gpu} does not run {precision} ({g.description} supports: {', '.join(g.precisions)})"
        )
    attn = attn or g.attention[0]
    if attn not in g.attention:
        raise BuildError(f"{gpu} does not run attention {attn!r} (supports: {', '.join(g.attention)})")
    if g.device == "cuda":
        name, cap = current_gpu()
        if not g.matches(name, cap):
            raise BuildError(f"building for {gpu} needs a {g.description}: engines are compiled and tuned on the GPU "
                             f"they run on; this machine has {name if cap else 'no CUDA GPU'}")  # fmt: skip
    if precision == "fp8" and not dit_file:
        if any(Path(ckpt).glob("dit-fp8.safetensors*")):
            dit_file = "dit-fp8"
        else:
            raise BuildError(f"precision fp8 needs an FP8 DiT: run `x2v-export calibrate` and `x2v-export quantize` "
                             f"on {ckpt} first, or pass --dit with a LightX2V FP8 file")  # fmt: skip
    dit_path = resolve(ckpt, dit_file or cfg.files.dit)
    shapes = [
        parse_profile(p)
        for p in (profiles or [f"{cfg.sample.frames}x{cfg.sample.height}x{cfg.sample.width}"])
    ]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = {}
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text()).get("engines", {})
    compute = torch.float32 if g.device == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    impl = attn
    if attn == "sage":
        impl = "sage_op_rope" if g.sage_prep == "fused" and backend == "aoti" else "sage_op"
        if g.sage_prep == "fused" and backend != "aoti":
            log(f"{gpu}: sage_prep fused applies to AOTInductor engines; {backend} engines take the "
                f"x2v::SageAttention node with Q and K prepared by the graph")  # fmt: skip
    dit = load_dit(ckpt, cfg, dtype=compute, device=g.device, attn=impl, dit_file=dit_file, **g.fp8_options())
    state_is_fp8 = any(b.dtype == torch.float8_e4m3fn for b in dit.buffers())
    if (precision == "fp8") != state_is_fp8:
        raise BuildError(
            f"precision {precision} but {dit_path.name} is {'an FP8' if state_is_fp8 else 'not an FP8'} checkpoint"
        )
    log(f"loaded {cfg.name} DiT from {dit_path} in {time.perf_counter() - t0:.1f} s")
    ckpt_id = identity(dit_path)
    autotune = g.autotune if autotune is None else autotune
    gpu_key = {k: v for k, v in dataclasses.asdict(g).items() if k not in RUNTIME_ONLY}
    common = {"model": dataclasses.asdict(cfg), "gpu": gpu_key, "precision": precision, "autotune": autotune,
              "attn": attn, "backend": backend, "versions": versions(backend), "checkpoint": ckpt_id,
              "source": source_hash()}  # fmt: skip
    ext = {"aoti": "pt2", "onnx": "onnx", "tensorrt": "plan"}[backend]
    inductor = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"} if autotune else {}
    entries = {}
    # `time` does not depend on the resolution: it is traced at a minimal latent of one patch grid
    minimal = (1, cfg.vae.z_dim, 1, 2 * cfg.dit.patch_size[1], 2 * cfg.dit.patch_size[2])
    # the block's halves serve guided sampling (block 0's self-attention shared by the branches)
    per_shape = ("pre", "block", "post") + (E.HALVES if cfg.sample.guide_scale != 1.0 else ())
    jobs = [("time", None)] + [(e, s) for s in shapes for e in per_shape]
    # The GPU's measured SageAttention tile (configs/gpus): no autotuning inside each engine build.
    with sage.pinned_tile(g.sage_tile):
        for engine, shape in jobs:
            key, file, digest = job(engine, shape, ext, common)
            if prev := reuse(old, key, digest, out / file, log):
                entries[key] = prev
                continue
            t1 = time.perf_counter()
            latent = minimal if shape is None else latent_shape(cfg, shape)
            names, acts = E.example_inputs(dit, engine, latent, g.device, compute)
            if backend == "aoti":
                E.export_aoti(dit, engine, latent, out / file, g.device, inductor)
            else:
                E.export_onnx(dit, engine, latent, out / Path(file).with_suffix(".onnx"), g.device)
                if backend == "tensorrt":
                    compile_onnx(out / Path(file).with_suffix(".onnx"), out / file, g)
            wstate = (dit.blocks[0] if engine.startswith("block") else dit).state_dict()
            weights = [[n, dtype_name(wstate[n].dtype)] for n in E.weight_names(dit, engine)]
            entries[key] = entry(out / file, digest, names, acts, E.OUTPUTS[engine], weights,
                                 time.perf_counter() - t1, log, key)  # fmt: skip
    if backend != "aoti" and not dit_only:  # encoders and VAE as ONNX engines (AOTInductor: torch modules)
        entries.update(build_aux(cfg, ckpt, out, shapes, g, compute, backend, common, old, log))
    manifest = {
        "format": FORMAT, "model": cfg.name, "model_config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "gpu": gpu, "backend": backend, "precision": precision, "attention": attn,
        "compute_dtype": dtype_name(compute), "batch": 1,
        "profiles": [f"{f}x{h}x{w}" for f, h, w in shapes],
        "versions": common["versions"], "source_sha256": common["source"],
        "checkpoint": {"dir": str(Path(ckpt).resolve()), "identity": ckpt_id,
                       "dit_file": dit_path.name.removesuffix(".index.json").removesuffix(".safetensors")},
        "engines": entries, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def build_aux(cfg, ckpt, out, shapes, g, compute, backend, common, old, log) -> dict:
    """umT5, CLIP and VAE encode/decode engines; their key includes the weight files' size and mtime, and the
    source of the model they are traced from."""
    from x2v.export.load import load_part

    entries = {}
    model_of = {"text": "t5", "image": "clip", "vae_encode": "vae", "vae_decode": "vae"}  # cfg.files' names
    jobs = [("text", None)] + ([("image", None)] if cfg.dit.i2v else [])
    jobs += [(p, s) for s in shapes for p in ("vae_encode", "vae_decode")]
    ext = {"onnx": "onnx", "tensorrt": "plan"}[backend]
    models = {}
    for part, shape in jobs:
        name = model_of[part]
        wfile = Path(ckpt) / getattr(cfg.files, name)
        stat = wfile.stat()
        key_data = {**common, "weights": [wfile.name, stat.st_size, stat.st_mtime_ns],
                    "part_source": source_hash(PART_SOURCES[name])}  # fmt: skip
        key, file, digest = job(part, shape, ext, key_data)
        if prev := reuse(old, key, digest, out / file, log):
            entries[key] = prev
            continue
        t1 = time.perf_counter()
        if name not in models:
            models[name] = load_part(name, ckpt, cfg, dtype=compute, device=g.device)
        latent = None if shape is None else latent_shape(cfg, shape)
        onnx_path = out / Path(file).with_suffix(".onnx")
        info = E.export_aux_onnx(part, models[name], cfg, latent, onnx_path, g.device, compute)
        if backend == "tensorrt":
            compile_onnx(onnx_path, out / file, g)
        entries[key] = entry(out / file, digest, info["inputs"], info["example"], info["outputs"], [],
                             time.perf_counter() - t1, log, key)  # fmt: skip
    return entries


__all__ = ["build", "BuildError", "ConfigError", "CheckpointError"]
