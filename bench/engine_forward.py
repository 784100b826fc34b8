"""Compiled engines against eager torch at full size, per variant, on one GPU (one process, same inputs).

    python bench/engine_forward.py [--model i2v-14b-480p] [--out DIR]     (writes engine_forward-<card>.json)

Variants: bf16 + SDPA, FP8 + SDPA, FP8 + SageAttention, and the FP8 ones with fast accumulation in their
GEMMs (`-fast`, GPU configs' `fp8_fast_accum`) and ffn.0's GELU + FP8 cast in its GEMM (`-gelu`,
`fp8_gelu_epilogue`); `-clamp` the casts as compiled before 2026-11-29; `none` every attention call replaced by
a copy (the linear-and-elementwise part on its own); `--variants` picks some. Each gets an AOTInductor `block`
engine (weights as inputs, one engine for all 40 blocks); `pre` and `post` engines are shared (they hold no
quantized layer).
For each: one-forward time of eager torch and of the engines, parity of the block engine against the eager
block of the same variant, and of the whole forward against the eager bf16 forward. The attention kernels
are also timed alone (40 calls), so `forward - attention` gives the linear-and-elementwise part; a profiler
breakdown of one block engine call by kernel kind (GEMM, attention, fused elementwise) measures it directly.
Last, rounds that run every variant's engine forward once in turn give the ratios (sequential timings drift
with the card's clocks).

FP8 scales come from one max-calibration forward on these inputs with forward hooks (what ModelOpt's max
calibrator computes); bench/fp8_forward.py runs the ModelOpt path itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import fp8_cast_before as cast_before
from bench.common import fp8_linear_before as before
from bench.common import interleaved, kernel_breakdown, rel_err, time_cuda, write_result
from bench.dit_forward import inputs, random_dit
from x2v.export.fp8 import configure_fp8
from x2v.runtime.config import load_model_config

ORDER = ("x", "t", "context", "clip_fea", "y")


def max_calibrated_fp8(model, cfg, x):
    """The FP8 model of `model`: per-tensor weight scales, static input scales from one forward's amax."""
    from x2v.export.fp8 import E4M3_MAX, configure_fp8, quantize, swap_linears
    from x2v.export.load import build
    from x2v.runtime.checkpoint import load_strict

    targets = cfg.fp8.targets(cfg.dit.num_layers)
    amax, hooks = {}, []
    for name in targets:

        def hook(mod, args, name=name):
            a = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax.get(name, a), a)

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(**x)
    for h in hooks:
        h.remove()
    state = dict(model.state_dict())
    for name in targets:
        w = state[f"{name}.weight"].float()
        ws = w.abs().amax() / E4M3_MAX
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = quantize(w, ws), ws
        state[f"{name}.input_scale"] = (amax[name] / E4M3_MAX).reshape(())
    fp8 = build("dit", cfg)
    swap_linears(fp8, targets, False, True)
    fp8 = load_strict(fp8, state, {}).eval().configure(torch.bfloat16, "sdpa")
    configure_fp8(fp8, "cuda")
    return fp8


def load_pt2(path):
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))


class SageOp(torch.nn.Module):
    """The SageAttention op alone, to export and compile as a package of its own."""

    def forward(self, q, k, v):
        return torch.ops.x2v.sage_attention(q, k, v)


def sage_op_package(q, k, v, path: Path):
    """The op compiled into an AOTInductor package at `path` for these inputs' shapes, loaded."""
    ep = torch.export.export(SageOp(), (q, k, v), strict=False)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    return load_pt2(path)


# The linear-and-elementwise part on its own: attention "none" replaces every attention kernel (self-attention,
# and cross-attention to text and image tokens) by a copy of q, an opaque op of its own, so that k and v and
# everything that produces them stay in the engine. A copy moves what an attention kernel must (q read, the
# output written) and computes nothing; the copies stay in both the bf16 and the FP8 forwards.
try:
    import triton
    import triton.language as tl

    @triton.jit
    def _standin_copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    @torch.library.triton_op("x2v_bench::attention_standin", mutates_args={})
    def attention_standin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = q.contiguous()
        out = torch.empty_like(q)
        n = q.numel()
        torch.library.wrap_triton(_standin_copy)[(triton.cdiv(n, 4096),)](q, out, n, BLOCK=4096)
        return out

except ImportError:  # CPU installs without Triton never run this bench
    pass


@contextlib.contextmanager
def no_attention(on: bool):
    from x2v.export import dit as dit_mod

    real = dit_mod.attention
    if on:
        dit_mod.attention = lambda q, k, v, impl="sdpa": torch.ops.x2v_bench.attention_standin(
            q, k, v
        ).flatten(2)
    try:
        yield
    finally:
        dit_mod.attention = real


