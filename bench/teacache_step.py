"""Why a computed step of the speed table's TeaCache rows is slower than the fp8 row's (GPU, one engine pipeline).

    python bench/teacache_step.py --engines DIR [--ckpt DIR] [--steps 8] [--rounds 2] [--out DIR]
                                                                  (writes teacache_step-<card>.json)

In the b2a4363 sitting a computed step took 3.766 s in `fp8-teacache-published` against 3.744 s in `fp8`, the same
engines and code (3.75 against 3.74 s at 40217a8): about 22 ms a step, 0.5 s of the published row's 85.2 s. The
TeaCache path adds one subtraction per branch (the residual, about 1 ms), so most of it is unexplained. Here one
pipeline runs, in alternating rounds, the same request under three schedules and times every step as
bench/table.py does (a synchronize after each step):
  plain       no TeaCache (the fp8 row);
  cached      every step computed, TeaCache's residual kept (what a computed step adds by itself);
  published   the published row's schedule (computed and skipped steps alternate).
The allocator's counters around each request (device allocations and frees, expandable-segment growth, retries)
say whether the alternation makes it map or unmap memory.

Measured (H200, bf16 + Sage engines, 76ef200: teacache_step-h200.json): the three within 0.05 %, and the same
allocator traffic in each; so the sitting's 22 ms lies between the rows' processes, not in the TeaCache path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import write_result
from bench.table import IMAGE, PROMPT, SEED, published_plan

COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams",
            "reserved_bytes.all.allocated", "reserved_bytes.all.freed")  # fmt: skip


def counters() -> dict:
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in COUNTERS}


def run(pipe, plan, steps: int) -> dict:
    """One request; the seconds of each step after the first, whether it computed, and the allocator's deltas."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    marks = []
    before = counters()
    t0 = time.perf_counter()
    pipe.generate(image=IMAGE, prompt=PROMPT, seed=SEED, steps=steps, skip_plan=plan,
                  progress=lambda i: (sync(), marks.append(time.perf_counter())))  # fmt: skip
    e2e = time.perf_counter() - t0
    after = counters()
    computes = plan.computes if plan is not None else (True,) * steps
    step_s = [float(d) for d in np.diff(marks)]
    return {
        "e2e_s": e2e,
        "step_s": step_s,
        "computed_step_s": [s for s, c in zip(step_s, computes[1:]) if c],
        "skipped_step_s": [s for s, c in zip(step_s, computes[1:]) if not c],
        "allocator": {k: after[k] - before[k] for k in after},
        "reserved_gb": torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else None,
    }


def main():
    from x2v.runtime.pipeline import Pipeline
    from x2v.runtime.teacache import TeaCachePlan

    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", required=True)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    n = args.steps
    pipe = Pipeline.from_engines(Path(args.engines), Path(args.ckpt) if args.ckpt else None)
    plans = {
        "plain": None,
        "cached": TeaCachePlan((True,) * n, 0.2, "every step"),
        "published": published_plan(n, round(22 * n / 40)),
    }
    res = {
        "steps": n,
        "rounds": args.rounds,
        "published_plan": plans["published"].describe(),
        "load_s": pipe.load_s,
    }
    runs = {name: [] for name in plans}
    names = list(plans)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # each round starts one further along
            out = run(pipe, plans[name], n)
            runs[name].append(out)
            print(f"round {r} {name}: computed steps {[round(s, 4) for s in out['computed_step_s']]}, "
                  f"skipped {[round(s, 4) for s in out['skipped_step_s']]}, allocator {out['allocator']}", flush=True)  # fmt: skip
    res["runs"] = runs
    res["computed_step_median_s"] = {
        name: statistics.median(s for o in outs for s in o["computed_step_s"]) for name, outs in runs.items()
    }
    base = res["computed_step_median_s"]["plain"]
    res["computed_step_vs_plain"] = {name: v / base for name, v in res["computed_step_median_s"].items()}
    print(json.dumps({k: res[k] for k in ("computed_step_median_s", "computed_step_vs_plain")}, indent=1))
    print(f"wrote {write_result('teacache_step', res, args.out)}")


if __name__ == "__main__":
    main()
