"""What the FP8 activation cast's true division costs in the block's fused kernels (H100/H200).

FP8Linear quantizes its input as `x / scale` (IEEE division: ~8 instructions an element on NVIDIA GPUs);
ModelOpt's fake quantization multiplies by 448 / amax. Three of the FP8 block's fused kernels as Inductor
compiles them, each with the division and with one reciprocal a kernel and a multiply an element:
  gelu  ffn.0's output + bias -> GELU (the compiled sigmoid form) -> bf16 -> E4M3 (ffn.2's input)
  norm  residual + gate * attention output, LayerNorm, modulation -> bf16 -> E4M3 (a linear's input)
  cast  the attention output -> E4M3 (the o projection's input)
Interleaved medians (GPU time), and how many E4M3 values the two forms round differently.

    python bench/quant_recip.py --out bench/results
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import environment, interleaved, write_result
from x2v.export.dit import GELUTanh
from x2v.export.fp8 import E4M3, E4M3_MAX, quantize


def cast(x, s, form):
    """FP8Linear's activation cast (`quantize`), or the same with a reciprocal multiply."""
    if form == "div":
        return quantize(x, s)
    return (x.float() * (1.0 / s)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def gelu(h, bias, s, form):
    return cast(GELUTanh()(h + bias), s, form)  # compiled: the sigmoid form the engines use


def norm(x, y, gate, shift, scale, s, form):
    x = x + y.float() * gate
    n = (F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift).to(torch.bfloat16)
    return x, cast(n, s, form)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, n, c, f = "cuda", args.tokens, 5120, 13824
    r = lambda *s: torch.randn(*s, device=dev)
    s = torch.tensor(0.02, device=dev)
    inputs = {
        "gelu": (r(n, f).bfloat16() * 2, r(f).bfloat16() * 0.1, s),
        "norm": (r(1, n, c), r(1, n, c).bfloat16(), r(1, 1, c) * 0.1, r(1, 1, c) * 0.1, r(1, 1, c) * 0.1, s),
        "cast": (r(n, c).bfloat16() * 2, s),
    }
    fns = {"gelu": gelu, "norm": norm, "cast": cast}
    res = {"tokens": n, "forms": {}, "differ": {}}
    for name, fn in fns.items():
        calls, outs = {}, {}
        for form in ("div", "mul"):
            comp = torch.compile(lambda *a, fn=fn, form=form: fn(*a, form), dynamic=False, fullgraph=True)
            outs[form] = comp(*inputs[name])
            calls[form] = lambda comp=comp, a=inputs[name]: comp(*a)
        a, b = (o[-1] if isinstance(o, tuple) else o for o in (outs["div"], outs["mul"]))
        res["differ"][name] = {
            "count": int((a.view(torch.uint8) != b.view(torch.uint8)).sum()),
            "of": a.numel(),
        }
        res["forms"][name] = interleaved(calls, args.reps, hide_launch=True)
        print(name, res["forms"][name], res["differ"][name], flush=True)
    res["env"] = environment()
    print(write_result("quant_recip", res, args.out))


if __name__ == "__main__":
    main()
