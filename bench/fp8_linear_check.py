"""FP8Linear's GPU product in each scaling mode against float math (GPU with FP8 tensor cores).

    python bench/fp8_linear_check.py [--out DIR]      (writes fp8_linear_check-<card>.json)

The product adds the bias in torch._scaled_mm's epilogue and quantizes activations by a multiply with the
reciprocal scale. Per mode (per-tensor weights with a static activation scale, ModelOpt's recipe; per-channel
weights, static; per-channel weights with per-token activations, LightX2V's checkpoints) and with and without
fast accumulation: the relative L2 error against the same quantized operands multiplied in float64 with the bias
added, and against the previous form (bias added to the rounded bf16 output). A refused bias or a wrong scale
layout fails here before an engine is built with it.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import environment, rel_err, write_result
from x2v.export.fp8 import E4M3_MAX, FP8Linear, configure_fp8, quantize, quantize_by, token_scales


def linear(k: int, n: int, channel: bool, static: bool, x: torch.Tensor) -> FP8Linear:
    gen = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(n, k, generator=gen, device="cuda") * 0.02
    lin = FP8Linear(k, n, channel=channel, static=static).cuda()
    ws = (w.abs().amax(1) if channel else w.abs().amax()) / E4M3_MAX
    lin.weight.copy_(quantize(w, ws[:, None] if channel else ws))
    lin.weight_scale.copy_(ws)
    lin.bias.copy_(torch.randn(n, generator=gen, device="cuda").bfloat16())
    if static:
        lin.input_scale.copy_(x.abs().amax().float() / E4M3_MAX)
    return lin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    m, k, n = 4096, 5120, 5120
    x = (torch.randn(m, k, device="cuda") * 3).bfloat16()
    res = {"shape": [m, k, n], "modes": {}}
    for channel, static in ((False, True), (True, True), (True, False)):
        for fast in (False, True):
            lin = linear(k, n, channel, static, x)
            configure_fp8(lin, "cuda", fast_accum=fast)
            out = lin(x)
            xs = lin.input_scale.float() if static else token_scales(x)
            q = quantize_by(x, 1.0 / xs)  # as the module quantizes
            ws = lin.weight_scale.double()
            exact = (q.double() * xs.double()) @ (lin.weight.double() * (ws[:, None] if channel else ws)).t()
            exact = exact + lin.bias.double()
            rowwise = channel or not static
            scale_b = (ws.float()[None] if channel else ws.float().expand(1, n)) if rowwise else ws.float()
            scale_a = xs.expand(m, 1).contiguous() if rowwise else xs
            prev = torch._scaled_mm(q, lin.weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                                    use_fast_accum=fast) + lin.bias  # the previous form: bias added after  # fmt: skip
            name = (
                ("channel" if channel else "tensor")
                + ("-static" if static else "-per-token")
                + ("-fast" * fast)
            )
            res["modes"][name] = {
                "vs_float64": rel_err(out.float(), exact),
                "bias_after_vs_float64": rel_err(prev.float(), exact),
                "vs_bias_after": rel_err(out.float(), prev.float()),
            }
            print(name, res["modes"][name], flush=True)
    res["env"] = environment()
    print(write_result("fp8_linear_check", res, args.out))


if __name__ == "__main__":
    main()
