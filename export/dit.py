"""The Wan2.1 diffusion transformer (T2V and I2V), split into `pre`, `block` x N and `post`.

Module names are the official checkpoint keys, so loading is a strict `load_state_dict`. The forward is
export friendly: fixed-shape batched tensors, real-valued RoPE tables computed once in `pre`, and one
`attention()` function where SageAttention swaps in.

Precision follows the official code: the residual stream and all time/modulation math are float32; the
linears run in `dtype` (bf16 by default). `sensitive_fp32=True` also keeps the embeddings and the head
weights in float32 (the "mixed" configuration of the published table).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from x2v.runtime.config import DiTConfig

# "sage_op" always emits the registered op (export: ONNX custom node, AOTInductor), whatever the device;
# "sage_op_rope" the op that also applies self-attention's q/k norms and RoPE (AOTInductor engines only).
ATTENTION_IMPLS = ("sdpa", "sage", "sage_op", "sage_op_rope")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    """q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H*D]. The single swap point for SageAttention."""
    if impl == "sage":
        from x2v.plugins.sage_attention import sage_attention

        out = sage_attention(q, k, v)
    elif impl == "sage_op":
        import x2v.plugins.sage_attention  # noqa: F401  (registers the op)

        out = torch.ops.x2v.sage_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)
    return out.flatten(2)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """t [B] -> [B, dim] float32, cos half first as in Wan (computed in float64 for large timesteps)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).float()


def rope_tables(grid: tuple[int, int, int], head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [f*h*w, head_dim/2] float32 for the 3D RoPE of a (frames, height, width) token grid.

    The head's channel pairs are split between time, height and width as in Wan: c - 2*(c//3), c//3, c//3
    pairs out of c = head_dim/2, each axis with its own frequency ladder theta^(-2j/(2*pairs)).
    """
    c = head_dim // 2
    splits = (c - 2 * (c // 3), c // 3, c // 3)
    angles = []
    for n, pairs in zip(grid, splits):
        inv = 1.0 / torch.pow(
            10000.0, torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=device) / (2 * pairs)
        )
        angles.append(torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv[None])
    f, h, w = grid
    a = torch.cat(
        [
            angles[0][:, None, None].expand(f, h, w, -1),
            angles[1][None, :, None].expand(f, h, w, -1),
            angles[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, c)
    return torch.cos(a).float(), torch.sin(a).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] with adjacent channel pairs rotated by the angle tables [L, D/2]; math in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS over the last dim in float32, rounded to x's dtype, times the weight (as Wan's)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GELUTanh(nn.Module):
    """nn.GELU(approximate="tanh"); compiled (AOTInductor, torch.compile, ONNX) as x * sigmoid(2z), the same
    function (0.5 (1 + tanh z) = sigmoid(2z)) in float32. Why: Inductor lowers tanh to libdevice's accurate
    tanhf, which made the FFN's GELU + FP8 cast kernel compute-bound (H200 block engines: 0.81 -> 0.63 ms FP8,
    0.66 -> 0.44 ms bf16, bench/results/block_gelu_norms-h200.json). Eager keeps torch's one fused kernel: the
    expression written out runs as ~7 float32 passes over the FFN activation (+0.3 s a 14B forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return F.gelu(x, approximate="tanh")
        y = x.float()
        return (y * torch.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))).to(x.dtype)


