"""The Wan2.1 video VAE: causal 3D convolutions, 4x temporal and 8x spatial compression, 16 latent channels.

Module names follow the official `Wan2.1_VAE.pth`. Every temporal operation is causal, so a video can be
run whole (`cache=None`) or in chunks that carry a cache (a dict keyed by module holding the last input
frames each causal conv saw). Both give the same function: the official chunking (encode 1, 4, 4, ...
frames; decode 1 latent frame at a time) is one choice of chunks, and larger decode chunks trade memory
for speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from x2v.runtime.config import VAEConfig

# Per-channel latent statistics of Wan2.1's VAE: latents are normalized as (mu - mean) / std.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip


class RMSNorm(nn.Module):
    """Channel-first RMS norm (F.normalize * sqrt(dim) * gamma); `images` picks a 2D or 3D gamma shape."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _channels(b: torch.Tensor) -> torch.Tensor:
    return b.view(1, -1, 1, 1, 1)


def rms_silu(
    x: torch.Tensor, norm: RMSNorm, out: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """SiLU(norm(x + bias)) for [B, C, T, H, W] (bias: the producing convolution's, per channel), into `out` if
    given. On a GPU one Triton kernel (float32 inside, one rounding at the end) reads x once; the torch ops round
    after each of six steps and move the tensor thirteen times. Traced graphs (ONNX export, compilers) get the
    torch ops, which they fuse themselves."""
    if x.is_cuda and not _traced(x):
        from x2v.export.vae_kernels import rms_silu_cuda

        return rms_silu_cuda(x, norm.gamma, norm.scale, out, bias)
    y = F.silu(norm(x if bias is None else x + _channels(bias)))
    return y if out is None else out.copy_(y)


def add_bias_residual(y: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y + bias + h, in y's memory: a residual block's output from its last convolution run without bias (torch
    adds a convolution's bias in a pass of its own, broadcast and so unvectorized: 0.11 s of a 1.03 s decode)."""
    if y.is_cuda and not _traced(y):
        from x2v.export.vae_kernels import add_bias_residual_cuda

        return add_bias_residual_cuda(y, bias, h)
    return y.add_(_channels(bias)).add_(h)


def _traced(t: torch.Tensor) -> bool:
    """Inside torch.compile, torch.export (ONNX export) or functionalization: no Triton launches there."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the past side in time; with a cache, the past comes from the previous chunk."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.time_pad = 2 * self.padding[0]
        self.padding = (0, *self.padding[1:])  # space is zero-padded by the convolution itself, time by hand

    def forward(
        self,
        x: torch.Tensor,
        cache: dict | None = None,
        norm: RMSNorm | None = None,
        x_bias: torch.Tensor | None = None,
        bias: bool = True,
    ) -> torch.Tensor:
        """norm: the RMSNorm whose output, through SiLU, this convolution reads: one fused pass that writes
        straight after the past frames (rms_silu), instead of norm, SiLU and concatenation one by one.
        x_bias: a bias x still lacks (its convolution's), added in that pass. bias=False: the output without
        this convolution's bias, for the caller to add in a pass it makes anyway."""
        if not self.time_pad:
            x = x if norm is None else rms_silu(x, norm, bias=x_bias)
            return self._conv(x, bias)
        past = None if cache is None else cache.get(self)
        b, c, t, h, w = x.shape
        # time_pad frames before x: the cached past, zeros where there is none (before the video's first
        # frame); laid out as cuDNN will run the convolution
        fmt = torch.channels_last_3d if channels_last(self.weight) else torch.contiguous_format
        buf = torch.empty((b, c, self.time_pad + t, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        start = self.time_pad - (0 if past is None else past.shape[2])
        buf[:, :, :start].zero_()
        if past is not None:
            buf[:, :, start : self.time_pad] = past
        if norm is None:
            buf[:, :, self.time_pad :] = x
        else:
            rms_silu(x, norm, out=buf[:, :, self.time_pad :], bias=x_bias)
        if cache is not None:
            cache[self] = buf[:, :, -self.time_pad :].clone()
            if STEADY in cache and self.stride[0] == 1:
                return self._steady(buf, cache[STEADY], bias, fmt)
        return self._conv(buf, bias)

    def _steady(self, buf: torch.Tensor, steady: Steady, bias: bool, fmt) -> torch.Tensor:
        """The convolution of `buf`, or what it returned for the previous chunk when both windows are one frame
        repeated. Every frame of an I2V conditioning video after the first is zero, so once a layer's window has
        moved past the first frame's reach it sees the same frames chunk after chunk; near the input (the
        full-resolution layers, most of the encoder's work) that is most of the video. A window starts with the
        previous window's last frames (the cache), so two repeated-frame windows in a row hold the same frame:
        no frame needs keeping but the output. Exact: an output is kept only when its frames came out identical."""
        seen = steady.out
        if not steady.open or not repeats(buf, buf[:, :, :1]):
            steady.open = False
            seen.pop(self, None)
            return self._conv(buf, bias)
        if self in seen:
            frame = seen[self]
            out = torch.empty((*frame.shape[:2], buf.shape[2] - self.time_pad, *frame.shape[3:]),
                              dtype=frame.dtype, device=frame.device, memory_format=fmt)  # fmt: skip
            for i in range(out.shape[2]):  # frame by frame: dense copies, where a broadcast copy is slow
                out[:, :, i : i + 1] = frame
            return out
        out = self._conv(buf, bias)
        if repeats(out, out[:, :, :1]):
            seen[self] = out[:, :, :1].clone()
        return out

    def _conv(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        if bias:
            return super().forward(x)
        return F.conv3d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)


# Key of a chunked encode's cache under which causal convolutions keep their last steady results (_steady).
STEADY = "steady"


@dataclass
class Steady:
    """What a chunked encode keeps for CausalConv3d._steady: each convolution's output frame for its last window
    if that held one frame repeated, and whether every window of this chunk so far did. The windows that repeat
    are a prefix of the encoder (a layer sees the frames of the layers before it), so once one does not, the
    chunk's later layers skip the test: each test hands a flag to the host, which stalls the GPU's queue."""

    out: dict = field(default_factory=dict)
    open: bool = True


INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def frames_dense(x: torch.Tensor) -> bool:
    """Channels-last [B, C, T, H, W] with every (b, t) frame one dense block (what cuDNN's NDHWC kernels use)."""
    _, c, _, _, w = x.shape
    return x.stride(1) == 1 and x.stride(4) == c and x.stride(3) == w * c


def repeats(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether every frame of x [B, C, T, H, W] equals ref [B, C, 1, H, W] bit for bit (so -0.0 is not 0.0)."""
    ints = INTS[x.element_size()]
    if x.is_cuda and frames_dense(x) and frames_dense(ref):
        from x2v.export.vae_kernels import frames_differ_cuda

        return not frames_differ_cuda(x.view(ints), ref.view(ints))
    return torch.equal(x.view(ints), ref.view(ints).expand_as(x))


def channels_last(weight: torch.Tensor) -> bool:
    """Whether a convolution weight is in channels-last memory (WanVAE.to_channels_last), so cuDNN runs the
    convolution in NDHWC / NHWC and its input should be laid out so."""
    return weight.shape[1] > 1 and weight.stride(1) == 1


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual  # SiLU and dropout (p=0) fused into the convs
        h = self.shortcut(x)
        # both convolutions without their bias: conv1's joins the norm pass, conv2's the residual add
        y = conv2(conv1(x, cache, norm1, bias=False), cache, norm2, x_bias=conv1.bias, bias=False)
        return add_bias_residual(y, conv2.bias, h)


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame of [B, C, T, H, W]."""
    b, t = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)[:, None].chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(n, c, h, w)
        return self.proj(y)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        return x + per_frame(self._attend, x)


class Resample(nn.Module):
    """2x spatial up/down sampling; the 3d modes also double or halve time, leaving the first frame alone."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            up = nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
            self.resample = nn.Sequential(up, nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        x = per_frame(self._spatial, x)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _spatial(self, f: torch.Tensor) -> torch.Tensor:
        if self.mode.startswith("up"):
            up, conv = self.resample
            return conv(up(f))  # nearest: the official float32 round trip copies the same values
        return self.resample(f)

    def _time_up(self, x, cache):
        # Frame 0 passes through; every later frame becomes two, from a causal conv whose history starts at
        # frame 1 (zeros before it), exactly as the official chunked decode behaves.
        first = cache is None or self not in cache
        if cache is not None:
            cache[self] = True
        head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (None, x)
        parts = [] if head is None else [head]
        if rest.shape[2]:
            y = self.time_conv(rest, cache)  # [B, 2C, T, H, W]
            b, c2, t, h, w = y.shape
            parts.append(
                y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
            )
        return torch.cat(parts, dim=2)

    def _time_down(self, x, cache):
        # Frame 0 passes through; then a stride-2 conv over all frames (frame 0 included) with no padding.
        prev = None if cache is None else cache.get(self)
        head = x[:, :, :1] if prev is None else None
        full = x if prev is None else torch.cat([prev, x], dim=2)
        if cache is not None:
            cache[self] = full[:, :, -1:].clone()
        parts = [] if head is None else [head]
        if full.shape[2] >= 3:
            parts.append(self.time_conv(full))
        return torch.cat(parts, dim=2)


def _run(layers, x, cache):
    for layer in layers:
        x = (
            layer(x, cache)
            if isinstance(layer, (CausalConv3d, ResidualBlock, AttentionBlock, Resample))
            else layer(x)
        )
    return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(
                    Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d")
                )
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(
            ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim), ResidualBlock(out_dim, out_dim)
        )
        self.head = nn.Sequential(
            RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, cfg.z_dim * 2, 3, padding=1)
        )

    def forward(self, x, cache=None):
        norm, _, conv = self.head
        return conv(_run([self.conv1, *self.downsamples, *self.middle], x, cache), cache, norm)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * u for u in (mult[-1], *mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous upsample's conv halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(
            RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1)
        )

    def forward(self, x, cache=None):
        norm, _, conv = self.head
        return conv(_run([self.conv1, *self.middle, *self.upsamples], x, cache), cache, norm)


def _size(n: int, count: int, overlap: int) -> int:
    """The side of `count` equal tiles that cover `n` with neighbours overlapping by at least `overlap`."""
    return n if count == 1 else -(-(n + (count - 1) * overlap) // count)


def _spread(n: int, count: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of `count` tiles of one size, evenly spread over `n`, neighbours overlapping by at least
    `overlap`: less area than fixed-stride tiles with a shifted last one."""
    if count == 1:
        return [(0, n)]
    size = _size(n, count, overlap)
    starts = [(n - size) * i // (count - 1) for i in range(count)]
    return [(a, a + size) for a in starts]


def tile_grid(h: int, w: int, tile: int, overlap: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Row and column spans of as few tiles as cover h x w latents, each at most tile * tile latents in area
    (a tile's activation memory is its area's) and overlapping its neighbours by at least `overlap`; of grids
    with as few tiles, the one with the least area. Square tiles of at most tile x tile would be the same
    memory in more tiles: 544 x 720 px (68 x 90 latents) at tile 64 is 1 x 2 tiles of 68 x 49, 1.09x the
    frame's area, against 2 x 2 of 38 x 49 and 1.22x. No side is shorter than tile / 2 where the frame's is
    not: the decoder's border effects reach into a tile from every side, and a sliver would be all border."""
    budget, least, best = tile * tile, tile // 2, None
    for ny in range(1, h + 1):
        th = _size(h, ny, overlap)
        if ny > 1 and (th <= overlap or th < least):
            break
        for nx in range(1, w + 1):
            tw = _size(w, nx, overlap)
            if nx > 1 and (tw <= overlap or tw < least):
                break
            if th * tw <= budget:
                key = (ny * nx, ny * nx * th * tw)
                if best is None or key < best[:2]:
                    best = (*key, ny, nx)
                break
    if best is None:
        raise ValueError(
            f"no tiling of {h} x {w} latents in tiles of at most {tile} x {tile} overlapping by {overlap}"
        )
    return _spread(h, best[2], overlap), _spread(w, best[3], overlap)


def _ramp(n: int, head: int, tail: int, device) -> torch.Tensor:
    """Blend weights along one axis: rising over `head` samples, falling over `tail`, 1 elsewhere."""
    i = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(n, device=device)
    if head:
        w = torch.minimum(w, i / head)
    if tail:
        w = torch.minimum(w, (n - i) / tail)
    return w


class WanVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        # chunked encodes reuse a convolution's result on repeated frames (CausalConv3d._steady)
        self.reuse_steady = True

    def to_channels_last(self) -> WanVAE:
        """Convolution weights in channels-last memory, so cuDNN runs its NDHWC / NHWC kernels and the
        activations stay channels-last between them (channel-first weights make cuDNN transpose every
        convolution's input and output: 0.2 s of a 1.2 s decode at 480P,
        bench/results/vae_speed_specialized-h200.json)."""
        for p in self.parameters():
            if p.dim() in (4, 5):
                fmt = torch.channels_last_3d if p.dim() == 5 else torch.channels_last
                p.data = p.data.contiguous(memory_format=fmt)
        return self

    @torch.no_grad()
    def warm_up(self) -> None:
        """Encode and decode 5 frames of 32 x 32 px: the norm kernel's compiled variants (one per channel count
        and dtype: its strides, multiples of the channel count, share one pattern at any frame size) compile,
        or load from Triton's disk cache, here. The engine loader runs it on its own thread beside the
        encoders' loading (about 1.7 s on a host's first use, bench/results/vae_speed_cold-h200.json), so that
        Pipeline.warm_up at the request's size pays only that size's costs."""
        dtype, device = self.conv1.weight.dtype, self.conv1.weight.device
        self.decode(self.encode(torch.zeros(1, 3, 5, 32, 32, dtype=dtype, device=device)).to(dtype))

    def _stats(self, x):
        mean = torch.tensor(LATENT_MEAN[: self.cfg.z_dim], device=x.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(LATENT_STD[: self.cfg.z_dim], device=x.device).view(1, -1, 1, 1, 1)
        return mean, std

    def encode(self, video: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """video [B, 3, 4k+1, H, W] in [-1, 1] -> normalized latent mean [B, z, k+1, H/8, W/8] float32."""
        t = video.shape[2]
        if (t - 1) % 4:
            raise ValueError(f"the VAE encodes 4k+1 frames, got {t}")
        if chunked:  # the official 1, 4, 4, ... chunks: memory bounded by 4 frames
            # the reuse tests data (a flag to the host): eager encodes only
            steady = Steady() if self.reuse_steady and not _traced(video) else None
            cache = {} if steady is None else {STEADY: steady}
            edges, parts = [0, 1, *range(5, t + 1, 4)], []
            for a, b in zip(edges[:-1], edges[1:]):
                if steady is not None:
                    steady.open = True
                parts.append(self.encoder(video[:, :, a:b], cache))
            out = torch.cat(parts, dim=2)
        else:
            out = self.encoder(video)
        mu = self.conv1(out).chunk(2, dim=1)[0].float()
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode_tiled(
        self, z: torch.Tensor, tile: int = 32, overlap: int = 8, chunk: int | None = 1, on_frames=None
    ) -> torch.Tensor:
        """decode() in spatial tiles of at most `tile` x `tile` latents in area (tile_grid) overlapping by
        `overlap`, blended linearly: activation memory of one tile instead of the whole frame. Equal to decode()
        when the frame is no larger than one tile.
        Tiles are decoded one after the other through all frames, so that one tile's causal cache is alive at
        a time; the last tile completes the frames chunk by chunk, and on_frames gets each chunk's frames as
        they complete (the MP4 encodes them while the rest of that tile decodes). With on_frames, returns
        None, as decode()."""
        _, _, t, h, w = z.shape
        if h * w <= tile * tile:
            return self.decode(z, chunk, on_frames)
        if not 0 < overlap < tile:
            raise ValueError(f"tile overlap must be in (0, {tile}), got {overlap}")
        rows, cols = tile_grid(h, w, tile, overlap)
        tiles = [(ys, xs) for ys in rows for xs in cols]
        weight = torch.zeros(8 * h, 8 * w, device=z.device)
        blend, ramp = [], 8 * overlap
        for (y0, y1), (x0, x1) in tiles:
            wy = _ramp(8 * (y1 - y0), ramp if y0 > 0 else 0, ramp if y1 < h else 0, z.device)
            wx = _ramp(8 * (x1 - x0), ramp if x0 > 0 else 0, ramp if x1 < w else 0, z.device)
            region = (..., slice(8 * y0, 8 * y1), slice(8 * x0, 8 * x1))
            blend.append((region, wy[:, None] * wx[None, :]))
            weight[region[1:]] += blend[-1][1]
        out = torch.zeros(z.shape[0], 3, 4 * (t - 1) + 1, 8 * h, 8 * w, device=z.device)
        for ((y0, y1), (x0, x1)), (region, wgt) in zip(tiles[:-1], blend):
            out[region] += self.decode(z[..., y0:y1, x0:x1], chunk) * wgt
        (y0, y1), (x0, x1) = tiles[-1]
        region, wgt = blend[-1]
        done = [0]

        def complete(part: torch.Tensor) -> None:  # this chunk's frames now have every tile's share
            frames = out[:, :, done[0] : done[0] + part.shape[2]]
            frames[region] += part * wgt
            frames /= weight
            done[0] += part.shape[2]
            if on_frames is not None:
                on_frames(frames)

        self.decode(z[..., y0:y1, x0:x1], chunk, on_frames=complete)
        return out if on_frames is None else None

    def decode(self, z: torch.Tensor, chunk: int | None = 1, on_frames=None) -> torch.Tensor:
        """normalized latent [B, z, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1].

        chunk: latent frames per decoder pass (1 as the official code; None decodes the whole sequence).
        on_frames: called with each chunk's frames as soon as they are decoded (the MP4 writer encodes them
        while the next chunk decodes). The frames are then not kept: returns None, and the whole video is never
        held in float32 beside its parts (0.39 GB at 81 x 480 x 832).
        """
        mean, std = self._stats(z)
        x = self.conv2((z.float() * std + mean).to(self.conv2.weight.dtype))
        cache = None if chunk is None else {}
        step = x.shape[2] if chunk is None else chunk
        parts = []
        for i in range(0, x.shape[2], step):
            parts.append(self.decoder(x[:, :, i : i + step], cache).float().clamp_(-1, 1))
            if on_frames is not None:
                on_frames(parts.pop())
        return None if on_frames is not None else torch.cat(parts, dim=2)
