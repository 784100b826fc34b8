"""Load an engine directory (manifest.json + engines) and drive it as a DiT callable for the runtime loop.

The manifest says what the engines were built from and for; loading refuses anything that does not match
this node (GPU, backend version, checkpoint, model config) with a message naming the mismatch and the
command that rebuilds. Weights are read from the checkpoint's safetensors and bound at load: one `block`
engine runs every block with that block's tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from x2v.runtime.checkpoint import identity, read_state_dict, resolve

MANIFEST = "manifest.json"
FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float8_e4m3fn": torch.float8_e4m3fn, "int64": torch.int64, "int32": torch.int32}  # fmt: skip


class EngineError(ValueError):
    """An engine directory is missing, stale or built for something else; the message says how to rebuild."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def profile_key(latent_shape) -> str:
    """'TxHxW' of a latent [B, z, T, h, w] in pixels-and-frames terms: frames x height x width."""
    t, h, w = latent_shape[-3:]
    return f"{(t - 1) * 4 + 1}x{h * 8}x{w * 8}"


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise EngineError(
            f"{directory}: no {MANIFEST}; build engines with `x2v-export build --gpu <name> --out {directory}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: not valid JSON ({e}); rebuild the engines") from None
    if manifest.get("format") != FORMAT:
        raise EngineError(
            f"{path}: manifest format {manifest.get('format')}, this x2v reads {FORMAT}; rebuild the engines"
        )
    return manifest


def rebuild_hint(m: dict) -> str:
    return (f"rebuild with `x2v-export build --model {m['model']} --ckpt <checkpoint> --gpu <this gpu> "
            f"--precision {m['precision']} --out <dir>`")  # fmt: skip


def check(manifest: dict, directory: Path, ckpt: Path, verify_engines: bool = True) -> None:
    """Refuse engines built for another GPU, backend version, model config or checkpoint."""
    from x2v.runtime.config import current_gpu, load_gpu_config, load_model_config

    m, hint = manifest, rebuild_hint(manifest)
    gpu = load_gpu_config(m["gpu"])
    name, cap = current_gpu() if gpu.device == "cuda" else ("cpu", None)
    if not gpu.matches(name, cap):
        have = name if cap is None else f"{name} (sm{cap[0]}{cap[1]})"
        raise EngineError(
            f"{directory}: engines were built for {m['gpu']} ({gpu.description}); this node has {have}: {hint}"
        )
    if m["backend"] == "aoti" and m["versions"]["torch"] != torch.__version__:
        raise EngineError(f"{directory}: AOTInductor engines built with torch {m['versions']['torch']}, "
                          f"this node has torch {torch.__version__}: {hint}")  # fmt: skip
    if m["backend"] == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise EngineError(
                f"{directory}: ONNX engines need onnxruntime: pip install onnxruntime"
            ) from None
    cfg = load_model_config(m["model"])
    if json.loads(json.dumps(dataclasses.asdict(cfg))) != m["model_config"]:
        raise EngineError(
            f"{directory}: the model config {m['model']} changed since these engines were built: {hint}"
        )
    dit = resolve(ckpt, m["checkpoint"]["dit_file"])
    if identity(dit) != m["checkpoint"]["identity"]:
        raise EngineError(f"{directory}: the DiT weights in {ckpt} are not the ones these engines were built with "
                          f"(file list, sizes or tensor layout differ): {hint}")  # fmt: skip
    if verify_engines:
        for key, e in m["engines"].items():
            path = Path(directory) / e["file"]
            if not path.is_file():
                raise EngineError(f"{directory}: engine {key} missing ({e['file']}): {hint}")
            if sha256_file(path) != e["sha256"]:
                raise EngineError(
                    f"{directory}: engine file {e['file']} does not match its manifest hash: {hint}"
                )


def _laps(phases: dict):
    """lap(name) stores the seconds since the previous lap (or since this call) under phases[name]."""
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = now - last[0]
        last[0] = now

    return lap