VARIANTS = {  # name: (FP8, attention, fast accumulation, GELU + FP8 cast in ffn.0's epilogue)
    "bf16-sdpa": (False, "sdpa", False, False),
    "fp8-sdpa": (True, "sdpa", False, False),
    "fp8-sdpa-fast": (True, "sdpa", True, False),
    "fp8-sdpa-fast-gelu": (True, "sdpa", True, True),
    "fp8-sage": (True, "sage_op", False, False),
    "fp8-sage-fast": (True, "sage_op", True, False),
    "fp8-sage-fast-gelu": (True, "sage_op", True, True),
    # *-before: as built before 2026-11-29 (bench.common.fp8_linear_before)
    "fp8-sdpa-fast-before": (True, "sdpa", True, False),
    "fp8-sage-fast-before": (True, "sage_op", True, False),
    # *-clamp: the casts as compiled until 2026-11-29 (bench.common.fp8_cast_before)
    "fp8-sdpa-fast-clamp": (True, "sdpa", True, False),
    "fp8-sage-fast-clamp": (True, "sage_op", True, False),
    # the linear-and-elementwise part on its own (no_attention)
    "bf16-none": (False, "none", False, False),
    "fp8-none-fast": (True, "none", True, False),
    "fp8-none-fast-clamp": (True, "none", True, False),
}


def variant_context(name: str):
    stack = contextlib.ExitStack()
    if name.endswith("-before"):
        stack.enter_context(before())
    if name.endswith("-clamp"):
        stack.enter_context(cast_before())
    stack.enter_context(no_attention(VARIANTS[name][1] == "none"))
    return stack


