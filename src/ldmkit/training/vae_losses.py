"""Stage 1's loss terms beyond the pixel term and the KL (models/vae.py `vae_loss`): what
keeps colour and edges on real pictures (BENCHMARKS.md "VAE recipe for real images").

- SSIM (pytorch-msssim; one scale: MS-SSIM's five scales need images of 161+ pixels);
- focal frequency loss (Jiang et al. 2021, "Focal Frequency Loss for Image Reconstruction
  and Synthesis"): squared spectrum distance, each frequency weighted by its own distance
  (normalised, no gradient), so the frequencies a VAE finds hard — edges — are not
  drowned by the easy low ones;
- a blurred-image term: L1 between 4x4 average-pooled images, the colour of each region;
- the adversarial term of taming-transformers / CompVis latent-diffusion
  (`VQLPIPSWithDiscriminator`, `LPIPSWithDiscriminator`): hinge losses for a PatchGAN and
  the adaptive weight ||grad rec|| / ||grad gan|| at the decoder's last layer.

All take images in [-1, 1] and compute in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLUR = 4  # pooling window of the blurred-image term: 16x16 regions of a 64x64 image


def ssim_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """1 - SSIM of the batch (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5), on the
    [0, 1] images; 0 for identical images."""
    from pytorch_msssim import ssim

    x01, r01 = (x.float() + 1) / 2, (recon.float() + 1) / 2
    return 1.0 - ssim(r01, x01, data_range=1.0, size_average=True)


def focal_frequency_loss(x: torch.Tensor, recon: torch.Tensor, alpha: float = 1.0
                         ) -> torch.Tensor:
    """The official FocalFrequencyLoss (patch_factor 1, ave_spectrum off, log_matrix off,
    batch_matrix off): mean over (B, C, u, v) of w * |F(recon) - F(x)|^2, with the
    orthonormal 2-D FFT and w = |F(recon) - F(x)|^alpha / its max per image and channel,
    taken without gradient."""
    fx = torch.fft.fft2(x.float(), norm="ortho")
    fr = torch.fft.fft2(recon.float(), norm="ortho")
    dist = (fr - fx).abs().pow(2)
    with torch.no_grad():
        weight = dist.sqrt().pow(alpha)
        weight = weight / weight.amax(dim=(-2, -1), keepdim=True)
        weight = torch.nan_to_num(weight, nan=0.0).clamp(0.0, 1.0)
    return (weight * dist).mean()


def blur_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """L1 between the images average-pooled over BLUR x BLUR blocks: how far each region's
    mean colour moved, whatever the edges do."""
    return F.l1_loss(F.avg_pool2d(recon.float(), BLUR), F.avg_pool2d(x.float(), BLUR))


# ----------------------------------------------------------------------------- adversarial


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (taming): 0.5 * (E relu(1 - D(x)) + E relu(1 + D(G)));
    zero once real patches score >= 1 and reconstructions <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean()
                  + F.relu(1.0 + logits_fake.float()).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial loss: -E D(G(x)) (falls as the discriminator is fooled)."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor,
                    last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """taming's `calculate_adaptive_weight`: ||d rec / d W|| / (||d g / d W|| + 1e-4) at the
    decoder's last weight W, clamped to [0, 1e4] and detached, so the adversarial term
    pulls on the decoder as hard as the reconstruction does whatever their scales.
    The graph is kept for the backward pass that follows."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
