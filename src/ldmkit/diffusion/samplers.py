"""Samplers as pure functions over a denoiser (the k-diffusion shape).

A denoiser is `denoiser(x_t, t) -> (x0_hat, eps_hat)` with t a LongTensor (B,) of schedule
steps; guidance, clamping and the network's parameterisation all live inside it
(see guidance.CFGDenoiser), so each sampler is only its update rule.

Every sampler has the same signature `(denoiser, x, schedule, steps, eta, generator,
callback)`, x being the initial noise x_T, and is named in the registry's table
(ldmkit.diffusion.registry), through which `run_sampler` finds it by name.

Every sampler walks the timesteps of `timesteps_for(schedule, steps)` and after the last
one jumps to clean data (alpha_bar = 1): its final output is the last x0 estimate.
`callback(step_index, t, x_t, x0_hat)` is called once per step with the state the step
started from and the denoiser's x0 estimate there (the progressive-sampling frames).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ldmkit.diffusion.registry import SAMPLERS
from ldmkit.diffusion.schedule import NoiseSchedule, posterior_coefficients

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def timesteps_for(schedule: NoiseSchedule, steps: int) -> list[int]:
    """`steps` timesteps from noisiest to cleanest with "trailing" spacing (Lin et al. 2024,
    Table 2; diffusers' `timestep_spacing="trailing"`): t_i = round(T - i T/steps) - 1.
    It always starts at t = T - 1, where x_T ~ N(0, I) really is the marginal, unlike
    "leading" spacing, which starts up to T/steps - 1 steps early; steps = T gives every
    step T-1, ..., 0 (the classic sampler). Rounding is half-to-even, as numpy's."""
    total = schedule.timesteps
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in 1..{total} (the schedule's T), got {steps}")
    ratio = total / steps
    return [round(total - i * ratio) - 1 for i in range(steps)]


def _step_pairs(schedule: NoiseSchedule, steps: int) -> list[tuple[int, int]]:
    """(t, t_next) for each step; the last step's target is -1, i.e. clean data."""
    ts = timesteps_for(schedule, steps)
    return list(zip(ts, ts[1:] + [-1]))


def _denoise(denoiser: Denoiser, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    x0, eps = denoiser(x, t_batch)
    return x0.to(x.dtype), eps.to(x.dtype)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- DDPM


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int,
                eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 (DDPM), Algorithm 2 with sigma_t^2 = beta~_t.
    Each step draws from the posterior q(x_s | x_t, x0_hat) between consecutive timesteps
    of the (possibly strided) subsequence, so with steps = T it is the paper's sampler and
    with fewer steps it is the posterior of the jump t -> s (= DDIM with eta = 1).
    `eta` is ignored: DDPM is ancestral by definition (use DDIM for other etas)."""
    for i, (t, s) in enumerate(_step_pairs(schedule, steps)):
        x0, _ = _denoise(denoiser, x, t)
        if callback is not None:
            callback(i, t, x, x0)
        # t is shared by the batch: scalar coefficients, the same formula as the schedule's
        coef_x0, coef_xt, var = posterior_coefficients(schedule.alpha_bar(t), schedule.alpha_bar(s))
        x = coef_x0 * x0 + coef_xt * x
        if s >= 0:
            x = x + math.sqrt(var) * _noise_like(x, generator)
    return x


# ----------------------------------------------------------------------------- DDIM


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int,
                eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Song, Meng & Ermon 2021 (DDIM), eq. 12: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2)
    eps + sigma z, sigma = eta sqrt((1 - ab_s)/(1 - ab_t)) sqrt(1 - ab_t/ab_s).
    eta = 0 is the deterministic sampler, eta = 1 the ancestral one."""
    for i, (t, s) in enumerate(_step_pairs(schedule, steps)):
        x0, eps = _denoise(denoiser, x, t)
        if callback is not None:
            callback(i, t, x, x0)
        x = ddim_step(x0, eps, schedule.alpha_bar(t), schedule.alpha_bar(s), eta, generator)
    return x


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_s: float, eta: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM update from alpha_bar ab_t to ab_s given the denoiser's (x0, eps)."""
    sigma = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
    x = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - sigma**2, 0.0)) * eps
    return x + sigma * _noise_like(x, generator) if sigma > 0 else x


# ----------------------------------------------------------------------------- DPM-Solver++


def _alpha_sigma_lambda(ab: float) -> tuple[float, float, float]:
    """VP-SDE quantities: alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha/sigma)."""
    alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
    return alpha, sigma, (math.log(alpha / sigma) if sigma > 0 else math.inf)


# Below this many steps the last update before the final x0 readout is first order too
# (diffusers' lower_order_final, whose threshold this is, makes only the readout first
# order). With guidance the x0 estimates swing between steps and the second-order
# extrapolation across the wide last interval overshoots: on the demo's three seed models
# (w = 5, the same 400 prompts and noise) 10 steps drew small circles as crosses and orange as
# yellow, 95.5 / 98.25 / 96 % single-object fidelity against 98.75 / 99 / 99.25 % at
# 20 steps; with this update first order 98.25 / 99.5 / 98.5 % (BENCHMARKS.md, "Few-step
# DPM-Solver++"). With an exact denoiser the second-order step is the better one.
LOWER_ORDER_FINAL_BELOW = 15


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int,
                    eta: float = 0.0, generator: torch.Generator | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """Lu et al. 2022 (DPM-Solver++), Algorithm 2: the second-order multistep solver of the
    diffusion ODE in data (x0) prediction. With h = lambda_s - lambda_t:
        x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) D,
    D = x0_t (first order, used at the first step) or x0_t + (x0_t - x0_prev) / (2 r) with
    r = h_prev / h (second order). As in diffusers' DPMSolverMultistepScheduler with its
    default final sigma of zero, the last step is first order, so it returns x0_hat.
    Below LOWER_ORDER_FINAL_BELOW steps the update before it is first order as well (see
    there): here ldmkit departs from diffusers, which keeps that one second order.
    `eta` and `generator` are ignored: the solver is deterministic."""
    pairs = _step_pairs(schedule, steps)
    last_update = len(pairs) - 2 if steps < LOWER_ORDER_FINAL_BELOW else -1
    prev: tuple[torch.Tensor, float] | None = None  # (x0 at the previous step, its h)
    for i, (t, s) in enumerate(pairs):
        x0, _ = _denoise(denoiser, x, t)
        if callback is not None:
            callback(i, t, x, x0)
        if s < 0:  # sigma_s = 0: the first-order update lands exactly on x0_hat
            return x0
        _, sigma_t, lam_t = _alpha_sigma_lambda(schedule.alpha_bar(t))
        alpha_s, sigma_s, lam_s = _alpha_sigma_lambda(schedule.alpha_bar(s))
        h = lam_s - lam_t
        first_order = prev is None or i == last_update
        d = x0 if first_order else x0 + (x0 - prev[0]) * (h / (2.0 * prev[1]))
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
        prev = (x0, h)
    return x  # unreachable: the last pair always ends at -1


# ----------------------------------------------------------------------------- dispatch


def run_sampler(name: str, denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                steps: int, eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Run the sampler called `name`, a key of the registry's SAMPLERS table."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}")
    sampler = globals()[SAMPLERS[name].function]
    return sampler(denoiser, x, schedule, steps, eta=eta, generator=generator,
                   callback=callback)
