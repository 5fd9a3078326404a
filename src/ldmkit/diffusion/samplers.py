"""Samplers as pure functions over a denoiser (the k-diffusion shape).

A denoiser is `denoiser(x_t, t) -> (x0_hat, eps_hat)` with t a (B,) tensor of what the
network is told (integer DDPM steps, or float flow times); guidance, clamping and the
network's parameterisation all live inside it (see guidance.CFGDenoiser), so each sampler
is only its update rule.

Every sampler has the same signature `(denoiser, x, schedule, steps, eta, generator,
callback)`, x being the initial noise, and is named in the registry's table
(ldmkit.diffusion.registry), through which `run_sampler` finds it by name.

The schedule gives the grid: `schedule.sampling_levels(steps)`, `steps` levels from the
noisiest down and then the clean level (alpha = 1, sigma = 0), each with the path's
coefficients x_t = alpha x0 + sigma eps. The update rules are written in alpha and sigma
only, so the same sampler runs the DDPM schedule (alpha = sqrt(alpha_bar)) and rectified
flow (alpha = 1 - t, sigma = t) — both are Gaussian paths, and every rule below is exact
for any such path. A sampler's final output is the last x0 estimate.
`callback(step_index, t, x_t, x0_hat)` is called once per step with the state the step
started from and the denoiser's x0 estimate there (the progressive-sampling frames).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ldmkit.diffusion.registry import SAMPLERS
from ldmkit.diffusion.schedule import Level

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def timesteps_for(schedule, steps: int) -> list:
    """The network times of the sampler's `steps` steps, noisiest first (see
    `sampling_levels`; for DDPM the "trailing" spacing, diffusers' timestep_spacing)."""
    return [level.t for level in schedule.sampling_levels(steps)[:-1]]


def _step_pairs(schedule, steps: int) -> list[tuple[Level, Level]]:
    """(level, next level) for each step; the last step's target is the clean level."""
    levels = schedule.sampling_levels(steps)
    return list(zip(levels[:-1], levels[1:]))


