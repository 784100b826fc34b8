"""TeaCache: skip the DiT blocks on steps whose timestep modulation barely changed, reusing the residual.

The signal (relative L1 change of the time embedding `e`, or of the 6-way projection `e0`) depends only
on the timestep, so the whole skip schedule is computed before the loop from one batched `time()` call:
no GPU->CPU synchronization per step, and the schedule can be printed up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TeaCachePlan:
    computes: tuple[bool, ...]  # per step: run the blocks (True) or reuse the cached residual (False)
    threshold: float
    signal: str

    @property
    def computed(self) -> int:
        return sum(self.computes)

    def describe(self) -> str:
        marks = "".join("#" if c else "." for c in self.computes)
        return f"teacache {self.threshold} ({self.signal}): {self.computed}/{len(self.computes)} steps computed [{marks}]"


def plan(time_fn, timesteps, coefficients, threshold: float, signal: str = "e", device="cpu") -> TeaCachePlan:
    """The skip schedule TeaCache4Wan2.1 would follow, per guidance branch (both branches share it).

    signal 'e': time embedding, steps 0 and n-1 always computed. signal 'e0': 6-way projection, the first
    5 steps computed (the published "ret_steps" variant). threshold <= 0 computes every step.
    """
    n = len(timesteps)
    if threshold <= 0:
        return TeaCachePlan((True,) * n, threshold, signal)
    with torch.no_grad():
        e, e0 = time_fn(torch.tensor(timesteps, dtype=torch.float32, device=device))
    mod = (e if signal == "e" else e0).float().flatten(1)
    rel = ((mod[1:] - mod[:-1]).abs().mean(1) / mod[:-1].abs().mean(1)).cpu().double().numpy()
    poly = np.poly1d(coefficients)
    first, last = (1, n - 1) if signal == "e" else (5, n)
    computes, acc = [], 0.0
    for i in range(n):
        if i < first or i >= last:
            computes.append(True)
            acc = 0.0
            continue
        acc += float(poly(rel[i - 1]))
        skip = acc < threshold
        computes.append(not skip)
        if not skip:
            acc = 0.0
    return TeaCachePlan(tuple(computes), threshold, signal)


class TeaCache:
    """The cached block residual of one stream of DiT calls (one guidance branch, or a batched pair)."""

    def __init__(self):
        self.residual: torch.Tensor | None = None

    def run_blocks(self, blocks, compute: bool, tokens, *args, **kw):
        if compute or self.residual is None:
            out = blocks(tokens, *args, **kw)
            old = self.residual
            if old is not None and (old.shape, old.dtype, old.device) == (out.shape, out.dtype, out.device):
                # into the old buffer: no second residual-sized block (0.66 GB a branch at 480P) beside it
                torch.sub(out, tokens, out=old)
            else:
                self.residual = out - tokens
            return out
        return tokens + self.residual
