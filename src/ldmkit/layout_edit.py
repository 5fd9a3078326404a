"""Re-describing a picture while keeping its layout: `pipe(prompt, image=..., strength=s,
source_prompt="what the picture shows")`. Plain img2img (SDEdit) must choose between the
new colour and the old shape and place; on the shapes demo it keeps all three in 47.5 %
of recolourings at best, this in 91.5 % (benchmarks/studies/recolour_methods.py).

1. Edit-friendly DDPM inversion of the picture under the source prompt, from the level
   that `strength` names (diffusion/inversion.py); the source pass records every
   attention map (models/attention_maps.py).
2. The edit's pass runs the same noises under the new prompt, taking the source's
   cross-attention maps for its first CROSS_FRACTION of steps (prompt-to-prompt, Hertz et
   al. 2023: the new words go where the old ones were) and its self-attention maps for
   all of them (plug-and-play, Tumanyan et al. 2023: the structure, not the colours).
3. A local blend: the source pass's attention to the blend words (the source prompt's
   content words unless given), averaged over its steps, upsampled with the U-Net's own
   cell alignment, makes soft masks; after each step, outside them the state goes back
   on the picture's path. A tight mask first (where the place is decided), a looser one
   after (so the object's rim can take the change); the decoded edit is laid over the
   picture's round trip by the loose mask.

The settings were chosen on the study's cases and two other sets of 200; on two more that
chose nothing they give 93-94 % (BENCHMARKS.md "Editing pictures").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldmkit.diffusion.editing import start_index
from ldmkit.diffusion.inversion import invert, run_inverted
from ldmkit.models.attention_maps import AttentionControl, controlled_attention
from ldmkit.models.layers import Attention
from ldmkit.sampling_args import CHUNK, SamplingArgumentError

CROSS_FRACTION = 0.375  # longer held the old maps' colour too (76.5 % colour at 1.0)
# the blend's two mask levels on the normalised attention, and the fraction of the run's
# steps that use the tight one (chosen on the study's cases, BENCHMARKS "Editing pictures")
TIGHT, LOOSE, SWITCH = 0.55, 0.2, 0.4
SOFTNESS = 0.2  # the masks ramp over +-0.1 around their level: hard edges cut shapes
STOPWORDS = frozenset("a an the of and or with on in at to from by for is are its".split())


def token_text(token: str) -> str:
    """A tokenizer's piece as plain lower-case text (WordPiece '##', BPE '</w>', 'Ġ')."""
    return token.removeprefix("##").removesuffix("</w>").lstrip("Ġ▁").lower()


