"""How faithfully a VAE reconstructs held-out images: PSNR, SSIM and colour error, on
[0, 1] images.

Colour error is the mean CIEDE2000 colour difference (Sharma, Wu & Dalal 2005) over every
pixel, the images read as sRGB (D65) and converted to CIELAB by scikit-image: about 1 is
the smallest difference a person sees side by side, 2-10 a visible shift (a yellow gone
orange, a white gone pink), 100 black against white.

SSIM is Wang et al. 2004's: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
population (not sample) statistics, averaged over the window positions that fit inside the
image and over channels (what scikit-image computes with `gaussian_weights=True,
use_sample_covariance=False`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.io import write_json_atomic

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images; inf where they are identical."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range ** 2 / mse)).float()


def color_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean CIEDE2000 between (B, 3, H, W) sRGB images in [0, 1]."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    lab_a, lab_b = (rgb2lab(x.detach().double().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy(),
                            channel_axis=-1) for x in (a, b))
    delta = deltaE_ciede2000(lab_a, lab_b, channel_axis=-1)
    return torch.from_numpy(delta).flatten(1).mean(dim=1).float()


def _gaussian_window(channels: int, dtype: torch.dtype, device) -> torch.Tensor:
    coords = torch.arange(WINDOW, dtype=torch.float64) - (WINDOW - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * SIGMA ** 2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype=dtype, device=device).expand(channels, 1, WINDOW, WINDOW)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images (H, W >= 11), computed in float64."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < WINDOW:
        raise ValueError(f"ssim needs images of at least {WINDOW}x{WINDOW}, "
                         f"got {tuple(a.shape[-2:])}")
    a, b = a.double(), b.double()
    window = _gaussian_window(a.shape[1], a.dtype, a.device)

    def blur(x: torch.Tensor) -> torch.Tensor:  # "valid": only windows inside the image
        return F.conv2d(x, window, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
             / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return score.flatten(1).mean(dim=1).float()


@torch.no_grad()
def evaluate_vae(vae, dataset, n: int | None = None, batch_size: int = 32) -> dict:
    """Mean PSNR / SSIM / colour error (CIEDE2000) of deterministic reconstructions
    (posterior mean) of the first n items, in float32, outputs clamped to the image range."""
    n = len(dataset) if n is None else min(n, len(dataset))
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    psnrs, ssims, colors = [], [], []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = torch.stack([dataset[i][0] for i in range(start, stop)]).to(device)
        recon = vae(x, sample_posterior=False)[0].float()
        x01, r01 = (x + 1) / 2, ((recon + 1) / 2).clamp(0, 1)
        psnrs.append(psnr(r01, x01).cpu())
        ssims.append(ssim(r01, x01).cpu())
        colors.append(color_error(r01, x01))
    vae.train(was_training)
    p, s, c = torch.cat(psnrs), torch.cat(ssims), torch.cat(colors)
    return {"psnr": _finite_mean(p), "psnr_min": float(p.min()), "ssim": float(s.mean()),
            "ssim_min": float(s.min()), "color_error": float(c.mean()),
            "color_error_max": float(c.max()), "n": n}


def _finite_mean(values: torch.Tensor) -> float:
    mean = float(values.mean())
    return mean if math.isfinite(mean) else float("inf")


def cli_evaluate_vae(args: argparse.Namespace) -> int:
    from ldmkit.config import override_config
    from ldmkit.data import build_dataset
    from ldmkit.models.vae import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae)
    cfg = args.cfg
    # Default to the size the VAE was trained at; an explicit data.image_size=... wins.
    explicit = any(o.split("=", 1)[0].strip() == "data.image_size" for o in args.overrides)
    if vae.image_size and not explicit:
        cfg = override_config(cfg, [f"data.image_size={vae.image_size}"], str(args.vae))
    result = evaluate_vae(vae, build_dataset(cfg.data, "val"))
    result.update(vae=str(args.vae), dataset=cfg.data.dataset, image_size=cfg.data.image_size)
    out = Path(args.out) if args.out else Path(args.vae) / "evaluation.json"
    write_json_atomic(out, result)
    print(f"PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}, colour error "
          f"(CIEDE2000) {result['color_error']:.2f} on {result['n']} held-out images -> {out}")
    return 0