def attention_checks(cfg, n, d, package: bool = True):
    """The attention kernels alone at the self-attention shape (x40: one forward's worth), and the
    SageAttention op through AOTInductor against eager."""
    from x2v.plugins.sage_attention import device_tile as sage_tile
    from x2v.plugins.sage_attention import sage_attention

    res = {}
    h, hd = cfg.dit.num_heads, cfg.dit.head_dim
    q, k, v = (torch.randn(1, n, h, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sdpa = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    res["attention_x40_ms"] = {
        "sdpa": time_cuda(sdpa, 2, 5)["median_ms"] * cfg.dit.num_layers,
        "sage": time_cuda(lambda: sage_attention(q, k, v), 2, 5)["median_ms"] * cfg.dit.num_layers,
    }
    res["sage_tile"] = str(sage_tile(q.device))  # eager calls take the card's configured tile, as the engines
    print("attention_x40_ms", res["attention_x40_ms"], res["sage_tile"], flush=True)
    if not package:
        return res

    t0 = time.perf_counter()
    op = sage_op_package(q, k, v, d / "sage.pt2")
    r = {
        "compile_s": time.perf_counter() - t0,
        **rel_err(op(q, k, v).float(), sage_attention(q, k, v).float()),
    }
    r["ms"] = time_cuda(lambda: op(q, k, v), 2, 5)["median_ms"]
    print("sage_op_aoti", r, flush=True)
    res["sage_op_aoti"] = r
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/x2v-engines")
    ap.add_argument("--out", default=None)
    ap.add_argument("--autotune", action="store_true", help="AOTInductor max-autotune for the block engines")
    ap.add_argument("--variants", default="bf16-sdpa,fp8-sdpa,fp8-sage")
    ap.add_argument("--name", default="engine_forward", help="result file name (<name>-<card>.json)")
    ap.add_argument("--no-eager", dest="eager", action="store_false", help="skip timing the eager forwards")
    ap.add_argument("--no-op-package", dest="op_package", action="store_false",
                    help="skip compiling the SageAttention op alone into a package")  # fmt: skip
    args = ap.parse_args()
    from x2v.export import engines as E

    cfg = load_model_config(args.model)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    res = {"model": cfg.name, "autotune": args.autotune, "variants": {}}
    log = lambda k, v: print(k, json.dumps(v), flush=True)
    torch.manual_seed(0)
    bf16 = random_dit(cfg)
    x = inputs(cfg)
    shape = x["x"].shape

    with torch.no_grad():
        n = E.example_inputs(bf16, "block", shape, "cuda")[1][0].shape[1]
        res.update(attention_checks(cfg, n, d, args.op_package))
        ref = bf16(**x).float()
        pre_out = bf16.pre(*(x[a] for a in ORDER))
        fp8 = max_calibrated_fp8(bf16, cfg, x)

        # Shared pre/post engines.
        t0 = time.perf_counter()
        E.export_aoti(bf16, "pre", shape, d / "pre.pt2", "cuda")
        E.export_aoti(bf16, "post", shape, d / "post.pt2", "cuda")
        res["pre_post_build_s"] = time.perf_counter() - t0
        pre, post = load_pt2(d / "pre.pt2"), load_pt2(d / "post.pt2")
        pre_w, post_w = E.engine_weights(bf16, "pre"), E.engine_weights(bf16, "post")
        pre_eng = pre(*(x[a] for a in ORDER), *pre_w)
        res["pre_engine_vs_eager"] = {
            name: rel_err(a.float(), b.float()) for name, a, b in zip(E.OUTPUTS["pre"], pre_eng, pre_out)
        }
        log("pre_engine_vs_eager", res["pre_engine_vs_eager"])

        forwards = {}

        def variant(name):
            quantized, attn, fast, gelu = VARIANTS[name]
            model = (fp8 if quantized else bf16).configure(torch.bfloat16, "sdpa" if attn == "none" else attn)
            if quantized:
                configure_fp8(model, "cuda", fast_accum=fast, gelu_epilogue=gelu)
            r = {"eager": time_cuda(lambda m=model: m(**x), 1, args.reps)["median_ms"]} if args.eager else {}
            if quantized:
                r["shared_qkv_input"] = model.blocks[0].self_attn.shared_fp8_input
            eager_block = model.blocks[0](*pre_out[0:1], pre_out[2], *pre_out[3:])
            t0 = time.perf_counter()
            tune = (
                {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"} if args.autotune else None
            )
            E.export_aoti(model, "block", shape, d / f"block-{name}.pt2", "cuda", tune)
            r["block_build_s"] = time.perf_counter() - t0
            r["block_engine_mb"] = (d / f"block-{name}.pt2").stat().st_size / 1e6
            t0 = time.perf_counter()
            blk = load_pt2(d / f"block-{name}.pt2")
            r["block_load_s"] = time.perf_counter() - t0
            weights = [[t for t in model.blocks[i].state_dict().values()] for i in range(cfg.dit.num_layers)]
            tokens, e, e0, ctx, cos, sin = pre_out
            r["block_engine_vs_eager"] = rel_err(
                blk(tokens, e0, ctx, cos, sin, *weights[0]).float(), eager_block.float()
            )

            def forward(blk=blk, weights=weights):
                tk, e_, e0_, c_, co, si = pre(*(x[a] for a in ORDER), *pre_w)
                for w in weights:
                    tk = blk(tk, e0_, c_, co, si, *w)
                return post(tk, e_, *post_w)

            # Where one block's GPU time goes (GEMMs, attention, fused elementwise), measured, not subtracted.
            args0 = (tokens, e0, ctx, cos, sin, *weights[0])
            r["block_kernels"] = kernel_breakdown(lambda blk=blk, a=args0: blk(*a))
            torch.cuda.reset_peak_memory_stats()
            r["engine"] = time_cuda(forward, 1, args.reps)["median_ms"]
            r["engine_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            out = forward().float()
            r["engine_vs_bf16_eager"] = rel_err(out, ref)
            forwards[name] = forward
            if attn != "none":
                r["eager_vs_bf16_eager"] = rel_err(model(**x).float(), ref)
                a40 = res["attention_x40_ms"]["sage" if attn == "sage_op" else "sdpa"]
                r["linear_elementwise_ms"] = {k: r[k] - a40 for k in ("eager", "engine") if k in r}
            res["variants"][name] = r
            log(name, r)
            write_result(args.name, res, args.out)

        for name in args.variants.split(","):
            with variant_context(name):
                variant(name)
        res["interleaved_ms"] = interleaved(forwards, args.reps)
        log("interleaved_ms", res["interleaved_ms"])
        # the fixed order every earlier file used (bf16 first), to see what the order itself does
        res["interleaved_fixed_order_ms"] = interleaved(forwards, args.reps, rotate=False)
        log("interleaved_fixed_order_ms", res["interleaved_fixed_order_ms"])
    v, inter, fixed = res["variants"], res["interleaved_ms"], res["interleaved_fixed_order_ms"]
    res["ratios"] = ratios = {}
    # each variant against the bf16 one with the same attention: bf16-sdpa, or bf16-none for "none"
    for name in v:
        ref = "bf16-none" if VARIANTS[name][1] == "none" else "bf16-sdpa"
        if name == ref or ref not in v:
            continue
        ratios[f"engine {name} / engine {ref}, interleaved"] = inter[name] / inter[ref]
        ratios[f"engine {name} / engine {ref}, interleaved in a fixed order"] = fixed[name] / fixed[ref]
        if "eager" in v[ref]:
            ratios[f"engine {name} / eager {ref}"] = v[name]["engine"] / v[ref]["eager"]
        # one block's kernels less the attention kernels themselves (profiled, one call each)
        part = lambda k: v[k]["block_kernels"]["total_ms"] - v[k]["block_kernels"]["attention_kernels_ms"]
        ratios[f"block kernels less attention kernels {name} / {ref}"] = part(name) / part(ref)
        if "sdpa" in name:  # the forward less 40 attention calls timed alone
            attn = res["attention_x40_ms"]["sdpa"]
            ratios[f"linear part engine {name} / engine {ref}, interleaved"] = (inter[name] - attn) / (
                inter[ref] - attn
            )
    log("ratios", res["ratios"])
    print(f"wrote {write_result(args.name, res, args.out)}")


if __name__ == "__main__":
    main()