def blend_positions(tokenizer, prompt: str, words: Sequence[str] | None,
                    max_length: int | None = None) -> list[int]:
    """Token positions of `words` in `prompt` (default: its words but STOPWORDS), among
    the first `max_length` tokens (the text encoder's window: the rest is not encoded)."""
    ids = tokenizer(prompt, truncation=max_length is not None, max_length=max_length,
                    verbose=False)["input_ids"]
    pieces = [token_text(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    special = set(map(token_text, tokenizer.all_special_tokens))
    if isinstance(words, str):  # "red square": its words, not its letters
        words = words.split()
    wanted = None if words is None else {w.lower() for w in words}
    found = [i for i, piece in enumerate(pieces) if piece and piece not in special
             and (piece in wanted if wanted is not None else piece not in STOPWORDS)]
    if not found:
        which = ("only words like 'a' and 'the', which do not say where the change goes"
                 if wanted is None else ", ".join(sorted(wanted)))
        raise SamplingArgumentError("source_prompt", f"{prompt!r:.60} has none of the words "
                                    f"to blend on ({which})")
    return found


def aligned_upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 1, s, s) -> (n, 1, size, size), cell i of the coarse map landing on fine cell
    i * size / s: the U-Net's stride-2 convs (padding 1) centre a coarse cell on the first
    fine cell under it, not between its two (bilinear's assumption, half a cell off)."""
    factor = size // maps.shape[-1]
    fine = F.interpolate(maps, size=(factor * (maps.shape[-1] - 1) + 1,) * 2,
                         mode="bilinear", align_corners=True)
    return F.pad(fine, (0, factor - 1, 0, factor - 1), mode="replicate")


def word_attention(steps: list[list[tuple[bool, torch.Tensor]]],
                   positions: list[list[int]], size: int) -> torch.Tensor:
    """(n, 1, size, size): the recorded cross-attention to each row's positions, summed
    over them, averaged over heads, steps and the finest cross-attention layers, upsampled;
    each row's maximum 1."""
    cross = [probs for step in steps for is_cross, probs in step if is_cross]
    finest = max(p.shape[2] for p in cross)
    total = 0.0
    for probs in (p for p in cross if p.shape[2] == finest):
        total = total + torch.stack([probs[-len(positions) + b, :, :, where].sum(-1).mean(0)
                                     for b, where in enumerate(positions)]).float()
    side = math.isqrt(finest)
    maps = aligned_upsample(total.view(-1, 1, side, side), size)
    return maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)


def soft_mask(attention: torch.Tensor, level: float) -> torch.Tensor:
    return ((attention - level) / SOFTNESS + 0.5).clamp(0, 1)


@dataclass
class LocalBlend:
    """After step k of `steps`: x outside the mask (`tight` for the first `switch` of the
    steps, `loose` after) back on the picture's path."""

    tight: torch.Tensor
    loose: torch.Tensor
    steps: int
    switch: float = SWITCH

    def __call__(self, k: int, x: torch.Tensor, on_path: torch.Tensor) -> torch.Tensor:
        mask = self.tight if k < self.switch * self.steps else self.loose
        return on_path + mask * (x - on_path)


@torch.no_grad()
def layout_edit_chunk(pipe, prompts: Sequence[str], sources: Sequence[str],
                      known: torch.Tensor, strength: float, steps: int, guidance: float,
                      guidance_rescale: float, generator: torch.Generator | None,
                      bf16: bool, blend_words: Sequence[str] | None,
                      negative_prompt: str | None = None, callback=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(edited latents, the loose latent mask) for one chunk of rows."""
    first = start_index(steps, strength)
    if first == steps:  # strength 0 (or under one step): the picture, as img2img gives it
        return known, torch.zeros_like(known[:, :1])
    encoder = pipe.text_encoder
    positions = [blend_positions(encoder.tokenizer, s, blend_words, encoder.max_length)
                 for s in sources]
    source, null = pipe.conditioning(sources)
    target, target_null = pipe.conditioning(prompts, negative_prompt)
    length = max(source.tokens.shape[1], target.tokens.shape[1])  # maps of one key length
    source, target = source.pad_to(length), target.pad_to(length)
    # prompt-to-prompt swaps maps token for token: only where both prompts have as many
    same_length = (source.mask.sum(1) == target.mask.sum(1)).to(known.device)
    control, recorded = AttentionControl(cross_rows=same_length), []

    def record(k: int) -> None:
        control.record()
        recorded.append(control.recorded)

    def inject(k: int) -> None:
        control.inject(recorded[k], cross=k < CROSS_FRACTION * (steps - first),
                       self_maps=True)

    with controlled_attention(pipe.unet, control), \
            torch.autocast(pipe.device.type, dtype=torch.bfloat16, enabled=bf16):
        inversion = invert(pipe.denoiser(source, null, 1.0), pipe.schedule, known, steps,
                           first, generator, record)
        attention = word_attention(recorded, positions, known.shape[-1])
        blend = LocalBlend(soft_mask(attention, TIGHT), soft_mask(attention, LOOSE),
                           inversion.steps)
        edited = run_inverted(pipe.denoiser(target, target_null, guidance, guidance_rescale),
                              pipe.schedule, inversion, steps, inject, blend, callback)
    return edited.float(), blend.loose


def check_layout_model(pipe, field: str = "source_prompt") -> None:
    """A layout edit steers `layers.Attention`: the U-Net backbone has it, DiT/MMDiT not."""
    if not any(isinstance(m, Attention) for m in pipe.unet.modules()):
        raise SamplingArgumentError(field, "a layout edit steers a U-Net's attention maps; "
                                    f"this model's backbone is {pipe.unet.cfg.kind!r}")


def layout_edit_latents(pipe, prompts: Sequence[str], source_prompt, images: torch.Tensor,
                        strength: float, steps: int, guidance: float, guidance_rescale: float,
                        generator: torch.Generator | None = None, bf16: bool = False,
                        blend_words: Sequence[str] | None = None,
                        negative_prompt: str | None = None, callback=None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(edited latents, the pictures' latents, the loose latent masks), CHUNK rows at a
    time; `source_prompt` one for all rows or one per row (checked by prepare_edit)."""
    check_layout_model(pipe)
    sources = ([source_prompt] * len(prompts) if isinstance(source_prompt, str)
               else list(source_prompt))  # checked: editing.check_source_prompt
    outs, knowns, masks = [], [], []
    for start in range(0, len(prompts), CHUNK):
        stop = min(start + CHUNK, len(prompts))
        known = pipe.encode_images(images[start:stop])
        latents, mask = layout_edit_chunk(pipe, prompts[start:stop], sources[start:stop],
                                          known, strength, steps, guidance,
                                          guidance_rescale, generator, bf16, blend_words,
                                          negative_prompt, callback)
        outs.append(latents)
        knowns.append(known)
        masks.append(mask.cpu())  # laid over the decoded pictures, which are on the CPU
    return torch.cat(outs), torch.cat(knowns), torch.cat(masks)
