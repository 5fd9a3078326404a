"""Model folders hold what builds the networks, nothing about how they were trained, and
folders written by earlier ldmkit versions keep loading and give the same images."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tiny_model import make_tiny_pipeline
from _tiny_text import make_tiny_bert
from ldmkit.config import VAEArchitecture, load_config
from ldmkit.errors import UserError
from ldmkit.models.text import TextEncoder
from ldmkit.models.vae import AutoencoderKL
from ldmkit.pipeline import TextToImagePipeline

FIXTURES = Path(__file__).parent / "fixtures"
OLD_FOLDER = FIXTURES / "model-0.1.0"  # written by ldmkit 0.1.0 before the split
TRAINING_KEYS = {"kl_weight", "recon_loss", "steps", "batch_size", "lr", "warmup_steps",
                 "minutes"}
ARCHITECTURE_KEYS = {"downsample_factor", "base_channels", "channel_mult", "num_res_blocks",
                     "latent_channels", "attention", "norm_group_channels", "scale_factor"}


def test_a_saved_vae_config_holds_the_architecture_and_image_size_only(tmp_path):
    cfg = load_config(None, ["vae.steps=7", "vae.lr=0.5", "vae.base_channels=8"])
    AutoencoderKL(cfg.vae, image_size=64).save_pretrained(tmp_path / "vae")
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert set(saved) == ARCHITECTURE_KEYS | {"image_size"}
    assert saved["base_channels"] == 8
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert type(loaded.config) is VAEArchitecture


def test_a_vae_config_is_an_architecture_plus_training_settings():
    cfg = load_config(None, ["vae.steps=7"]).vae
    assert isinstance(cfg, VAEArchitecture)
    arch = cfg.architecture()
    assert {f for f in vars(arch)} == ARCHITECTURE_KEYS
    assert not hasattr(arch, "steps")


def test_a_folder_written_before_the_split_still_loads_and_gives_the_same_images(tmp_path,
                                                                               monkeypatch):
    from ldmkit.diffusion import samplers

    # the images were made before DPM-Solver++ took its last update first order below 15
    # steps and before guidance rescale was the default; this test is about the folder, so
    # it samples with that version's rules
    monkeypatch.setattr(samplers, "LOWER_ORDER_FINAL_BELOW", 0)
    old_vae = json.loads((OLD_FOLDER / "vae" / "config.json").read_text())
    assert TRAINING_KEYS <= set(old_vae)  # the fixture really is the old format
    text = TextEncoder(str(make_tiny_bert(tmp_path)), max_length=12)
    pipe = TextToImagePipeline.from_pretrained(OLD_FOLDER, text_encoder=text)
    latents = pipe.generate_latents(["a red circle", "a blue square"], num_inference_steps=4,
                                    guidance_scale=3.0, sampler="dpmpp-2m",
                                    guidance_rescale=0.0,
                                    generator=torch.Generator().manual_seed(0))
    # made by ldmkit 0.1.0 from this folder, one torch thread (as conftest sets); the
    # tolerance allows for another CPU's kernels and for prompts now being encoded padded
    # to max_length (their embeddings moved ~1e-6, the images 1.3e-5), far below any change
    # of weights
    expected = load_file(str(FIXTURES / "model-0.1.0-images.safetensors"))["images"]
    torch.testing.assert_close(pipe.decode(latents), expected, rtol=0, atol=5e-5)
    pipe.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "vae" / "config.json").read_text())
    assert not TRAINING_KEYS & set(resaved)
    # keys added since 0.1.0 come back at the defaults that build the old network
    assert resaved.pop("norm_group_channels") == 0
    assert {k: old_vae[k] for k in resaved} == resaved


def test_a_bad_training_value_in_an_old_folder_is_still_refused(tmp_path):
    import shutil

    shutil.copytree(OLD_FOLDER / "vae", tmp_path / "vae")
    path = tmp_path / "vae" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lr": "fast"}))
    with pytest.raises(UserError, match="vae.lr"):
        AutoencoderKL.from_pretrained(tmp_path / "vae")


def test_with_unet_swaps_weights_through_the_fit_checks(tmp_path):
    from ldmkit.models.unet import UNet

    pipe = make_tiny_pipeline(tmp_path)
    cfg = load_config(None, ["unet.base_channels=16", "unet.channel_mult=[1, 2]",
                             "unet.cross_attn_levels=[1]", "unet.num_heads=2"])
    other = UNet(cfg.unet, 4, pipe.text_encoder.hidden_size)
    swapped = pipe.with_unet(other)
    assert swapped.unet is other and pipe.unet is not other
    with pytest.raises(UserError, match="context_dim"):
        pipe.with_unet(UNet(cfg.unet, 4, pipe.text_encoder.hidden_size + 8))
