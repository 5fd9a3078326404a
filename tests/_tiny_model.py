"""A tiny, randomly initialised pipeline folder (tiny VAE, tiny U-Net, tiny BERT text
encoder) built in a second, for tests of the folder format, the pipeline and the CLI."""

from __future__ import annotations

from pathlib import Path

import torch

from _tiny_text import make_tiny_bert
from ldmkit.config import load_config
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.models.text import TextEncoder
from ldmkit.models.unet import UNet
from ldmkit.models.vae import AutoencoderKL
from ldmkit.pipeline import TextToImagePipeline

TINY = ["data.image_size=16", "vae.downsample_factor=4", "vae.channel_mult=[1, 2, 2]",
        "vae.base_channels=8", "vae.scale_factor=0.5", "unet.base_channels=16",
        "unet.channel_mult=[1, 2]", "unet.cross_attn_levels=[1]", "unet.num_res_blocks=1",
        "unet.num_heads=2", "diffusion.timesteps=50", "diffusion.objective=v"]


def make_tiny_pipeline(root: Path, seed: int = 0, hidden_layers=(-1,)) -> TextToImagePipeline:
    cfg = load_config(None, TINY)
    text = TextEncoder(str(make_tiny_bert(root / "text", seed)), max_length=12,
                       hidden_layers=hidden_layers)
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg.vae, image_size=cfg.data.image_size)
    unet = UNet(cfg.unet, cfg.vae.latent_channels, text.hidden_size)
    # The zero-initialised output conv would make every image the same: perturb it.
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    return TextToImagePipeline(vae, unet, text, NoiseSchedule("cosine", 50), "v", 0.0,
                               cfg.data.image_size)


def make_tiny_model_dir(root: Path, seed: int = 0) -> Path:
    model = root / "model"
    make_tiny_pipeline(root, seed).save_pretrained(model)
    return model
