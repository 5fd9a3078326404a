"""Samplers against diffusers' schedulers (same model outputs, same spacing), the DDPM
paper's Algorithm 2, and an exactly solvable Gaussian data distribution."""

import inspect
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ldmkit.diffusion import samplers
from ldmkit.diffusion.registry import SAMPLERS, reference_sampler
from ldmkit.diffusion.samplers import (
    run_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    timesteps_for,
)
from ldmkit.diffusion.schedule import NoiseSchedule

COSINE = {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing",
          "prediction_type": "epsilon"}


def fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth, deterministic stand-in for a trained eps network (depends on x and t)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.8 * x + 0.2 * torch.tanh(x) * torch.cos(t / 300.0) + 0.05 * torch.sin(t / 100.0)


def eps_denoiser(schedule: NoiseSchedule):
    def denoise(x, t):
        eps = fake_eps(x, t)
        return schedule.x0_from_eps(x, t, eps), eps
    return denoise


def _x_T(seed: int = 0, shape=(2, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _recorder():
    frames = []
    return frames, lambda i, t, x, x0: frames.append((i, t, x.clone(), x0.clone()))


# ----------------------------------------------------------------------------- spacing


@pytest.mark.parametrize("T,steps", [(1000, 20), (1000, 7), (500, 30), (500, 8), (500, 500),
                                     (1000, 1)])
def test_timesteps_use_diffusers_trailing_spacing(T, steps):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert timesteps_for(NoiseSchedule("cosine", T), steps) == ref.timesteps.tolist()


def test_timesteps_start_at_T_minus_one_and_full_T_visits_every_step():
    sched = NoiseSchedule("cosine", 50)
    assert timesteps_for(sched, 50) == list(range(49, -1, -1))
    assert timesteps_for(sched, 3)[0] == 49
    with pytest.raises(ValueError, match="1..50"):
        timesteps_for(sched, 51)


# ----------------------------------------------------------------------------- vs diffusers


def _diffusers_loop(scheduler, steps, x_T, generator=None, **step_kwargs):
    scheduler.set_timesteps(steps)
    x, states = x_T.clone(), []
    for t in scheduler.timesteps:
        states.append(x.clone())
        x = scheduler.step(fake_eps(x, int(t)), t, x, generator=generator,
                           **step_kwargs).prev_sample
    return states, x


@pytest.mark.parametrize("steps", [20, 5])
def test_ddim_steps_equal_diffusers_ddim_scheduler(steps):
    sched = NoiseSchedule("cosine", 1000)
    ref = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True,
                        **COSINE)
    states, final = _diffusers_loop(ref, steps, _x_T())
    frames, cb = _recorder()
    out = sample_ddim(eps_denoiser(sched), _x_T(), sched, steps, eta=0.0, callback=cb)
    assert len(frames) == steps
    for (_, _, x, _), expected in zip(frames, states):  # every intermediate step, incl. the first
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, final, rtol=1e-4, atol=1e-4)


def test_stochastic_ddim_equals_diffusers_for_the_same_generator():
    sched = NoiseSchedule("cosine", 1000)
    ref = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True,
                        **COSINE)
    _, final = _diffusers_loop(ref, 10, _x_T(), torch.Generator().manual_seed(7), eta=0.5)
    out = sample_ddim(eps_denoiser(sched), _x_T(), sched, 10, eta=0.5,
                      generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, final, rtol=1e-4, atol=1e-4)


def _dpm_solver(order: int) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++",
                                       solver_order=order, **COSINE)


def test_dpmpp_2m_steps_equal_diffusers_dpm_solver_multistep_from_15_steps():
    steps = 15  # diffusers' lower_order_final stops here; so does ldmkit's
    sched = NoiseSchedule("cosine", 1000)
    states, final = _diffusers_loop(_dpm_solver(2), steps, _x_T())
    frames, cb = _recorder()
    out = sample_dpmpp_2m(eps_denoiser(sched), _x_T(), sched, steps, callback=cb)
    # states[1] follows the first-order first step, states[2] the first multistep (2nd-order) one
    assert len(frames) == len(states) == steps
    for (_, _, x, _), expected in zip(frames, states):
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, final, rtol=1e-4, atol=1e-4)


