"""VAE decode + MP4 write: one after the other against streamed (each decoded chunk encoded at once), side by
side, for whole-frame and tiled decodes and latent frames per decoder pass (chunk).

    python bench/decode_write.py [--out DIR] [--name decode_write]     (writes NAME-<card>.json)

The full-size Wan2.1 VAE (random weights, bf16, channels-last as loaded on GPUs) decodes 21 latent frames of
544 x 720 (81 frames). Settings, rounds alternating them:
  - after: whole frames a latent frame a chunk, then `write_mp4`;
  - streamed: the same, every chunk handed to an `Mp4Writer` whose thread encodes it while the next chunk
    decodes; streamed_chunk3: 3 latent frames a decoder pass (the distill row);
  - tiled32_after_chunk3: 32-latent tiles (3 x 4 at this size), each through all frames, then the write (what the
    fp8 rows did up to commit 772f488);
  - tiled32_chunk3, tiled64_chunk3: tiles of at most 32 x 32 and 64 x 64 latents in area (`tile_grid`: 3 x 3 and
    1 x 2 at this size) overlapping by 8 latents, the MP4 fed chunk by chunk while the last tile completes the frames;
  - square32_chunk3, square64_chunk3: the same with square tiles of at most 32 and 64 latents a side (3 x 4 and
    2 x 2), how tiles were chosen before `tile_grid`.
Each records decode and write seconds and the peak GPU memory allocated during the call above what was
allocated before it, and the largest difference of its frames from the reference frames of its kind (whole
frames: chunk 1; tiles: the same tile size written after). Random weights decode to noise, x264's worst case.
A tiled decode by frame (every tile a latent frame at a time, all their caches alive) was measured at commit
1e3985e and dropped: `decode_write_by_frame-h200.json`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import x2v.export.vae as vae_module
from bench.common import random_part, write_result
from x2v.runtime.config import load_model_config
from x2v.runtime.video import Mp4Writer, to_uint8, write_mp4


def run(decode, path: Path, stream: bool) -> tuple[np.ndarray, dict]:
    """decode(on_frames) -> video; the MP4 written after it or from on_frames as chunks arrive."""
    parts = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if stream:
        with Mp4Writer(path) as writer:

            def emit(video):
                parts.append(to_uint8(video[0]))
                writer.write(parts[-1])

            decode(emit)
            t1 = time.perf_counter()
        frames = np.concatenate(parts)
    else:
        frames = to_uint8(decode(None)[0])
        t1 = time.perf_counter()
        write_mp4(frames, path)
    t2 = time.perf_counter()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return frames, {"decode_s": t1 - t0, "write_s": t2 - t1, "total_s": t2 - t0, "peak_gb": peak}


def square_grid(h: int, w: int, tile: int, overlap: int):
    """Tiles of at most tile x tile latents a side, as decode_tiled chose them up to tile_grid."""

    def spans(n):
        count = 1 if n <= tile else -(-(n - overlap) // (tile - overlap))
        return vae_module._spread(n, count, overlap)

    return spans(h), spans(w)


def profile(decode) -> dict:
    """One decode (frames kept, no MP4) under torch.profiler: its GPU kernel time and count against the profiled
    call's wall time. Kernel time well under the wall time says the host paces the decode (launches, syncs)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        decode(None)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    r = {
        "wall_s": wall,
        "kernel_s": sum(e.time_range.elapsed_us() for e in kernels) / 1e6,
        "kernels": len(kernels),
    }
    print("profile", r, flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="decode_write", help="result file: NAME-<card>.json")
    ap.add_argument("--settings", default=None, help="comma-separated subset of the settings (default: all)")
    ap.add_argument(
        "--profile", action="store_true", help="also one decode of each setting under torch.profiler"
    )
    args = ap.parse_args()
    cfg = load_model_config("i2v-14b-480p")
    vae = random_part("vae", cfg).to_channels_last()  # as load_part leaves it on GPUs
    z = torch.randn(1, cfg.vae.z_dim, 21, 68, 90, device="cuda", dtype=torch.bfloat16)

    def whole(chunk):
        return lambda on_frames: vae.decode(z, chunk=chunk, on_frames=on_frames)

    def tiled(size, chunk, grid=vae_module.tile_grid):
        def decode(on_frames):
            vae_module.tile_grid = grid  # what decode_tiled looks up
            try:
                return vae.decode_tiled(z, size, 8, chunk, on_frames=on_frames)
            finally:
                vae_module.tile_grid = area_grid

        return decode

    area_grid = vae_module.tile_grid

    settings = {"after": (whole(1), False), "streamed": (whole(1), True), "streamed_chunk3": (whole(3), True),
                "tiled32_after_chunk3": (tiled(32, 3), False), "tiled32_chunk3": (tiled(32, 3), True),
                "tiled64_after_chunk3": (tiled(64, 3), False), "tiled64_chunk3": (tiled(64, 3), True),
                "square32_chunk3": (tiled(32, 3, square_grid), True),
                "square64_chunk3": (tiled(64, 3, square_grid), True)}  # fmt: skip
    if args.settings:
        settings = {k: settings[k] for k in ["streamed", *args.settings.split(",")] if k in settings}
    kind = lambda name: name.split("_")[0] if name.startswith(("tiled", "square")) else "whole"
    runs = {name: [] for name in settings}
    ref = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, (decode, stream) in settings.items():  # warm-up: cuDNN plans, x264 start-up
            frames, _ = run(decode, Path(tmp) / "warm.mp4", stream)
            ref.setdefault(kind(name), frames)
        for i in range(args.rounds):
            for name, (decode, stream) in settings.items():
                frames, t = run(decode, Path(tmp) / f"{name}{i}.mp4", stream)
                t["same_frames"] = bool(np.array_equal(frames, ref[kind(name)]))
                t["max_frame_diff"] = int(np.abs(frames.astype(int) - ref[kind(name)]).max())
                t["mp4_bytes"] = (Path(tmp) / f"{name}{i}.mp4").stat().st_size
                runs[name].append(t)
                print(f"round {i} {name:14s} decode {t['decode_s']:.2f} s, then write {t['write_s']:.2f} s, "
                      f"total {t['total_s']:.2f} s, peak {t['peak_gb']:.2f} GB, same frames {t['same_frames']} "
                      f"(max diff {t['max_frame_diff']})", flush=True)  # fmt: skip
    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("decode_s", "write_s", "total_s", "peak_gb")}
        for n, rs in runs.items()
    }
    profiled = {name: profile(decode) for name, (decode, _) in settings.items()} if args.profile else None
    print("median total: " + ", ".join(f"{n} {m['total_s']:.2f} s" for n, m in med.items()))
    diff = {k: int(np.abs(v.astype(int) - ref["whole"]).max()) for k, v in ref.items() if k != "whole"}
    path = write_result(args.name, {"latents": list(z.shape), "frames": int(ref["whole"].shape[0]), "runs": runs,
                                         "median": med, "tiled_vs_whole_max_frame_diff": diff,
                                         "profile": profiled}, args.out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