def probe_aoti(path: Path) -> None:
    """Load one package in a child process first: on some images (torch 2.11+cu130) loading segfaults inside
    the compiled wrapper's std::regex (a libstdc++ mismatch), which would kill the service with no message."""
    import os
    import subprocess
    import sys

    if "libstdc++" in os.environ.get("LD_PRELOAD", "") or os.environ.get("X2V_AOTI_PROBE") == "0":
        return
    code = f"import torch; torch._C._aoti.AOTIModelPackageLoader({str(path)!r}, 'model', False, 1, -1)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode < 0:  # killed by a signal
        raise EngineError(
            f"{path}: loading AOTInductor packages crashes this process (signal {-proc.returncode}), a known "
            "libstdc++ mismatch; start the runtime with LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 "
            "(the system library) and try again"
        )


def _aoti(path: Path, device):
    """An AOTInductor package through its C++ loader. Not torch's aoti_load_package: before loading, that
    compares the package's CPU vector ISA with this machine's by compiling and running test programs in ten
    Python subprocesses, 40 of the 46-66 s engine load measured on an H200 (bench/results/table/h200/fp8.json,
    load_profile); check() has matched the GPU and the torch version already. boxed_run takes the flat
    tensor list our engines are called with (no pytree round trip per block call)."""
    if not getattr(probe_aoti, "_done", False):
        probe_aoti(path)
        probe_aoti._done = True
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    return lambda *args: loader.boxed_run(list(args))


def _ort(path: Path, device):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def value(t: torch.Tensor):
        t = t.detach().contiguous().cpu()
        if t.dtype == torch.float8_e4m3fn:  # numpy has no float8: pass the bytes with their ONNX type
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.uint8).numpy(), 17)
        return ort.OrtValue.ortvalue_from_numpy(t.numpy())

    def run(*args):
        outs = sess.run(None, {n: value(a) for n, a in zip(names, args)})
        return [torch.from_numpy(o) for o in outs]

    return run


def _trt(path: Path, device):
    """A TensorRT plan: inputs and outputs bound by name to torch tensors, run on torch's current stream."""
    from x2v.plugins.tensorrt_plugin import register, trt_module

    trt = trt_module()
    register()  # the plan's SageAttention nodes call back into the plugin
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise EngineError(
            f"{path}: TensorRT could not deserialize this plan (built by another TensorRT or GPU?)"
        )
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    torch_dtype = {trt.float32: torch.float32, trt.bfloat16: torch.bfloat16, trt.float16: torch.float16,
                   trt.fp8: torch.float8_e4m3fn}  # fmt: skip

    def run(*args):
        for n, a in zip(inputs, args):
            context.set_tensor_address(n, a.data_ptr())
        outs = []
        for n in outputs:
            out = torch.empty(tuple(context.get_tensor_shape(n)), dtype=torch_dtype[engine.get_tensor_dtype(n)],
                              device=device)  # fmt: skip
            context.set_tensor_address(n, out.data_ptr())
            outs.append(out)
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise EngineError(f"{path}: TensorRT execution failed")
        return outs

    return run


LOADERS = {"aoti": _aoti, "onnx": _ort, "tensorrt": _trt}


def run_engine(m: dict, engines: dict, device, name: str, profile: str | None, inputs: list, weights=()):
    """Call one engine: inputs checked against the manifest's shapes and converted to its dtypes."""
    key = name if profile is None else f"{name}@{profile}"
    if key not in engines:
        have = ", ".join(m["profiles"])
        raise EngineError(f"no {name} engine for {profile} (frames x height x width); built profiles: {have}")
    args = []
    for (n, dt, shape), a in zip(m["engines"][key]["inputs"], inputs):
        if list(a.shape) != shape:
            raise EngineError(f"{key}: input {n} has shape {list(a.shape)}, the engine takes {shape}")
        # AOTInductor code reads inputs with the strides they were traced with (dense): never pass a view
        args.append(a.to(device, DTYPES[dt]).contiguous())
    out = engines[key](*args, *weights)
    return out if isinstance(out, (list, tuple)) else [out]


class TextEngine:
    """umT5 as an engine: t5(ids, mask) -> context, like the torch module."""

    def __init__(self, m, engines, device):
        self.m, self.engines, self.device = m, engines, device

    def __call__(self, ids, mask):
        return run_engine(self.m, self.engines, self.device, "text", None, [ids, mask])[0]


