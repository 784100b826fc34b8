"""VAE decode + MP4 write: one after the other against streamed (each decoded chunk encoded at once), side by
side, for whole-frame and tiled decodes.

    python bench/decode_write.py [--out DIR]     (writes decode_write-<card>.json)

The full-size Wan2.1 VAE (random weights, bf16) decodes 21 latent frames of 544 x 720 (81 frames), one latent
frame a chunk. Settings, rounds alternating them:
  - after: whole frames, then `write_mp4` (what `Pipeline.generate` did until the MP4 moved into it);
  - streamed: whole frames, every chunk handed to an `Mp4Writer` whose thread encodes it while the next chunk
    decodes (the distill row);
  - tiled_after: 32-latent tiles, each through all frames (`decode_tiled(by_frame=False)`), then the write: the
    fp8 rows until this commit;
  - tiled_streamed: 32-latent tiles, all tiles a latent frame at a time (`by_frame=True`), streamed.
Each records decode and write seconds and the peak GPU memory allocated during the call above what was
allocated before it. Whole-frame settings must write the same frames as each other, tiled ones likewise;
random weights decode to noise, x264's worst case.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_model_config("i2v-14b-480p")
    vae = random_part("vae", cfg).to_channels_last()  # as load_part leaves it on GPUs
    z = torch.randn(1, cfg.vae.z_dim, 21, 68, 90, device="cuda", dtype=torch.bfloat16)
    whole = lambda on_frames: vae.decode(z, chunk=1, on_frames=on_frames)
    by_tile = lambda on_frames: vae.decode_tiled(z, 32, 8, on_frames=on_frames, by_frame=False)
    by_frame = lambda on_frames: vae.decode_tiled(z, 32, 8, on_frames=on_frames, by_frame=True)
    settings = {"after": (whole, False), "streamed": (whole, True), "tiled_after": (by_tile, False),
                "tiled_streamed": (by_frame, True)}  # fmt: skip
    runs = {name: [] for name in settings}
    ref = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, (decode, stream) in settings.items():  # warm-up: cuDNN plans, x264 start-up
            frames, _ = run(decode, Path(tmp) / "warm.mp4", stream)
            ref.setdefault(name.startswith("tiled"), frames)
        for i in range(args.rounds):
            for name, (decode, stream) in settings.items():
                frames, t = run(decode, Path(tmp) / f"{name}{i}.mp4", stream)
                t["same_frames"] = bool(np.array_equal(frames, ref[name.startswith("tiled")]))
                t["max_frame_diff"] = int(np.abs(frames.astype(int) - ref[name.startswith("tiled")]).max())
                t["mp4_bytes"] = (Path(tmp) / f"{name}{i}.mp4").stat().st_size
                runs[name].append(t)
                print(f"round {i} {name:14s} decode {t['decode_s']:.2f} s, then write {t['write_s']:.2f} s, "
                      f"total {t['total_s']:.2f} s, peak {t['peak_gb']:.2f} GB, same frames {t['same_frames']} "
                      f"(max diff {t['max_frame_diff']})", flush=True)  # fmt: skip
    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("decode_s", "write_s", "total_s", "peak_gb")}
        for n, rs in runs.items()
    }
    print("median total: " + ", ".join(f"{n} {m['total_s']:.2f} s" for n, m in med.items()))
    tiled_diff = int(np.abs(ref[True].astype(int) - ref[False]).max())
    path = write_result("decode_write", {"latents": list(z.shape), "frames": int(ref[False].shape[0]), "runs": runs,
                                         "median": med, "tiled_vs_whole_max_frame_diff": tiled_diff}, args.out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
