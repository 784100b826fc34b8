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
