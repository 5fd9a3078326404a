"""The noise schedule against the papers' formulas and diffusers' schedulers."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import UserError


def _f(t: float, T: int, s: float = 0.008) -> float:
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


# ----------------------------------------------------------------------------- betas


@pytest.mark.parametrize("T", [1000, 500])
def test_cosine_betas_equal_diffusers_squaredcos_cap_v2(T):
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=T).betas
    ours = NoiseSchedule("cosine", T).betas
    assert ours.shape == (T,)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("T", [1000, 500])
def test_linear_betas_equal_diffusers_linear_with_ddpm_range_scaled_by_1000_over_T(T):
    scale = 1000 / T
    ref = DDPMScheduler(beta_schedule="linear", beta_start=1e-4 * scale, beta_end=0.02 * scale,
                        num_train_timesteps=T).betas
    ours = NoiseSchedule("linear", T).betas
    torch.testing.assert_close(ours.double(), ref.double(), rtol=0, atol=1e-7)
    assert ours[0].item() == pytest.approx(1e-4 * scale)
    assert ours[-1].item() == pytest.approx(0.02 * scale)


def test_cosine_alpha_bar_is_f_of_t_plus_one_over_f_zero_until_the_clip():
    T = 1000
    sched = NoiseSchedule("cosine", T)
    ab = sched._ab  # float64 table
    for t in [0, 1, 10, 250, 500, 900, 990]:
        assert ab[t].item() == pytest.approx(_f(t + 1, T) / _f(0, T), rel=1e-9)
    assert sched.betas.max().item() == pytest.approx(0.999)  # the clip is hit at the very end
    assert sched.betas[-1].item() == pytest.approx(0.999)


def test_tables_are_float32_and_prev_is_shifted_with_a_leading_one():
    sched = NoiseSchedule("cosine", 100)
    for table in (sched.betas, sched.alphas, sched.alphas_cumprod, sched.alphas_cumprod_prev):
        assert table.dtype == torch.float32 and table.shape == (100,)
    assert sched.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(sched.alphas_cumprod_prev[1:], sched.alphas_cumprod[:-1])
    torch.testing.assert_close(sched.alphas, 1 - sched.betas)
    expected = torch.cumprod(sched.alphas.double(), 0).float()
    torch.testing.assert_close(sched.alphas_cumprod, expected)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar_and_decreases():
    sched = NoiseSchedule("cosine", 1000)
    t = torch.arange(1000)
    snr = sched.snr(t)
    ab = sched._ab  # float64: in float32, 1 - ab near t = 0 has only ~3 significant digits
    torch.testing.assert_close(snr.double(), ab / (1 - ab), rtol=1e-6, atol=0)
    assert snr.dtype == torch.float32
    assert bool((snr[1:] < snr[:-1]).all())


# ----------------------------------------------------------------------------- forward process


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_has_mean_sqrt_ab_x0_and_variance_one_minus_ab(t):
    sched = NoiseSchedule("cosine", 1000)
    n = 200_000
    gen = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    xt = sched.q_sample(x0, torch.full((n,), t), noise)
    ab = sched.alpha_bar(t)
    std_err = math.sqrt((1 - ab) / n)
    assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 5 * std_err + 1e-9
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02, abs=1e-9)


def test_q_sample_and_velocity_equal_diffusers_add_noise_and_get_velocity():
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)
    sched = NoiseSchedule("cosine", 1000)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 6, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    torch.testing.assert_close(sched.q_sample(x0, t, noise), ref.add_noise(x0, noise, t),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sched.v_from(x0, noise, t), ref.get_velocity(x0, noise, t),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- conversions


def test_eps_x0_v_conversions_invert_each_other():
    sched = NoiseSchedule("cosine", 1000)
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 5, 100, 500, 900, 999])
    x0 = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    xt = sched.q_sample(x0, t, eps)
    close = {"rtol": 1e-7, "atol": 1e-7}
    torch.testing.assert_close(sched.x0_from_eps(xt, t, eps), x0, **close)
    torch.testing.assert_close(sched.eps_from_x0(xt, t, x0), eps, **close)
    v = sched.v_from(x0, eps, t)
    torch.testing.assert_close(sched.x0_from_v(xt, t, v), x0, **close)
    torch.testing.assert_close(sched.eps_from_v(xt, t, v), eps, **close)
    for prediction, out in (("eps", eps), ("v", v)):
        got_x0, got_eps = sched.split_prediction(out, xt, t, prediction)
        torch.testing.assert_close(got_x0, x0, **close)
        torch.testing.assert_close(got_eps, eps, **close)
        torch.testing.assert_close(sched.training_target(x0, eps, t, prediction), out)


def test_split_prediction_returns_x_t_dtype_and_rejects_unknown_parameterisation():
    sched = NoiseSchedule("cosine", 100)
    xt, t = torch.randn(2, 4, 2, 2), torch.tensor([3, 50])
    x0, eps = sched.split_prediction(xt.bfloat16(), xt, t, "v")
    assert x0.dtype == eps.dtype == torch.float32
    with pytest.raises(ValueError, match="x0"):
        sched.split_prediction(xt, xt, t, "x0")


# ----------------------------------------------------------------------------- loss weights


def test_min_snr_weights_follow_hang_et_al_for_eps_and_v():
    sched = NoiseSchedule("cosine", 1000)
    t = torch.arange(0, 1000, 37)
    ab = sched._ab[t]
    snr = ab / (1 - ab)
    gamma = 5.0
    expected_eps = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    expected_v = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    torch.testing.assert_close(sched.loss_weight(t, "eps", gamma).double(), expected_eps,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.loss_weight(t, "v", gamma).double(), expected_v,
                               rtol=1e-6, atol=0)
    # noisy steps (SNR < gamma) keep weight 1 under eps; clean ones are down-weighted
    assert sched.loss_weight(torch.tensor([999]), "eps", gamma).item() == 1.0
    assert sched.loss_weight(torch.tensor([0]), "eps", gamma).item() < 1e-3


def test_min_snr_gamma_zero_gives_unit_weights():
    sched = NoiseSchedule("linear", 1000)
    t = torch.tensor([0, 10, 999])
    for prediction in ("eps", "v"):
        assert torch.equal(sched.loss_weight(t, prediction, 0.0), torch.ones(3))


# ----------------------------------------------------------------------------- posterior


def _paper_posterior(betas: list[float], t: int):
    """Ho et al. eq. 7 computed from the betas alone, in plain Python."""
    ab = [1.0]
    for b in betas:
        ab.append(ab[-1] * (1 - b))  # ab[k + 1] = alpha_bar at step k
    ab_t, ab_prev, beta = ab[t + 1], ab[t], betas[t]
    coef_x0 = math.sqrt(ab_prev) * beta / (1 - ab_t)
    coef_xt = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
    return coef_x0, coef_xt, beta * (1 - ab_prev) / (1 - ab_t)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_posterior_mean_and_variance_match_ddpm_eq_7(kind):
    sched = NoiseSchedule(kind, 1000)
    betas = sched._betas.tolist()
    gen = torch.Generator().manual_seed(2)
    ts = [0, 1, 400, 998, 999]
    t = torch.tensor(ts)
    x0 = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    xt = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    mean, var = sched.posterior_mean_variance(x0, xt, t)
    for i, step in enumerate(ts):
        cx0, cxt, v = _paper_posterior(betas, step)
        torch.testing.assert_close(mean[i], cx0 * x0[i] + cxt * xt[i], rtol=1e-9, atol=1e-12)
        assert var[i].item() == pytest.approx(v, rel=1e-9, abs=1e-15)
    assert var[0].item() == 0.0  # at t = 0 the posterior collapses onto x0
    torch.testing.assert_close(mean[0], x0[0])


def test_posterior_over_a_jump_is_the_bayes_conditional_of_the_two_marginals():
    """q(x_s | x_t, x0) from Gaussian conditioning: prior N(sqrt(ab_s) x0, 1 - ab_s),
    likelihood x_t | x_s ~ N(sqrt(ab_t/ab_s) x_s, 1 - ab_t/ab_s)."""
    sched = NoiseSchedule("cosine", 1000)
    x0 = torch.tensor([[0.3]], dtype=torch.float64)
    xt = torch.tensor([[-1.2]], dtype=torch.float64)
    for t, s in [(999, 949), (500, 450), (49, 0), (10, 9)]:
        ab_t, ab_s = sched.alpha_bar(t), sched.alpha_bar(s)
        a = ab_t / ab_s
        precision = 1 / (1 - ab_s) + a / (1 - a)
        var = 1 / precision
        mean = var * (math.sqrt(ab_s) * 0.3 / (1 - ab_s) + math.sqrt(a) * -1.2 / (1 - a))
        got_mean, got_var = sched.posterior_mean_variance(x0, xt, torch.tensor([t]),
                                                          torch.tensor([s]))
        assert got_mean.item() == pytest.approx(mean, rel=1e-9)
        assert got_var.item() == pytest.approx(var, rel=1e-9)


# ----------------------------------------------------------------------------- persistence


def test_schedule_round_trips_through_its_dict():
    sched = NoiseSchedule("linear", 321)
    again = NoiseSchedule.from_dict(sched.to_dict())
    assert again.to_dict() == {"kind": "linear", "timesteps": 321}
    assert torch.equal(again.betas, sched.betas)


@pytest.mark.parametrize("bad", [{"kind": "sigmoid", "timesteps": 10}, {"kind": "cosine"},
                                 {"kind": "cosine", "timesteps": 1.5}, []])
def test_bad_scheduler_dict_is_a_user_error_naming_the_file(bad):
    with pytest.raises(UserError, match="model/scheduler.json"):
        NoiseSchedule.from_dict(bad, "model/scheduler.json")


def test_constructor_rejects_unknown_kind():
    with pytest.raises(ValueError, match="sigmoid"):
        NoiseSchedule("sigmoid", 10)
