"""Why SageAttention's quantization kernels are slow inside an AOTInductor package: a probe.

    python bench/sage_quant_package.py [--out DIR]     (writes sage_quant_package-<card>.json)

An earlier block-engine run found the op's Q/K quantization kernel at 4.1 ms inside a package against 0.28 ms
eager for the same inputs, so the engines quantize with torch ops Inductor fuses (about 1.2 ms a block more than
the SDPA block's norm + RoPE). This compiles the op alone (pinned tile, quantization by its own kernels) at
1x32760x40x128 and records, beside the eager launch: each kernel's GPU time in both, and what the package holds
for the quantization kernels (their compile metadata and the wrapper lines that launch them), to compare the
launch (grid, warps, specialization) with eager Triton's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import zipfile
from pathlib import Path

import torch

from bench.attention import make_inputs
from bench.common import kernel_breakdown, write_result
from bench.engine_forward import sage_op_package
from x2v.plugins import sage_attention as sage

TILE = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}


def package_facts(path: Path) -> dict:
    """Files of the package and, for the quantization kernels, their metadata and launch lines."""
    facts = {"files": [], "metadata": {}, "launch_lines": []}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            facts["files"].append(name)
            low = name.lower()
            if "quant" in low and name.endswith(".json"):
                facts["metadata"][name] = json.loads(z.read(name))
            if name.endswith((".cpp", ".py")):
                lines = z.read(name).decode(errors="replace").splitlines()
                for i, line in enumerate(lines):
                    if "quant_" in line and (
                        "launch" in line.lower() or "grid" in line.lower() or "(" in line
                    ):
                        facts["launch_lines"].append(f"{name}:{i}: " + " | ".join(lines[i : i + 6])[:1200])
    facts["launch_lines"] = facts["launch_lines"][:40]
    return facts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (t.to(torch.bfloat16) for t in make_inputs(1, 40, 32760, 128, "realistic", gen))
    res = {"shape": [1, 32760, 40, 128], "tile": TILE}
    sage.TILE, sage.TRACED_QUANT = TILE, "kernels"
    with torch.no_grad():
        res["eager_quantize"] = kernel_breakdown(lambda: sage.quantize_pass(q, k, v), top=8)
        res["eager_op"] = kernel_breakdown(lambda: torch.ops.x2v.sage_attention(q, k, v), top=8)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "op.pt2"
            op = sage_op_package(q, k, v, path)
            out = op(q, k, v)
            ref = torch.ops.x2v.sage_attention(q, k, v)
            res["package_vs_eager_max_abs"] = float((out.float() - ref.float()).abs().max())
            res["package_op"] = kernel_breakdown(lambda: op(q, k, v), top=8)
            res["package"] = package_facts(path)
    for key in ("eager_quantize", "eager_op", "package_op"):
        print(key, json.dumps(res[key]["top_ms"])[:1500], flush=True)
    print("metadata", json.dumps(res["package"]["metadata"])[:3000])
    print("\n".join(res["package"]["launch_lines"][:12])[:4000])
    print(f"wrote {write_result('sage_quant_package', res, args.out)}")


if __name__ == "__main__":
    main()
