"""Rectified flow (Liu et al. 2022; Lipman et al. 2022's flow matching with the straight
path; Esser et al. 2024, SD3): the noisy latent is the straight line between data and noise,

    x_t = (1 - t) x0 + t eps,        t in [0, 1] (t = 1 is pure noise),

and the network regresses its velocity v = dx_t/dt = eps - x0. Sampling integrates
dx/dt = v from t = 1 to 0.

`FlowSchedule` offers what the trainer, the guidance wrapper and the samplers ask of a
schedule (the same methods as `NoiseSchedule`), so they run either without knowing which:
- the network sees t scaled to [0, T] as a float (T = `timesteps`, 1000 by default, as
  SD3's and diffusers' flow models), so the sinusoidal embedding has the same range as for
  the integer DDPM steps;
- `sampling_levels` gives the (t, alpha, sigma) grid the samplers walk, alpha = 1 - t,
  sigma = t: the straight path is a Gaussian path x = alpha x0 + sigma eps like the DDPM
  one, so DDIM, DPM-Solver++ and the ancestral sampler apply to it unchanged.

Timesteps for training are drawn uniformly or logit-normally (SD3, section 3.1: more
weight on the middle of the path, where the velocity is hardest to predict), then moved
by the shift s (SD3 eq. 23; diffusers' `shift`): t' = s t / (1 + (s - 1) t), s > 1
spending more of training and of the sampler's steps at high noise.
"""

from __future__ import annotations

import torch

from ldmkit.diffusion.schedule import Level
from ldmkit.errors import UserError

T_SAMPLING = ("uniform", "logit-normal")


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def shift_time(t, shift: float):
    """SD3's shift of the time axis (eq. 23): t' = s t / (1 + (s - 1) t); s = 1 is identity.
    Works on floats and tensors."""
    return shift * t / (1 + (shift - 1) * t)


class FlowSchedule:
    """The straight path from data (t = 0) to noise (t = 1), with network time t * T."""

    objective = "flow"

    def __init__(self, timesteps: int = 1000, shift: float = 1.0,
                 t_sampling: str = "logit-normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        if timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {timesteps}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if t_sampling not in T_SAMPLING:
            raise ValueError(f"t_sampling {t_sampling!r} is not one of {T_SAMPLING}")
        self.timesteps, self.shift, self.t_sampling = timesteps, float(shift), t_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def __repr__(self) -> str:
        return (f"FlowSchedule(timesteps={self.timesteps}, shift={self.shift}, "
                f"t_sampling={self.t_sampling!r})")

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Network time (B,) in [0, T] -> the path's t in [0, 1], float32."""
        return t.float() / self.timesteps

    # ------------------------------------------------------------------ training

    def draw_timesteps(self, n: int) -> torch.Tensor:
        """n network times for a training batch, drawn on the CPU (float32, in (0, T))."""
        if self.t_sampling == "uniform":
            u = torch.rand(n)
        else:  # logit-normal: sigmoid of a normal draw
            u = torch.sigmoid(torch.randn(n) * self.logit_std + self.logit_mean)
        return shift_time(u, self.shift) * self.timesteps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps."""
        s = _bcast(self._sigma(t), x0)
        return (1 - s) * x0 + s * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        prediction: str = "flow") -> torch.Tensor:
        """The velocity of the straight path, eps - x0 (the same at every t)."""
        _check(prediction)
        return noise - x0

    def loss_weight(self, t: torch.Tensor, prediction: str, min_snr_gamma: float
                    ) -> torch.Tensor:
        """Plain velocity MSE: the logit-normal draw already weights the middle of the path
        (SD3 eq. 19); min-SNR is a DDPM reweighting and does not apply."""
        _check(prediction)
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)

    # ------------------------------------------------------------------ conversions

    def split_prediction(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         prediction: str = "flow") -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity -> (x0, eps): x0 = x_t - t v, eps = x_t + (1 - t) v."""
        _check(prediction)
        v = model_out.to(x_t.dtype)
        s = _bcast(self._sigma(t), x_t)
        return x_t - s * v, x_t + (1 - s) * v

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - (1 - t) x0) / t (t > 0: samplers never ask at t = 0)."""
        s = _bcast(self._sigma(t), x_t)
        return (x_t - (1 - s) * x0) / s

    # ------------------------------------------------------------------ sampling

    def sampling_levels(self, steps: int) -> list[Level]:
        """`steps` levels from t = 1 down, then the clean level t = 0. As diffusers'
        FlowMatchEulerDiscreteScheduler: t evenly spaced from 1 to 1/T, then shifted."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps} (the schedule's T), "
                             f"got {steps}")
        grid = torch.linspace(1.0, 1.0 / self.timesteps, steps, dtype=torch.float64)
        sigmas = [float(shift_time(s, self.shift)) for s in grid]
        return [Level(s * self.timesteps, 1.0 - s, s) for s in sigmas] + [Level(0.0, 1.0, 0.0)]

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        """What scheduler.json holds (the training draw is kept for the record)."""
        return {"objective": "flow", "timesteps": self.timesteps, "shift": self.shift,
                "t_sampling": self.t_sampling, "logit_mean": self.logit_mean,
                "logit_std": self.logit_std}

    @classmethod
    def from_dict(cls, data: dict, source: str = "scheduler.json") -> FlowSchedule:
        timesteps, shift = data.get("timesteps"), data.get("shift", 1.0)
        if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
            raise UserError(f"{source}: timesteps = {timesteps!r} must be an integer >= 2")
        if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
            raise UserError(f"{source}: shift = {shift!r} must be a number > 0")
        sampling = data.get("t_sampling", "logit-normal")
        if sampling not in T_SAMPLING:
            raise UserError(f"{source}: t_sampling = {sampling!r} is not one of "
                            f"{', '.join(T_SAMPLING)}")
        return cls(timesteps, float(shift), sampling, float(data.get("logit_mean", 0.0)),
                   float(data.get("logit_std", 1.0)))


def _check(prediction: str) -> None:
    if prediction != "flow":
        raise ValueError(f"a FlowSchedule trains and samples velocity ('flow'), "
                         f"not {prediction!r}")
