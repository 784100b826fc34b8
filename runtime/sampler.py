"""Flow-matching samplers as Wan2.1 uses them: UniPC (order 2, bh2, x0-prediction) and Euler (distilled).

A sampler is built from the full sigma schedule before the loop; every coefficient is a Python float,
so stepping never synchronizes with the GPU. Latents stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def shift_sigma(sigma, shift: float):
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple[float, ...]  # what the DiT sees, 0..1000, one per step
    sigmas: tuple[float, ...]  # noise levels, one more than steps (the last is 0)


def unipc_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> Schedule:
    """Wan's FlowUniPCMultistepScheduler.set_timesteps: sigmas linspace(1 - 1/1000, 0) shifted, final 0;
    the DiT gets the timesteps truncated to integers as Wan does."""
    base = np.linspace(1 - 1 / num_train_timesteps, 0, steps + 1)[:-1]
    sigmas = shift_sigma(base, shift)
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    return Schedule(tuple(float(t) for t in timesteps), tuple(float(s) for s in sigmas))


def euler_schedule(timesteps: tuple[int, ...], shift: float, num_train_timesteps: int = 1000) -> Schedule:
    """Step-distilled models: fixed timesteps out of 1000, shifted; the DiT sees sigma * 1000."""
    sigmas = [float(shift_sigma(t / num_train_timesteps, shift)) for t in timesteps]
    return Schedule(tuple(s * num_train_timesteps for s in sigmas), tuple(sigmas) + (0.0,))


def _lam(sigma: float) -> float:
    """log-SNR of a flow-matching noise level: log((1 - sigma) / sigma)."""
    return math.inf if sigma == 0 else math.log(1 - sigma) - math.log(sigma)


def _bh2_terms(h: float, order: int) -> tuple[float, float, np.ndarray]:
    """(h_phi_1, B_h, b) of UniPC's bh2 variant in x0-prediction form, for `order` terms."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1 if math.isfinite(hh) else -1.0
    b, fact = [], 1
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / h_phi_1)
        fact *= i + 1
        h_phi_k = (h_phi_k / hh - 1 / fact) if math.isfinite(hh) else -1 / fact
    return h_phi_1, h_phi_1, np.array(b)


class UniPC:
    """UniPC multistep (predictor + corrector), order 2, bh2, lower order at the first and last step."""

    def __init__(self, schedule: Schedule, order: int = 2):
        self.sig, self.order = schedule.sigmas, order
        self.n = len(schedule.timesteps)
        self.x0s: list[torch.Tensor] = []  # the last `order` x0 predictions
        self.last_x: torch.Tensor | None = None
        self.last_order = 0

    def step(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Flow prediction v at step i on latents x -> latents at step i + 1."""
        x0 = x - self.sig[i] * v.float()
        if i > 0:
            x = self._update(x0, self.last_x, src=i - 1, dst=i, order=self.last_order, corrector=True)
        self.x0s = (self.x0s + [x0])[-self.order :]
        order = min(self.order, self.n - i, i + 1)
        self.last_x, self.last_order = x, order
        return self._update(None, x, src=i, dst=i + 1, order=order, corrector=False)

    def _update(self, x0_new, x, src: int, dst: int, order: int, corrector: bool) -> torch.Tensor:
        s0, st = self.sig[src], self.sig[dst]
        h = _lam(st) - _lam(s0)
        m0 = self.x0s[-1]
        # Earlier x0 predictions, as divided differences at their log-SNR offsets r_k.
        rks, d1s = [], []
        for k in range(1, order):
            r = (_lam(self.sig[src - k]) - _lam(s0)) / h
            rks.append(r)
            d1s.append((self.x0s[-(k + 1)] - m0) / r)
        h_phi_1, b_h, b = _bh2_terms(h, order)
        alpha_t = 1 - st
        out = (st / s0) * x - (alpha_t * h_phi_1) * m0
        R = np.stack([np.array(rks + [1.0]) ** j for j in range(order)])
        if corrector:
            rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
            res = sum(float(r) * d for r, d in zip(rhos[:-1], d1s)) + float(rhos[-1]) * (x0_new - m0)
        else:
            if not d1s:
                return out
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            res = sum(float(r) * d for r, d in zip(rhos, d1s))
        return out - (alpha_t * b_h) * res


class Euler:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v: the sampler of the step-distilled models."""

    def __init__(self, schedule: Schedule):
        self.sig = schedule.sigmas

    def step(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + (self.sig[i + 1] - self.sig[i]) * v.float()


def make_sampler(solver: str, schedule: Schedule):
    makers = {"unipc": UniPC, "euler": Euler}
    if solver not in makers:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(makers)}")
    return makers[solver](schedule)
