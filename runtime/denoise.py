"""The denoising loop, written once over a DiT callable (torch model or engines, same interface).

A DiT callable has `time(t)`, `pre(x, t, context, clip_fea, y)`, `run_blocks(tokens, e0, ctx, cos, sin,
shared=None)` and `post(tokens, e, grid)`; `grid(shape)` gives the token grid of a latent shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from x2v.runtime.teacache import TeaCache, TeaCachePlan


@dataclass
class Conditioning:
    """What one guidance branch feeds the DiT: text states and, for I2V, CLIP features and the mask+latent y."""

    context: torch.Tensor  # [B, text_len, text_dim]
    clip_fea: torch.Tensor | None = None  # [B, clip_tokens, clip_dim]
    y: torch.Tensor | None = None  # [B, 4 + z, T, h, w]

    def cat(self, other: Conditioning) -> Conditioning:
        join = lambda a, b: None if a is None else torch.cat([a, b])
        return Conditioning(
            join(self.context, other.context), join(self.clip_fea, other.clip_fea), join(self.y, other.y)
        )


def dit_call(
    dit, x, t, cond: Conditioning, cache: TeaCache | None, compute: bool, shared: dict | None = None
):
    """One DiT evaluation -> flow [B, z, T, h, w]. shared: a dict that the guidance branches of one step, run one
    after the other, pass in turn. They enter block 0 with the same tokens and timestep and only the text
    differs, so block 0's self-attention (about half a block) runs in the first branch and the others start
    from its output, which run_blocks keeps there."""
    tokens, e, e0, ctx, cos, sin = dit.pre(x, t, cond.context, cond.clip_fea, cond.y)
    if cache is None:
        tokens = dit.run_blocks(tokens, e0, ctx, cos, sin, shared=shared)
    else:
        tokens = cache.run_blocks(dit.run_blocks, compute, tokens, e0, ctx, cos, sin, shared=shared)
    return dit.post(tokens, e, dit.grid(x.shape))


def denoise(dit, noise, schedule, sampler, cond: Conditioning, uncond: Conditioning | None = None,
            guide_scale: float = 5.0, plan: TeaCachePlan | None = None, batch_cfg: bool = True,
            on_step=None) -> torch.Tensor:  # fmt: skip
    """Run every step of `schedule` from `noise` [1, z, T, h, w] -> final latents (float32).

    uncond None (or guide_scale 1) runs one DiT pass a step. With guidance, the conditional and
    unconditional passes run as one batch-2 call (batch_cfg) or one after the other (less memory).
    """
    guided = uncond is not None and guide_scale != 1.0
    both = cond.cat(uncond) if guided and batch_cfg else None
    caches = [TeaCache(), TeaCache()] if plan is not None else [None, None]
    x = noise.float()
    for i, t_val in enumerate(schedule.timesteps):
        compute = True if plan is None else plan.computes[i]
        t = torch.full((1,), t_val, dtype=torch.float32, device=x.device)
        if not guided:
            v = dit_call(dit, x, t, cond, caches[0], compute)
        elif both is not None:
            v_cond, v_uncond = dit_call(
                dit, x.expand(2, -1, -1, -1, -1), t.expand(2), both, caches[0], compute
            ).chunk(2)
            v = v_uncond + guide_scale * (v_cond - v_uncond)
        else:
            shared = {}
            v_cond = dit_call(dit, x, t, cond, caches[0], compute, shared)
            v_uncond = dit_call(dit, x, t, uncond, caches[1], compute, shared)
            del shared  # block 0's shared output: a residual stream's worth (0.67 GB at 480P), freed per step
            v = v_uncond + guide_scale * (v_cond - v_uncond)
        x = sampler.step(i, v, x)
        if on_step is not None:
            on_step(i)
    return x