class FeedForward(nn.Sequential):
    """ffn.0, GELU, ffn.2 (the checkpoint's keys). With `gelu_epilogue` (FP8 linears with static scales,
    set by export.fp8.configure_fp8) ffn.0's GEMM writes ffn.2's FP8 input itself: the bf16 activation,
    [L, 13824] at 480P, is never stored (export/fp8_kernels.py)."""

    gelu_epilogue = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gelu_epilogue:
            return super().forward(x)
        from x2v.export import fp8_kernels  # noqa: F401  (registers the op)
        from x2v.export.fp8 import quantize_by

        up, _, down = self
        x2 = x.reshape(-1, x.shape[-1])
        xs, hs = up.input_scale.float(), down.input_scale.float()
        h = torch.ops.x2v.fp8_gelu_linear(quantize_by(x2, 1.0 / xs), up.weight, xs, up.weight_scale, up.bias,
                                          hs, up.fast_accum)  # fmt: skip
        return down.product(h, hs, x.dtype).reshape(*x.shape[:-1], down.out_features)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (returns float32)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear computed in float32 whatever its stored dtype: for the small, sensitive time layers."""
    b = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), b)


class SelfAttention(nn.Module):
    # With SageAttention (the op) and an FP8 o projection, the op writes o's FP8 input itself (its output
    # rounded to bf16 and quantized as FP8Linear would): the bf16 output is never stored. False: the op's bf16
    # output goes through o as usual (benches measure the two side by side).
    fp8_out = True

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_impl = "sdpa"
        # Set by export.fp8.configure_fp8 where q, k and v are FP8 linears with one static input scale (ModelOpt's
        # max calibration gives them the same amax: they see the same tensor): x is quantized once, not three
        # times, and the norm kernel before them writes one FP8 tensor instead of three.
        self.shared_fp8_input = False
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # takes_fp8 is off while ONNX export traces every FP8 linear as Q/DQ
        if not (self.shared_fp8_input and getattr(self.q, "takes_fp8", False)):
            return self.q(x), self.k(x), self.v(x)
        from x2v.export.fp8 import quantize_by

        xq = quantize_by(x, 1.0 / self.q.input_scale.float())
        return tuple(lin.forward_fp8(xq, x.dtype) for lin in (self.q, self.k, self.v))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, L, C] in compute dtype -> [B, L, C]."""
        n = self.num_heads
        q, k, v = self.project(x)
        v = v.unflatten(-1, (n, -1))
        if self.attn_impl == "sage_op_rope":
            import x2v.plugins.sage_attention  # noqa: F401  (registers the op)

            out = torch.ops.x2v.sage_attention_rope(q, k, v, self.norm_q.weight, self.norm_k.weight, cos, sin, n,
                                                    self.norm_q.eps)  # fmt: skip
            return self.o(out.flatten(2))
        q = apply_rope(self.norm_q(q).unflatten(-1, (n, -1)), cos, sin)
        k = apply_rope(self.norm_k(k).unflatten(-1, (n, -1)), cos, sin)
        op_quantizes = self.attn_impl == "sage_op" and self.fp8_out and getattr(self.o, "takes_fp8", False)
        if op_quantizes and x.dtype == torch.bfloat16:
            import x2v.plugins.sage_attention  # noqa: F401  (registers the op)

            inv = 1.0 / self.o.input_scale.float()
            return self.o.forward_fp8(torch.ops.x2v.sage_attention_fp8(q, k, v, inv).flatten(2), x.dtype)
        return self.o(attention(q, k, v, self.attn_impl))


