"""Where the VAE's first-call costs go at load: the engine loader's side thread against its serial warm-up (GPU).

    python bench/load_warmup.py --ckpt CKPT [--out DIR] [--rounds 2]      (writes load_warmup-<card>.json)

Why: the engine rows' load went from 9.0 s (dd2454c) to 10.2 s (a4ec982; goal 10 s) and their warm-up from
1.3 to 3.0 s after edd65fb dropped the VAE's 32 x 32 warm-up from `load_part`, which had run on the loader's
side thread (while the DiT's weights go to the GPU) and loaded or compiled the VAE's Triton kernels and
cuDNN's first plans there. Pipeline.warm_up then paid them on the critical path.

Each variant runs in a fresh process (first-call costs are per process), rounds interleaved (the first round
may pay the host's first Triton compile: read `runs`, not only the medians); the side thread
(VAE resident, umT5 and CLIP streamed, as `encoders: stream`) is timed, then Pipeline.warm_up at the table's
request size through the fp8 rows' decode path (tiles, 3 latent frames a pass):
  serial       the VAE loaded and nothing more on the side thread (a4ec982)
  same_thread  the VAE encodes and decodes 5 frames of 32 x 32 px right after loading, on the same thread (dd2454c)
  own_thread   the same on a thread of its own, beside umT5's and CLIP's reading and page-locking
The load's critical path is max(DiT weights ~6 s, side) + warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = ("serial", "same_thread", "own_thread")
SIZE = (544, 720)  # the table's request: the example image's aspect at 480P's area


def child(variant: str, ckpt: Path, model: str, device: str) -> dict:
    import torch

    from x2v.export.load import load_part
    from x2v.runtime.config import load_model_config
    from x2v.runtime.offload import stream, stream_units
    from x2v.runtime.pipeline import Pipeline
    from x2v.runtime.tokenizer import Tokenizer

    cfg, dev = load_model_config(model), torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # as Pipeline computes
    torch.zeros(1, device=dev)  # the CUDA context, which the real loader has before its side thread starts

    def vae(warm: bool):
        m = load_part("vae", ckpt, cfg, dtype=dt, device=dev)
        if warm:
            m.warm_up()
        return m

    def encoders():
        out = {}
        for p in ("t5", "clip"):
            m = load_part(p, ckpt, cfg, dtype=dt, device="cpu")
            out[p] = stream(m, stream_units(p, m), dev)
        return out

    t0 = time.perf_counter()
    if variant == "own_thread":
        with ThreadPoolExecutor(2) as pool:
            fv, fe = pool.submit(vae, True), pool.submit(encoders)
            parts = {"vae": fv.result(), **fe.result()}
    else:
        with ThreadPoolExecutor(1) as pool:
            parts = pool.submit(lambda: {"vae": vae(variant == "same_thread"), **encoders()}).result()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    side = time.perf_counter() - t0
    parts["tokenizer"] = Tokenizer(ckpt / cfg.files.tokenizer, cfg.dit.text_len)
    pipe = Pipeline(cfg, parts, device)
    pipe.decode_tile, pipe.decode_chunk = 64, 3  # latents: the fp8 rows' tiles (bench/table.py --vae-tile)
    warm = pipe.warm_up([SIZE if model == "i2v-14b-480p" else (cfg.sample.height, cfg.sample.width)])
    return {"side_s": side, "warm_up_s": warm, "side_plus_warm_up_s": side + warm}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.ckpt), args.model, args.device)), flush=True)
        return
    from bench.common import write_result

    runs = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            p = subprocess.run([sys.executable, "-m", "bench.load_warmup", "--ckpt", args.ckpt, "--child", v,
                                "--model", args.model, "--device", args.device],
                               capture_output=True, text=True)  # fmt: skip
            if p.returncode:
                raise SystemExit(f"variant {v} failed:\n{p.stderr[-3000:]}")
            runs[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(r, v, runs[v][-1], flush=True)
    res = {"size": SIZE, "runs": runs}
    res["median"] = {v: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for v, rs in runs.items()}
    print(json.dumps(res["median"], indent=1))
    print(f"wrote {write_result('load_warmup', res, args.out)}")


if __name__ == "__main__":
    main()
