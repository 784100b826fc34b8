"""What the first SageAttention call costs in eager torch: the card's configured tile against autotuning.

    python bench/first_call.py [--out DIR]      (GPU; writes first_call-<card>.json)

The torch backend's DiT calls the op eagerly, once a block, at one shape a request (the I2V-14B 480P
self-attention, batch 2 with guidance). Each mode runs in a fresh process with an empty Triton cache (a
new host's first request): the first call (compile, and for autotuning the timing of every candidate tile),
then the median of the next calls. `configured` is what eager calls do now (the GPU config's `sage_tile`,
as the engines compile it); `autotune` is what they did until then.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.common import write_result

SHAPE = (2, 32760, 40, 128)  # [B, L, H, D]: both guidance branches, 81 x 480 x 832

CHILD = """
import json, statistics, sys, time, torch
from x2v.plugins import sage_attention as sage
b, n, h, d = {shape}
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(b, n, h, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
def call():
    torch.cuda.synchronize(); t0 = time.perf_counter()
    sage.sage_attention(q, k, v); torch.cuda.synchronize()
    return time.perf_counter() - t0
with sage.pinned_tile(sage.AUTOTUNE if "{mode}" == "autotune" else None):
    first = call()
    rest = [call() for _ in range(5)]
print(json.dumps({{"first_call_s": first, "next_calls_median_s": statistics.median(rest)}}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"shape_blhd": list(SHAPE)}
    for mode in ("configured", "autotune"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TRITON_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, "-c", CHILD.format(shape=SHAPE, mode=mode)], env=env,
                                 capture_output=True, text=True, check=True)  # fmt: skip
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(mode, res[mode], flush=True)
    print(f"wrote {write_result('first_call', res, args.out)}")


if __name__ == "__main__":
    main()
