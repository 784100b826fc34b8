"""Streamed umT5 on a GPU at full size: same output as resident, what pinning costs at load, what a call costs.

    python bench/stream_check.py [--register-threads N] [--unbounded] [--out DIR]   (stream_check-<card>.json)

The GPU configs' `encoders: stream` keeps umT5-XXL (11.4 GB in bf16) in pinned host memory and copies one block
at a time to the GPU (runtime/offload.py). Random weights: the copy and compute costs do not depend on them.
The DiT's streamed blocks (`dit_weights: stream`) are measured with the real block engine by
bench/block_engine.py.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import random_part, time_cuda, write_result
from x2v.runtime.config import load_model_config
from x2v.runtime.offload import configure_allocator, stream, stream_units


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--out", default=None)
    ap.add_argument("--register-threads", type=int, default=0,
                    help="page-lock with cudaHostRegister on this many threads instead of cudaHostAlloc")  # fmt: skip
    ap.add_argument("--expandable", action="store_true", help="expandable segments, as the GPU configs set")
    ap.add_argument(
        "--unbounded", action="store_true", help="let the host run ahead of the GPU (the old stream)"
    )
    args = ap.parse_args()
    cfg = load_model_config(args.model)
    res = {"model": cfg.name, "register_threads": args.register_threads, "bounded": not args.unbounded,
           "expandable_segments": args.expandable}  # fmt: skip
    if args.register_threads:  # what the engine load sets (runtime/offload.py), with this many threads
        configure_allocator(expandable_segments=args.expandable, register_threads=args.register_threads)
    t5 = random_part("t5", cfg)
    res["weights_gb"] = sum(p.numel() * p.element_size() for p in t5.parameters()) / 1e9
    ids = torch.randint(0, cfg.t5.vocab, (2, cfg.dit.text_len), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with torch.no_grad():
        ref = t5(ids, mask)
        res["resident_ms"] = time_cuda(lambda: t5(ids, mask), 1, 3)["median_ms"]
        t0 = time.perf_counter()
        t5 = t5.cpu()
        res["to_host_s"] = time.perf_counter() - t0
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        streamed = stream(t5, stream_units("t5", t5), "cuda", bounded=not args.unbounded)
        torch.cuda.synchronize()
        res["pin_s"] = time.perf_counter() - t0
        torch.cuda.empty_cache()
        base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        out = streamed(ids, mask)
        torch.cuda.synchronize()
        res["peak_gb_above_resident_parts"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        # What the caching allocator holds for it (the driver's view, less the context): the encode phase's gap.
        res["peak_reserved_gb_above_resident_parts"] = (
            torch.cuda.max_memory_reserved() - base_reserved
        ) / 1e9
        res["max_abs_diff_vs_resident"] = (out.float() - ref.float()).abs().max().item()
        res["streamed_ms"] = time_cuda(lambda: streamed(ids, mask), 1, 3)["median_ms"]
    print(res, flush=True)
    name = "stream_check" + (f"_register{args.register_threads}" if args.register_threads else "")
    name += "_unbounded" if args.unbounded else ""
    print(f"wrote {write_result(name, res, args.out)}")


if __name__ == "__main__":
    main()
