"""An independent, deliberately plain re-statement of the official Wan2.1 DiT forward, for tests only.

It reads weights straight from a state dict, loops over samples, applies RoPE with complex float64
numbers and materializes attention with an explicit softmax, all in float64: nothing is shared with
x2v.export.dit, so agreement means both follow the official semantics.
"""

import math

import torch
import torch.nn.functional as F


def _lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"].double(), sd[f"{name}.bias"].double())


def _rms(sd, name, x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * sd[f"{name}.weight"].double()


def _ln(x, eps, w=None, b=None):
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def _rope_params(n, dim, theta=10000.0):
    freqs = torch.outer(
        torch.arange(n).double(), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).double() / dim)
    )
    return torch.polar(torch.ones_like(freqs), freqs)


def _rope(x, grid, freqs):
    """x [L, n, d] float64; official rope_apply for one sample."""
    f, h, w = grid
    c = x.shape[-1] // 2
    fr = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    table = torch.cat([fr[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1), fr[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       fr[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)  # fmt: skip
    xc = torch.view_as_complex(x.reshape(x.shape[0], x.shape[1], -1, 2))
    return torch.view_as_real(xc * table).flatten(2)


def _attn(q, k, v):
    """q [Lq, n, d], k/v [Lk, n, d] -> [Lq, n*d] via explicit softmax."""
    s = torch.einsum("qnd,knd->nqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("nqk,knd->qnd", s.softmax(-1), v).flatten(1)


def reference_forward(sd, cfg, x, t, context, clip_fea=None, y=None):
    """Same arguments as WanDiT.forward (batched tensors), computed sample by sample in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    n, d = cfg.num_heads, cfg.dim // cfg.num_heads
    freqs = torch.cat([_rope_params(1024, d - 4 * (d // 6)), _rope_params(1024, 2 * (d // 6)),
                       _rope_params(1024, 2 * (d // 6))], dim=1)  # fmt: skip
    outs = []
    for i in range(x.shape[0]):
        u = x[i].double() if y is None else torch.cat([x[i], y[i]]).double()
        u = F.conv3d(u[None], sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=cfg.patch_size)
        grid = tuple(u.shape[2:])
        tok = u.flatten(2).transpose(1, 2)[0]
        half = cfg.freq_dim // 2
        ang = t[i].double() * torch.pow(10000.0, -torch.arange(half).double() / half)
        sin = torch.cat([torch.cos(ang), torch.sin(ang)])[None]
        e = _lin(sd, "time_embedding.2", F.silu(_lin(sd, "time_embedding.0", sin)))
        e0 = _lin(sd, "time_projection.1", F.silu(e)).view(6, cfg.dim)
        ctx = _lin(
            sd,
            "text_embedding.2",
            F.gelu(_lin(sd, "text_embedding.0", context[i].double()), approximate="tanh"),
        )
        if clip_fea is not None:
            c = clip_fea[i].double()
            c = _ln(c, 1e-5, sd["img_emb.proj.0.weight"], sd["img_emb.proj.0.bias"])
            c = _lin(sd, "img_emb.proj.3", F.gelu(_lin(sd, "img_emb.proj.1", c)))
            ctx_img = _ln(c, 1e-5, sd["img_emb.proj.4.weight"], sd["img_emb.proj.4.bias"])
        for b in range(cfg.num_layers):
            p = f"blocks.{b}"
            m = sd[f"{p}.modulation"][0] + e0
            h = _ln(tok, cfg.eps) * (1 + m[1]) + m[0]
            q = _rms(sd, f"{p}.self_attn.norm_q", _lin(sd, f"{p}.self_attn.q", h), cfg.eps).view(-1, n, d)
            k = _rms(sd, f"{p}.self_attn.norm_k", _lin(sd, f"{p}.self_attn.k", h), cfg.eps).view(-1, n, d)
            v = _lin(sd, f"{p}.self_attn.v", h).view(-1, n, d)
            tok = (
                tok
                + _lin(sd, f"{p}.self_attn.o", _attn(_rope(q, grid, freqs), _rope(k, grid, freqs), v)) * m[2]
            )
            h = _ln(tok, cfg.eps, sd[f"{p}.norm3.weight"], sd[f"{p}.norm3.bias"])
            q = _rms(sd, f"{p}.cross_attn.norm_q", _lin(sd, f"{p}.cross_attn.q", h), cfg.eps).view(-1, n, d)
            k = _rms(sd, f"{p}.cross_attn.norm_k", _lin(sd, f"{p}.cross_attn.k", ctx), cfg.eps).view(-1, n, d)
            a = _attn(q, k, _lin(sd, f"{p}.cross_attn.v", ctx).view(-1, n, d))
            if clip_fea is not None:
                ki = _rms(
                    sd, f"{p}.cross_attn.norm_k_img", _lin(sd, f"{p}.cross_attn.k_img", ctx_img), cfg.eps
                )
                a = a + _attn(q, ki.view(-1, n, d), _lin(sd, f"{p}.cross_attn.v_img", ctx_img).view(-1, n, d))
            tok = tok + _lin(sd, f"{p}.cross_attn.o", a)
            h = _ln(tok, cfg.eps) * (1 + m[4]) + m[3]
            tok = tok + _lin(sd, f"{p}.ffn.2", F.gelu(_lin(sd, f"{p}.ffn.0", h), approximate="tanh")) * m[5]
        hm = sd["head.modulation"][0] + e
        out = _lin(sd, "head.head", _ln(tok, cfg.eps) * (1 + hm[1]) + hm[0])
        f, h_, w = grid
        out = out.view(f, h_, w, *cfg.patch_size, cfg.out_dim)
        out = torch.einsum("fhwpqrc->cfphqwr", out).reshape(
            cfg.out_dim, *[g * p for g, p in zip(grid, cfg.patch_size)]
        )
        outs.append(out)
    return torch.stack(outs)
