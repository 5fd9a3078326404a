"""The noise schedule and every formula that depends only on it: the forward process,
conversions between the eps / x0 / v parameterisations, training targets and weights,
and the DDPM posterior. Samplers and the trainer call these; nothing else knows an alpha.

Conventions: an integer timestep t lies in [0, T); alpha_bar(t) = prod_{s<=t} (1 - beta_s)
(Ho et al. 2020), so t = 0 is the least noisy step. t = -1 stands for "clean data"
(alpha_bar = 1), which samplers use as the target of their last step.
The tables are kept in float64 (the cosine schedule's alpha_bar reaches ~1e-5, where float32
loses digits in 1 - alpha_bar); per-sample coefficients are gathered from them in float64
and only the result is cast to the data's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldmkit.errors import UserError

KINDS = ("cosine", "linear")
PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class Level:
    """One point of a sampler's grid: what the network is told (`t`: an integer step for
    DDPM, a float for flow matching) and the path's coefficients there,
    x_t = alpha x0 + sigma eps. Every sampler is written in (alpha, sigma) alone, so one
    implementation serves every schedule (Kingma et al. 2021's view of Gaussian paths)."""

    t: float | int
    alpha: float
    sigma: float


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 (Improved DDPM), eq. 17: alpha_bar(t) = f(t)/f(0) with
    f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2); beta_t = 1 - alpha_bar(t+1)/alpha_bar(t),
    clipped at 0.999 so the last steps stay invertible."""
    def f(step: int) -> float:
        return math.cos((step / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1.0 - f(t + 1) / f(t), max_beta) for t in range(timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(timesteps: int) -> torch.Tensor:
    """Ho et al. 2020's linear schedule, 1e-4 ... 0.02 for T = 1000. For other T both ends
    are scaled by 1000/T (as in Improved DDPM's code) so the total noise added, and hence
    alpha_bar at the last step, stays about the same whatever T is."""
    scale = 1000.0 / timesteps
    return torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64)


def posterior_coefficients(ab_t, ab_s):
    """(coef_x0, coef_xt, variance) of q(x_s | x_t, x0) = N(coef_x0 x0 + coef_xt x_t, variance)
    from alpha_bar at t and at an earlier s, as floats or tensors (Ho et al. 2020, eq. 7,
    with beta = 1 - ab_t/ab_s the effective beta of the jump t -> s)."""
    beta = 1.0 - ab_t / ab_s
    coef_x0 = ab_s**0.5 * beta / (1.0 - ab_t)
    coef_xt = (1.0 - beta) ** 0.5 * (1.0 - ab_s) / (1.0 - ab_t)
    return coef_x0, coef_xt, beta * (1.0 - ab_s) / (1.0 - ab_t)


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) coefficients -> (B, 1, 1, ...) in `like`'s dtype, ready to multiply `like`."""
    return coef.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """A discrete DDPM noise schedule with T steps (`kind` = "cosine" or "linear")."""

    objective = "diffusion"  # trains eps or v (FlowSchedule: "flow")

    def __init__(self, kind: str = "cosine", timesteps: int = 1000):
        if kind not in KINDS:
            raise ValueError(f"schedule kind {kind!r} is not one of {KINDS}")
        if timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {timesteps}")
        self.kind = kind
        self.timesteps = timesteps
        self._betas = cosine_betas(timesteps) if kind == "cosine" else linear_betas(timesteps)
        self._alphas = 1.0 - self._betas
        self._ab = torch.cumprod(self._alphas, dim=0)
        self._ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), self._ab[:-1]])
        self._device_tables: dict[tuple[str, str], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, timesteps={self.timesteps})"

    # ------------------------------------------------------------------ tables (float32 views)

    @property
    def betas(self) -> torch.Tensor:
        return self._betas.float()

    @property
    def alphas(self) -> torch.Tensor:
        return self._alphas.float()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._ab.float()

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return self._ab_prev.float()

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at one integer step as a Python float (float64); t = -1 gives 1.0."""
        if not -1 <= t < self.timesteps:
            raise ValueError(f"timestep {t} outside -1..{self.timesteps - 1}")
        return 1.0 if t < 0 else float(self._ab[t])

    def _ab_at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar gathered at a (B,) tensor of steps, float64, on t's device, -1 -> 1.
        The table is copied to each device once; gathering never syncs with the host."""
        key = (str(t.device), "ab")
        table = self._device_tables.get(key)
        if table is None:
            table = torch.cat([self._ab, torch.ones(1, dtype=torch.float64)]).to(t.device)
            self._device_tables[key] = table
        t = t.long()
        # -1 -> the appended 1.0; index_select is far cheaper than advanced indexing on CPU
        return table.index_select(0, torch.where(t < 0, t + table.shape[0], t).reshape(-1))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at steps t (float32)."""
        ab = self._ab_at(t)
        return (ab / (1.0 - ab)).float()

    # ------------------------------------------------------------------ training draws

    def draw_timesteps(self, n: int) -> torch.Tensor:
        """n training timesteps, uniform over 0..T-1, drawn on the CPU (long)."""
        return torch.randint(0, self.timesteps, (n,))

    # ------------------------------------------------------------------ sampling grid

    def sampling_levels(self, steps: int) -> list[Level]:
        """`steps` levels with "trailing" spacing (Lin et al. 2024, Table 2; diffusers'
        `timestep_spacing="trailing"`): t_i = round(T - i T/steps) - 1, then the clean
        level t = -1 (alpha = 1). It always starts at t = T - 1, where x_T ~ N(0, I) really
        is the marginal, unlike "leading" spacing; steps = T visits every step T-1, ..., 0
        (the classic sampler). Rounding is half-to-even, as numpy's."""
        total = self.timesteps
        if not 1 <= steps <= total:
            raise ValueError(f"steps must be in 1..{total} (the schedule's T), got {steps}")
        ratio = total / steps
        ts = [round(total - i * ratio) - 1 for i in range(steps)] + [-1]
        return [Level(t, math.sqrt(self.alpha_bar(t)), math.sqrt(1.0 - self.alpha_bar(t)))
                for t in ts]

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I) with the given noise."""
        ab = self._ab_at(t)
        return _bcast(ab.sqrt(), x0) * x0 + _bcast((1.0 - ab).sqrt(), x0) * noise

    # ------------------------------------------------------------------ conversions

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = x_t / sqrt(ab) - sqrt(1/ab - 1) eps (coefficients formed in float64)."""
        ab = self._ab_at(t)
        return _bcast(ab.rsqrt(), x_t) * x_t - _bcast((1.0 / ab - 1.0).sqrt(), x_t) * eps

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(ab) - x0) / sqrt(1/ab - 1), the inverse of `x0_from_eps`."""
        ab = self._ab_at(t)
        return (_bcast(ab.rsqrt(), x_t) * x_t - x0) / _bcast((1.0 / ab - 1.0).sqrt(), x_t)

    def v_from(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Salimans & Ho 2022: v = sqrt(ab) eps - sqrt(1 - ab) x0."""
        ab = self._ab_at(t)
        return _bcast(ab.sqrt(), x0) * eps - _bcast((1.0 - ab).sqrt(), x0) * x0

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(ab) x_t - sqrt(1 - ab) v (a rotation: stable at every t)."""
        ab = self._ab_at(t)
        return _bcast(ab.sqrt(), x_t) * x_t - _bcast((1.0 - ab).sqrt(), x_t) * v

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - ab) x_t + sqrt(ab) v."""
        ab = self._ab_at(t)
        return _bcast((1.0 - ab).sqrt(), x_t) * x_t + _bcast(ab.sqrt(), x_t) * v

    def split_prediction(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A network output in its own parameterisation -> (x0, eps), in x_t's dtype.
        eps: eps is the output, x0 by `x0_from_eps`. v: both by the rotation formulas, which
        never divide by sqrt(ab) and so stay bounded at the noisiest steps."""
        out = model_out.to(x_t.dtype)
        if prediction == "eps":
            return self.x0_from_eps(x_t, t, out), out
        if prediction == "v":
            return self.x0_from_v(x_t, t, out), self.eps_from_v(x_t, t, out)
        raise ValueError(f"prediction {prediction!r} is not one of {PREDICTIONS}")

    # ------------------------------------------------------------------ training

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        prediction: str) -> torch.Tensor:
        """What the network regresses: the noise (eps) or v."""
        if prediction == "eps":
            return noise
        if prediction == "v":
            return self.v_from(x0, noise, t)
        raise ValueError(f"prediction {prediction!r} is not one of {PREDICTIONS}")

    def loss_weight(self, t: torch.Tensor, prediction: str, min_snr_gamma: float) -> torch.Tensor:
        """Hang et al. 2023 (min-SNR-gamma) per-sample weights, shape (B,), float32.
        The paper's weight for x0-loss is min(SNR, gamma); divided by the factor that turns
        the x0 error into the eps error (SNR) or the v error (SNR + 1). gamma = 0 -> all 1."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction {prediction!r} is not one of {PREDICTIONS}")
        if min_snr_gamma <= 0:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        ab = self._ab_at(t)
        snr = ab / (1.0 - ab)
        clipped = snr.clamp(max=min_snr_gamma)
        return (clipped / snr if prediction == "eps" else clipped / (snr + 1.0)).float()

    # ------------------------------------------------------------------ posterior

    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                                t_prev: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ho et al. 2020 eq. 6-7: q(x_s | x_t, x0) with s = t - 1 by default. Any earlier
        s (a sampler skipping steps; -1 = clean data) uses the same formula with the
        effective beta = 1 - ab_t / ab_s of the jump. Returns (mean, variance (B,1,..))."""
        ab_t = self._ab_at(t)
        ab_s = self._ab_at(t - 1 if t_prev is None else t_prev)
        coef_x0, coef_xt, variance = posterior_coefficients(ab_t, ab_s)
        mean = _bcast(coef_x0, x_t) * x0 + _bcast(coef_xt, x_t) * x_t
        return mean, _bcast(variance, x_t)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        """What scheduler.json holds; the betas are derived, so kind and T suffice."""
        return {"kind": self.kind, "timesteps": self.timesteps}

    @classmethod
    def from_dict(cls, data: dict, source: str = "scheduler.json") -> NoiseSchedule:
        """Rebuild from `to_dict` output; other keys (e.g. prediction) are left to the caller.
        Missing or bad values raise UserError naming `source`."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(data).__name__}")
        kind, timesteps = data.get("kind"), data.get("timesteps")
        if kind not in KINDS:
            raise UserError(f"{source}: kind = {kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
            raise UserError(f"{source}: timesteps = {timesteps!r} must be an integer >= 2")
        return cls(kind, timesteps)
