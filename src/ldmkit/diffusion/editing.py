"""Sampling that starts from a picture (SDEdit) and keeps part of it (inpainting), over the
unchanged samplers of samplers.py: every piece here is a view of the schedule's grid or a
wrapper around the denoiser, so DDPM, DDIM, Euler, DPM-Solver++ and any later sampler run
it, on the DDPM schedule or on rectified flow, without knowing.

- **img2img** (Meng et al. 2022, SDEdit): noise the picture's latent to the level that
  `strength` names on the text-to-image grid, then run the rest of that grid
  (`GridSlice`). As diffusers' img2img, strength s with N steps runs the last floor(s N)
  of the N-step grid: s = 1 is text-to-image, s = 0 returns the latent untouched.
- **inpainting** with a text-to-image model (no extra input channels): `KnownRegion` makes
  the denoiser's x0 estimate the known latent wherever the mask is 0. Every sampler moves
  x_t towards its x0 estimate, so there the state stays the known latent noised to the
  current level (for the deterministic samplers exactly alpha x0 + sigma eps with the
  start's eps; the ancestral one draws fresh noise each step): the blended diffusion of
  Avrahami et al. 2023 ("Blended Latent Diffusion"), done inside the denoiser instead of
  by editing the sampler's state. A soft mask (0 < m < 1 at the edge) blends the two.
- **resampling** (Lugmayr et al. 2022, RePaint, jump length 1): each step is taken,
  its result noised back to the step's start by the forward process, and taken again,
  `resample` more times, so the generated region can adapt to the known one.
"""

from __future__ import annotations

import math

import torch

from ldmkit.diffusion.samplers import Callback, Denoiser, run_sampler
from ldmkit.diffusion.schedule import Level


def steps_run(steps: int, strength: float) -> int:
    """How many of the `steps`-step grid's steps a run of this strength takes: the last
    floor(strength * steps) (diffusers' rule; the epsilon absorbs 0.7 * 10 = 6.99..)."""
    return min(steps, int(strength * steps + 1e-6))


def start_index(steps: int, strength: float) -> int:
    """Index of the grid level the run starts from (0 = pure noise, `steps` = clean)."""
    return steps - steps_run(steps, strength)


class GridSlice:
    """A schedule whose sampling grid is levels first..last of its base's grid for the
    same step count; every other attribute is the base schedule's. Handing this to a
    sampler runs the part of the text-to-image trajectory that an edit needs."""

    def __init__(self, schedule, first: int, last: int | None = None):
        self.base, self.first, self.last = schedule, first, last

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (copy/pickle): avoid recursing into itself
            raise AttributeError(name)
        return getattr(self.base, name)

    def sampling_levels(self, steps: int) -> list[Level]:
        levels = self.base.sampling_levels(steps)
        return levels[self.first:None if self.last is None else self.last + 1]


def noised_start(schedule, steps: int, first: int, latents: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    """The sampler's starting state: the latents on the forward path at grid level
    `first`, alpha x0 + sigma eps. At level 0 it is the noise itself, as text-to-image
    starts (there alpha is ~0 on the DDPM grid, exactly 0 for flow), so strength 1 gives
    the text-to-image images for the same noise bit for bit."""
    if first == 0:
        return noise
    level = schedule.sampling_levels(steps)[first]
    return level.alpha * latents + level.sigma * noise


def renoise(x: torch.Tensor, now: Level, back: Level,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward process from level `now` back to the noisier `back`: q(x_back | x_now) =
    N((a_b / a_n) x_now, s_b^2 - (a_b / a_n)^2 s_n^2) for the path x = a x0 + s eps."""
    ratio = back.alpha / now.alpha
    std = math.sqrt(max(back.sigma**2 - (ratio * now.sigma) ** 2, 0.0))
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return ratio * x + std * noise


class KnownRegion:
    """`denoiser(x_t, t) -> (x0, eps)` whose x0 is the known latent where `mask` is 0,
    the wrapped denoiser's where it is 1, a blend between (a soft edge); eps is rebuilt
    from x_t and that x0 by the schedule, so the pair stays consistent with x_t for any
    sampler. `known` (B, C, h, w) scaled latents, `mask` (B, 1, h, w), 1 = repaint."""

    def __init__(self, denoiser: Denoiser, schedule, known: torch.Tensor, mask: torch.Tensor):
        self.denoiser, self.schedule = denoiser, schedule
        self.known, self.mask = known, mask

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0, _ = self.denoiser(x_t, t)
        known, mask = self.known.to(x0.dtype), self.mask.to(x0.dtype)
        x0 = mask * x0 + (1.0 - mask) * known
        return x0, self.schedule.eps_from_x0(x_t, t, x0).to(x0.dtype)


def sample_from(name: str, denoiser: Denoiser, x: torch.Tensor, schedule, steps: int,
                first: int = 0, resample: int = 0, eta: float = 0.0,
                generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Run sampler `name` over levels first..clean of the `steps`-step grid from state x
    (at level `first`). With `resample` > 0 each step but the last (which lands on clean
    data) is retaken that many more times after noising its result back (RePaint); the
    sampler then runs one step at a time, so a multistep solver is first order."""
    if resample == 0:
        return run_sampler(name, denoiser, x, GridSlice(schedule, first), steps, eta=eta,
                           generator=generator, callback=callback)
    levels = schedule.sampling_levels(steps)
    for i in range(first, steps):
        step_callback = None if callback is None else _shifted(callback, i - first)
        rounds = resample + 1 if i < steps - 1 else 1
        start = x
        for r in range(rounds):
            x = run_sampler(name, denoiser, start, GridSlice(schedule, i, i + 1), steps,
                            eta=eta, generator=generator,
                            callback=step_callback if r == rounds - 1 else None)
            if r < rounds - 1:
                start = renoise(x, levels[i + 1], levels[i], generator)
    return x


def _shifted(callback: Callback, offset: int) -> Callback:
    """The callback with step indices counted over the whole run, not one slice."""
    def call(step: int, t, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        callback(step + offset, t, x_t, x0)
    return call
