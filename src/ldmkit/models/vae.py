"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, appendix G):
ResBlock encoder -> diagonal Gaussian posterior over a (C, H/f, W/f) latent -> ResBlock
decoder, with self-attention at the lowest resolution (encoder end, decoder start).

Latents handed to the diffusion stage are `z * scale_factor` (1/std of the posterior over
data, computed after training and stored in the config) so they have roughly unit variance.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.config import VAEArchitecture, config_from_dict
from ldmkit.errors import UserError
from ldmkit.io import load_state_into, read_json, save_tensors_atomic, write_json_atomic
from ldmkit.models.layers import Attention, Downsample, ResBlock, Upsample, group_norm

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element; `params` holds mean and logvar stacked on dim 1."""

    def __init__(self, params: torch.Tensor):
        self.mean, logvar = params.chunk(2, dim=1)
        # The clamp keeps exp() finite early in training (LDM uses the same bounds).
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator,
                            device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: shape (B,), float32
        (a sum of thousands of terms loses too much in bf16)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


def vae_loss(x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian,
             kl_weight: float, kind: str = "mse"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction, kl), all per image element, computed in float32.

    Normalisation, so `kl_weight` means the same at every image size:
    - reconstruction = mean over every pixel element (B*C*H*W) of the squared error (or
      `pixel_error`'s other kinds);
    - kl = per-image KL summed over latent elements, divided by the image's C*H*W, then
      averaged over the batch.
    Both are per-pixel quantities, so their ratio equals the ratio of per-image sums: the
    seed's "MSE summed per image + KL weight 1" is kl_weight = 1 here, and LDM's 1e-6
    relative to per-pixel reconstruction is kl_weight = 1e-6.
    """
    x, recon = x.float(), recon.float()
    rec = pixel_error(x, recon, kind).mean()
    kl = (posterior.kl() / x[0].numel()).mean()
    return rec + kl_weight * kl, rec, kl


CHARBONNIER_EPS = 1e-3  # sqrt(e^2 + eps^2): L1 away from 0, smooth (quadratic) near it


def pixel_error(x: torch.Tensor, recon: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-element reconstruction error: "mse" squared, "l1" absolute, "charbonnier"
    sqrt(e^2 + 1e-6) (L1 whose gradient does not flip sign abruptly at 0)."""
    diff = recon - x
    if kind == "l1":
        return diff.abs()
    if kind == "charbonnier":
        return (diff.pow(2) + CHARBONNIER_EPS ** 2).sqrt()
    return diff.pow(2)


# ----------------------------------------------------------------------------- networks


def _widths(cfg: VAEArchitecture) -> list[int]:
    return [cfg.base_channels * m for m in cfg.channel_mult]


class _Middle(nn.Module):
    """ResBlock, self-attention, ResBlock at the lowest resolution."""

    def __init__(self, ch: int, attention: bool, per_group: int = 0):
        super().__init__()
        self.block1 = ResBlock(ch, ch, norm_per_group=per_group)
        self.attn = Attention(ch, norm_per_group=per_group) if attention else nn.Identity()
        self.block2 = ResBlock(ch, ch, norm_per_group=per_group)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(h)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> posterior parameters (B, 2*latent_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEArchitecture):
        super().__init__()
        widths, g = _widths(cfg), cfg.norm_group_channels
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, width, norm_per_group=g))
                ch = width
            if level < len(widths) - 1:  # one halving per level but the last: log2(f) in all
                layers.append(Downsample(ch))
        self.down = nn.Sequential(*layers)
        self.mid = _Middle(ch, cfg.attention, g)
        self.norm_out = group_norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, 3, h*f, w*f). As in LDM, each level
    has one more ResBlock than the encoder's."""

    def __init__(self, cfg: VAEArchitecture):
        super().__init__()
        widths, g = _widths(cfg), cfg.norm_group_channels
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = _Middle(ch, cfg.attention, g)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(ch, widths[level], norm_per_group=g))
                ch = widths[level]
            if level > 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- the model


class AutoencoderKL(nn.Module):
    """The stage-1 VAE. `image_size` is recorded in the saved config (the size it was
    trained at); the network itself accepts any size divisible by the factor."""

    def __init__(self, cfg: VAEArchitecture, image_size: int | None = None):
        super().__init__()
        self.config = cfg.architecture()  # a [vae] config's training settings stay behind
        self.image_size = image_size
        self.factor = cfg.downsample_factor
        if len(cfg.channel_mult) != int(math.log2(self.factor)) + 1:
            raise ValueError(f"vae.channel_mult needs log2({self.factor}) + 1 entries, "
                             f"got {cfg.channel_mult}")
        self.encoder = Encoder(cfg)
        # 1x1 convs between the networks and the latent space, as in LDM.
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def scale_factor(self) -> float:
        """1/std of the latents; 0 in the config means "not computed yet" and acts as 1."""
        return self.config.scale_factor or 1.0

    def latent_size(self, image_size: int) -> tuple[int, int]:
        """(h, w) of the latent for a square image of that size."""
        return image_size // self.factor, image_size // self.factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE's "
                             f"downsample_factor {self.factor}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents for the diffusion stage."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    def decode_latents(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (roughly [-1, 1]; clamp before saving)."""
        return self.decode(z_scaled / self.scale_factor)

    # ------------------------------------------------------------------ folder format

    def save_pretrained(self, directory: str | Path, image_size: int | None = None) -> None:
        """Write `config.json` (the architecture + image_size, no training settings) and
        `model.safetensors`, each file atomically (a crash never leaves a torn file).
        Weights go first: a crash between the two leaves the old config, whose shapes
        `from_pretrained` checks."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(directory / WEIGHTS_NAME, self.state_dict())
        config = dataclasses.asdict(self.config)
        config["image_size"] = image_size or self.image_size
        write_json_atomic(directory / CONFIG_NAME, config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"
                        ) -> AutoencoderKL:
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"{directory}: VAE folder not found")
        raw = read_json(directory / CONFIG_NAME, "VAE config")
        if not isinstance(raw, dict):
            raise UserError(f"{directory / CONFIG_NAME}: VAE config must be a JSON object")
        image_size = raw.pop("image_size", None)
        # Validated as a whole [vae] section: folders written before the split also hold
        # training settings (steps, lr, ...), which are checked and then left out.
        cfg = config_from_dict({"vae": raw}, str(directory / CONFIG_NAME)).vae
        model = cls(cfg, image_size=image_size)
        load_state_into(model, directory / WEIGHTS_NAME)
        return model.to(device)
