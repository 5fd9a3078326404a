"""Rectified flow: the grid and the Euler step against diffusers' FlowMatchEulerDiscreteScheduler,
the training draws and targets, every sampler on an exactly solvable Gaussian, and the
config / scheduler.json plumbing (old folders still load)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ldmkit.config import ConfigError, load_config
from ldmkit.diffusion.flow import FlowSchedule, shift_time
from ldmkit.diffusion.objective import make_schedule, schedule_from_dict, scheduler_dict
from ldmkit.diffusion.registry import SAMPLERS
from ldmkit.diffusion.samplers import run_sampler, timesteps_for
from ldmkit.diffusion.schedule import NoiseSchedule


def fake_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a trained velocity network (depends on x and t)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.7 * x - 0.3 * torch.tanh(x) * torch.cos(t / 400.0) + 0.05 * torch.sin(t / 90.0)


def velocity_denoiser(schedule: FlowSchedule):
    def denoise(x, t):
        return schedule.split_prediction(fake_velocity(x, t), x, t, "flow")
    return denoise


def _x_T(seed: int = 0, shape=(2, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("T,steps", [(1000, 20), (1000, 7), (500, 10), (1000, 1), (50, 50)])
def test_flow_grid_equals_diffusers_flow_match_euler(T, steps):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
    ref.set_timesteps(steps)
    sched = FlowSchedule(T)
    ours = torch.tensor(timesteps_for(sched, steps), dtype=torch.float64)
    torch.testing.assert_close(ours, ref.timesteps.double(), rtol=0, atol=1e-3)
    sigmas = [level.sigma for level in sched.sampling_levels(steps)]
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), ref.sigmas.double(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [3.0, 0.5])
def test_flow_shift_equals_diffusers_shift(shift):
    """diffusers shifts the sigmas it is given once (its default grid also shifts the
    minimum of an already shifted table; ldmkit shifts its grid once)."""
    T, steps = 1000, 12
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    ref.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / T, steps, dtype=torch.float64).tolist())
    sigmas = [level.sigma for level in FlowSchedule(T, shift).sampling_levels(steps)]
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), ref.sigmas.double(),
                               rtol=0, atol=1e-6)
    assert shift_time(0.5, shift) == pytest.approx(shift / (1 + shift))


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_euler_sampler_equals_diffusers_flow_match_euler_steps(steps):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    ref.set_timesteps(steps)
    x = _x_T()
    for t in ref.timesteps:
        x = ref.step(fake_velocity(x, t.expand(x.shape[0])), t, x).prev_sample
    sched = FlowSchedule(1000)
    ours = run_sampler("euler", velocity_denoiser(sched), _x_T(), sched, steps)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_one_euler_step_is_x_plus_dt_times_v():
    sched = FlowSchedule(1000)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    ref.set_timesteps(2)
    x, t = _x_T(), ref.timesteps[0]
    v = fake_velocity(x, t.expand(2))
    frames = []
    run_sampler("euler", velocity_denoiser(sched), x, sched, 2,
                callback=lambda i, t, x_t, x0: frames.append(x_t))
    torch.testing.assert_close(frames[1], ref.step(v, t, x).prev_sample, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- training


def test_target_and_split_prediction_invert_each_other():
    sched = FlowSchedule(1000)
    x0, eps = _x_T(1), _x_T(2)
    t = torch.tensor([10.0, 730.0])
    x_t = sched.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t[1], 0.27 * x0[1] + 0.73 * eps[1])
    got_x0, got_eps = sched.split_prediction(sched.training_target(x0, eps, t), x_t, t)
    torch.testing.assert_close(got_x0, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_eps, eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.eps_from_x0(x_t, t, x0), eps, rtol=1e-4, atol=1e-4)


def test_logit_normal_draws_follow_the_logit_normal_distribution():
    torch.manual_seed(0)
    t = FlowSchedule(1000, t_sampling="logit-normal", logit_std=1.0).draw_timesteps(40_000)
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1000
    logit = torch.logit(t.double() / 1000)
    ref = torch.distributions.Normal(0.0, 1.0)
    for q in (0.1, 0.5, 0.9):  # quantiles of the logits against the normal's
        assert torch.quantile(logit, q).item() == pytest.approx(ref.icdf(torch.tensor(q)).item(),
                                                               abs=0.03)


def test_uniform_draws_with_a_shift_spend_more_time_at_high_noise():
    torch.manual_seed(0)
    plain = FlowSchedule(1000, t_sampling="uniform").draw_timesteps(20_000) / 1000
    shifted = FlowSchedule(1000, shift=3.0, t_sampling="uniform").draw_timesteps(20_000) / 1000
    assert plain.mean().item() == pytest.approx(0.5, abs=0.01)
    # E[3u / (1 + 2u)] for u ~ U(0, 1) = 3/2 - 3 ln(3) / 4
    assert shifted.mean().item() == pytest.approx(1.5 - 0.75 * math.log(3), abs=0.01)


def test_flow_loss_weight_is_one_and_refuses_other_predictions():
    sched = FlowSchedule()
    assert torch.equal(sched.loss_weight(torch.tensor([3.0, 900.0]), "flow", 5.0),
                       torch.ones(2))
    with pytest.raises(ValueError, match="velocity"):
        sched.training_target(_x_T(), _x_T(), torch.tensor([1.0, 2.0]), "eps")


# ----------------------------------------------------------------------------- samplers


def _gaussian_flow_case(sched: FlowSchedule, mu: float = 0.5, s: float = 0.3):
    """x0 ~ N(mu, s^2) on the straight path x = a x0 + t eps (a = 1 - t): E[x0 | x] is
    linear in x, and a sampler's output (its last x0 estimate, at the last level t_L) has
    std s * sqrt(a^2 s^2 / (a^2 s^2 + t_L^2))."""
    def exact(x, t_net):
        t = float(t_net[0]) / sched.timesteps
        a = 1 - t
        x0 = mu + a * s**2 / (a * a * s**2 + t * t) * (x - a * mu)
        return x0, (x - a * x0) / t

    def expected_std(steps: int) -> float:
        t = sched.sampling_levels(steps)[-2].sigma
        a = 1 - t
        return s * math.sqrt(a * a * s**2 / (a * a * s**2 + t * t))

    return exact, expected_std


@pytest.mark.parametrize("name,steps,tol", [("euler", 50, 0.02), ("ddim", 50, 0.02),
                                            ("dpmpp-2m", 15, 0.01), ("ddpm", 500, 0.02)])
def test_every_sampler_on_the_flow_path_reproduces_a_gaussian(name, steps, tol):
    sched = FlowSchedule(1000)
    exact, expected_std = _gaussian_flow_case(sched)
    x_T = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = run_sampler(name, exact, x_T, sched, steps, generator=torch.Generator().manual_seed(8))
    assert out.mean().item() == pytest.approx(0.5, abs=0.03)
    assert out.std().item() == pytest.approx(expected_std(steps), abs=tol)


def test_second_order_dpmpp_beats_euler_on_the_flow_path():
    sched = FlowSchedule(1000)
    exact, expected_std = _gaussian_flow_case(sched)
    x_T = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    err = {name: abs(run_sampler(name, exact, x_T, sched, 15).std().item() - expected_std(15))
           for name in ("euler", "dpmpp-2m")}
    assert err["dpmpp-2m"] < err["euler"] / 3, err


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registered_sampler_runs_on_both_schedules(name):
    flow = FlowSchedule(200)
    out = run_sampler(name, velocity_denoiser(flow), _x_T(), flow, 6,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    ddpm = NoiseSchedule("cosine", 200)
    frames = []
    run_sampler(name, lambda x, t: (x * 0.5, x), _x_T(), ddpm, 6,
                generator=torch.Generator().manual_seed(0),
                callback=lambda i, t, x, x0: frames.append(t))
    assert frames == timesteps_for(ddpm, 6) and all(isinstance(t, int) for t in frames)


# ----------------------------------------------------------------------------- plumbing


def test_config_objective_flow_builds_a_flow_schedule_and_old_prediction_key_loads():
    cfg = load_config(None, ["diffusion.objective=flow", "diffusion.flow_shift=2.0",
                             "diffusion.t_sampling=uniform"])
    sched = make_schedule(cfg.diffusion)
    assert isinstance(sched, FlowSchedule) and sched.shift == 2.0
    assert sched.t_sampling == "uniform"
    old = load_config(None, ["diffusion.prediction=v"])  # the key's name before flow
    assert old.diffusion.objective == "v"
    assert isinstance(make_schedule(old.diffusion), NoiseSchedule)
    with pytest.raises(ConfigError, match="objective"):
        load_config(None, ["diffusion.objective=x0"])


def test_scheduler_json_round_trip_and_old_folders_without_objective():
    sched, prediction = schedule_from_dict(scheduler_dict(FlowSchedule(500, 3.0), "flow", 0.0))
    assert isinstance(sched, FlowSchedule) and prediction == "flow"
    assert (sched.timesteps, sched.shift) == (500, 3.0)
    old, prediction = schedule_from_dict({"kind": "cosine", "timesteps": 50, "prediction": "v"})
    assert isinstance(old, NoiseSchedule) and prediction == "v"
    oldest, prediction = schedule_from_dict({"kind": "linear", "timesteps": 50})
    assert oldest.kind == "linear" and prediction == "eps"
    from ldmkit.errors import UserError
    with pytest.raises(UserError, match="shift"):
        schedule_from_dict({"objective": "flow", "timesteps": 50, "shift": -1})
