"""Seeing and steering a U-Net's attention maps, for edits that keep a picture's layout:
prompt-to-prompt (Hertz et al. 2023) gives the edit's cross-attention the source pass's
maps, so the new words land where the old ones were; plug-and-play (Tumanyan et al. 2023)
and MasaCtrl inject the source's self-attention maps, which carry the picture's structure
and not its colours (the values stay the edit's own).

`controlled_attention(model, control)` sets, for its duration, the `probs_hook` of every
`layers.Attention` inside `model` (instances only: the VAE and other models are untouched),
so each call's probabilities (batch, heads, queries, keys) pass through `control`.
"""

from __future__ import annotations

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
    batch: the unconditional rows keep theirs; and only the rows `cross_rows` allows:
    prompt-to-prompt swaps maps token for token, so a row whose prompts differ in length
    keeps its own), self-attention maps when `self_maps` (every row)."""

    mode: str | None = None
    cross: bool = False
    self_maps: bool = False
    cross_rows: torch.Tensor | None = None  # (n,) bool, None = every row
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
        source = source.to(probs.dtype)
        if is_cross and self.cross:
            n = len(source)
            own = probs[-n:]
            if own.shape != source.shape:  # another key length: nothing to swap token-wise
                return probs
            if self.cross_rows is not None:
                source = torch.where(self.cross_rows.view(-1, 1, 1, 1), source, own)
            return torch.cat([probs[:-n], source]) if len(probs) > n else source
        if not is_cross and self.self_maps:
            return source.repeat(len(probs) // len(source), 1, 1, 1)
        return probs


@contextmanager
def controlled_attention(model: nn.Module, control: AttentionControl) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.probs_hook = control
    try:
        yield
    finally:
        for layer in layers:
            del layer.probs_hook  # back to the class's None: the fused kernel
