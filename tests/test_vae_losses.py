"""Stage 1's loss terms, discriminator, colour error and EMA: each behaves as its paper or
reference code says (training/vae_losses.py, models/discriminator.py, vae_metrics.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.config import load_config
from ldmkit.evaluation.vae_metrics import color_error, ssim
from ldmkit.models.discriminator import PatchDiscriminator
from ldmkit.models.vae import AutoencoderKL, pixel_error
from ldmkit.training import vae_losses
from ldmkit.training.common import make_accelerator
from ldmkit.training.vae_step import VAEStep


def images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- reconstruction


def test_ssim_term_is_zero_for_identical_images_and_one_minus_wang_ssim_otherwise():
    x, y = images(0), images(1)
    assert vae_losses.ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    # the package against ldmkit's own metric (Wang et al. 2004's definition, float64)
    expected = 1 - ssim((y + 1) / 2, (x + 1) / 2).mean()
    assert vae_losses.ssim_loss(x, y).item() == pytest.approx(expected.item(), abs=1e-4)


def test_ssim_term_pulls_a_reconstruction_towards_its_image():
    x = images(0)
    y = images(1).requires_grad_()
    vae_losses.ssim_loss(x, y).backward()
    stepped = (y - 50 * y.grad).detach()
    assert vae_losses.ssim_loss(x, stepped) < vae_losses.ssim_loss(x, y.detach())


def test_focal_frequency_loss_equals_the_official_implementation():
    focal = pytest.importorskip("focal_frequency_loss")
    x, y = images(2), images(3)
    official = focal.FocalFrequencyLoss(loss_weight=1.0, alpha=1.0)(y, x)
    torch.testing.assert_close(vae_losses.focal_frequency_loss(x, y), official)
    assert vae_losses.focal_frequency_loss(x, x).item() == 0.0


def test_blur_term_sees_a_colour_shift_but_not_noise_that_averages_out():
    x = images(4)
    assert vae_losses.blur_loss(x, x + 0.1).item() == pytest.approx(0.1, abs=1e-6)
    checker = torch.ones(1, 1, 32, 32)
    checker[..., ::2, :] = -1  # +-1 stripes: a 4x4 block's mean is 0
    assert vae_losses.blur_loss(x, x + 0.1 * checker).item() == pytest.approx(0.0, abs=1e-6)


def test_charbonnier_is_l1_away_from_zero_and_smooth_at_it():
    e = torch.tensor([0.0, 0.5, -2.0])
    got = pixel_error(torch.zeros(3), e, "charbonnier")
    torch.testing.assert_close(got, torch.tensor([1e-3, math.hypot(0.5, 1e-3),
                                                  math.hypot(2.0, 1e-3)]))
    torch.testing.assert_close(pixel_error(torch.zeros(3), e, "l1"), e.abs())


# ----------------------------------------------------------------------------- adversarial


def test_hinge_losses_have_taming_signs_and_margins():
    ones = torch.ones(4)
    assert vae_losses.hinge_d_loss(ones, -ones).item() == 0.0  # past both margins
    assert vae_losses.hinge_d_loss(0 * ones, 0 * ones).item() == 1.0
    assert vae_losses.hinge_d_loss(-ones, ones).item() == 2.0  # fooled both ways
    # the autoencoder's term falls as the discriminator scores reconstructions higher
    assert vae_losses.generator_loss(2 * ones) < vae_losses.generator_loss(ones)
    assert vae_losses.generator_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.tensor([[0.5, -1.0]], requires_grad=True)  # the "last layer"
    a, b, c = torch.tensor([2.0, 1.0]), 0.3, torch.tensor([0.7, -0.2])
    rec = ((w * a).sum() - b) ** 2
    g = -(w * c).sum()
    # by hand: d rec/dw = 2 (w.a - b) a, d g/dw = -c
    rec_grad = 2 * ((0.5 * 2.0 - 1.0 * 1.0) - b) * a
    expected = rec_grad.norm() / (c.norm() + 1e-4)
    got = vae_losses.adaptive_weight(rec, g, w)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not got.requires_grad
    rec.backward()  # the graph survives for the update's own backward
    assert w.grad is not None


def test_patch_discriminator_gives_one_logit_per_overlapping_patch():
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, layers=2).eval()
    x = images(5, n=1, size=64)
    logits = disc(x)
    assert logits.shape == (1, 1, 14, 14)
    poked = x.clone()
    poked[..., :4, :4] += 1.0  # the top-left corner only
    moved = (disc(poked) - logits).abs()[0, 0] > 0
    assert moved[0, 0] and not moved[-1, -1]  # a far patch does not see it


# ----------------------------------------------------------------------------- colour


def test_color_error_is_ciede2000_black_white_100_identical_0():
    white, black = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    assert color_error(white, black).item() == pytest.approx(100.0, abs=1e-3)
    x = (images(6) + 1) / 2
    assert color_error(x, x).tolist() == [0.0, 0.0]


def test_color_error_of_two_greys_is_the_lightness_formula():
    """Greys have a* = b* = 0, so CIEDE2000 is |dL| / S_L with
    S_L = 1 + 0.015 (L - 50)^2 / sqrt(20 + (L - 50)^2) at the mean lightness L."""
    from skimage.color import rgb2lab

    grey_a, grey_b = torch.full((1, 3, 2, 2), 0.4), torch.full((1, 3, 2, 2), 0.6)
    la = rgb2lab(grey_a[0].permute(1, 2, 0).double().numpy())[0, 0, 0]
    lb = rgb2lab(grey_b[0].permute(1, 2, 0).double().numpy())[0, 0, 0]
    mean = (la + lb) / 2
    s_l = 1 + 0.015 * (mean - 50) ** 2 / math.sqrt(20 + (mean - 50) ** 2)
    assert color_error(grey_a, grey_b).item() == pytest.approx(abs(la - lb) / s_l, rel=1e-4)


@pytest.mark.parametrize("lab1, lab2, expected", [  # Sharma, Wu & Dalal 2005, table 1
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    ((90.8027, -2.0831, 1.441), (91.1528, -1.6435, 0.0447), 1.4441),
])
def test_the_colour_library_reproduces_sharmas_ciede2000_table(lab1, lab2, expected):
    import numpy as np
    from skimage.color import deltaE_ciede2000

    got = deltaE_ciede2000(np.array(lab1), np.array(lab2))
    assert float(got) == pytest.approx(expected, abs=1e-4)


def test_group_norm_groups_by_channels_per_group_or_32_groups():
    from ldmkit.models.layers import group_norm

    assert [group_norm(c).num_groups for c in (16, 32, 64, 128)] == [16, 32, 32, 32]
    assert [group_norm(c, 4).num_groups for c in (16, 32, 64, 2)] == [4, 8, 16, 1]
    assert group_norm(24, 16).num_groups == 1  # no 16-channel groups in 24: one group


def test_a_vae_config_sets_its_norm_groups_and_its_folder_keeps_them(tmp_path):
    cfg = load_config(None, ["vae.base_channels=16", "vae.norm_group_channels=4"]).vae
    vae = AutoencoderKL(cfg, 64)
    assert vae.encoder.norm_out.num_groups == 64 // 4
    vae.save_pretrained(tmp_path / "vae")
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").decoder.norm_out.num_groups == 4


# ----------------------------------------------------------------------------- EMA


def tiny_step(*extra: str) -> VAEStep:
    cfg = load_config(None, ["vae.downsample_factor=4", "vae.channel_mult=[1,1,1]",
                             "vae.base_channels=8", 'train.mixed_precision="no"', *extra])
    torch.manual_seed(0)
    update = VAEStep(AutoencoderKL(cfg.vae, 16), cfg)
    update.prepare(make_accelerator("no"))
    return update


def test_ema_of_the_vae_follows_the_ramped_decay():
    update = tiny_step("vae.ema_decay=0.99")
    before = [p.detach().clone() for p in update.vae.parameters()]
    update(images(7, size=16), step=0)
    after = list(update.vae.parameters())
    # step 0: decay min(0.99, 1/10) = 0.1 -> ema = 0.1 * initial + 0.9 * updated
    for ema, old, new in zip(update.ema.parameters(), before, after):
        torch.testing.assert_close(ema, 0.1 * old + 0.9 * new.detach())
    assert update.final() is update.ema


def test_without_ema_the_live_weights_are_final():
    update = tiny_step()
    assert update.ema is None and update.final() is update.vae


def test_the_discriminator_trains_only_from_gan_start():
    update = tiny_step("vae.gan_weight=0.5", "vae.gan_start=1", "vae.disc_channels=8")
    disc_before = [p.detach().clone() for p in update.disc_module.parameters()]
    logged = update(images(8, size=16), step=0)
    assert "d_loss" not in logged
    assert all(torch.equal(a, b) for a, b in zip(disc_before, update.disc_module.parameters()))
    logged = update(images(8, size=16), step=1)
    assert {"g_loss", "d_weight", "d_loss"} <= set(logged)
    assert not all(torch.equal(a, b)
                   for a, b in zip(disc_before, update.disc_module.parameters()))


def test_the_vae_takes_no_step_from_the_discriminators_loss():
    """The discriminator's update sees reconstructions detached: the VAE's own update
    cleared its gradients before it, and the discriminator's backward put none back."""
    update = tiny_step("vae.gan_weight=0.5", "vae.disc_channels=8")
    update(images(9, size=16), step=0)
    assert all(p.grad is None for p in update.vae.parameters())