def _first_order_step(steps: int, index: int, x: torch.Tensor) -> torch.Tensor:
    """diffusers' first-order DPM-Solver++ update number `index` of `steps`, from x."""
    ref = _dpm_solver(1)
    ref.set_timesteps(steps)
    ref.set_begin_index(index)
    t = ref.timesteps[index]
    return ref.step(fake_eps(x, int(t)), t, x).prev_sample


@pytest.mark.parametrize("steps", [10, 4])
def test_dpmpp_2m_below_15_steps_takes_the_update_before_the_readout_first_order(steps):
    """diffusers' multistep updates up to the last two; then diffusers' first-order update
    twice (the second lands on x0_hat), where diffusers would take the first second order."""
    sched = NoiseSchedule("cosine", 1000)
    states, final = _diffusers_loop(_dpm_solver(2), steps, _x_T())
    frames, cb = _recorder()
    out = sample_dpmpp_2m(eps_denoiser(sched), _x_T(), sched, steps, callback=cb)
    for (_, _, x, _), expected in zip(frames[:-1], states[:-1]):
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)
    before_last = _first_order_step(steps, steps - 2, states[-2])
    torch.testing.assert_close(frames[-1][2], before_last, rtol=1e-4, atol=1e-4)
    assert (before_last - states[-1]).abs().max() > 1e-2  # diffusers' 2nd-order one differs
    torch.testing.assert_close(out, _first_order_step(steps, steps - 1, before_last),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [1000, 25])
