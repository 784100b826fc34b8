"""Compile the SageAttention kernel for sm90 (or sm89) without a GPU and show what the hardware will execute.

    pip install triton==3.6.0        # the device image's Triton; its wheel bundles ptxas and cuobjdump
    python bench/sage_sass.py [--block-m 64 --warps 4 --stages 3] [--arch 90] [--maxnreg N] [--sass FILE]

Prints the registers, spill stack and shared memory per CTA (what bounds CTAs per SM) and the instruction
mix of the key loop (the code between the first IGMMA and the loop's backward branch), per score. The
launch specializes the arguments the way a real launch does (16-byte aligned pointers, strides divisible by
16), so the counts match the GPU's: 252 registers, 0 spill and 106504 bytes at 64/4/3 on an H200.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
from pathlib import Path

SIGNATURE = {"Q": "*i8", "K": "*i8", "V": "*fp8e4nv", "QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "Out": "*bf16",
             "Lq": "i32", "Lk": "i32", "L_pad": "i32", "H": "i32", "n_kblocks": "i32",
             "s_qb": "i32", "s_qh": "i32", "s_ql": "i32", "s_kb": "i32", "s_kh": "i32", "s_kn": "i32",
             "s_ob": "i32", "s_ol": "i32", "s_oh": "i32"}  # fmt: skip
# Divisible by 16 at Wan shapes (Lq = Lk = 32760 and H = 40 are not).
ALIGNED = ("Q", "K", "V", "QS", "KS", "VS", "Out", "L_pad", "n_kblocks",
           "s_qb", "s_qh", "s_ql", "s_kb", "s_kh", "s_kn", "s_ob", "s_ol", "s_oh")  # fmt: skip


def compile_for(arch: int, block_m: int, warps: int, stages: int, head_dim: int = 128, maxnreg: int | None = None,
                block_n: int | None = None):  # fmt: skip
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from x2v.plugins import sage_kernels as K
    from x2v.plugins.sage_attention import BLOCK_N

    const = {"D": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n or BLOCK_N, "KS_BLOCK": BLOCK_N}
    names = list(SIGNATURE)
    src = ASTSource(
        fn=K.attn_body,
        signature={**SIGNATURE, **dict.fromkeys(const, "constexpr")},
        constexprs=const,
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED},
    )
    opts = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def cuobjdump(cubin: bytes, *flags: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = Path("/tmp/x2v_sage.cubin")
    path.write_bytes(cubin)
    return subprocess.run([str(tool), *flags, str(path)], capture_output=True, text=True, check=True).stdout


def loop_mix(sass: str, markers=("IGMMA", "IMMA")) -> tuple[collections.Counter, int]:
    """Opcode counts of the first loop holding one of `markers` (the key loop: its Q.K^T MMA is IGMMA on sm90,
    IMMA on sm89), per warp and key block."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", ln).group(1), 16) for ln in lines]
    for i, ln in enumerate(lines):  # loops in the order their backward branches close them
        m = re.search(r"BRA (0x[0-9a-f]+)", ln)
        if m and int(m.group(1), 16) <= addr[i]:
            body = lines[addr.index(int(m.group(1), 16)) : i + 1]
            if any(marker in b for b in body for marker in markers):
                op = r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)"
                return collections.Counter(re.match(op, b).group(1) for b in body), len(body)
    raise RuntimeError(f"no loop holding any of {markers}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-m", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--arch", type=int, default=90, choices=(89, 90))
    ap.add_argument("--block-n", type=int, default=None, help="key block (default: K's scale block, 128)")
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--sass", default=None, help="also write the whole SASS here")
    args = ap.parse_args()
    k = compile_for(
        args.arch, args.block_m, args.warps, args.stages, args.head_dim, args.maxnreg, args.block_n
    )
    usage = cuobjdump(k.asm["cubin"], "-res-usage").strip().splitlines()[-1].strip()
    sass = cuobjdump(k.asm["cubin"], "-sass")
    if args.sass:
        Path(args.sass).write_text(sass)
    print(
        f"sm{args.arch}, BLOCK_M {args.block_m}, {args.warps} warps, {args.stages} stages: {usage}; shared {k.metadata.shared} B"
    )
    ops, n = loop_mix(sass)
    scores = args.block_m * (args.block_n or 128) // (args.warps * 32)  # per thread per key block
    print(f"key loop: {n} instructions per warp per key block, {n / scores:.1f} per score")
    print("  " + ", ".join(f"{op} {c}" for op, c in ops.most_common(16)))


if __name__ == "__main__":
    main()
