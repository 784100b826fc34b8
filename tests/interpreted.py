"""Triton kernels run in Triton's CPU interpreter, in a child process (TRITON_INTERPRET is read at import)."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Triton 3.6's interpreter turns a loop bound into an int with int(array of shape (1,)), which NumPy 2.4
# refuses; take the element instead.
PATCH = """
import triton.runtime.interpreter as interp

patch = interp._patch_lang_tensor
def patched(tensor, scope):
    patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = patched
"""


def run_interpreted(script: str) -> str:
    """Run `script` (from the repository root) with kernels interpreted; its stdout. A failure shows stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", PATCH + textwrap.dedent(script)], capture_output=True, text=True,
                         env=env, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def fp8_steps_against(out, pre):
    """(most E4M3 steps between a kernel's interpreted `out` and torch's cast of `pre`, the fraction left out).
    The interpreter's FP8 rounding does not carry into the exponent (1.111b rounds up to 1.000b at the same
    exponent), so the elements whose correct rounding carries are left out."""
    import torch

    from bench.common import fp8_steps

    ref = pre.clamp(-448, 448).to(torch.float8_e4m3fn)
    cut = (pre.view(torch.int32) & ~((1 << 20) - 1)).view(torch.float32)
    carries = torch.frexp(ref.float())[1] != torch.frexp(cut)[1]
    return fp8_steps(out[~carries], ref[~carries]).max().item(), carries.float().mean().item()
