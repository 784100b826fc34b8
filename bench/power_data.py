"""Does the data change the speed at the power limit? The big kernels on iid, token-smooth and zero inputs (GPU).

    python bench/power_data.py [--out DIR] [--seconds 6]      (writes power_data-<card>.json)

Why: every speed figure here is measured with random weights and random inputs, on the premise that they
cost the same FLOPs as real ones. At the card's 700 W limit (power-h200.json) time follows energy, and the
energy of a tensor-core kernel depends on how many operand bits toggle. Real video activations are not iid:
neighbouring tokens (adjacent patches of a frame) carry similar features. This measures how far that alone
moves the kernels, with the same harness as bench/power.py (back to back for --seconds, nvidia-smi every
100 ms). Weights stay iid Gaussian in every case; only the activations (GEMM rows, Q/K/V tokens) change:
  iid     unit Gaussian, independent per token (what every other bench uses)
  smooth  unit Gaussian noise averaged over a sliding window of 16 tokens (rescaled to unit variance), so
          neighbouring tokens correlate about 0.94
  zeros   all zero: the least toggling there is (a floor, not a workload)
Not a claim about real weights, which could not be measured here.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.common import write_result
from bench.power import cool_and_sample, tensor_core_work
from x2v.runtime.config import load_gpu_config

WINDOW = 16


def tokens(kind: str, n: int, c: int) -> torch.Tensor:
    """[n, c] float32 activations on the GPU, rows are tokens."""
    x = torch.randn(n, c, device="cuda")
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "smooth":
        x = F.avg_pool1d(x.t()[None], WINDOW, stride=1, padding=WINDOW // 2, count_include_pad=False)[0].t()[
            :n
        ]
        x = (x / x.std()).contiguous()
    return x


def neighbour_correlation(x: torch.Tensor) -> float:
    a, b = x[:-1].flatten().float(), x[1:].flatten().float()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.abs().sum() else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()

    torch.manual_seed(0)
    n, h, d = 32760, 40, 128
    tile = load_gpu_config("h200").sage_tile
    w8 = torch.randn(13824, 5120, device="cuda").to(torch.float8_e4m3fn)
    res = {"seconds": args.seconds, "window": WINDOW}
    for kind in ("iid", "smooth", "zeros"):
        x = tokens(kind, n, 5120)
        res[f"neighbour_correlation_{kind}"] = neighbour_correlation(x[:4096])
        q, k, v = (tokens(kind, n, h * d).view(1, n, h, d).bfloat16() for _ in range(3))
        for name, fn in tensor_core_work(q, k, v, x.to(torch.float8_e4m3fn), w8, tile).items():
            res[f"{name}_{kind}"] = r = cool_and_sample(fn, args.seconds)
            print(name, kind, json.dumps(r), flush=True)
    for name in ("fp8_gemm_32760x5120x13824", "sage_attention_1x40x32760x128", "sdpa_bf16_1x40x32760x128"):
        base = res[f"{name}_iid"]["ms_mean_sustained"]
        res[f"{name}_sustained_vs_iid"] = {
            kind: res[f"{name}_{kind}"]["ms_mean_sustained"] / base for kind in ("smooth", "zeros")
        }
        print(name, "sustained time against iid:", res[f"{name}_sustained_vs_iid"])
    print(f"wrote {write_result('power_data', res, args.out)}")


if __name__ == "__main__":
    main()