def test_ddpm_equals_diffusers_ddpm_scheduler_for_the_same_generator(steps):
    sched = NoiseSchedule("cosine", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, clip_sample=False,
                        variance_type="fixed_small", **COSINE)
    shape = (1, 2, 4, 4)
    _, final = _diffusers_loop(ref, steps, _x_T(shape=shape), torch.Generator().manual_seed(3))
    out = sample_ddpm(eps_denoiser(sched), _x_T(shape=shape), sched, steps,
                      generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, final, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- vs the papers


def test_full_T_ddpm_is_algorithm_2_of_ho_et_al():
    """x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t) + sigma_t z, with
    sigma_t^2 = beta~_t and no noise on the last step, written here from the paper."""
    T = 100
    sched = NoiseSchedule("linear", T)
    betas = sched._betas.tolist()
    gen = torch.Generator().manual_seed(4)
    x = _x_T(1, shape=(1, 2, 4, 4)).double()
    ab = [math.prod(1 - b for b in betas[: k + 1]) for k in range(T)]
    for t in reversed(range(T)):
        eps = fake_eps(x, t)
        mean = (x - betas[t] / math.sqrt(1 - ab[t]) * eps) / math.sqrt(1 - betas[t])
        if t > 0:
            var = betas[t] * (1 - ab[t - 1]) / (1 - ab[t])
            x = mean + math.sqrt(var) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        else:
            x = mean
    out = sample_ddpm(eps_denoiser(sched), _x_T(1, shape=(1, 2, 4, 4)).double(), sched, T,
                      generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, x, rtol=1e-8, atol=1e-8)


def test_ddim_with_eta_one_is_ancestral_ddpm_on_the_same_subsequence():
    sched = NoiseSchedule("cosine", 500)
    a = sample_ddim(eps_denoiser(sched), _x_T(), sched, 25, eta=1.0,
                    generator=torch.Generator().manual_seed(5))
    b = sample_ddpm(eps_denoiser(sched), _x_T(), sched, 25,
                    generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _gaussian_case(sched: NoiseSchedule, mu: float = 0.5, s: float = 0.6):
    """Data x0 ~ N(mu, s^2): E[x0 | x_t] is linear in x_t, so the exact denoiser is known,
    and so is the std of a sampler's output, E[x0 | x_t] at its last step t_L:
    s * sqrt(ab s^2 / (ab s^2 + 1 - ab)), ab = alpha_bar(t_L)."""
    def exact(x, t):
        ab = sched.alpha_bar(int(t[0]))  # samplers pass one t for the whole batch
        x0 = mu + ab**0.5 * s**2 / (ab * s**2 + 1 - ab) * (x - ab**0.5 * mu)
        return x0, (x - ab**0.5 * x0) / (1 - ab) ** 0.5

    def expected_std(steps: int) -> float:
        ab = sched.alpha_bar(timesteps_for(sched, steps)[-1])
        return s * math.sqrt(ab * s**2 / (ab * s**2 + 1 - ab))

    return exact, expected_std


def _run_gaussian(name: str, sched: NoiseSchedule, steps: int,
                  n: int = 20_000) -> tuple[float, float, float]:
    exact, expected_std = _gaussian_case(sched)
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = run_sampler(name, exact, x_T, sched, steps, generator=torch.Generator().manual_seed(8))
    return out.mean().item(), out.std().item(), expected_std(steps)


# Ancestral DDPM plugs E[x0 | x_t] into the posterior, which drops Var[x0 | x_t]: it is
# exact only as the steps get fine, hence all T = 1000 steps (on fewer samples, for time).
@pytest.mark.parametrize("name,steps,n,tol", [("ddpm", 1000, 5_000, 0.02),
                                              ("ddim", 50, 20_000, 0.02),
                                              ("dpmpp-2m", 15, 20_000, 0.01)])
def test_samplers_with_the_exact_denoiser_reproduce_a_gaussian_data_distribution(name, steps, n,
                                                                                tol):
    mean, std, expected = _run_gaussian(name, NoiseSchedule("cosine", 1000), steps, n)
    assert mean == pytest.approx(0.5, abs=0.03)
    assert std == pytest.approx(expected, abs=tol)


# With the exact denoiser second order is the better update everywhere: below 15 steps, where
# DPM-Solver++ takes one more update first order (for guided models, see LOWER_ORDER_FINAL_BELOW),
# it keeps less of its lead over DDIM (10 steps: error 0.024 against DDIM's 0.059).
@pytest.mark.parametrize("steps,lead", [(15, 3), (10, 2)])
def test_second_order_dpmpp_2m_beats_first_order_ddim_at_equal_steps(steps, lead):
    sched = NoiseSchedule("cosine", 1000)
    errors = {}
    for name in ("ddim", "dpmpp-2m"):
        _, std, expected = _run_gaussian(name, sched, steps)
        errors[name] = abs(std - expected)
    assert errors["dpmpp-2m"] < errors["ddim"] / lead, errors


# ----------------------------------------------------------------------------- plumbing


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_sees_every_step_in_order_with_the_denoisers_x0(name):
    sched = NoiseSchedule("cosine", 200)
    frames, cb = _recorder()
    run_sampler(name, eps_denoiser(sched), _x_T(), sched, 6, callback=cb,
                generator=torch.Generator().manual_seed(0))
    assert [f[0] for f in frames] == list(range(6))
    assert [f[1] for f in frames] == timesteps_for(sched, 6)
    _, t, x, x0 = frames[2]
    expected, _ = eps_denoiser(sched)(x, torch.full((2,), t))
    torch.testing.assert_close(x0, expected)


def test_sampler_returns_the_last_x0_estimate():
    sched = NoiseSchedule("cosine", 200)
    for name in SAMPLERS:
        frames, cb = _recorder()
        out = run_sampler(name, eps_denoiser(sched), _x_T(), sched, 4, callback=cb,
                          generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, frames[-1][3])


def test_seeded_stochastic_samplers_are_reproducible():
    sched = NoiseSchedule("cosine", 200)
    runs = [sample_ddpm(eps_denoiser(sched), _x_T(), sched, 10,
                        generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(*runs)


def test_unknown_sampler_name_is_rejected():
    with pytest.raises(ValueError, match="lms"):
        run_sampler("lms", eps_denoiser(NoiseSchedule()), _x_T(), NoiseSchedule(), 5)


def test_every_registered_sampler_is_a_function_with_the_shared_signature():
    shared = list(inspect.signature(run_sampler).parameters)[1:]  # all but the name
    for info in SAMPLERS.values():
        assert list(inspect.signature(getattr(samplers, info.function)).parameters) == shared


def test_the_reference_sampler_is_ancestral_ddpm():
    assert reference_sampler() == "ddpm" and SAMPLERS["ddpm"].stochastic
    assert [name for name, info in SAMPLERS.items() if info.reference] == ["ddpm"]
