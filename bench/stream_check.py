"""Streamed weights on a GPU at full size: what pinning costs at load and what a call costs.

    python bench/stream_check.py [--out DIR]     (writes stream_check-<card>.json)

- `encoders: stream` keeps umT5-XXL (11.4 GB in bf16) in pinned host memory and copies one block at a time to
  the GPU: same output as resident, pinning time, time of a call.
- `dit_weights: stream` (runtime/offload.py BlockWeights): 40 blocks of an FP8 14B DiT's size (0.41 GB) with
  a stand-in for each block's compute (GEMMs of the block's FLOPs, ~50 ms): the 40-block time with the
  weights resident and streamed, i.e. whether the copies hide behind the compute.
Random weights: the copy and compute costs do not depend on them.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import time_cuda, write_result
from x2v.export.load import build
from x2v.runtime.config import load_model_config
from x2v.runtime.offload import BlockWeights, stream, stream_units


def dit_blocks(n: int = 40, block_bytes: int = 410_000_000, tokens: int = 32760, dim: int = 5120) -> dict:
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(dim, dim, device="cuda", dtype=torch.bfloat16)
    gemms = 12  # 12 x 2*32760*5120^2 = 20.6 TFLOP, about one FP8 block's GEMM work (here in bf16: ~28 ms)
    host = [[torch.empty(block_bytes, dtype=torch.uint8)] for _ in range(n)]
    t0 = time.perf_counter()
    streamed = BlockWeights(host, "cuda")
    torch.cuda.synchronize()
    res = {"blocks": n, "block_gb": block_bytes / 1e9, "pin_s": time.perf_counter() - t0}
    resident = [[h[0].to("cuda")] for h in streamed.host]

    def run(blocks):
        for ws in blocks:
            y = ws[0][:1].float()  # the block reads its weights
            for _ in range(gemms):
                y = x @ w
        return y

    res["resident_ms"] = time_cuda(lambda: run(resident), 1, 3)["median_ms"]
    res["streamed_ms"] = time_cuda(lambda: run(streamed), 1, 3)["median_ms"]
    res["copy_only_ms"] = time_cuda(lambda: [None for _ in streamed], 1, 3)["median_ms"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--out", default=None)
    ap.add_argument("--register-threads", type=int, default=0,
                    help="page-lock with cudaHostRegister on this many threads instead of cudaHostAlloc")  # fmt: skip
    args = ap.parse_args()
    cfg = load_model_config(args.model)
    res = {"model": cfg.name, "register_threads": args.register_threads}
    if args.register_threads:  # the 8.3 s default pinning of umT5 was 9 of the engine rows' 50-67 s load
        torch.cuda.memory._set_allocator_settings(
            f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{args.register_threads}"
        )
    t5 = build("t5", cfg).to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in t5.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * 0.02)
    t5 = t5.to(torch.bfloat16).eval().requires_grad_(False)
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
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        streamed = stream(t5, stream_units("t5", t5), "cuda")
        torch.cuda.synchronize()
        res["pin_s"] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        out = streamed(ids, mask)
        res["peak_gb_above_resident_parts"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        res["max_abs_diff_vs_resident"] = (out.float() - ref.float()).abs().max().item()
        res["streamed_ms"] = time_cuda(lambda: streamed(ids, mask), 1, 3)["median_ms"]
    t5 = streamed = None  # free the GPU and pinned memory before the DiT part
    torch.cuda.empty_cache()
    res["dit_blocks"] = dit_blocks()
    print(res, flush=True)
    name = "stream_check" + (f"_register{args.register_threads}" if args.register_threads else "")
    print(f"wrote {write_result(name, res, args.out)}")


if __name__ == "__main__":
    main()
