"""Seeing and steering a U-Net's attention maps, for edits that keep a picture's layout:
prompt-to-prompt (Hertz et al. 2023) gives the edit's cross-attention the source pass's
maps, so the new words land where the old ones were; plug-and-play (Tumanyan et al. 2023)
and MasaCtrl inject the source's self-attention maps, which carry the picture's structure
and not its colours (the values stay the edit's own).

`controlled_attention(model, control)` swaps, for its duration, the forward of every
`layers.Attention` inside `model` (instances only: the VAE and other models are untouched)
for the same maths with the softmax spelled out, and passes each call's probabilities
(batch, heads, queries, keys) through `control`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ldmkit.models.layers import Attention


@dataclass
class AttentionControl:
    """What happens to the attention maps of the current model call, in call order.

    mode None: untouched. "record": every call's maps are kept (`recorded`, a list per
    call). "inject": the maps recorded earlier replace the call's own, cross-attention
    maps when `cross` (the conditional rows only, when the call is a guided [uncond; cond]
    batch: the unconditional rows keep theirs) and self-attention maps when `self_maps`
    (every row). A cross map whose token length differs from the recorded one (prompts of
    other lengths) is left alone."""

    mode: str | None = None
    cross: bool = False
    self_maps: bool = False
    recorded: list[tuple[bool, torch.Tensor]] = field(default_factory=list)
    calls: int = 0

    def record(self) -> None:
        self.mode, self.recorded, self.calls = "record", [], 0

    def inject(self, recorded: list[tuple[bool, torch.Tensor]], cross: bool,
               self_maps: bool) -> None:
        self.mode = "inject" if cross or self_maps else None
        self.recorded, self.cross, self.self_maps, self.calls = recorded, cross, self_maps, 0

    def __call__(self, probs: torch.Tensor, is_cross: bool) -> torch.Tensor:
        if self.mode == "record":
            self.recorded.append((is_cross, probs))
            return probs
        if self.mode != "inject":
            return probs
        _, source = self.recorded[self.calls]
        self.calls += 1
        if is_cross and self.cross and source.shape[-1] == probs.shape[-1]:
            n = len(source)
            return torch.cat([probs[:-n], source.to(probs.dtype)]) if len(probs) > n \
                else source.to(probs.dtype)
        if not is_cross and self.self_maps:
            return source.to(probs.dtype).repeat(len(probs) // len(source), 1, 1, 1)
        return probs


def _controlled_forward(layer: Attention, control: AttentionControl):
    """Attention.forward with the softmax spelled out and its result passed to `control`."""
    def forward(x, context=None, context_mask=None):
        b, c, h, w = x.shape
        tokens = layer.norm(x).flatten(2).transpose(1, 2)
        source = tokens if context is None else context
        q, k, v = (layer._heads(p(s)) for p, s in
                   ((layer.to_q, tokens), (layer.to_k, source), (layer.to_v, source)))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if context is not None and context_mask is not None:
            logits = logits.masked_fill(~context_mask.bool()[:, None, None, :], float("-inf"))
        probs = control(logits.float().softmax(-1).to(v.dtype), context is not None)
        out = (probs @ v).transpose(1, 2).reshape(b, h * w, c)
        return x + layer.to_out(out).transpose(1, 2).reshape(b, c, h, w)
    return forward


@contextmanager
def controlled_attention(model: nn.Module, control: AttentionControl) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.forward = _controlled_forward(layer, control)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
