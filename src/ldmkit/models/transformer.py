"""Transformer denoisers over latent patches, beside the U-Net and with its call signature
forward(x (B,C,h,w), t (B,), context (B,L,D), context_mask (B,L) bool) -> (B,C,h,w):

- DiT (Peebles & Xie 2023): the latent cut into p x p patches, one token each, with a
  fixed 2-D sin-cos position code; every block is self-attention and an MLP modulated by
  adaLN-Zero (shift, scale and a gate per branch regressed from the time + pooled-text
  vector, the gates starting at zero so each block starts as the identity), with
  cross-attention to the text tokens between them (as PixArt-alpha conditions DiT on text).
- MMDiT (Esser et al. 2024, SD3): text tokens and latent patches are two streams with
  weights of their own (projections, MLPs, modulation) that meet in one joint attention
  over both, so text tokens are updated by the image as the image by the text.

The pieces the U-Net has too come from models/layers.py: the timestep embedding, the one
attention kernel call (`attend`, with the key mask), `split_heads`, `masked_mean`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.config import UNetConfig
from ldmkit.models.denoiser import FolderModel
from ldmkit.models.layers import attend, key_mask_or_all, masked_mean, split_heads
from ldmkit.models.layers import timestep_embedding as sinusoid

FREQ_DIM = 256  # width of the sinusoidal time code before its MLP (DiT's value)


def sincos_2d(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 2-D sin-cos position code (MAE / DiT): half the channels encode the row,
    half the column. (h*w, dim), float32; any grid size, so any latent size works."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, device=device) / quarter)
    parts = [f(pos.reshape(-1, 1).float() * freqs) for pos in (rows, cols)
             for f in (torch.sin, torch.cos)]
    return F.pad(torch.cat(parts, dim=1), (0, dim - 4 * quarter))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: a LayerNorm'd x (B, N, C) shifted and scaled per sample by (B, C) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(width: int) -> nn.LayerNorm:
    """No affine parameters: the adaLN modulation supplies the scale and shift."""
    return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


def _mlp(width: int, ratio: float, dropout: float = 0.0) -> nn.Sequential:
    """Linear, GELU, Linear, then `unet.dropout` on the branch's output (GPT-2's residual
    dropout; appended last, so the weights keep their names and old folders load)."""
    hidden = int(width * ratio)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden, width), nn.Dropout(dropout))


class Modulation(nn.Module):
    """SiLU + Linear from the conditioning vector to `chunks` (B, C) vectors, zero-init."""

    def __init__(self, width: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.proj = nn.Linear(width, chunks * width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: torch.Tensor) -> list[torch.Tensor]:
        return list(self.proj(F.silu(cond)).chunk(self.chunks, dim=-1))


class TokenAttention(nn.Module):
    """Multi-head attention between token sequences (self when `source` is None). The
    projections carry the U-Net's names (to_q, to_k, to_v, to_out) so adapters find them."""

    def __init__(self, width: int, num_heads: int, source_dim: int | None = None):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(source_dim or width, width)
        self.to_v = nn.Linear(source_dim or width, width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        source = x if source is None else source
        q, k, v = (split_heads(p(s), self.num_heads) for p, s in
                   ((self.to_q, x), (self.to_k, source), (self.to_v, source)))
        return self.to_out(attend(q, k, v, mask).transpose(1, 2).reshape(x.shape))


class _PatchDenoiser(FolderModel):
    """What DiT and MMDiT share: patch embedding, the conditioning vector (time, plus the
    pooled caption when `pooled_text`), the final adaLN layer and unpatchify."""

    def __init__(self, cfg: UNetConfig, in_channels: int, context_dim: int):
        super().__init__()
        if cfg.width % cfg.num_heads:
            raise ValueError(f"unet.width {cfg.width} not divisible by unet.num_heads "
                             f"{cfg.num_heads}")
        self.cfg, self.in_channels, self.context_dim = cfg, in_channels, context_dim
        width, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(in_channels, width, p, stride=p)
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(),
                                        nn.Linear(width, width))
        self.text_embed = nn.Linear(context_dim, width) if cfg.pooled_text else None
        self.final_mod = Modulation(width, 2)
        self.final_norm = _layer_norm(width)
        self.final = nn.Linear(width, p * p * in_channels)
        # Zero-init (DiT): the untrained net predicts 0, the mean of eps, of v and of the
        # flow's velocity, as the U-Net's zeroed last conv does.
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def _check_size(self, x: torch.Tensor) -> None:
        p = self.cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by "
                             f"unet.patch_size = {p}")

    def _inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None):
        """What every forward starts from: patch tokens and their grid, the caption in the
        tokens' dtype, its key mask, the conditioning vector."""
        self._check_size(x)
        mask = key_mask_or_all(context_mask)
        tokens, grid = self._tokens(x)
        context = context.to(tokens.dtype)
        return tokens, grid, context, mask, self._condition(t, context, mask, tokens.dtype)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h = self.patch_embed(x)
        grid = h.shape[-2:]
        tokens = h.flatten(2).transpose(1, 2)
        pos = sincos_2d(grid[0], grid[1], self.cfg.width, x.device).to(tokens.dtype)
        return tokens + pos, (grid[0], grid[1])

    def _condition(self, t: torch.Tensor, context: torch.Tensor,
                   mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        cond = self.time_embed(sinusoid(t, FREQ_DIM).to(dtype))
        if self.text_embed is not None:
            pooled = context.mean(1) if mask is None else masked_mean(context, mask)
            cond = cond + self.text_embed(pooled)
        return cond

    def _output(self, tokens: torch.Tensor, cond: torch.Tensor, grid: tuple[int, int]
                ) -> torch.Tensor:
        shift, scale = self.final_mod(cond)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))
        p, c, (gh, gw) = self.cfg.patch_size, self.in_channels, grid
        out = out.reshape(out.shape[0], gh, gw, p, p, c)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(out.shape[0], c, gh * p, gw * p)