class CrossAttention(nn.Module):
    """Cross-attention to text tokens; I2V adds a second attention to the CLIP image tokens (k_img, v_img)."""

    def __init__(self, dim: int, num_heads: int, eps: float, i2v: bool, text_len: int):
        super().__init__()
        self.num_heads, self.text_len = num_heads, text_len
        # SDPA in every build: SageAttention is slower at 512 and 257 keys (bench/results/block_cross_sage-h200.json)
        self.attn_impl = "sdpa"
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        if i2v:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], context [B, clip_tokens + text_len, C] (image tokens first) -> [B, L, C]."""
        n = self.num_heads
        img, txt = context[:, : -self.text_len], context[:, -self.text_len :]
        q = self.norm_q(self.q(x)).unflatten(-1, (n, -1))
        k = self.norm_k(self.k(txt)).unflatten(-1, (n, -1))
        out = attention(q, k, self.v(txt).unflatten(-1, (n, -1)), self.attn_impl)
        if hasattr(self, "k_img"):
            k_img = self.norm_k_img(self.k_img(img)).unflatten(-1, (n, -1))
            out = out + attention(q, k_img, self.v_img(img).unflatten(-1, (n, -1)), self.attn_impl)
        return self.o(out)


class WanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.dtype = torch.bfloat16
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, cfg.i2v, cfg.text_len)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = FeedForward(nn.Linear(dim, cfg.ffn_dim), GELUTanh(), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x, e0, context, cos, sin):
        """x [B, L, C] float32 residual stream; e0 [B, 6, C] float32; context [B, Lc, C]; cos/sin [L, D/2]."""
        return self.rest(self.attend(x, e0, cos, sin), e0, context)

    def attend(self, x, e0, cos, sin):
        """The self-attention half: everything the block computes before it sees the text. In block 0 the
        guidance branches of a step enter with the same tokens and timestep, so they can share it."""
        shift1, scale1, gate1 = (self.modulation[:, :3].float() + e0[:, :3]).chunk(3, dim=1)
        y = self.self_attn((self.norm1(x) * (1 + scale1) + shift1).to(self.dtype), cos, sin)
        return x + y.float() * gate1

    def rest(self, x, e0, context):
        """Cross-attention and FFN: the half that sees the text."""
        dt = self.dtype
        shift2, scale2, gate2 = (self.modulation[:, 3:].float() + e0[:, 3:]).chunk(3, dim=1)
        x = x + self.cross_attn(self.norm3(x).to(dt), context.to(dt)).float()
        y = self.ffn((self.norm2(x) * (1 + scale2) + shift2).to(dt))
        return x + y.float() * gate2


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, C] float32, e [B, C] float32 -> [B, L, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return linear32(self.head, self.norm(x) * (1 + scale) + shift)


class MLPProj(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm0, lin1, act, lin3, norm4 = self.proj
        x = F.layer_norm(
            x.float(), norm0.normalized_shape, norm0.weight.float(), norm0.bias.float(), norm0.eps
        )
        x = lin3(act(lin1(x.to(lin1.weight.dtype))))
        return F.layer_norm(
            x.float(), norm4.normalized_shape, norm4.weight.float(), norm4.bias.float(), norm4.eps
        )


class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.i2v:
            self.img_emb = MLPProj(cfg.clip_dim, dim)

    # The three engines. `pre` and `post` are cheap; `block` is 99% of the FLOPs.

    def time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] (0..1000) -> e [B, C] and e0 [B, 6, C], float32: the only inputs TeaCache looks at."""
        te = self.time_embedding
        e = linear32(te[2], F.silu(linear32(te[0], sinusoidal_embedding(self.cfg.freq_dim, t))))
        e0 = linear32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def pre(self, x, t, context, clip_fea=None, y=None):
        """Embed everything the blocks need.

        x [B, 16, F, H, W] latents; t [B]; context [B, text_len, text_dim] (zero-padded umT5 states);
        clip_fea [B, clip_tokens, clip_dim] and y [B, in_dim - 16, F, H, W] for I2V.
        Returns tokens [B, L, C] float32, e [B, C], e0 [B, 6, C], context [B, Lc, C], rope cos and sin [L, D/2].
        """
        if self.cfg.i2v:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        w = self.patch_embedding.weight
        # contiguous: engines compiled for dense inputs read raw memory (a transposed view would be garbage)
        tokens = self.patch_embedding(x.to(w.dtype)).flatten(2).transpose(1, 2).float().contiguous()
        grid = self.grid(x.shape)
        e, e0 = self.time(t)
        te = self.text_embedding
        ctx = te[2](te[1](te[0](context.to(te[0].weight.dtype))))
        if self.cfg.i2v:
            ctx = torch.cat([self.img_emb(clip_fea).to(ctx.dtype), ctx], dim=1)
        cos, sin = rope_tables(grid, self.cfg.head_dim, device=x.device)
        return tokens, e, e0, ctx, cos, sin

    def run_blocks(self, x, e0, context, cos, sin, shared: dict | None = None) -> torch.Tensor:
        """All blocks in order: what TeaCache skips. shared: see runtime.denoise.dit_call."""
        blocks = iter(self.blocks)
        if shared is not None:
            first = next(blocks)
            if "tokens" not in shared:
                shared["tokens"] = first.attend(x, e0, cos, sin)
            x = first.rest(shared["tokens"], e0, context)
        for block in blocks:
            x = block(x, e0, context, cos, sin)
        return x

    def post(self, x: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """tokens [B, L, C], e [B, C] -> flow prediction [B, out_dim, F, H, W] float32."""
        x = self.head(x, e)
        (pt, ph, pw), (f, h, w) = self.cfg.patch_size, grid
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)

    def grid(self, shape) -> tuple[int, int, int]:
        pt, ph, pw = self.cfg.patch_size
        return shape[2] // pt, shape[3] // ph, shape[4] // pw

    def forward(self, x, t, context, clip_fea=None, y=None):
        tokens, e, e0, ctx, cos, sin = self.pre(x, t, context, clip_fea, y)
        return self.post(self.run_blocks(tokens, e0, ctx, cos, sin), e, self.grid(x.shape))

    def configure(self, dtype: torch.dtype = torch.bfloat16, attn: str = "sdpa") -> WanDiT:
        """Set the blocks' compute dtype and self-attention kernel."""
        if attn not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {attn!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
        for block in self.blocks:
            block.dtype = dtype
            block.self_attn.attn_impl = attn
        return self


# Parameters computed in float32 whatever the checkpoint dtype: kept in high precision by every recipe.
SENSITIVE_PREFIXES = (
    "patch_embedding",
    "text_embedding",
    "time_embedding",
    "time_projection",
    "img_emb",
    "head",
)
SENSITIVE_SUFFIXES = ("modulation", "norm3.weight", "norm3.bias")


def is_sensitive(key: str) -> bool:
    return key.startswith(SENSITIVE_PREFIXES) or key.endswith(SENSITIVE_SUFFIXES)
