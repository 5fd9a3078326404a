"""img2img and inpainting on a text-to-image pipeline: picture -> VAE latents -> noised to
the strength's level -> the pipeline's own guided sampler from there (with the known
region held, for a mask) -> VAE decode (laid over the picture's round trip, for a mask).

The sampling maths lives in diffusion/editing.py; the picture and mask checks in
edit_inputs.py. `TextToImagePipeline.__call__(..., image=, mask=, strength=)` lands here.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ldmkit.diffusion.editing import noised_start, start_index
from ldmkit.edit_inputs import (
    fit_image,
    fit_mask,
    latent_mask,
    open_image,
    per_image,
    pixel_weights,
)
from ldmkit.sampling_args import (
    CHUNK,
    SamplingArgumentError,
    check_resample,
    check_strength,
)

DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
DEFAULT_INPAINT_STRENGTH = 1.0  # diffusers' inpainting default: the masked region anew
FEATHER_MAX = 4


@dataclass
class EditInputs:
    """A checked edit: pictures (n, 3, S, S) in [-1, 1], masks (n, 1, S, S) of 0/1 or None,
    and the run's strength, RePaint passes and mask feather (latent cells); with
    `source_prompt` (what the pictures show: one, or one per picture) a layout edit."""

    images: torch.Tensor
    masks: torch.Tensor | None
    strength: float
    resample_steps: int = 0
    mask_feather: int = 1
    source_prompt: str | list[str] | None = None

    def repeat(self, n: int) -> EditInputs:
        """One picture (and mask) made the edit of n images."""
        masks = None if self.masks is None else self.masks[:1].expand(n, -1, -1, -1)
        source = self.source_prompt
        return EditInputs(self.images[:1].expand(n, -1, -1, -1), masks, self.strength,
                          self.resample_steps, self.mask_feather,
                          source[0] if isinstance(source, list) else source)

    def rows(self, start: int, stop: int) -> EditInputs:
        masks = None if self.masks is None else self.masks[start:stop]
        source = self.source_prompt
        return EditInputs(self.images[start:stop], masks, self.strength,
                          self.resample_steps, self.mask_feather,
                          source[start:stop] if isinstance(source, list) else source)


def check_feather(value: object, field: str = "mask_feather") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= value <= FEATHER_MAX:
        raise SamplingArgumentError(field, f"must be an integer in 0..{FEATHER_MAX} (latent "
                                    f"cells), got {value!r:.40}")
    return int(value)


def prepare_edit(image, mask, n: int, size: int, strength: float | None = None,
                 resample_steps: int = 0, mask_feather: int = 1, mask_from_alpha: bool = False,
                 fields: dict[str, str] | None = None, source_prompt=None) -> EditInputs:
    """Check and load what an edit starts from, for `n` images of the model's `size`.
    `image` / `mask`: one each (PIL image, file path or bytes) or a sequence of n;
    `source_prompt` one string or n (a layout edit: no mask).
    `fields` renames the parameters in errors (`--init-image` on the command line)."""
    name = {"image": "image", "mask": "mask", "strength": "strength",
            "resample_steps": "resample_steps", "mask_feather": "mask_feather",
            "source_prompt": "source_prompt", **(fields or {})}
    source_prompt = check_source_prompt(source_prompt, mask, n, name["source_prompt"])
    if image is None:
        raise SamplingArgumentError(name["image"], "is needed for an edit (a mask or a "
                                    "strength applies to a picture)")
    default = DEFAULT_STRENGTH if mask is None else DEFAULT_INPAINT_STRENGTH
    strength = check_strength(default if strength is None else strength, name["strength"])
    resample_steps = check_resample(resample_steps, name["resample_steps"])
    mask_feather = check_feather(mask_feather, name["mask_feather"])
    if resample_steps and mask is None:
        raise SamplingArgumentError(name["resample_steps"], "resamples an inpainting run; "
                                    "give a mask")
    pictures = [open_image(v, name["image"]) for v in per_image(image, n, name["image"])]
    images = torch.stack([fit_image(p, size, name["image"]) for p in pictures])
    masks = None
    if mask is not None:
        given = per_image(mask, n, name["mask"])
        masks = torch.stack([fit_mask(open_image(m, name["mask"]), p.size, size, name["mask"],
                                      mask_from_alpha) for m, p in zip(given, pictures)])
    return EditInputs(images, masks, strength, resample_steps, mask_feather, source_prompt)


def check_source_prompt(value, mask, n: int, field: str) -> str | list[str] | None:
    """None, one string, or n strings; never with a mask (the layout edit finds its own
    region from the source prompt's words)."""
    if value is None:
        return None
    if mask is not None:
        raise SamplingArgumentError(field, "a layout edit finds its own region from the "
                                    "source prompt's words; give it no mask (or inpaint "
                                    "without a source prompt)")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) \
            and len(value) in (1, n):
        return list(value) * (n // len(value))
    raise SamplingArgumentError(field, f"must be a string, or one per image ({n}), not "
                                f"{value!r:.60}")


@dataclass
class EditStart:
    """Where an edit's sampler starts: state `x` at grid level `first`, the pictures'
    latents, and the latent masks (None for img2img)."""

    x: torch.Tensor
    known: torch.Tensor | None  # None: text-to-image rows (the server's batcher)
    lmask: torch.Tensor | None
    first: int

    @property
    def held(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`denoise`'s `known` argument: the region an inpainting run keeps."""
        return None if self.lmask is None else (self.known, self.lmask)


@torch.no_grad()
def edit_start(pipe, edit: EditInputs, noise: torch.Tensor, steps: int) -> EditStart:
    """Encode the pictures and noise them to the strength's level (one row per picture);
    the pipeline and the server's batcher both start an edit here."""
    known = pipe.encode_images(edit.images)
    first = start_index(steps, edit.strength)
    x = noised_start(pipe.schedule, steps, first, known, noise.to(known.device))
    lmask = None
    if edit.masks is not None:
        lmask = latent_mask(edit.masks.to(known.device), pipe.vae.factor, edit.mask_feather)
    return EditStart(x, known, lmask, first)


@torch.no_grad()
def edit_latents(pipe, prompts: Sequence[str], edit: EditInputs,
                 negative_prompt: str | None, steps: int, guidance_scale: float,
                 sampler: str, generator: torch.Generator | None = None, callback=None,
                 eta: float = 0.0, guidance_rescale: float = 0.0, bf16: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(final latents, the pictures' latents, latent masks or None), one row per prompt,
    CHUNK rows at a time. Noise is drawn as text-to-image draws it, so strength 1 without
    a mask gives its very images."""
    outs, knowns, lmasks = [], [], []
    for start in range(0, len(prompts), CHUNK):
        part = list(prompts[start:start + CHUNK])
        rows = edit.rows(start, start + len(part))
        cond, uncond = pipe.conditioning(part, negative_prompt)
        begin = edit_start(pipe, rows, pipe.initial_noise(len(part), generator), steps)
        if begin.lmask is not None:
            lmasks.append(begin.lmask.cpu())
        outs.append(pipe.denoise(begin.x, cond, uncond, steps, guidance_scale, sampler,
                                 generator, callback, eta, guidance_rescale, bf16=bf16,
                                 start=begin.first, known=begin.held,
                                 resample=edit.resample_steps))
        knowns.append(begin.known)
    return torch.cat(outs), torch.cat(knowns), (torch.cat(lmasks) if lmasks else None)


def edited_images(pipe, latents: torch.Tensor, known: torch.Tensor,
                  lmask: torch.Tensor | None) -> torch.Tensor:
    """Decoded edits in [-1, 1]. With a mask, laid over the decoded picture latents (its
    VAE round trip) by the mask at image resolution: the VAE decoder sees a few latent
    cells around each pixel, so kept pixels near the edit would otherwise pick up a
    little of it; beyond half a cell past the feathered mask they are the round trip."""
    images = pipe.decode(latents)
    if lmask is None:
        return images
    weights = pixel_weights(lmask, tuple(images.shape[-2:]))
    return weights * images + (1.0 - weights) * pipe.decode(known)
