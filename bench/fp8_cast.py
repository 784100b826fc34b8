"""The compiled E4M3 cast without Inductor's clamp: bit-exactness and what it saves (one GPU, sm89+).

    python bench/fp8_cast.py [--out DIR]        (writes fp8_cast-<card>.json)

1. Exactness: `export.fp8.quantize_by` compiled (no clamp: Triton's saturating conversion) against its eager
   form (clamp, then cast) on values around and past +-448, +-inf, NaN, subnormals and 64 M random values.
2. Time, at the 14B model's 480P shapes, of the kernels Inductor writes: the FFN's GELU + cast
   ([32760, 13824] bf16), the block's first LayerNorm + modulation + cast for q, k and v ([32760, 5120]
   float32; three FP8 tensors as before, or one shared), each with and without the clamp, interleaved.
   A hand-written Triton GELU + cast, rounding GELU's output to bf16 as the eager module does, is timed beside
   them (measured slower, 0.456-0.462 ms, and 1.6 % of its codes differ from Inductor's: bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.common import interleaved, write_result
from x2v.export import fp8
from x2v.export.dit import GELUTanh

L, C, FFN = 32760, 5120, 13824


def special_values() -> torch.Tensor:
    edges = [0.0, -0.0, 1e-9, -1e-9, 2.0**-9, 2.0**-10, 447.9, 448.0, 448.1, 463.9, 464.0, 464.1, 479.9, 480.0,
             480.1, 500.0, 1e4, 3e38, float("inf"), float("-inf"), float("nan")]  # fmt: skip
    v = torch.tensor(edges + [-e for e in edges[2:]], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    rnd = (
        torch.randn(1 << 26, generator=g)
        * torch.logspace(-6, 3, 1 << 26)[torch.randperm(1 << 26, generator=g)]
    )
    return torch.cat([v, rnd]).cuda()


def exactness() -> dict:
    x = special_values()
    res = {}
    for dt in (torch.float32, torch.bfloat16):
        xi = x.to(dt)
        for inv_value in (1.0, 0.37, 3.3):
            inv = torch.tensor(inv_value, device="cuda")
            eager = fp8.quantize_by(xi, inv)
            compiled = torch.compile(fp8.quantize_by, fullgraph=True, dynamic=False)(xi, inv)
            a, b = eager.view(torch.uint8), compiled.view(torch.uint8)
            nan_a, nan_b = eager.float().isnan(), compiled.float().isnan()
            res[f"{dt}, inv {inv_value}"] = {
                "values": xi.numel(),
                "bytes_differing": int((a != b).sum()),
                "nan_positions_equal": bool(torch.equal(nan_a, nan_b)),
                "saturated": int((eager.float().abs() == 448).sum()),
            }
            torch._dynamo.reset()
    return res


@triton.jit
def gelu_cast_kernel(h, out, inv_scale, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(h + offs, mask=offs < n).to(tl.float32)
    g = (y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))).to(tl.bfloat16).to(tl.float32)
    tl.store(out + offs, (g * tl.load(inv_scale)).to(tl.float8e4nv), mask=offs < n)


def gelu_cast_hand(h, inv, block=2048, warps=8):
    out = torch.empty_like(h, dtype=torch.float8_e4m3fn)
    gelu_cast_kernel[(triton.cdiv(h.numel(), block),)](h, out, inv, h.numel(), BLOCK=block, num_warps=warps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    res = {"exactness": exactness()}
    print("exactness", json.dumps(res["exactness"]), flush=True)

    torch.manual_seed(0)
    h = torch.randn(L, FFN, device="cuda", dtype=torch.bfloat16) * 2
    inv_h = torch.tensor(448 / 9.0, device="cuda")
    gelu = GELUTanh()
    x = torch.randn(1, L, C, device="cuda") * 3 + 0.5
    mod = torch.randn(1, 3, C, device="cuda") * 0.1
    invs = [torch.tensor(448 / 5.0, device="cuda") for _ in range(3)]  # q, k and v's (equal) scales

    def clamped(x, inv):  # quantize_by as compiled before 2026-11-29: the clamp in every graph
        return (x.float() * inv).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.E4M3)

    def modulated(x, mod):  # the block's first LayerNorm + modulation, rounded to the compute dtype
        return (F.layer_norm(x, (C,), eps=1e-6) * (1 + mod[:, 1:2]) + mod[:, 0:1]).to(torch.bfloat16)

    calls, outs, code = {}, {}, {}
    from torch._inductor.utils import run_and_get_code

    # Each variant is its own function (no flag flipped between compiles: a compiled function re-traces with
    # the globals it finds when it is called).
    with torch.no_grad():
        for tag, cast in (("clamp", clamped), ("saturating cast", fp8.quantize_by)):
            gelu_cast = torch.compile(lambda h, inv, cast=cast: cast(gelu(h), inv), fullgraph=True)
            outs[f"gelu + cast, {tag}"], src = run_and_get_code(gelu_cast, h, inv_h)
            code[f"gelu + cast, {tag}"] = src[0][-6000:]
            res.setdefault("clamp_in_gelu_kernel", {})[tag] = "clamp" in src[0]  # Inductor names it after it
            calls[f"gelu + cast, {tag}"] = lambda f=gelu_cast: f(h, inv_h)
            three = torch.compile(lambda x, mod, cast=cast: [cast(modulated(x, mod), i) for i in invs])
            one = torch.compile(lambda x, mod, cast=cast: cast(modulated(x, mod), invs[0]))
            outs[f"norm + cast x3, {tag}"] = three(x, mod)[0]
            outs[f"norm + cast x1, {tag}"] = one(x, mod)
            calls[f"norm + cast x3, {tag}"] = lambda f=three: f(x, mod)
            calls[f"norm + cast x1, {tag}"] = lambda f=one: f(x, mod)
        gelu_bf16 = torch.compile(gelu, fullgraph=True)
        calls["gelu bf16 (no cast)"] = lambda: gelu_bf16(h)
        outs["gelu + cast, hand-written"] = gelu_cast_hand(h, inv_h)
        calls["gelu + cast, hand-written"] = lambda: gelu_cast_hand(h, inv_h)
        for fn in calls.values():  # compiled at the first call
            fn()
        torch.cuda.synchronize()
        res["ms"] = interleaved(calls, args.reps)
        print("ms", json.dumps(res["ms"]), flush=True)
        ref = outs["gelu + cast, clamp"].view(torch.uint8)
        res["gelu_bytes_differing_from_clamp"] = {
            k: int((o.view(torch.uint8) != ref).sum()) for k, o in outs.items() if k.startswith("gelu")
        }
        ref = outs["norm + cast x3, clamp"].view(torch.uint8)
        res["norm_bytes_differing_from_clamp"] = {
            k: int((o.view(torch.uint8) != ref).sum()) for k, o in outs.items() if k.startswith("norm")
        }
        print("differing", res["gelu_bytes_differing_from_clamp"], res["norm_bytes_differing_from_clamp"])
    res["inductor_code_tail"] = code
    print(f"wrote {write_result('fp8_cast', res, args.out)}")


if __name__ == "__main__":
    main()
