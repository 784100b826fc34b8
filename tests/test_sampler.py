"""Samplers against diffusers' UniPCMultistepScheduler (the oracle) and Wan's schedule formula."""

import numpy as np
import pytest
import torch

from x2v.runtime.sampler import Euler, UniPC, euler_schedule, unipc_schedule

diffusers = pytest.importorskip("diffusers")


def wan_sigmas(steps, shift):
    """Wan's FlowUniPCMultistepScheduler: linspace(sigma_max=0.999, 0) shifted, plus a final 0."""
    s = np.linspace(0.999, 0, steps + 1)[:-1]
    return np.append(shift * s / (1 + (shift - 1) * s), 0.0)


def toy_flow(x, t):
    return torch.tanh(x) * 0.7 + 0.001 * t * torch.cos(x)


@pytest.mark.parametrize("steps", [4, 40, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_unipc_matches_diffusers_over_full_schedules(steps, shift):
    schedule = unipc_schedule(steps, shift)
    np.testing.assert_allclose(schedule.sigmas, wan_sigmas(steps, shift), rtol=1e-6, atol=1e-7)
    oracle = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=1.0, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")  # fmt: skip
    oracle.set_timesteps(sigmas=np.array(schedule.sigmas[:-1], dtype=np.float64))
    assert [int(t) for t in oracle.timesteps] == [int(t) for t in schedule.timesteps]
    x = torch.randn(1, 4, 3, 6, 5)
    ours, ref, sampler = x.clone(), x.clone(), UniPC(schedule)
    for i, t in enumerate(schedule.timesteps):
        ref = oracle.step(toy_flow(ref, t), oracle.timesteps[i], ref).prev_sample
        ours = sampler.step(i, toy_flow(ours, t), ours)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_euler_distilled_schedule():
    s = euler_schedule((1000, 750, 500, 250), shift=5.0)
    np.testing.assert_allclose(s.sigmas, [1.0, 0.9375, 2.5 / 3, 0.625, 0.0], rtol=1e-7)
    np.testing.assert_allclose(s.timesteps, [1000, 937.5, 2500 / 3, 625], rtol=1e-7)
    x, v = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(Euler(s).step(3, v, x), x - 0.625 * v)  # last step lands on x0
