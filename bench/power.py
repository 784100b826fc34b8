"""Board power and SM clock while the FP8 engine's big kernels run back to back (GPU, full size).

    python bench/power.py [--out DIR] [--seconds 6]      (writes power-<card>.json)

Why: in the FP8 block, work taken out of the memory-bound kernels did not come back as block time. The fused
Q/K preparation saved 2.5 ms of them and the attention kernel ran 2.4 ms slower in the same block
(block_qkprep-h200.json), and the table's step time stayed at 3.85 s after the block engine had lost about
1.3 ms elsewhere. If the card sits at its power limit under sustained FP8/INT8 tensor-core work, its clock
falls there, and the low-power memory-bound kernels are where the board recovers.

Each workload runs back to back for --seconds while nvidia-smi samples every 100 ms: power draw, SM clock and
the active clock-event reasons (software power cap, thermal). The time per call is taken at the start (the
first calls, from a cool board) and over the whole run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch

from bench.common import event_ms, write_result
from x2v.plugins import sage_attention as sage
from x2v.runtime.config import load_gpu_config

QUERY = "power.draw,power.limit,clocks.sm,clocks.max.sm,temperature.gpu,clocks_event_reasons.sw_power_cap,clocks_event_reasons.hw_slowdown"


def sampled(fn, seconds: float) -> dict:
    """Run fn back to back for `seconds`, sampling the board; per-call ms of the first 5 calls and overall."""
    first = [event_ms(fn) for _ in range(5)]
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    t0, calls = time.perf_counter(), 0
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
        if calls % 4 == 0:
            torch.cuda.synchronize()  # keep the host within a few calls of the GPU, so samples match the work
    end.record()
    torch.cuda.synchronize()
    smi.terminate()
    rows = [r.split(", ") for r in smi.communicate()[0].strip().splitlines()]
    if not rows or len(rows[0]) != len(QUERY.split(",")):
        raise SystemExit(f"nvidia-smi did not answer the query {QUERY!r}: {rows[:2]}")
    rows = rows[len(rows) // 5 :]  # steady state: drop the first fifth

    def med(i):
        v = sorted(float(r[i]) for r in rows if r[i].replace(".", "").isdigit())
        return v[len(v) // 2] if v else None

    return {
        "ms_first5_median": sorted(first)[2],
        "ms_mean_sustained": start.elapsed_time(end) / calls,
        "calls": calls,
        "samples": len(rows),
        "power_w_median": med(0),
        "power_limit_w": med(1),
        "sm_clock_mhz_median": med(2),
        "sm_clock_max_mhz": med(3),
        "temperature_c_median": med(4),
        "power_capped_fraction": sum(r[5].strip() == "Active" for r in rows) / max(len(rows), 1),
        "hw_slowdown_fraction": sum(r[6].strip() == "Active" for r in rows) / max(len(rows), 1),
    }


def cool_and_sample(fn, seconds: float) -> dict:
    """One call (compiles, plans), 2 s idle so that the first calls start from a cool board, then sampled()."""
    fn()
    torch.cuda.synchronize()
    time.sleep(2.0)
    return sampled(fn, seconds)


def tensor_core_work(q, k, v, x8, w8, tile) -> dict:
    """The FP8 block's big tensor-core kernels as callables: the attention (ours at `tile`, and SDPA) on q, k, v
    [1, L, H, D], and the FFN's FP8 GEMM with fast accumulation on x8 [L, 5120] and w8 [13824, 5120]."""
    from x2v.plugins import sage_kernels as K

    one = torch.ones((), device="cuda")
    return {
        "sage_attention_1x40x32760x128": lambda: sage.launch(q, k, v, lambda f: f, K.attn_body, **tile),
        "sdpa_bf16_1x40x32760x128": lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ),
        "fp8_gemm_32760x5120x13824": lambda: torch._scaled_mm(
            x8, w8.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True
        ),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()

    torch.manual_seed(0)
    b, n, h, d = 1, 32760, 40, 128
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    tile = load_gpu_config("h200").sage_tile  # the tile the H200 engines compile with
    x8 = torch.randn(n, 5120, device="cuda").to(torch.float8_e4m3fn)
    w8 = torch.randn(13824, 5120, device="cuda").to(torch.float8_e4m3fn)
    xb, wb = x8.bfloat16(), w8.bfloat16()
    big = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")  # 2 GiB copies: the memory-bound case
    work = {
        **tensor_core_work(q, k, v, x8, w8, tile),
        "bf16_gemm_32760x5120x13824": lambda: xb @ wb.t(),
        "copy_2GiB": lambda: big.roll(1),
    }
    res = {"seconds": args.seconds}
    for name, fn in work.items():
        res[name] = cool_and_sample(fn, args.seconds)
        print(name, json.dumps(res[name]), flush=True)
    print(f"wrote {write_result('power', res, args.out)}")


if __name__ == "__main__":
    main()
