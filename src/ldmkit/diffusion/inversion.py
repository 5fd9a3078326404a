"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024): a picture's latent is
noised independently to every level of the run (the start level first, the picture
itself last), and for each step the noise that carries the ancestral sampler from one
level to the next under the source prompt is solved for. Running the sampler again with
exactly those noises retraces the path and rebuilds the picture, for the source prompt,
to rounding (the last step, to the clean level, adds back its x0 estimate's residual); with
another prompt it gives an edit that keeps much of the picture's layout, because the
noises carry it.

The ancestral step is samplers.ddpm_posterior between consecutive levels of the
text-to-image grid, so a run of strength s starts where img2img of strength s starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldmkit.diffusion.samplers import Callback, Denoiser, ddpm_posterior, denoise_at

# before each step k: step_hook(k); after it: blend(k, x, path level k + 1) -> x
StepHook = Callable[[int], None]
Blend = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Inversion:
    """`path[k]`: the picture noised to the run's level k (path[-1] is the picture);
    `noises[k]`: the ancestral noise of step k; the last step, to the clean level, has no
    noise, and `residual` (the picture less that step's x0 estimate) takes its place."""

    first: int
    path: list[torch.Tensor]
    noises: list[torch.Tensor]
    residual: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.path) - 1


@torch.no_grad()
def invert(denoiser: Denoiser, schedule, known: torch.Tensor, steps: int, first: int,
           generator: torch.Generator | None = None,
           step_hook: StepHook | None = None) -> Inversion:
    """Invert latents `known` over levels first..steps of the `steps`-step grid; the path's
    noise is drawn on the CPU (as the pipeline's initial noise) for reproducibility."""
    levels = schedule.sampling_levels(steps)[first:]
    draws = [torch.randn(known.shape, generator=generator).to(known.device)
             for _ in levels[:-1]]
    path = [lv.alpha * known + lv.sigma * z for lv, z in zip(levels[:-1], draws)] + [known]
    noises, residual = [], torch.zeros_like(known)
    for k, (now, nxt) in enumerate(zip(levels[:-1], levels[1:])):
        if step_hook is not None:
            step_hook(k)
        x0, _ = denoise_at(denoiser, path[k], now)
        if nxt.sigma > 0:
            mean, std = ddpm_posterior(path[k], x0.float(), now, nxt)
            noises.append((path[k + 1] - mean) / std)
        else:
            residual = known - x0.float()
    return Inversion(first, path, noises, residual)


@torch.no_grad()
def run_inverted(denoiser: Denoiser, schedule, inversion: Inversion, steps: int,
                 step_hook: StepHook | None = None, blend: Blend | None = None,
                 callback: Callback | None = None) -> torch.Tensor:
    """The ancestral sampler from the inversion's start, with its noises, under
    `denoiser` (the edit's prompt); `blend` may put part of each step's result back on the
    picture's path (a local edit); `callback(k, t, x, x0)` as the samplers'."""
    levels = schedule.sampling_levels(steps)[inversion.first:]
    x = inversion.path[0]
    for k, (now, nxt) in enumerate(zip(levels[:-1], levels[1:])):
        if step_hook is not None:
            step_hook(k)
        x0, _ = denoise_at(denoiser, x, now)
        if callback is not None:
            callback(k, now.t, x, x0)
        if nxt.sigma > 0:
            mean, std = ddpm_posterior(x, x0.float(), now, nxt)
            x = mean + std * inversion.noises[k]
        else:
            x = x0.float() + inversion.residual
        if blend is not None:
            x = blend(k, x, inversion.path[k + 1])
    return x
