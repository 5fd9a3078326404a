"""Classifier-free guidance as a denoiser: the mixing formula, one batched pass, rescale, clamp."""

import pytest
import torch
from torch import nn

from ldmkit.config import UNetConfig
from ldmkit.diffusion.guidance import CFGDenoiser, rescale_guidance
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.models.text import TextEmbeddings
from ldmkit.models.unet import UNet

D = 6


class ToyModel(nn.Module):
    """Output depends on x, t and the masked mean of the tokens; records each call's batch."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x, t, ctx, mask):
        self.batches.append(x.shape[0])
        m = mask.to(ctx.dtype)[..., None]
        pooled = (ctx * m).sum(1) / m.sum(1).clamp_min(1)
        return 0.7 * x + pooled[:, :4, None, None] + (t.to(x.dtype) / 500)[:, None, None, None]


def condition(seed, batch=1, length=5, real=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :real] = True
    return TextEmbeddings(torch.randn(batch, length, D, generator=g), mask)


SCHED = NoiseSchedule("cosine", 1000)
X = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([10, 500, 990])
COND, UNCOND = condition(1, real=4), condition(2, real=1)


def split(out, prediction="eps"):
    return SCHED.split_prediction(out, X, T, prediction)


def raw(model, cond):
    return model(X, T, cond.tokens.expand(3, -1, -1), cond.mask.expand(3, -1))


def test_scale_one_is_the_conditional_prediction_in_a_single_pass_of_batch_b():
    model = ToyModel()
    x0, eps = CFGDenoiser(model, SCHED, "eps", COND, UNCOND, guidance_scale=1.0)(X, T)
    assert model.batches == [3]  # the unconditional half is skipped entirely
    ex0, eeps = split(raw(model, COND))
    torch.testing.assert_close(x0, ex0)
    torch.testing.assert_close(eps, eeps)


def test_scale_zero_is_the_unconditional_prediction():
    model = ToyModel()
    x0, _ = CFGDenoiser(model, SCHED, "eps", COND, UNCOND, guidance_scale=0.0)(X, T)
    torch.testing.assert_close(x0, split(raw(model, UNCOND))[0])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_one_batched_pass_equals_two_separate_passes_and_the_cfg_formula(prediction):
    model = ToyModel()
    batched = CFGDenoiser(model, SCHED, prediction, COND, UNCOND, guidance_scale=5.0)(X, T)
    assert model.batches == [6]  # [uncond; cond] in one call
    model.batches.clear()
    two = CFGDenoiser(model, SCHED, prediction, COND, UNCOND, 5.0, two_pass=True)(X, T)
    assert model.batches == [3, 3]
    # the formula, applied to eps (affine conversions: same result in any parameterisation)
    _, eps_u = split(raw(model, UNCOND), prediction)
    _, eps_c = split(raw(model, COND), prediction)
    expected_eps = eps_u + 5.0 * (eps_c - eps_u)
    for got in (batched, two):
        torch.testing.assert_close(got[1], expected_eps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[0], SCHED.x0_from_eps(X, T, expected_eps),
                                   rtol=1e-4, atol=1e-3)


def tiny_unet(**kw) -> UNet:
    cfg = UNetConfig(base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                     cross_attn_levels=[1], num_heads=2, **kw)
    model = UNet(cfg, 4, D).eval()
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)  # undo the zero init: outputs vary
    return model


def test_batched_pass_through_a_real_unet_equals_two_passes():
    model = tiny_unet()
    one = CFGDenoiser(model, SCHED, "v", COND, UNCOND, 4.0)(X, T)
    two = CFGDenoiser(model, SCHED, "v", COND, UNCOND, 4.0, two_pass=True)(X, T)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batch_one_conditions_expand_to_the_latent_batch():
    model = ToyModel()
    full_cond = TextEmbeddings(COND.tokens.expand(3, -1, -1).clone(),
                               COND.mask.expand(3, -1).clone())
    full_uncond = TextEmbeddings(UNCOND.tokens.repeat(3, 1, 1), UNCOND.mask.repeat(3, 1))
    a = CFGDenoiser(model, SCHED, "eps", COND, UNCOND, 3.0)(X, T)
    b = CFGDenoiser(model, SCHED, "eps", full_cond, full_uncond, 3.0)(X, T)
    torch.testing.assert_close(a, b)


def test_padding_both_conditions_leaves_a_masked_unets_guided_output_unchanged():
    torch.manual_seed(0)
    model = tiny_unet(pooled_text=True)  # masked attention and the masked-mean pooled path
    plain = CFGDenoiser(model, SCHED, "v", COND, UNCOND, 4.0)(X, T)
    padded = CFGDenoiser(model, SCHED, "v", COND.pad_to(9), UNCOND.pad_to(7), 4.0)(X, T)
    for a, b in zip(plain, padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_negative_prompt_of_another_token_length_is_padded_and_masked():
    model = ToyModel()
    negative = condition(3, length=3, real=2)
    x0, _ = CFGDenoiser(model, SCHED, "eps", COND, negative, 2.0)(X, T)
    padded = TextEmbeddings(torch.cat([negative.tokens, 99 * torch.ones(1, 2, D)], 1),
                            torch.cat([negative.mask, torch.zeros(1, 2, dtype=torch.bool)], 1))
    expected, _ = CFGDenoiser(model, SCHED, "eps", COND, padded, 2.0)(X, T)
    torch.testing.assert_close(x0, expected)
    with pytest.raises(ValueError, match="batch"):
        CFGDenoiser(model, SCHED, "eps", condition(4, batch=2), UNCOND, 2.0)(X, T)


# ----------------------------------------------------------------------------- rescale, clamp


def test_guidance_rescale_at_phi_zero_is_a_no_op():
    model = ToyModel()
    plain = CFGDenoiser(model, SCHED, "v", COND, UNCOND, 7.0)(X, T)
    zero = CFGDenoiser(model, SCHED, "v", COND, UNCOND, 7.0, guidance_rescale=0.0)(X, T)
    for a, b in zip(plain, zero):
        assert torch.equal(a, b)


def test_guidance_rescale_matches_the_conditional_std_at_phi_one_and_blends_linearly():
    g = torch.Generator().manual_seed(5)
    guided, cond = 3 * torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    full = rescale_guidance(guided, cond, 1.0)
    dims = (1, 2, 3)
    torch.testing.assert_close(full.std(dim=dims), cond.std(dim=dims))
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.7), 0.7 * full + 0.3 * guided)
    model = ToyModel()
    rescaled = CFGDenoiser(model, SCHED, "v", COND, UNCOND, 7.0, guidance_rescale=0.7)(X, T)
    plain = CFGDenoiser(model, SCHED, "v", COND, UNCOND, 7.0)(X, T)
    assert not torch.allclose(rescaled[0], plain[0])


def test_x0_clamp_bounds_x0_and_keeps_eps_consistent_with_x_t():
    model = ToyModel()
    unclamped, _ = CFGDenoiser(model, SCHED, "eps", COND, UNCOND, 5.0)(X, T)
    assert unclamped.abs().max() > 1.5  # the noisy step's x0 estimate blows up without it
    x0, eps = CFGDenoiser(model, SCHED, "eps", COND, UNCOND, 5.0, x0_clamp=1.5)(X, T)
    assert x0.abs().max() <= 1.5
    ab = SCHED.alphas_cumprod[T].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, X, rtol=1e-4, atol=1e-4)
    inside = unclamped.abs() < 1.5  # untouched where already in range
    torch.testing.assert_close(x0[inside], unclamped[inside])
