"""The building blocks shared by the VAE and the U-Net: one ResBlock, one attention,
one timestep embedding, one down/upsampler. Each is used by both models. Also the one
masked mean over text tokens, shared by the U-Net and the text encoder's pooling, and the
token block the U-Net can run over the text before cross-attending to it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def group_norm(channels: int, per_group: int = 0) -> nn.GroupNorm:
    """GroupNorm with 32 groups when the width allows it (as in LDM), fewer for tiny widths;
    or, given `per_group`, groups of that many channels. At widths up to 32, 32 groups is
    one channel per group — instance norm, which takes away each image's mean and contrast
    of every channel (its colour, for a VAE)."""
    wanted = max(1, channels // per_group) if per_group else 32
    return nn.GroupNorm(math.gcd(wanted, channels), channels, eps=1e-6)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only (mask True), sentence-transformers' mean pooling: the
    U-Net's pooled text vector and the BERT-family encoders' pooled output."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def key_mask_or_all(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The caption's key mask as bool, with a row that has no real token opened to all of
    its tokens: an all-False row would make softmax 0/0 = NaN. Computed on the device, so
    the forward never waits for the host."""
    if mask is None:
        return None
    mask = mask.bool()
    return mask | ~mask.any(dim=1, keepdim=True)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional time embedding added in between."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None = None, dropout: float = 0.0,
                 norm_per_group: int = 0):
        super().__init__()
        self.norm1 = group_norm(in_ch, norm_per_group)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = group_norm(out_ch, norm_per_group)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None and temb is not None:
            h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention over a feature map: self-attention when `context` is None,
    cross-attention to `context` tokens (B, L, D) otherwise. A boolean `context_mask`
    (B, L), True = real token, keeps padded tokens out of every softmax."""

    def __init__(self, channels: int, num_heads: int = 1, context_dim: int | None = None,
                 norm_per_group: int = 0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_per_group)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(context_dim or channels, channels)
        self.to_v = nn.Linear(context_dim or channels, channels)
        self.to_out = nn.Linear(channels, channels)

    # None: one fused kernel call. Set (models/attention_maps.py), the softmax is spelled
    # out and its probabilities (B, heads, queries, keys) pass through
    # probs_hook(probs, is_cross), which returns the ones to use.
    probs_hook = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        source = tokens if context is None else context
        q, k, v = (self._heads(p(s)) for p, s in
                   ((self.to_q, tokens), (self.to_k, source), (self.to_v, source)))
        mask = context_mask if context is not None else None
        if self.probs_hook is None:
            out = attend(q, k, v, mask)
        else:
            out = self._hooked(q, k, v, mask, context is not None)
        out = out.transpose(1, 2).reshape(b, h * w, c)
        return x + self.to_out(out).transpose(1, 2).reshape(b, c, h, w)

    def _hooked(self, q, k, v, key_mask, is_cross: bool) -> torch.Tensor:
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
        probs = self.probs_hook(logits.float().softmax(-1).to(v.dtype), is_cross)
        return probs @ v

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return split_heads(t, self.num_heads)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention over (B, heads, N, d); `key_mask` (B, L) bool, True =
    a real token, keeps padding out of every softmax. The one attention kernel call."""
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    if q.device.type == "cpu":
        # Measured on a 2-core CPU (demo U-Net, batch 128): the CPU flash kernel's
        # backward made training ~1.3x slower than the plain-matmul ("math") kernel
        # at these short sequences (64 queries, 24 keys).
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class TokenBlock(nn.Module):
    """A pre-norm transformer block over text tokens (B, L, C): masked self-attention,
    then an MLP. Lets the U-Net mix a frozen encoder's tokens, e.g. bind "red" to the
    "square" it describes, before cross-attending to them."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(self.norm1(x)).chunk(3, -1))
        out = attend(q, k, v, mask).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))


class Downsample(nn.Module):
    """Strided 3x3 conv: halves height and width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (avoids the checkerboard of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
