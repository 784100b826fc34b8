"""`Pipeline`: load once, generate many times. The Python API a service embeds; the CLI sits on top.

pipe = Pipeline.load("ckpt", model="i2v-14b-480p", device="cuda")
result = pipe.generate(image="cat.png", prompt="a cat walks on the beach", seed=42, teacache=0.2)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from x2v.runtime.config import (
    WAN_NEGATIVE_PROMPT,
    ModelConfig,
    gpu_config_of,
    load_gpu_config,
    load_model_config,
    load_teacache_coefficients,
)
from x2v.runtime.denoise import Conditioning, denoise
from x2v.runtime.offload import OnDevice, configure_allocator, stream, stream_units
from x2v.runtime.sampler import euler_schedule, make_sampler, unipc_schedule
from x2v.runtime.teacache import plan as teacache_plan

log = logging.getLogger("x2v")


class InputError(ValueError):
    """A generate() argument is invalid; raised before any heavy work."""


@dataclass
class Result:
    frames: np.ndarray  # [T, H, W, 3] uint8
    latents: torch.Tensor  # [1, z, T', h, w] float32, before decoding
    timings: dict[str, float] = field(default_factory=dict)
    steps_computed: int = 0
    steps_total: int = 0
    teacache: str = ""

    def summary(self) -> str:
        t = self.timings
        mem = f", peak {t['peak_gb']:.2f} GB" if "peak_gb" in t else ""
        return (
            f"load {t.get('load_s', 0):.2f} s, encode {t['encode_s']:.2f} s, denoise {t['denoise_s']:.2f} s "
            f"({self.steps_computed}/{self.steps_total} steps computed), decode {t['decode_s']:.2f} s{mem}"
        )


def check_output(out) -> None:
    """The video's path can be written (its folder is made if missing), checked before any weight is read."""
    folder = Path(out).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write the video to {out}: {e}") from e
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write the video to {out}: {folder} is not writable")
    if Path(out).is_dir():
        raise InputError(f"cannot write the video to {out}: it is a directory")
    if Path(out).suffix.lower() != ".mp4":
        raise InputError(f"the video is written as MP4: give a path ending in .mp4, not {out}")


