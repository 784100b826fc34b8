"""The FFN with ffn.0's GELU + FP8 cast in its GEMM's epilogue against the unfused FFN, one GPU, one process.

    python bench/ffn_epilogue.py [--model i2v-14b-480p] [--out DIR]     (writes ffn_epilogue-<card>.json)

At the 480P self-attention token count and full width: the whole FFN (ffn.0, GELU, ffn.2, FP8 static
scales) under torch.compile both ways (what the block engine compiles), in interleaved rotated rounds;
ffn.0 alone as cuBLAS `torch._scaled_mm` (bf16 out, the GEMM the unfused FFN runs) and as the fused kernel
at a few tiles. Parity: the fused kernel's FP8 output against the unfused graph's FP8 input of ffn.2 on the
same data, in FP8 steps (only the GEMM's summation order differs), and the FFN's output rel L2.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from bench.common import fp8_steps, interleaved, kernel_breakdown, rel_err, time_cuda, write_result
from x2v.export import engines as E
from x2v.export import fp8_kernels as FK
from x2v.export.dit import FeedForward, GELUTanh
from x2v.export.fp8 import E4M3_MAX, FP8Linear, configure_fp8, quantize
from x2v.runtime.config import load_model_config

TILES = {  # BLOCK_M x BLOCK_N x BLOCK_K, stages, warps
    "128x256x128 s3 w8": {},
    "128x256x128 s4 w8": {"num_stages": 4},
    "128x256x64 s4 w8": {"BLOCK_K": 64, "num_stages": 4},
}
# Measured and dropped (ffn_epilogue.log): TMA descriptors made on the device, 3.406 vs 3.428 ms at 3e2fe80, but
# an illegal address inside the block engine; two programs an SM (128 x 128, 64 x 256 tiles) 3.96-5.79 ms.


def fp8_linear(w: torch.Tensor, b: torch.Tensor, x_amax: float) -> FP8Linear:
    m = FP8Linear(w.shape[1], w.shape[0]).cuda()
    ws = w.abs().amax().float() / E4M3_MAX
    m.weight.copy_(quantize(w, ws))
    m.weight_scale.copy_(ws)
    m.bias.copy_(b)
    m.input_scale.fill_(x_amax / E4M3_MAX)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = load_model_config(args.model)
    torch.manual_seed(0)
    dim, hid, n = cfg.dit.dim, cfg.dit.ffn_dim, args.tokens
    # LayerNorm-modulated activations; weights at the checkpoint's scale; biases as trained ones
    x = torch.randn(n, dim, device="cuda").bfloat16()
    w1, w2 = (torch.randn(o, i, device="cuda") * 0.02 for o, i in ((hid, dim), (dim, hid)))
    b1, b2 = (torch.randn(o, device="cuda").bfloat16() * 0.05 for o in (hid, dim))
    with torch.no_grad():
        h_amax = (GELUTanh()(nn.functional.linear(x.float(), w1, b1.float()))).abs().amax().item()
        up = fp8_linear(w1, b1, x.float().abs().amax().item())
        down = fp8_linear(w2, b2, h_amax)
        # two modules over the same linears: a compiled function guards on the flag and would recompile
        ffn = FeedForward(up, GELUTanh(), down)
        ffn_fused = FeedForward(up, GELUTanh(), down)
        configure_fp8(ffn, "cuda", fast_accum=True, gelu_epilogue=False)
        configure_fp8(ffn_fused, "cuda", fast_accum=True, gelu_epilogue=True)
        assert ffn_fused.gelu_epilogue and not ffn.gelu_epilogue, "the epilogue was refused on this GPU"
        res = {"model": cfg.name, "tokens": n, "dim": dim, "ffn_dim": hid, "fast_accum": True}

        unfused = torch.compile(lambda t: ffn(t), fullgraph=True, dynamic=False)
        fused = torch.compile(lambda t: ffn_fused(t), fullgraph=True, dynamic=False)
        ref_out, out = unfused(x), fused(x)
        res["ffn_out_vs_unfused"] = rel_err(out.float(), ref_out.float())

        up, down = ffn[0], ffn[2]
        xs, hs = up.input_scale.float(), down.input_scale.float()
        q = quantize(x, xs)
        # ffn.2's FP8 input as the unfused graph makes it (compiled, like the engine) and as the kernel does
        h_ref = torch.compile(lambda q: quantize(GELUTanh()(up.product(q, xs, torch.bfloat16)), hs))(q)
        h = FK.launch(q, up.weight, xs, up.weight_scale.float(), up.bias, hs, True)
        steps = fp8_steps(h, h_ref)
        res["h_vs_unfused"] = {
            "fp8_steps_max": steps.max().item(),
            "fraction_differing": (steps > 0).float().mean().item(),
            **rel_err(h.float(), h_ref.float()),
        }
        print("parity", res["ffn_out_vs_unfused"], res["h_vs_unfused"], flush=True)

        calls = {"ffn unfused (compiled)": lambda: unfused(x), "ffn fused (compiled)": lambda: fused(x)}
        res["ffn_ms"] = interleaved(calls, args.reps, hide_launch=True)
        print("ffn_ms", res["ffn_ms"], flush=True)

        flops = 2 * n * dim * hid
        ws = up.weight_scale.float()
        gemm = {  # cuBLAS's GEMM alone (no bias): the floor the fused kernel's mainloop is held against
            "cublas scaled_mm bf16 out": lambda: torch._scaled_mm(
                q, up.weight.t(), xs, ws, out_dtype=torch.bfloat16, use_fast_accum=True
            )
        }
        for name, t in TILES.items():
            gemm[f"fused {name}"] = lambda t=t: FK.launch(q, up.weight, xs, up.weight_scale.float(), up.bias, hs,
                                                          True, tile=t)  # fmt: skip
        ok = {}
        for name, fn in gemm.items():
            try:
                time_cuda(fn, 2, 2, hide_launch=True)
                ok[name] = fn
            except Exception as e:  # a tile this card cannot launch (shared memory): recorded, not timed
                res.setdefault("failed", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
        res["ffn0_ms"] = interleaved(ok, args.reps, hide_launch=True)
        res["ffn0_tflops"] = {k: flops / v / 1e9 for k, v in res["ffn0_ms"].items()}
        print("ffn0_ms", res["ffn0_ms"], flush=True)
        # where each compiled FFN's time goes, kernel by kernel
        res["kernels"] = {k: kernel_breakdown(fn) for k, fn in calls.items()}
        for k, v in res["kernels"].items():
            print(k, [(t["kernel"][:60], round(t["ms"], 3)) for t in v["top_ms"]], flush=True)
        u, f = res["ffn_ms"]["ffn unfused (compiled)"], res["ffn_ms"]["ffn fused (compiled)"]
        res["ffn_fused_saves_ms"] = u - f
        write_result("ffn_epilogue", res, args.out)

        # The fused FFN in an AOTInductor package (the block engines' compiler), weights as inputs as in the
        # block engines (buffers would become the package's constants)
        names = list(ffn_fused.state_dict())
        weights = tuple(ffn_fused.state_dict().values())
        ep = torch.export.export(E._Call(ffn_fused, FeedForward.forward, names), (x, *weights), strict=False)
        pkg = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(ep, package_path="/tmp/ffn-fused.pt2")
        )
        res["aoti"] = rel_err(pkg(x, *weights).float(), out.float())
        res["aoti"]["ms"] = time_cuda(lambda: pkg(x, *weights), 3, args.reps, hide_launch=True)["median_ms"]
        print("aoti", res["aoti"], flush=True)
    print(f"wrote {write_result('ffn_epilogue', res, args.out)}")


if __name__ == "__main__":
    main()
