"""VAE decode + MP4 write, one after the other against streamed (each decoded chunk encoded at once), side by side.

    python bench/decode_write.py [--out DIR]     (writes decode_write-<card>.json)

The full-size Wan2.1 VAE (random weights, bf16) decodes 21 latent frames of 544 x 720 (81 frames) in whole
frames, one latent frame a chunk, as the distill row of the speed table does. `after`: decode, then
`write_mp4` (what `Pipeline.generate` did until the MP4 moved into it); `streamed`: `decode(on_frames=...)`
hands every chunk to an `Mp4Writer`, whose thread encodes it while the next chunk decodes. Rounds alternate
the two; both must write the same frames. Random weights decode to noise, x264's worst case.
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


def after(vae, z, path: Path) -> tuple[np.ndarray, dict]:
    t0 = time.perf_counter()
    frames = to_uint8(vae.decode(z, chunk=1)[0])
    t1 = time.perf_counter()
    write_mp4(frames, path)
    t2 = time.perf_counter()
    return frames, {"decode_s": t1 - t0, "write_s": t2 - t1, "total_s": t2 - t0}


def streamed(vae, z, path: Path) -> tuple[np.ndarray, dict]:
    parts = []
    t0 = time.perf_counter()
    with Mp4Writer(path) as writer:

        def emit(video):
            parts.append(to_uint8(video[0]))
            writer.write(parts[-1])

        vae.decode(z, chunk=1, on_frames=emit)
        t1 = time.perf_counter()
    t2 = time.perf_counter()
    return np.concatenate(parts), {"decode_s": t1 - t0, "write_s": t2 - t1, "total_s": t2 - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_model_config("i2v-14b-480p")
    vae = random_part("vae", cfg)
    z = torch.randn(1, cfg.vae.z_dim, 21, 68, 90, device="cuda", dtype=torch.bfloat16)
    runs = {"after": [], "streamed": []}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ref, _ = after(vae, z, Path(tmp) / "warm.mp4")  # warm-up: cuDNN algorithm choice, x264 start-up
        for i in range(args.rounds):
            for name, fn in (("after", after), ("streamed", streamed)):
                frames, t = fn(vae, z, Path(tmp) / f"{name}{i}.mp4")
                t["same_frames"] = bool(np.array_equal(frames, ref))
                t["mp4_bytes"] = (Path(tmp) / f"{name}{i}.mp4").stat().st_size
                runs[name].append(t)
                print(f"round {i} {name:8s} decode {t['decode_s']:.2f} s, then write {t['write_s']:.2f} s, "
                      f"total {t['total_s']:.2f} s, same frames {t['same_frames']}", flush=True)  # fmt: skip
    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("decode_s", "write_s", "total_s")}
        for n, rs in runs.items()
    }
    print(f"median total: after {med['after']['total_s']:.2f} s, streamed {med['streamed']['total_s']:.2f} s")
    path = write_result("decode_write", {"latents": list(z.shape), "frames": int(ref.shape[0]), "runs": runs,
                                         "median": med}, args.out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