class ImageEngine:
    """CLIP as an engine: the resize to the tower's input size runs here, the tower in the engine."""

    def __init__(self, m, engines, device):
        self.m, self.engines, self.device = m, engines, device
        self.size = m["model_config"]["clip"]["image_size"]

    def __call__(self, images):
        from x2v.runtime.pipeline import resize_for_clip

        x = resize_for_clip(images, self.size)
        return run_engine(self.m, self.engines, self.device, "image", None, [x])[0]


class VAEEngine:
    """The VAE as engines per profile: encode(video) and decode(latents), like the torch module."""

    def __init__(self, m, engines, device):
        self.m, self.engines, self.device = m, engines, device

    def encode(self, video):
        f, h, w = video.shape[2:]
        return run_engine(self.m, self.engines, self.device, "vae_encode", f"{f}x{h}x{w}", [video])[0]

    def decode(self, z, chunk=None, on_frames=None):
        """The whole sequence in one engine call; on_frames (as the torch VAE's) gets it at the end, and then
        nothing is returned."""
        video = run_engine(self.m, self.engines, self.device, "vae_decode", profile_key(z.shape), [z])[0]
        if on_frames is None:
            return video
        on_frames(video)


class EngineDiT:
    """The DiT callable of the runtime loop (time/pre/run_blocks/post/grid) over loaded engines."""

    def __init__(self, manifest: dict, engines: dict, weights: dict, device):
        self.m, self.engines, self.weights, self.device = manifest, engines, weights, torch.device(device)
        self.patch = tuple(manifest["model_config"]["dit"]["patch_size"])
        self.num_layers = manifest["model_config"]["dit"]["num_layers"]

    def _run(self, name: str, profile: str | None, inputs: list, weights: list):
        return run_engine(self.m, self.engines, self.device, name, profile, inputs, weights)

    def grid(self, shape):
        pt, ph, pw = self.patch
        return shape[2] // pt, shape[3] // ph, shape[4] // pw

    def time(self, t):
        """t [n] -> e [n, C], e0 [n, 6, C]; the engine takes one timestep (TeaCache asks for all at once)."""
        outs = [self._run("time", None, [t[i : i + 1]], self.weights["time"]) for i in range(t.shape[0])]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def pre(self, x, t, context, clip_fea=None, y=None):
        self.profile = profile_key(x.shape)
        inputs = [x, t, context] + ([clip_fea, y] if clip_fea is not None else [])
        return tuple(self._run("pre", self.profile, inputs, self.weights["pre"]))

    def run_blocks(self, x, e0, context, cos, sin, shared: dict | None = None):
        """shared: see runtime.denoise.dit_call; needs the block_attn/block_rest engines (built for models
        sampled with guidance), else every branch runs whole blocks."""
        blocks = iter(self.weights["blocks"])
        if shared is not None and f"block_attn@{self.profile}" in self.engines:
            w = next(blocks)
            if "tokens" not in shared:
                (shared["tokens"],) = self._run("block_attn", self.profile, [x, e0, cos, sin], w)
            (x,) = self._run("block_rest", self.profile, [shared["tokens"], e0, context], w)
        for w in blocks:
            (x,) = self._run("block", self.profile, [x, e0, context, cos, sin], w)
        return x

    def post(self, x, e, grid):
        (out,) = self._run("post", self.profile, [x, e], self.weights["post"])
        return out

    @torch.no_grad()
    def warm_up(self) -> None:
        """Call every engine once on zeros of its built shapes (a block engine with block 0's weights), so
        that loading its kernels and cuBLAS's first-call work happen at load, not in a request's first step."""
        block0 = next(iter(self.weights["blocks"]))
        weights = {"time": self.weights["time"], "pre": self.weights["pre"], "post": self.weights["post"],
                   "block": block0, "block_attn": block0, "block_rest": block0}  # fmt: skip
        for key, e in self.m["engines"].items():
            name, _, profile = key.partition("@")
            if name in weights:
                inputs = [
                    torch.zeros(shape, dtype=DTYPES[dt], device=self.device) for _, dt, shape in e["inputs"]
                ]
                self._run(name, profile or None, inputs, weights[name])


