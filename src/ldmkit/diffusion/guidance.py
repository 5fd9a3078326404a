"""Classifier-free guidance (Ho & Salimans 2022) packaged as a denoiser for the samplers.

Guidance is mixed in the network's own parameterisation: out = out_u + w (out_c - out_u).
Every conversion to eps or x0 is affine in the output with coefficients that depend only
on (x_t, t), so mixing eps, x0 or v gives the same (x0, eps) — one formula for both.
A negative prompt is just a different `uncond`.
"""

from __future__ import annotations

import torch
from torch import nn

from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.models.text import TextEmbeddings


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 2: rescale the guided output to the per-sample std of the
    conditional one, then blend with weight phi (0 = plain CFG). Counteracts the
    over-exposure large guidance scales cause."""
    if phi <= 0:
        return guided
    dims = tuple(range(1, guided.dim()))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return phi * guided * ratio + (1.0 - phi) * guided


def _run(model: nn.Module, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings
         ) -> torch.Tensor:
    """The one place the conditioning is unpacked. The network's boundary stays plain
    tensors: torch.compile and DDP handle tensor arguments without special cases, and
    bench_unet swaps in diffusers' U-Net behind the same (x, t, tokens, mask) call."""
    return model(x, t, text.tokens, text.mask)


class CFGDenoiser:
    """`denoiser(x_t, t) -> (x0, eps)` that runs `model(x, t, tokens, mask)` with guidance.

    cond and uncond are TextEmbeddings of batch 1 (broadcast) or the latent batch; the
    shorter is padded (masked out) to the other's token length so both fit one batch.

    guidance_scale w: 1 = conditional only (the unconditional pass is skipped), 0 =
    unconditional only; otherwise one model call over the batch [uncond; cond], or two
    calls when `two_pass` (the seed's way, kept for the baseline benchmark).
    guidance_rescale: Lin et al.'s phi. x0_clamp > 0 clamps x0 to +-x0_clamp (latent units)
    and recomputes eps from the clamped x0, so the pair stays consistent with x_t.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, prediction: str,
                 cond: TextEmbeddings, uncond: TextEmbeddings, guidance_scale: float,
                 guidance_rescale: float = 0.0, x0_clamp: float = 0.0, two_pass: bool = False):
        length = max(cond.tokens.shape[1], uncond.tokens.shape[1])
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.cond = cond.pad_to(length)
        self.uncond = uncond.pad_to(length)
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.x0_clamp = float(x0_clamp)
        self.two_pass = two_pass
        self._joint: tuple[tuple, TextEmbeddings] | None = None  # cached [uncond; cond]

    def _joint_condition(self, batch: int, device: torch.device) -> TextEmbeddings:
        """The concatenated [uncond; cond] context, built once per batch size and device."""
        key = (batch, str(device))
        if self._joint is None or self._joint[0] != key:
            halves = [c.to(device).expand(batch) for c in (self.uncond, self.cond)]
            self._joint = (key, TextEmbeddings.cat(halves))
        return self._joint[1]

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided network output, in the network's parameterisation."""
        batch, device, w = x_t.shape[0], x_t.device, self.guidance_scale
        if w == 1.0 or w == 0.0:  # a single half suffices
            text = (self.cond if w == 1.0 else self.uncond).to(device).expand(batch)
            return _run(self.model, x_t, t, text).to(x_t.dtype)
        if self.two_pass:
            out_u = _run(self.model, x_t, t, self.uncond.to(device).expand(batch))
            out_c = _run(self.model, x_t, t, self.cond.to(device).expand(batch))
        else:
            joint = self._joint_condition(batch, device)
            out_u, out_c = _run(self.model, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                joint).chunk(2)
        # mix in x_t's precision: an autocast model may hand back bf16
        out_u, out_c = out_u.to(x_t.dtype), out_c.to(x_t.dtype)
        guided = out_u + w * (out_c - out_u)
        return rescale_guidance(guided, out_c, self.guidance_rescale)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model_output(x_t, t)
        x0, eps = self.schedule.split_prediction(out, x_t, t, self.prediction)
        if self.x0_clamp > 0:
            x0 = x0.clamp(-self.x0_clamp, self.x0_clamp)
            eps = self.schedule.eps_from_x0(x_t, t, x0)
        return x0, eps
