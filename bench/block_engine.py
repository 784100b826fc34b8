"""One full-size DiT block as an AOTInductor engine, per variant, with where its GPU time goes.

    python bench/block_engine.py [--model i2v-14b-480p] [--out DIR]     (writes block_engine-<card>.json)

One process, one block of the model at its sample size (random weights, FP8 scales from one max-calibration
forward), the same inputs for every variant:
  bf16-sdpa       bf16 linears, SDPA
  fp8-sdpa        FP8 linears (torch._scaled_mm), SDPA
  fp8-sage        FP8 + SageAttention as the engines measured so far: tile autotuned inside the package,
                  quantization by the op's own kernels
  fp8-sage-tile   the same with the tile pinned (no autotuning at build)
  fp8-sage-fused  pinned tile, quantization as torch ops that Inductor fuses into the norm/RoPE kernels
  *-fast          the same with the FP8 GEMMs accumulating in the tensor cores (`use_fast_accum`)
  *-exact-gelu    GELU as nn.GELU(approximate="tanh") (Inductor: libdevice tanhf), as before GELUTanh
  *-qkprep        Q and K normalized, rotated (Q quantized) inside the op (`sage_prep: fused`, x2v::sage_attention_rope)
  *-xsage         the two cross-attentions through the SageAttention op too (SDPA in every build)
  *-at, *-attma   GEMMs autotuned at build (Inductor max-autotune: cuBLAS or Triton templates with fused
                  epilogues), the latter with the persistent TMA templates
Measured with `--no-op --no-streamed --variants fp8-sage-fused-fast,fp8-sage-tile-fast`
(`block_quant_kernels-h200.json`): the op's own quantization kernels beat the fused torch ops by 1.1 ms a block.
Per variant: build seconds, block time (median of device-event timings), a profiler breakdown of one call
by kernel kind, parity against the eager block of the same variant, and the error of what the block adds
to its input (output minus input) against the eager bf16 block's. The SageAttention op is also
timed alone (eager and as a package per variant) at the self-attention shape, to separate the op from
what the compiler does around it. Last, the last variant's engine runs the model's 40 blocks with the weights
resident and streamed from pinned host memory (`dit_weights: stream`): time, equality and peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from bench.attention import make_inputs, sdpa
from bench.common import interleaved, kernel_breakdown, rel_err, time_cuda, write_result
from bench.dit_forward import inputs, random_dit
from bench.engine_forward import ORDER, load_pt2, max_calibrated_fp8, sage_op_package
from x2v.export.dit import GELUTanh
from x2v.export.fp8 import configure_fp8
from x2v.plugins import sage_attention as sage
from x2v.runtime.config import load_model_config

TILE = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}  # the best tile of every H200 sweep so far
# AOTInductor max-autotune for the GEMMs, as `build` does where a GPU config says `autotune: true`: cuBLAS against
# Triton templates, which can take the following pointwise work (bias, GELU, the FP8 cast) into their epilogue.
AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"}
# and with Inductor's persistent TMA templates (on Hopper the only Triton FP8 GEMMs with TMA loads)
AUTOTUNE_TMA = {**AUTOTUNE, "triton.enable_persistent_tma_matmul": True}
VARIANTS = {  # name: (model, attention, sage tile, traced quantization, FP8 fast accumulation, options)
    "bf16-sdpa": ("bf16", "sdpa", None, "kernels", False, {}),
    "fp8-sdpa": ("fp8", "sdpa", None, "kernels", False, {}),
    "fp8-sdpa-fast": ("fp8", "sdpa", None, "kernels", True, {}),
    "fp8-sage": ("fp8", "sage_op", None, "kernels", False, {}),
    "fp8-sage-tile": ("fp8", "sage_op", TILE, "kernels", False, {}),
    "fp8-sage-fused": ("fp8", "sage_op", TILE, "fused", False, {}),
    "fp8-sage-fused-fast": ("fp8", "sage_op", TILE, "fused", True, {}),
    # the op's own quantization kernels traced into the package: 15x slow there until f3a2811 (fp64 promotion)
    "fp8-sage-tile-fast": ("fp8", "sage_op", TILE, "kernels", True, {}),
    # GELU as nn.GELU(approximate="tanh") (Inductor: libdevice's tanhf), as built before GELUTanh (export/dit.py)
    "fp8-sage-tile-fast-exact-gelu": ("fp8", "sage_op", TILE, "kernels", True, {"gelu": "exact"}),
    "bf16-sdpa-exact-gelu": ("bf16", "sdpa", None, "kernels", False, {"gelu": "exact"}),
    "fp8-sdpa-fast-exact-gelu": ("fp8", "sdpa", None, "kernels", True, {"gelu": "exact"}),
    # Q and K normalized, rotated (and Q quantized) inside the op, one pass each (GPU configs' sage_prep: fused)
    "fp8-sage-tile-fast-qkprep": ("fp8", "sage_op_rope", TILE, "kernels", True, {}),
    # the cross-attentions (32760 queries against 512 text and 257 image keys) through SageAttention too
    "fp8-sage-tile-fast-xsage": ("fp8", "sage_op", TILE, "kernels", True, {"cross": "sage_op"}),
    # *-at: GEMMs autotuned (AUTOTUNE); *-attma: with the persistent TMA templates too (AUTOTUNE_TMA)
    "bf16-sdpa-at": ("bf16", "sdpa", None, "kernels", False, {"inductor": AUTOTUNE}),
    "fp8-sdpa-fast-at": ("fp8", "sdpa", None, "kernels", True, {"inductor": AUTOTUNE}),
    "bf16-sdpa-attma": ("bf16", "sdpa", None, "kernels", False, {"inductor": AUTOTUNE_TMA}),
    "fp8-sdpa-fast-attma": ("fp8", "sdpa", None, "kernels", True, {"inductor": AUTOTUNE_TMA}),
    "fp8-sage-tile-fast-attma": ("fp8", "sage_op", TILE, "kernels", True, {"inductor": AUTOTUNE_TMA}),
}


def op_alone(n, h, d, directory: Path, reps: int) -> dict:
    """The op at the self-attention shape: eager, and compiled into a package per (tile, quantization)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = make_inputs(1, h, n, d, "realistic", gen)
    res = {"sdpa_ms": time_cuda(lambda: sdpa(q, k, v), 2, reps)["median_ms"]}
    # the eager column autotunes (eager calls would take the card's configured tile)
    sage.TILE, sage.TRACED_QUANT = sage.AUTOTUNE, "kernels"
    eager = sage.sage_attention(q, k, v)
    res["eager"] = {"ms": time_cuda(lambda: sage.sage_attention(q, k, v), 2, reps)["median_ms"],
                    "kernels": kernel_breakdown(lambda: sage.sage_attention(q, k, v))}  # fmt: skip
    from x2v.plugins import sage_kernels

    res["eager"]["autotuned_tile"] = str(getattr(sage_kernels.attn_kernel, "best_config", None))
    print("op eager", json.dumps(res["eager"]), flush=True)

    for name, tile, quant in (
        ("autotuned", None, "kernels"),
        ("tile", TILE, "kernels"),
        ("fused", TILE, "fused"),
    ):
        sage.TILE, sage.TRACED_QUANT = tile, quant
        t0 = time.perf_counter()
        op = sage_op_package(q, k, v, directory / f"sage-{name}.pt2")
        r = {"build_s": time.perf_counter() - t0, "vs_eager": rel_err(op(q, k, v).float(), eager.float()),
             "ms": time_cuda(lambda op=op: op(q, k, v), 2, reps)["median_ms"],
             "kernels": kernel_breakdown(lambda op=op: op(q, k, v))}  # fmt: skip
        res[f"aoti-{name}"] = r
        print(f"op aoti-{name}", json.dumps(r), flush=True)
    return res


