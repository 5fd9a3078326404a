"""The KL-VAE: shapes, the posterior and its KL, the loss normalisation, overfitting, the
folder format, and the PSNR / SSIM metrics used to judge it."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch.distributions import Normal, kl_divergence

from ldmkit.config import VAEConfig
from ldmkit.errors import UserError
from ldmkit.evaluation.vae_metrics import psnr, ssim
from ldmkit.models.vae import AutoencoderKL, DiagonalGaussian, vae_loss


def tiny_cfg(factor: int = 8, **kw) -> VAEConfig:
    levels = factor.bit_length()
    return VAEConfig(downsample_factor=factor, base_channels=8, channel_mult=[1] * levels, **kw)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("factor", [4, 8])
def test_encode_decode_shapes_follow_the_downsampling_factor(factor):
    vae = AutoencoderKL(tiny_cfg(factor, latent_channels=3))
    x = torch.randn(2, 3, 32, 32)
    posterior = vae.encode(x)
    assert posterior.mean.shape == (2, 3, 32 // factor, 32 // factor)
    assert posterior.sample().shape == posterior.mode().shape
    recon, _ = vae(x)
    assert recon.shape == x.shape
    assert vae.decode_latents(vae.encode_latents(x)).shape == x.shape


def test_non_square_images_work_when_both_sides_divide():
    vae = AutoencoderKL(tiny_cfg(4))
    assert vae.encode(torch.randn(1, 3, 16, 24)).mean.shape == (1, 4, 4, 6)


@pytest.mark.parametrize("size", [(36, 36), (32, 20)])
def test_image_size_the_factor_does_not_divide_is_refused(size):
    vae = AutoencoderKL(tiny_cfg(8))
    with pytest.raises(ValueError, match="not divisible by the VAE's downsample_factor 8"):
        vae.encode(torch.randn(1, 3, *size))


def test_attention_sits_at_the_lowest_resolution_only():
    vae = AutoencoderKL(tiny_cfg(8))
    names = [n for n, m in vae.named_modules() if type(m).__name__ == "Attention"]
    assert names == ["encoder.mid.attn", "decoder.mid.attn"]
    assert not any(type(m).__name__ == "Attention"
                   for m in AutoencoderKL(tiny_cfg(8, attention=False)).modules())


# ----------------------------------------------------------------------------- posterior and loss


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    params = torch.randn(3, 8, 4, 4) * 2
    post = DiagonalGaussian(params)
    reference = kl_divergence(Normal(post.mean, post.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), reference, rtol=1e-5, atol=1e-5)


def test_logvar_is_clamped_to_minus_30_and_20():
    params = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([100.0, -100.0]).view(1, 2, 1, 1)], 1)
    post = DiagonalGaussian(params)
    assert post.logvar.flatten().tolist() == [20.0, -30.0]
    assert torch.isfinite(post.kl()).all()


def test_sample_is_mean_plus_std_noise_and_follows_the_generator():
    mean, logvar = torch.full((1, 1, 64, 64), 2.0), torch.full((1, 1, 64, 64), 2 * np.log(0.5))
    params = torch.cat([mean, logvar], 1)
    post = DiagonalGaussian(params)
    a = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, post.sample(torch.Generator().manual_seed(1)))
    assert abs(a.mean().item() - 2.0) < 0.05 and abs(a.std().item() - 0.5) < 0.05
    assert torch.equal(post.mode(), post.mean)


def test_loss_is_per_pixel_so_kl_weight_1_equals_the_seeds_per_image_sums():
    torch.manual_seed(0)
    x, recon = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    post = DiagonalGaussian(torch.randn(2, 8, 2, 2))
    total, rec, kl = vae_loss(x, recon, post, kl_weight=1.0)
    torch.testing.assert_close(rec, F.mse_loss(recon, x))
    torch.testing.assert_close(kl, post.kl().mean() / (3 * 8 * 8))
    # seed: per image, squared error summed + KL summed; averaged over the batch
    seed = ((recon - x) ** 2).sum(dim=(1, 2, 3)) + post.kl()
    torch.testing.assert_close(total * 3 * 8 * 8, seed.mean())
    _, rec_l1, _ = vae_loss(x, recon, post, 1.0, kind="l1")
    torch.testing.assert_close(rec_l1, F.l1_loss(recon, x))


def test_tiny_vae_overfits_one_batch():
    from ldmkit.data.shapes import ShapesDataset

    torch.manual_seed(0)
    data = ShapesDataset(image_size=16, num_items=2, seed=0)
    x = torch.stack([data[i][0] for i in range(2)])  # pixel variance ~0.07
    vae = AutoencoderKL(VAEConfig(downsample_factor=4, base_channels=8, channel_mult=[1, 1, 1]))
    opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
    for _ in range(200):
        recon, post = vae(x)
        loss = vae_loss(x, recon, post, kl_weight=1e-6)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    recon = vae(x, sample_posterior=False)[0]
    # stated bound: MSE < 2e-3 in [-1, 1] units (> 33 dB on [0, 1]); reached ~9e-4
    assert F.mse_loss(recon, x).item() < 2e-3


# ----------------------------------------------------------------------------- folder format


def test_save_pretrained_round_trip_is_bit_exact(tmp_path):
    vae = AutoencoderKL(tiny_cfg(4, scale_factor=0.37), image_size=32)
    vae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["image_size"] == 32 and config["scale_factor"] == 0.37
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.scale_factor == 0.37 and loaded.image_size == 32
    for (k, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(vae.encode_latents(x), loaded.encode_latents(x))


def test_encode_latents_scales_and_decode_latents_unscales():
    vae = AutoencoderKL(tiny_cfg(4, scale_factor=0.5))
    x = torch.randn(1, 3, 16, 16)
    mean = vae.encode(x).mean
    torch.testing.assert_close(vae.encode_latents(x), mean * 0.5)
    torch.testing.assert_close(vae.decode_latents(mean * 0.5), vae.decode(mean))
    assert AutoencoderKL(tiny_cfg(4)).scale_factor == 1.0  # 0 = not computed yet


@pytest.mark.parametrize("damage", ["missing weights", "missing config", "corrupted weights",
                                    "config mismatch"])
def test_from_pretrained_refuses_a_broken_folder_naming_the_file(tmp_path, damage):
    AutoencoderKL(tiny_cfg(4)).save_pretrained(tmp_path)
    culprit = {"missing weights": "model.safetensors", "missing config": "config.json",
               "corrupted weights": "model.safetensors", "config mismatch": "model.safetensors"}
    path = tmp_path / culprit[damage]
    if damage.startswith("missing"):
        path.unlink()
    elif damage == "corrupted weights":
        path.write_bytes(path.read_bytes()[:100] + b"\x00garbage")
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        config["base_channels"] = 16
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=str(path)):
        AutoencoderKL.from_pretrained(tmp_path)


def test_from_pretrained_validates_the_config(tmp_path):
    AutoencoderKL(tiny_cfg(4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["downsample_factor"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="downsample_factor"):
        AutoencoderKL.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- metrics


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 written out with scipy's Gaussian filter, per channel, interior only."""
    c1, c2, pad, scores = 0.01 ** 2, 0.03 ** 2, 5, []
    for ca, cb in zip(a, b):
        def blur(img):
            return gaussian_filter(img, sigma=1.5, truncate=3.5)[pad:-pad, pad:-pad]
        mu_a, mu_b = blur(ca), blur(cb)
        va, vb = blur(ca * ca) - mu_a ** 2, blur(cb * cb) - mu_b ** 2
        cov = blur(ca * cb) - mu_a * mu_b
        s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
        scores.append(s.mean())
    return float(np.mean(scores))


def test_ssim_matches_an_independent_gaussian_filter_formula():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 24, 20))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b))
    for i in range(2):
        assert ours[i].item() == pytest.approx(_reference_ssim(a[i], b[i]), abs=1e-5)


def test_ssim_known_values():
    x = torch.rand(1, 3, 16, 16)
    assert ssim(x, x).item() == pytest.approx(1.0)
    # flat images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01 ** 2
    flat = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)).item()
    assert flat == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    assert ssim(x, 1 - x).item() < 0.0  # anti-correlated structure


def test_psnr_is_per_image_and_uses_the_unit_range():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1] += 0.01  # MSE 1e-4 -> 40 dB
    torch.testing.assert_close(psnr(b, a), torch.tensor([20.0, 40.0]))
    assert psnr(a, a).isinf().all()
