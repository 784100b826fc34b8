"""x264's threading in the MP4 writer: slice threads (PyAV's default) against frame threads, side by side.

    python bench/mp4_threads.py [--out DIR]     (writes mp4_threads-<card>.json; the GPU host's CPU is what counts)

Encodes 81 noise frames of 544 x 720 (what random weights decode to: x264's worst case) as `Mp4Writer` does
(CRF 18, veryfast, yuv420p), all frames at once as after a tiled decode, rounds alternating the settings.
Records seconds, file size and the CPU count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write_result


def encode(frames: np.ndarray, path: Path, thread_type: str) -> float:
    import av

    t0 = time.perf_counter()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=16, options={"crf": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_type = thread_type
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    frames = (np.random.default_rng(0).random((81, 544, 720, 3)) * 255).astype(np.uint8)
    runs = {"SLICE": [], "FRAME": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds + 1):  # round 0: x264 and the page cache warm up
            for name in runs:
                path = Path(tmp) / f"{name}.mp4"
                s = encode(frames, path, name)
                if i:
                    runs[name].append({"s": s, "bytes": path.stat().st_size})
                print(f"round {i} {name}: {s:.2f} s, {path.stat().st_size} bytes", flush=True)
    med = {n: statistics.median(r["s"] for r in rs) for n, rs in runs.items()}
    print("median:", med)
    res = {"frames": list(frames.shape), "cpus": os.cpu_count(), "runs": runs, "median_s": med}
    print(f"wrote {write_result('mp4_threads', res, args.out)}")


if __name__ == "__main__":
    main()