# ----------------------------------------------------------------------------- DiT


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the text, adaLN-Zero MLP."""

    def __init__(self, width: int, num_heads: int, context_dim: int, mlp_ratio: float,
                 dropout: float = 0.0):
        super().__init__()
        self.mod = Modulation(width, 6)
        self.norm1, self.norm2 = _layer_norm(width), _layer_norm(width)
        self.self_attn = TokenAttention(width, num_heads)
        self.cross_norm = nn.LayerNorm(width, eps=1e-6)
        self.cross_attn = TokenAttention(width, num_heads, source_dim=context_dim)
        self.mlp = _mlp(width, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)  # on the attention branches' outputs

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(cond)
        x = x + g1[:, None] * self.drop(self.self_attn(modulate(self.norm1(x), sh1, sc1)))
        x = x + self.drop(self.cross_attn(self.cross_norm(x), context, mask))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(_PatchDenoiser):
    """DiT with cross-attention to the caption's tokens."""

    def __init__(self, cfg: UNetConfig, in_channels: int, context_dim: int):
        super().__init__(cfg, in_channels, context_dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.num_heads, context_dim,
                                             cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.depth))
        init_transformer(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, grid, context, mask, cond = self._inputs(x, t, context, context_mask)
        for block in self.blocks:
            tokens = block(tokens, cond, context, mask)
        return self._output(tokens, cond, grid)


# ----------------------------------------------------------------------------- MMDiT


class Stream(nn.Module):
    """One stream's weights in an MMDiT block: modulation, qkv, output, MLP."""

    def __init__(self, width: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.mod = Modulation(width, 6)
        self.norm1, self.norm2 = _layer_norm(width), _layer_norm(width)
        self.to_q, self.to_k = nn.Linear(width, width), nn.Linear(width, width)
        self.to_v, self.to_out = nn.Linear(width, width), nn.Linear(width, width)
        self.mlp = _mlp(width, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)  # on the joint attention's output

    def qkv(self, x: torch.Tensor, mods: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        h = modulate(self.norm1(x), mods[0], mods[1])
        return self.to_q(h), self.to_k(h), self.to_v(h)

    def finish(self, x: torch.Tensor, attended: torch.Tensor, mods: list[torch.Tensor]
               ) -> torch.Tensor:
        _, _, g1, sh2, sc2, g2 = mods
        x = x + g1[:, None] * self.drop(self.to_out(attended))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class MMDiTBlock(nn.Module):
    """Joint attention over [text; image] tokens, each stream with its own weights."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.text = Stream(width, mlp_ratio, dropout)
        self.image = Stream(width, mlp_ratio, dropout)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, cond: torch.Tensor,
                joint_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        mods_i, mods_t = self.image.mod(cond), self.text.mod(cond)
        qkv = [torch.cat(pair, dim=1) for pair in
               zip(self.text.qkv(txt, mods_t), self.image.qkv(img, mods_i))]
        q, k, v = (split_heads(a, self.num_heads) for a in qkv)
        out = attend(q, k, v, joint_mask).transpose(1, 2).reshape(qkv[0].shape)
        length = txt.shape[1]
        return (self.image.finish(img, out[:, length:], mods_i),
                self.text.finish(txt, out[:, :length], mods_t))


class MMDiT(_PatchDenoiser):
    """SD3's multimodal DiT: the caption's tokens are a stream of their own."""

    def __init__(self, cfg: UNetConfig, in_channels: int, context_dim: int):
        super().__init__(cfg, in_channels, context_dim)
        self.context_proj = nn.Linear(context_dim, cfg.width)
        self.blocks = nn.ModuleList(MMDiTBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio,
                                               cfg.dropout) for _ in range(cfg.depth))
        init_transformer(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, grid, context, mask, cond = self._inputs(x, t, context, context_mask)
        txt = self.context_proj(context)
        joint = None
        if mask is not None:  # image tokens are always real keys
            joint = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1])], dim=1)
        for block in self.blocks:
            tokens, txt = block(tokens, txt, cond, joint)
        return self._output(tokens, cond, grid)


def init_transformer(model: nn.Module) -> nn.Module:
    """DiT's initialisation: Xavier-uniform linear layers, the patch embedding like a linear
    layer, then the zero-inits put back: the modulations (gates 0: every gated branch
    starts switched off), DiT's cross-attention output (PixArt-alpha: so each block
    starts as the identity) and the final layer."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    w = model.patch_embed.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for module in model.modules():
        if isinstance(module, Modulation):
            nn.init.zeros_(module.proj.weight)
        if isinstance(module, DiTBlock):
            nn.init.zeros_(module.cross_attn.to_out.weight)
    nn.init.zeros_(model.final.weight)
    nn.init.normal_(model.time_embed[0].weight, std=0.02)
    nn.init.normal_(model.time_embed[2].weight, std=0.02)
    return model