def tile_overlap(tile: int) -> int:
    """Latents that neighbouring VAE decode tiles of `tile` latents share."""
    return min(8, max(tile // 4, 1))


def check_request(
    cfg: ModelConfig,
    image,
    prompt: str,
    frames: int,
    height: int,
    width: int,
    steps: int | None = None,
    teacache: float = 0.0,
    decode_tile: int | None = None,
) -> torch.Tensor | None:
    """Every cheap check of a request, so bad input fails in milliseconds with a one-line message.

    Returns the decoded image ([3, H, W] in [-1, 1]) for I2V models, None for T2V.
    """
    s = cfg.sample
    if steps is not None and steps < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    if steps is not None and s.solver == "euler" and steps != s.num_steps:  # not silently its own count
        raise InputError(
            f"model {cfg.name} samples its {s.num_steps} distilled timesteps {list(s.timesteps)}; steps={steps} "
            "does not apply"
        )
    if teacache < 0:
        raise InputError(f"the TeaCache threshold must be 0 (off) or positive, got {teacache}")
    if decode_tile is not None and (decode_tile < 0 or decode_tile == 1):  # tiles overlap by >= 1
        raise InputError(f"the VAE tile must be 0 (whole frames) or at least 2 latents, got {decode_tile}")
    if frames < 1 or (frames - 1) % 4:
        raise InputError(f"frames must be 4k+1 (1, 5, ..., 81), got {frames}")
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise InputError(f"height and width must be positive multiples of 16, got {height}x{width}")
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty; this model is conditioned on text")
    if cfg.dit.i2v:
        if image is None:
            raise InputError(f"model {cfg.name} is image-to-video: give an image")
        return image if isinstance(image, torch.Tensor) else load_image(image)
    if image is not None:
        raise InputError(f"model {cfg.name} is text-to-video: it takes no image")
    return None


def load_image(image) -> torch.Tensor:
    """A path or PIL image -> [3, H, W] float32 in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"unreadable image {path}: {e}") from None
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def resize_for_clip(images: torch.Tensor, size: int) -> torch.Tensor:
    """Any image size -> [B, 3, size, size] float32 (bicubic, as open-clip's transform in Wan): the step
    before the CLIP tower, kept outside it so an image-encoder engine has one input shape."""
    return torch.nn.functional.interpolate(
        images.float(), size=(size, size), mode="bicubic", align_corners=False
    )


def i2v_size(image_hw: tuple[int, int], max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """Wan's I2V output size: the image's aspect ratio at about `max_area` pixels, in multiples of 16."""
    aspect = image_hw[0] / image_hw[1]
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    return lat_h * stride, lat_w * stride


def i2v_mask(frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """[4, T', h, w]: 1 on the latent slots that hold the given first frame (4 per latent frame), else 0."""
    msk = torch.zeros(frames + 3, lat_h, lat_w)
    msk[:4] = 1
    return msk.view((frames + 3) // 4, 4, lat_h, lat_w).transpose(0, 1)


def output_size(cfg: ModelConfig, image: torch.Tensor | None, height: int, width: int) -> tuple[int, int]:
    """The video's (height, width): as asked for T2V; for I2V the image's aspect ratio at that pixel area."""
    return i2v_size(image.shape[1:], height * width) if cfg.dit.i2v else (height, width)


def card_fp8_options(device) -> dict:
    """The FP8 GEMM settings of the GPU config that matches `device` (what an engine build takes from --gpu), as
    load_dit's keyword arguments; none on the CPU or a card no config describes."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    gpu = gpu_config_of(torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)))
    return {} if gpu is None else gpu.fp8_options()


def _one_request_at_a_time(method):
    """Serialize the calls that run models on one Pipeline. A service's threads may share it: their requests
    queue instead of interleaving on the GPU, where two would hold two requests' activations at once (past a 24
    GB card's memory with the 14B models), and each request's peak-memory figures (process-wide counters, reset
    per request) stay its own."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return call


class Pipeline:
    def __init__(
        self, cfg: ModelConfig, parts: dict, device: str, load_s: float = 0.0, manifest: dict | None = None
    ):
        self.cfg, self.device, self.load_s, self.manifest = cfg, torch.device(device), load_s, manifest
        self.tokenizer, self.t5, self.clip, self.vae, self.dit = (
            parts.get(k) for k in ("tokenizer", "t5", "clip", "vae", "dit")
        )
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.decode_tile = None  # default spatial VAE tile (engine directories: their GPU config's)
        self.decode_chunk = 1  # latent frames per VAE decode pass
        self.load_phases = {}  # seconds per load phase, where the loader records them
        self._lock = threading.RLock()

    @classmethod
    def load(cls, ckpt: Path, model: str | ModelConfig = "tiny", device: str = "cpu", dtype=None, attn: str = "sdpa",
             sensitive_fp32: bool = False, dit_file: str | None = None, warm_up: bool | None = None) -> Pipeline:  # fmt: skip
        """Torch backend: the export-side models loaded from a checkpoint directory.

        dit_file: another DiT file in (or path outside) `ckpt`, e.g. the FP8 checkpoint of `x2v-export quantize`.
        warm_up: run warm_up() before returning (counted in the load time); default: on GPUs.
        """
        from x2v.export.load import load_dit, load_part
        from x2v.runtime.tokenizer import Tokenizer

        t0 = time.perf_counter()
        if not Path(ckpt).is_dir():
            raise InputError(f"checkpoint directory not found: {ckpt}")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device}: this machine has no CUDA device (torch {torch.__version__})")
        cfg = model if isinstance(model, ModelConfig) else load_model_config(model)
        dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        parts = {
            "tokenizer": Tokenizer(Path(ckpt) / cfg.files.tokenizer, cfg.dit.text_len),
            "dit": load_dit(
                ckpt, cfg, dtype, sensitive_fp32, device, attn, dit_file, **card_fp8_options(device)
            ),
            "vae": load_part("vae", ckpt, cfg, dtype=dtype, device=device),
            "t5": load_part("t5", ckpt, cfg, dtype=dtype, device=device),
        }
        if cfg.dit.i2v:
            parts["clip"] = load_part("clip", ckpt, cfg, dtype=dtype, device=device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        pipe = cls(cfg, parts, device)
        if torch.device(device).type == "cuda" if warm_up is None else warm_up:
            pipe.load_phases["warm_up_s"] = pipe.warm_up()
        pipe.load_s = time.perf_counter() - t0
        return pipe

    @classmethod
    def from_engines(cls, engines: Path, ckpt: Path | None = None, device: str | None = None,
                     warm_up: bool | None = None) -> Pipeline:  # fmt: skip
        """Engine backend: the DiT from an engine directory (checked against its manifest), weights bound from
        the checkpoint's safetensors; umT5, CLIP and the VAE from their engines where the backend builds them
        (ONNX, TensorRT), else as torch modules (AOTInductor builds; said in the log).
        warm_up: run warm_up() for the built profiles before returning (counted in the load time); default: on
        GPUs."""
        from concurrent.futures import ThreadPoolExecutor

        from x2v.export.load import load_part
        from x2v.runtime import engines as E
        from x2v.runtime.tokenizer import Tokenizer

        t0 = time.perf_counter()
        m, ckpt = E.checked(engines, ckpt)  # refuse stale or foreign engines before reading any weight
        phases = {"check_s": time.perf_counter() - t0}
        cfg, gpu = load_model_config(m["model"]), load_gpu_config(m["gpu"])
        device = E.engine_device(m, device)
        dtype = E.DTYPES[m["compute_dtype"]]
        built = {k.split("@")[0] for k in m["engines"]}
        engine_of = {"vae": "vae_decode", "t5": "text", "clip": "image"}
        torch_parts = [
            p for p in ("vae", "t5") + (("clip",) if cfg.dit.i2v else ()) if engine_of[p] not in built
        ]
        if torch_parts:
            log.info(
                "%s engines cover the DiT only: %s run as torch modules", m["backend"], ", ".join(torch_parts)
            )
        where = gpu.encoders if device.type == "cuda" else "resident"
        if device.type == "cuda":
            configure_allocator(gpu.expandable_segments)

        def load_encoders():
            t1, loaded = time.perf_counter(), {}
            for part in (p for p in torch_parts if p != "vae"):
                if where == "resident":
                    loaded[part] = load_part(part, ckpt, cfg, dtype=dtype, device=device)
                elif where == "stream":
                    module = load_part(part, ckpt, cfg, dtype=dtype, device="cpu")
                    loaded[part] = stream(module, stream_units(part, module), device)
                else:  # host: run on the CPU in fp32, outputs moved over
                    loaded[part] = OnDevice(
                        load_part(part, ckpt, cfg, dtype=torch.float32, device="cpu"), device
                    )
            if device.type == "cuda":
                torch.cuda.synchronize()
            return loaded, time.perf_counter() - t1

        def load_vae():
            t1 = time.perf_counter()
            vae = load_part("vae", ckpt, cfg, dtype=dtype, device=device)
            if device.type == "cuda":
                # Its Triton kernels and cuDNN's first plans load here, beside the encoders' reading, instead
                # of in warm_up on the critical path: warm-up 2.38 -> 0.96 s, this thread no longer than the
                # encoders' (bench/results/load_warmup-h200.json).
                vae.warm_up()
                torch.cuda.synchronize()
            return {"vae": vae}, time.perf_counter() - t1

        # Encoders and VAE are read (and, streamed, page-locked) on threads while the DiT's weights go to the
        # GPU: the fp8 table rows spent 9.9 s and 4.4 s on them one after the other.
        with ThreadPoolExecutor(2) as pool:
            encoders = pool.submit(load_encoders)
            vae = pool.submit(load_vae) if "vae" in torch_parts else None
            dit, m, ckpt, aux = E.load(engines, ckpt, device, phases=phases, manifest=m)
            loaded, phases["encoders_s"] = encoders.result()
            if vae is not None:
                vae_part, phases["vae_s"] = vae.result()
                loaded.update(vae_part)
        parts = {
            "tokenizer": Tokenizer(Path(ckpt) / cfg.files.tokenizer, cfg.dit.text_len),
            "dit": dit,
            **aux,
            **loaded,
        }
        pipe = cls(cfg, parts, str(device), manifest=m)
        pipe.load_phases = phases
        pipe.decode_chunk = gpu.vae_chunk
        if hasattr(pipe.vae, "decode_tiled"):  # a torch VAE: tile as the GPU config says
            pipe.decode_tile = gpu.vae_tile
        if device.type == "cuda" if warm_up is None else warm_up:
            phases["warm_up_s"] = pipe.warm_up()
        pipe.load_s = time.perf_counter() - t0
        log.info("loaded in %.1f s (%s)", pipe.load_s, ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
        return pipe

    @_one_request_at_a_time
    @torch.no_grad()
    def warm_up(self, sizes: list[tuple[int, int]] | None = None) -> float:
        """Run every model once at the shapes of requests for videos of these (height, width) sizes, so the
        first request does not pay for what the GPU does once per process and shape: loading kernels, cuBLAS's
        and cuDNN's per-shape plans, the Triton kernels' variants. Cheap: umT5 and CLIP at their one input
        shape each, the VAE's encode (I2V) on 5 frames and its decode on two passes of latent frames through
        the decode path generate takes, each DiT engine once (a torch DiT: pre, block 0 and post). Encoders
        run on the host (`encoders: host`) are left alone: nothing to load there, and a CPU umT5 call costs
        seconds. Outputs are dropped and nothing is cached, so results do not change. sizes: the engines' built
        profiles, else the model's sample size (an I2V video's size follows its image's aspect ratio: pass the
        sizes requests will have, `output_size`). Returns the seconds it took."""
        t0 = time.perf_counter()
        if sizes is None:
            profiles = self.manifest["profiles"] if self.manifest else []
            sizes = sorted({tuple(int(n) for n in p.split("x")[1:]) for p in profiles})
            sizes = sizes or [(self.cfg.sample.height, self.cfg.sample.width)]
        if not isinstance(self.t5, OnDevice):
            ids, mask = self.tokenizer(["warm-up", "warm-up"])  # padded to text_len, as every request
            self.t5(ids.to(self.device), mask.to(self.device))
            self._release_cache()
        torch_vae = hasattr(self.vae, "decode_tiled")  # VAE engines take their profiles' shapes only
        i2v = self.cfg.dit.i2v
        for h, w in sizes:
            if i2v and not isinstance(self.clip, OnDevice):
                self.clip(torch.zeros(1, 3, h, w, dtype=self.dtype, device=self.device))
            if not torch_vae:
                continue
            if i2v:  # the encode's two chunk shapes: 1 frame, then 4
                self.vae.encode(torch.zeros(1, 3, 5, h, w, dtype=self.dtype, device=self.device))
            # the decode's two pass shapes: the first pass, and a later one with the causal cache
            n = 2 * (self.decode_chunk or 1)
            z = torch.zeros(1, self.cfg.vae.z_dim, n, h // 8, w // 8, dtype=self.dtype, device=self.device)
            self._decode(z, self.decode_tile, self.decode_chunk)
        if hasattr(self.dit, "warm_up"):
            self.dit.warm_up()
        elif self.dit is not None:  # a torch DiT: pre, one block and post at each size (all blocks alike)
            for h, w in sizes:
                self._warm_dit(h, w)
        self._release_cache()
        return self._lap(t0)

    def _warm_dit(self, height: int, width: int) -> None:
        """One torch DiT evaluation with block 0 only, on inputs of a request's shapes with guidance batched (the
        default): the SageAttention op's Triton compile (3.9 s on an H200) and cuBLAS's and cuDNN's first calls
        happen here instead of in the first step. The inputs are the pre engine's random examples (a torch DiT
        comes from export/ anyway), drawn on a forked generator so that the caller's seeds stay as they were."""
        from x2v.export.engines import example_inputs

        s = self.cfg.sample
        batch = 1 if s.guide_scale == 1.0 else 2
        lat = (batch, self.cfg.vae.z_dim, (s.frames - 1) // 4 + 1, height // 8, width // 8)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            _, inputs = example_inputs(self.dit, "pre", lat, self.device, self.dtype)
        tokens, e, e0, ctx, cos, sin = self.dit.pre(*inputs)
        self.dit.post(self.dit.blocks[0](tokens, e0, ctx, cos, sin), e, self.dit.grid(lat))

    @torch.no_grad()
    def encode(
        self,
        image: torch.Tensor | None,
        prompt: str,
        negative_prompt: str,
        frames: int,
        height: int,
        width: int,
        laps: dict | None = None,
    ):
        """-> (cond, uncond, latent shape) on the device. laps: receives the seconds of each part (text_s,
        image_s, vae_encode_s; the device synchronized at each boundary)."""
        laps, t0 = {} if laps is None else laps, time.perf_counter()
        ids, mask = self.tokenizer([prompt, negative_prompt])
        context = self.t5(ids.to(self.device), mask.to(self.device))
        self._release_cache()
        laps["text_s"], t0 = self._lap(t0), time.perf_counter()
        cond, uncond = Conditioning(context[:1]), Conditioning(context[1:])
        lat_t = (frames - 1) // 4 + 1
        if not self.cfg.dit.i2v:
            return cond, uncond, (1, self.cfg.vae.z_dim, lat_t, height // 8, width // 8)
        img = image.to(self.device)
        h, w = i2v_size(img.shape[1:], height * width)
        clip_fea = self.clip(img[None].to(self.dtype))
        self._release_cache()
        laps["image_s"], t0 = self._lap(t0), time.perf_counter()
        first = torch.nn.functional.interpolate(img[None].float(), size=(h, w), mode="bicubic")[:, :, None]
        video = torch.cat([first, first.new_zeros(1, 3, frames - 1, h, w)], dim=2)
        y = torch.cat(
            [i2v_mask(frames, h // 8, w // 8).to(self.device)[None], self.vae.encode(video.to(self.dtype))],
            dim=1,
        )
        laps["vae_encode_s"] = self._lap(t0)
        cond, uncond = replace(cond, clip_fea=clip_fea, y=y), replace(uncond, clip_fea=clip_fea, y=y)
        return cond, uncond, (1, self.cfg.vae.z_dim, lat_t, h // 8, w // 8)

    @_one_request_at_a_time
    @torch.no_grad()
    def generate(self, image=None, prompt: str = "", negative_prompt: str | None = None, steps: int | None = None,
                 seed: int = 0, teacache: float = 0.0, teacache_signal: str = "e", guide_scale: float | None = None,
                 shift: float | None = None, frames: int | None = None, height: int | None = None,
                 width: int | None = None, batch_cfg: bool = True, decode_chunk: int | None = None,
                 decode_tile: int | None = None, progress=None, skip_plan=None, out: str | Path | None = None,
                 on_phase=None) -> Result:  # fmt: skip
        """progress(i): called after denoising step i (skipped steps too). on_phase(name): called as each phase
        starts, "encode", "denoise", "decode", after the request is checked (a service can report where a request
        is; the CLI opens its step bar at "denoise").
        skip_plan: an explicit TeaCachePlan (e.g. a published schedule) instead of computing one.
        decode_tile: decode the video in spatial tiles of this many latents (overlapping by tile_overlap).
        out: also write the MP4 there, encoding each decoded chunk while the next one decodes (whole frames;
        tiled: the chunks the last tile completes; an engine VAE hands over the video at the end); complete when
        generate returns."""
        s = self.cfg.sample
        frames, height, width = frames or s.frames, height or s.height, width or s.width
        guide_scale = s.guide_scale if guide_scale is None else guide_scale
        decode_tile = self.decode_tile if decode_tile is None else decode_tile
        image = check_request(self.cfg, image, prompt, frames, height, width, steps, teacache, decode_tile)
        decode_chunk = self.decode_chunk if decode_chunk is None else decode_chunk
        if decode_tile and not hasattr(self.vae, "decode_tiled"):
            raise InputError(
                "tiled VAE decode runs on the torch VAE; these engines include a VAE engine (build --dit-only)"
            )
        if self.manifest is not None:  # engines exist for the built profiles only, at batch 1
            h, w = output_size(self.cfg, image, height, width)
            if f"{frames}x{h}x{w}" not in self.manifest["profiles"]:
                raise InputError(
                    f"the engines were built for {', '.join(self.manifest['profiles'])} (frames x height x width); "
                    f"this request is {frames}x{h}x{w}: build that profile with `x2v-export build --profile {frames}x{h}x{w}`"
                )
            batch_cfg = False
        writer = None
        if out is not None:  # opened first: a bad path or a missing PyAV fails before the heavy work
            from x2v.runtime.video import Mp4Writer

            check_output(out)
            writer = Mp4Writer(out, fps=s.fps)
        with writer or contextlib.nullcontext():  # on an error the partial MP4 goes
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timings = {"load_s": self.load_s}
            phase = on_phase or (lambda name: None)

            phase("encode")
            t0 = time.perf_counter()
            cond, uncond, shape = self.encode(
                image, prompt, negative_prompt or WAN_NEGATIVE_PROMPT, frames, height, width, laps=timings
            )
            timings["encode_s"] = self._lap(t0)
            self._phase_peak(timings, "encode")

            shift = s.shift if shift is None else shift
            if s.solver == "euler":
                schedule = euler_schedule(s.timesteps, shift)
            else:
                schedule = unipc_schedule(steps or s.steps, shift)
            plan = skip_plan
            if plan is not None and len(plan.computes) != len(schedule.timesteps):
                raise InputError(
                    f"skip_plan has {len(plan.computes)} steps, the schedule {len(schedule.timesteps)}"
                )
            if teacache > 0 and plan is None:
                if s.teacache is None:
                    raise InputError(
                        f"model {self.cfg.name} has no TeaCache coefficients (sample.teacache in its config)"
                    )
                coeffs = load_teacache_coefficients(s.teacache, teacache_signal)
                plan = teacache_plan(
                    self.dit.time, schedule.timesteps, coeffs, teacache, teacache_signal, self.device
                )
            gen = torch.Generator(device=self.device).manual_seed(seed)
            noise = torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32)

            phase("denoise")
            t0 = time.perf_counter()
            latents = denoise(self.dit, noise, schedule, make_sampler(s.solver, schedule), cond,
                              uncond if guide_scale != 1.0 else None, guide_scale, plan, batch_cfg, progress)  # fmt: skip
            timings["denoise_s"] = self._lap(t0)
            self._phase_peak(timings, "denoise")

            from x2v.runtime.video import to_uint8

            phase("decode")
            t0 = time.perf_counter()
            parts = []

            def emit(video: torch.Tensor) -> None:  # [1, 3, t, H, W] as decoded
                parts.append(to_uint8(video[0]))
                if writer is not None:
                    writer.write(parts[-1])

            self._decode(latents.to(self.dtype), decode_tile, decode_chunk, on_frames=emit)
            frames_u8 = np.concatenate(parts)
            timings["decode_s"] = self._lap(t0)
            if writer is not None:  # what encoding adds after the last frame is decoded
                t0 = time.perf_counter()
                writer.close()
                timings["write_s"] = time.perf_counter() - t0
            if self.device.type == "cuda":
                self._phase_peak(timings, "decode")
                timings["peak_gb"] = max(timings[f"peak_{p}_gb"] for p in ("encode", "denoise", "decode"))
            else:  # the process's peak resident memory (Linux reports KiB)
                import resource

                timings["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            n = len(schedule.timesteps)
            return Result(
                frames_u8, latents, timings, plan.computed if plan else n, n, plan.describe() if plan else ""
            )

    def _decode(
        self, z: torch.Tensor, tile: int | None, chunk: int | None, on_frames=None
    ) -> torch.Tensor | None:
        """The VAE decode requests take (and warm_up rehearses): in spatial tiles overlapping by a quarter, at
        most 8 latents (64 px: what the 32-latent tiles blend over; a wider overlap only adds area), or whole
        frames. With on_frames the frames go there only (None returned)."""
        if tile:
            return self.vae.decode_tiled(z, tile, tile_overlap(tile), chunk, on_frames=on_frames)
        return self.vae.decode(z, chunk=chunk, on_frames=on_frames)

    def _phase_peak(self, timings: dict, phase: str) -> None:
        """GPU memory peaks of the phase that just ended (allocated, and reserved by the caching allocator),
        then a fresh count: the denoise peak is the DiT's weights and activations plus whatever stays resident.
        The reserved peak is also kept over the whole request."""
        if self.device.type == "cuda":
            timings[f"peak_{phase}_gb"] = torch.cuda.max_memory_allocated() / 1e9
            reserved = torch.cuda.max_memory_reserved() / 1e9
            timings[f"peak_{phase}_reserved_gb"] = reserved
            timings["peak_reserved_gb"] = max(timings.get("peak_reserved_gb", 0.0), reserved)
            # The phase's cached blocks go back to the driver instead of sitting beside the next phase's: the
            # fp8 table rows reserved 31 GB at most for 22 GB allocated (commit 53c5ece).
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def _release_cache(self) -> None:
        """Streamed encoders copy their weights on a side stream, whose cached blocks the main stream's
        allocations (the VAE encode next) cannot use: handed back to the driver, they do not add to its peak."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _lap(self, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