def streamed_forward(blk, acts, weights, n: int, reps: int) -> dict:
    """The last variant's engine over n blocks (all with this block's weights), the weights resident and
    streamed from pinned host memory (GPU configs' `dit_weights: stream`): time, equality, peak memory."""
    from x2v.runtime.offload import BlockWeights

    def forward(blocks):
        t = acts[0]
        for w in blocks:
            t = blk(t, *acts[1:], *w)
        return t

    resident = [weights] * n
    t0 = time.perf_counter()
    streamed = BlockWeights([[w.cpu() for w in weights] for _ in range(n)], "cuda")
    torch.cuda.synchronize()
    r = {"blocks": n, "pin_s": time.perf_counter() - t0}

    def with_peaks(blocks, name):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = forward(blocks)
        r[f"peak_gb_{name}"] = torch.cuda.max_memory_allocated() / 1e9
        r[f"peak_reserved_gb_{name}"] = torch.cuda.max_memory_reserved() / 1e9
        return t

    ref, out = with_peaks(resident, "resident"), with_peaks(streamed, "streamed")
    r["allocator"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")
    r["equal"] = bool(torch.equal(out, ref))
    r["resident_ms"] = time_cuda(lambda: forward(resident), 1, reps)
    r["streamed_ms"] = time_cuda(lambda: forward(streamed), 1, reps)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dir", default="/tmp/x2v-block")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-op", dest="op", action="store_false", help="skip timing the attention op alone")
    ap.add_argument("--name", default="block_engine", help="result file name (block_engine-<card>.json)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="build no further variant once this many seconds have passed (the rounds still run)",
    )
    ap.add_argument("--no-streamed", dest="streamed", action="store_false",
                    help="skip the 40-block forward with weights streamed from host memory")  # fmt: skip
    args = ap.parse_args()
    from x2v.export import engines as E

    cfg = load_model_config(args.model)
    cfg_layers = cfg.dit.num_layers
    cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, num_layers=1))
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    res = {"model": cfg.name, "tile": TILE, "variants": {}}
    torch.manual_seed(0)
    models = {"bf16": random_dit(cfg)}
    x = inputs(cfg, cfg.sample.frames, cfg.sample.height, cfg.sample.width)
    shape = x["x"].shape
    calls = {}
    with torch.no_grad():
        pre_out = models["bf16"].pre(*(x[a] for a in ORDER))
        tokens, e, e0, ctx, cos, sin = pre_out
        n = tokens.shape[1]
        res["tokens"] = n
        if args.op:
            res["op"] = op_alone(n, cfg.dit.num_heads, cfg.dit.head_dim, d, args.reps)
        models["fp8"] = max_calibrated_fp8(models["bf16"], cfg, x)
        block_args = (tokens, e0, ctx, cos, sin)
        bf16_delta = (
            models["bf16"].configure(torch.bfloat16, "sdpa").blocks[0](*block_args).float() - tokens.float()
        )
        start = time.perf_counter()
        for name in args.variants.split(","):
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                print(f"{name}: skipped, past --budget-s {args.budget_s:.0f}", flush=True)
                res.setdefault("skipped", []).append(name)
                continue
            kind, attn, tile, quant, fast, opts = VARIANTS[name]
            model = models[kind].configure(torch.bfloat16, attn)
            for b in model.blocks:
                b.ffn[1] = torch.nn.GELU(approximate="tanh") if opts.get("gelu") == "exact" else GELUTanh()
                b.cross_attn.attn_impl = opts.get("cross", "sdpa")
            if kind == "fp8":
                configure_fp8(model, "cuda", fast_accum=fast)
            sage.TILE, sage.TRACED_QUANT = None, "kernels"
            eager = model.blocks[0](*block_args).float()
            sage.TILE, sage.TRACED_QUANT = tile, quant
            t0 = time.perf_counter()
            path = d / f"block-{name}.pt2"
            E.export_aoti(model, "block", shape, path, "cuda", opts.get("inductor"))
            r = {"build_s": time.perf_counter() - t0}
            blk = load_pt2(path)
            args0 = (tokens, e0, ctx, cos, sin, *E.engine_weights(model, "block"))
            calls[name] = lambda blk=blk, a=args0: blk(*a)
            out = blk(*args0).float()
            r["vs_eager"] = rel_err(out, eager)
            r["delta_vs_bf16_eager"] = rel_err(out - tokens.float(), bf16_delta)
            r["ms"] = time_cuda(lambda blk=blk, a=args0: blk(*a), 3, args.reps)
            r["kernels"] = kernel_breakdown(lambda blk=blk, a=args0: blk(*a), top=16)
            res["variants"][name] = r
            print(name, json.dumps(r), flush=True)
            write_result(args.name, res, args.out)
        # Sequential timings drift with the card's clocks (SDPA alone moved 3.6 ms between two variants):
        # the ratios come from rounds that call every variant once, in turn.
        res["interleaved_ms"] = interleaved(calls, args.reps)
        if args.streamed:
            res["streamed"] = streamed_forward(blk, (tokens, e0, ctx, cos, sin), E.engine_weights(model, "block"),
                                               cfg_layers, args.reps)  # fmt: skip
            print("streamed", json.dumps(res["streamed"]), flush=True)
    v = res["interleaved_ms"]
    attn = {k: sum(ms for kind, ms in r["kernels"]["by_kind_ms"].items() if "attention" in kind)
            for k, r in res["variants"].items()}  # fmt: skip
    res["summary"] = {k: {"block_ms": v[k], "attention_ms": attn[k], "rest_ms": v[k] - attn[k]} for k in v}
    summary = res["summary"]
    pairs = [
        (f, "bf16-sdpa") for f in ("fp8-sdpa", "fp8-sdpa-fast", "fp8-sdpa-fast-at", "fp8-sdpa-fast-attma")
    ]
    pairs += [("fp8-sdpa-fast-at", "bf16-sdpa-at"), ("fp8-sdpa-fast-attma", "bf16-sdpa-attma")]
    for fp8, bf16 in pairs:
        if bf16 in v and fp8 in v:  # issue 5's two ratios
            summary[f"{fp8}/{bf16} block, SDPA in both"] = v[fp8] / v[bf16]
            summary[f"{fp8}/{bf16} rest (linear and elementwise)"] = (
                summary[fp8]["rest_ms"] / summary[bf16]["rest_ms"]
            )
    print("summary", json.dumps(res["summary"]), flush=True)
    print(f"wrote {write_result(args.name, res, args.out)}")


if __name__ == "__main__":
    main()
