"""The conditional U-Net that denoises VAE latents (Rombach et al. 2022, after Ho et al.
2020 and Dhariwal & Nichol 2021): sinusoidal time embedding + MLP, ResBlocks that take it,
cross-attention to the text tokens at chosen levels and in the middle, skip connections.

Level i works at latent_size / 2^i with base_channels * channel_mult[i] channels; with
the seed's 8x8 latents and four levels that is 8 -> 4 -> 2 -> 1. Every block comes from
models/layers.py, shared with the VAE. forward() never reads a tensor value on the host,
so it runs without device syncs and under torch.compile / CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from ldmkit.config import UNetConfig
from ldmkit.errors import ConfigError
from ldmkit.models.denoiser import FolderModel
from ldmkit.models.layers import (
    Attention,
    Downsample,
    ResBlock,
    TokenBlock,
    Upsample,
    group_norm,
    key_mask_or_all,
    masked_mean,
    timestep_embedding,
)


class AttentionBlock(nn.Module):
    """Optional self-attention over the feature map, then cross-attention to the text."""

    def __init__(self, channels: int, num_heads: int, context_dim: int, self_attn: bool):
        super().__init__()
        self.self_attn = Attention(channels, num_heads) if self_attn else None
        self.cross_attn = Attention(channels, num_heads, context_dim=context_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        if self.self_attn is not None:
            x = self.self_attn(x)
        return self.cross_attn(x, context, mask)


class TextBlocks(nn.Module):
    """A residual side path over the text tokens: project down to `text_width`, run
    `text_layers` transformer blocks, project back up and add. The up-projection starts
    at zero, so training starts from the frozen encoder's own tokens and learns only what
    to mix in (a projection that replaced them was measured to set training back)."""

    def __init__(self, context_dim: int, cfg: UNetConfig):
        super().__init__()
        self.down = nn.Linear(context_dim, cfg.text_width)
        self.blocks = nn.ModuleList(TokenBlock(cfg.text_width, cfg.num_heads)
                                    for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(cfg.text_width)
        self.up = nn.Linear(cfg.text_width, context_dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.down(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return tokens + self.up(self.norm(h))


class Stage(nn.Module):
    """One ResBlock, followed by an AttentionBlock at the attention levels."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float,
                 attn: AttentionBlock | None):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, time_dim=time_dim, dropout=dropout)
        self.attn = attn

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = self.res(x, temb)
        return x if self.attn is None else self.attn(x, context, mask)


class UNet(FolderModel):
    """eps- or v-predicting U-Net: forward(x (B,C,h,w), t (B,), context (B,L,D),
    context_mask (B,L) bool, True = real token) -> (B,C,h,w)."""

    def __init__(self, cfg: UNetConfig, in_channels: int, context_dim: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        _check_heads(widths, cfg.num_heads)
        self.cfg, self.in_channels, self.context_dim = cfg, in_channels, context_dim
        self.num_levels = len(widths)
        time_dim = 4 * cfg.base_channels
        self.time_embed = nn.Sequential(nn.Linear(cfg.base_channels, time_dim), nn.SiLU(),
                                        nn.Linear(time_dim, time_dim))
        # Optional blocks over the text tokens: a frozen encoder's token for "square" barely
        # knows which colour the caption gives it; mixing tokens lets the U-Net bind them.
        self.text_blocks = TextBlocks(context_dim, cfg) if cfg.text_layers else None
        # Pooled text -> every ResBlock (through the time embedding): a cheap global
        # signal for what the caption says, while cross-attention says where.
        self.text_embed = nn.Linear(context_dim, time_dim) if cfg.pooled_text else None

        def attn(level: int | None, ch: int) -> AttentionBlock | None:
            # level None = the middle, which always cross-attends
            if level is not None and level not in cfg.cross_attn_levels:
                return None
            return AttentionBlock(ch, cfg.num_heads, context_dim, cfg.self_attn)

        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [widths[0]], widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Stage(ch, width, time_dim, cfg.dropout, attn(level, width)))
                ch = width
                skips.append(ch)
            if level < self.num_levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)

        self.mid = Stage(ch, ch, time_dim, cfg.dropout, attn(None, ch))
        self.mid_out = ResBlock(ch, ch, time_dim=time_dim, dropout=cfg.dropout)

        self.up = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            width = widths[level]
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Stage(ch + skips.pop(), width, time_dim, cfg.dropout,
                                     attn(level, width)))
                ch = width
            if level > 0:
                self.up.append(Upsample(ch))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # Zero-init: the untrained net predicts 0 (the mean of eps and of v), so early
        # training starts from a sensible output instead of large random noise.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        factor = 2 ** (self.num_levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by {factor} "
                             f"({self.num_levels} U-Net levels)")
        mask = key_mask_or_all(context_mask)
        temb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        if self.text_blocks is not None:
            context = self.text_blocks(context, mask)
        if self.text_embed is not None:
            pooled = context.mean(1) if mask is None else masked_mean(context, mask)
            temb = temb + self.text_embed(pooled)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, temb, context, mask)
            skips.append(h)
        h = self.mid_out(self.mid(h, temb, context, mask), temb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), temb, context, mask)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


def _check_heads(widths: list[int], num_heads: int) -> None:
    bad = [w for w in widths if w % num_heads]
    if bad:
        raise ConfigError(f"unet.num_heads = {num_heads} does not divide the level widths "
                          f"{bad} (base_channels x channel_mult)")
