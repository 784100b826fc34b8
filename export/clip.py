"""The CLIP ViT-H/14 vision tower of open-clip xlm-roberta-large-vit-huge-14, as Wan2.1 I2V uses it.

Keys are the `visual.*` part of the official checkpoint (the text tower is not needed and its keys are
ignored by name at load). Wan feeds the DiT the output of the first 31 of 32 blocks: 257 tokens x 1280.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from x2v.runtime.config import CLIPConfig
from x2v.runtime.pipeline import resize_for_clip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LayerNorm(nn.LayerNorm):
    """Computed in float32 whatever the stored dtype (bf16/fp16 weights included)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int, num_heads: int):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(
            3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, n + 1, cfg.dim))
        self.pre_norm = LayerNorm(cfg.dim, eps=1e-5)
        self.transformer = nn.Sequential(
            *(AttentionBlock(cfg.dim, cfg.mlp_ratio, cfg.num_heads) for _ in range(cfg.num_layers))
        )
        self.post_norm = LayerNorm(cfg.dim, eps=1e-5)
        self.head = nn.Parameter(torch.empty(cfg.dim, cfg.out_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> features of block 31 [B, 1 + patches, dim] (Wan's use_31_block)."""
        return self.encode_resized(resize_for_clip(images, self.cfg.image_size))

    def encode_resized(self, x: torch.Tensor) -> torch.Tensor:
        """The tower on images already resized to image_size (what the image-encoder engine computes)."""
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x * 0.5 + 0.5 - mean) / std).to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pre_norm(x + self.pos_embedding.to(x.dtype))
        return self.transformer[:-1](x)


class CLIPVision(nn.Module):
    """Holds the tower under `visual` so its keys are the checkpoint's."""

    # Keys of the official file that belong to the text tower: ignored by name, never silently.
    IGNORED_PREFIXES = ("textual.", "log_scale")

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.visual = VisionTransformer(cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)