def denoise_at(denoiser: Denoiser, x: torch.Tensor, level: Level
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) at a grid level: its t as the network takes it (an integer step of the
    DDPM schedule, a float time of the flow's), one per row."""
    dtype = torch.long if isinstance(level.t, int) else torch.float32
    t_batch = torch.full((x.shape[0],), level.t, dtype=dtype, device=x.device)
    x0, eps = denoiser(x, t_batch)
    return x0.to(x.dtype), eps.to(x.dtype)


def _exp_neg_h(now: Level, nxt: Level) -> float:
    """e^{-h}, h = lambda_s - lambda_t the step in log-SNR (lambda = log(alpha/sigma)):
    (alpha_t sigma_s) / (sigma_t alpha_s). 0 from pure noise (alpha_t = 0, flow's t = 1)."""
    return (now.alpha * nxt.sigma) / (now.sigma * nxt.alpha)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- DDPM


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, schedule, steps: int,
                eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 (DDPM), Algorithm 2 with sigma_t^2 = beta~_t.
    Each step draws from the posterior q(x_s | x_t, x0_hat) between consecutive levels of
    the (possibly strided) grid, so with steps = T it is the paper's sampler and with fewer
    steps it is the posterior of the jump t -> s (= DDIM with eta = 1). Written for any
    Gaussian path (Kingma et al. 2021, eq. 33, in log-SNR): mean = alpha_s (1 - e^{-2h}) x0
    + (sigma_s / sigma_t) e^{-h} x_t, variance sigma_s^2 (1 - e^{-2h}).
    `eta` is ignored: DDPM is ancestral by definition (use DDIM for other etas)."""
    for i, (now, nxt) in enumerate(_step_pairs(schedule, steps)):
        x0, _ = denoise_at(denoiser, x, now)
        if callback is not None:
            callback(i, now.t, x, x0)
        if nxt.sigma == 0:  # the clean level: the posterior is x0 itself
            return x0
        mean, std = ddpm_posterior(x, x0, now, nxt)
        x = mean + std * _noise_like(x, generator)
    return x


def ddpm_posterior(x: torch.Tensor, x0: torch.Tensor, now: Level, nxt: Level
                   ) -> tuple[torch.Tensor, float]:
    """(mean, std) of q(x_nxt | x_now = x, x0), for a level `nxt` below `now` with
    sigma > 0 (the clean level's posterior is x0 itself)."""
    e = _exp_neg_h(now, nxt)
    return (nxt.alpha * (1.0 - e * e) * x0 + (nxt.sigma / now.sigma) * e * x,
            nxt.sigma * math.sqrt(1.0 - e * e))


# ----------------------------------------------------------------------------- DDIM


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, schedule, steps: int,
                eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Song, Meng & Ermon 2021 (DDIM), eq. 12: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps
    + c z with c = eta sigma_s sqrt(1 - e^{-2h}) (for DDPM, eta sqrt((1 - ab_s)/(1 - ab_t))
    sqrt(1 - ab_t/ab_s) as in the paper). eta = 0 is the deterministic sampler, eta = 1
    the ancestral one."""
    for i, (now, nxt) in enumerate(_step_pairs(schedule, steps)):
        x0, eps = denoise_at(denoiser, x, now)
        if callback is not None:
            callback(i, now.t, x, x0)
        x = ddim_step(x0, eps, now, nxt, eta, generator)
    return x


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, schedule, steps: int,
                 eta: float = 0.0, generator: torch.Generator | None = None,
                 callback: Callback | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE. For rectified flow that is
    x_s = x_t + (s - t) v (diffusers' FlowMatchEulerDiscreteScheduler), which is exactly
    x_s = (1 - s) x0 + s eps: the deterministic DDIM update, as Karras et al. 2022
    (section 3) show DDIM is Euler in the scaled variables for any schedule. `eta` and
    `generator` are ignored."""
    return sample_ddim(denoiser, x, schedule, steps, 0.0, None, callback)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, now: Level, nxt: Level, eta: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM update from level `now` to `nxt` given the denoiser's (x0, eps)."""
    if nxt.sigma == 0:
        return x0
    c = eta * nxt.sigma * math.sqrt(max(1.0 - _exp_neg_h(now, nxt) ** 2, 0.0))
    x = nxt.alpha * x0 + math.sqrt(max(nxt.sigma**2 - c**2, 0.0)) * eps
    return x + c * _noise_like(x, generator) if c > 0 else x


# ----------------------------------------------------------------------------- DPM-Solver++


def _log_snr(level: Level) -> float:
    """lambda = log(alpha / sigma); -inf at pure noise (alpha = 0)."""
    return math.log(level.alpha / level.sigma) if level.alpha > 0 else -math.inf


# Below this many steps the last update before the final x0 readout is first order too
# (diffusers' lower_order_final, whose threshold this is, makes only the readout first
# order). With guidance the x0 estimates swing between steps and the second-order
# extrapolation across the wide last interval overshoots: on the demo's three seed models
# (w = 5, the same 400 prompts and noise) 10 steps drew small circles as crosses and orange as
# yellow, 95.5 / 98.25 / 96 % single-object fidelity against 98.75 / 99 / 99.25 % at
# 20 steps; with this update first order 98.25 / 99.5 / 98.5 % (BENCHMARKS.md, "Few-step
# DPM-Solver++"). With an exact denoiser the second-order step is the better one.
LOWER_ORDER_FINAL_BELOW = 15

# The second-order correction extrapolates by 1/(2r), r = h_prev / h; a step more than
# twice as long in log-SNR as the one before (r < 0.5) amplifies the estimates' error
# instead of cancelling it, so that step is first order. The DDPM grids never do this (r >=
# 0.6 at 10-30 steps); flow's grid ends with a long step into t = 1/T (r ~ 0.18), where
# on an exactly solvable Gaussian the second-order update overshot the std by 31 % at 15
# steps and first order lands within 1.5 % (tests/test_flow.py).
MIN_STEP_RATIO = 0.5


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, schedule, steps: int,
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
    A step more than twice the previous one in log-SNR is first order (MIN_STEP_RATIO).
    From pure noise (flow's t = 1, lambda = -inf) the first step is x_s = alpha_s x0 +
    sigma_s x_t, and the next one (h_prev = inf) is second order in form but its
    correction is zero.
    `eta` and `generator` are ignored: the solver is deterministic."""
    pairs = _step_pairs(schedule, steps)
    last_update = len(pairs) - 2 if steps < LOWER_ORDER_FINAL_BELOW else -1
    prev: tuple[torch.Tensor, float] | None = None  # (x0 at the previous step, its h)
    for i, (now, nxt) in enumerate(pairs):
        x0, _ = denoise_at(denoiser, x, now)
        if callback is not None:
            callback(i, now.t, x, x0)
        if nxt.sigma == 0:  # sigma_s = 0: the first-order update lands exactly on x0_hat
            return x0
        h = _log_snr(nxt) - _log_snr(now)
        first_order = prev is None or i == last_update or prev[1] < MIN_STEP_RATIO * h
        d = x0 if first_order else x0 + (x0 - prev[0]) * (h / (2.0 * prev[1]))
        x = (nxt.sigma / now.sigma) * x - nxt.alpha * math.expm1(-h) * d
        prev = (x0, h)
    return x  # unreachable: the last pair always ends at the clean level


# ----------------------------------------------------------------------------- dispatch


def run_sampler(name: str, denoiser: Denoiser, x: torch.Tensor, schedule,
                steps: int, eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Run the sampler called `name`, a key of the registry's SAMPLERS table."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}")
    sampler = globals()[SAMPLERS[name].function]
    return sampler(denoiser, x, schedule, steps, eta=eta, generator=generator,
                   callback=callback)