def checked(directory: Path, ckpt: Path | None = None, verify_engines: bool = True) -> tuple[dict, Path]:
    """(manifest, checkpoint directory) of an engine directory that check() accepts; nothing but headers and
    small files is read before a mismatch is refused."""
    m = read_manifest(directory)
    ckpt = Path(ckpt or m["checkpoint"]["dir"])
    check(m, Path(directory), ckpt, verify_engines)
    return m, ckpt


def engine_device(m: dict, device=None) -> torch.device:
    return torch.device(device or ("cpu" if m["gpu"] == "cpu" else "cuda"))


def load(directory: Path, ckpt: Path | None = None, device=None, verify_engines: bool = True,
         phases: dict | None = None, dit_weights: str | None = None, manifest: dict | None = None):  # fmt: skip
    """-> (EngineDiT, manifest, checkpoint directory, {"t5"/"clip"/"vae": engine wrappers, where built}).
    Checks everything before reading any weight, unless `manifest` says the caller has (checked()).
    `phases`, if given, receives the seconds of each phase. dit_weights: "resident" (on the device) or
    "stream" (blocks from pinned host memory, offload.BlockWeights); default: the GPU config's on a GPU,
    resident on the CPU."""
    phases = {} if phases is None else phases
    lap = _laps(phases)
    directory = Path(directory)
    if manifest is None:
        m, ckpt = checked(directory, ckpt, verify_engines)
        lap("check_s")
    else:
        m, ckpt = manifest, Path(ckpt or manifest["checkpoint"]["dir"])
    device = engine_device(m, device)
    loader = LOADERS.get(m["backend"])
    if loader is None:
        raise EngineError(
            f"{directory}: backend {m['backend']!r} cannot run on this node (this x2v runs: {', '.join(LOADERS)})"
        )
    first = lambda prefix: next(e for k, e in m["engines"].items() if k.split("@")[0] == prefix)
    block_dt = {n: DTYPES[d] for n, d in first("block")["weights"]}
    dt = {n: DTYPES[d] for k, e in m["engines"].items() if not k.startswith("block") for n, d in e["weights"]}
    pick = lambda key: block_dt[key.split(".", 2)[2]] if key.startswith("blocks.") else dt.get(key)
    if dit_weights is None:
        from x2v.runtime.config import load_gpu_config

        dit_weights = load_gpu_config(m["gpu"]).dit_weights if device.type == "cuda" else "resident"
    if dit_weights not in ("resident", "stream"):
        raise EngineError(f"dit_weights must be resident or stream, not {dit_weights!r}")
    stream = dit_weights == "stream"
    state, _ = read_state_dict(resolve(ckpt, m["checkpoint"]["dit_file"]), pick, "cpu" if stream else device)
    # a .pth DiT is read to the CPU; streamed blocks stay there
    state = {k: v if stream and k.startswith("blocks.") else v.to(device) for k, v in state.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    lap("dit_weights_s")
    weights = {
        "time": [state[n] for n, _ in first("time")["weights"]],
        "pre": [state[n] for n, _ in first("pre")["weights"]],
        "post": [state[n] for n, _ in first("post")["weights"]],
        "blocks": [[state[f"blocks.{i}.{n}"] for n, _ in first("block")["weights"]]
                   for i in range(m["model_config"]["dit"]["num_layers"])],
    }  # fmt: skip
    if stream:
        from x2v.runtime.offload import BlockWeights

        weights["blocks"] = BlockWeights(weights["blocks"], device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        lap("dit_pin_s")
    engines = {key: loader(directory / e["file"], device) for key, e in m["engines"].items()}
    lap("engines_s")
    aux = {}
    if "text" in engines:
        aux["t5"] = TextEngine(m, engines, device)
    if "image" in engines:
        aux["clip"] = ImageEngine(m, engines, device)
    if any(k.startswith("vae_decode@") for k in engines):
        aux["vae"] = VAEEngine(m, engines, device)
    return EngineDiT(m, engines, weights, device), m, ckpt, aux
