"""Fine-tuning from a trained model: `train --init-from` starts from its weights and keeps
its text encoder, schedule and geometry (refusing a config that differs, naming each
key); a LoRA run trains only the adapter, resumes exactly and saves a small adapter
folder; `train-vae --init-from` with a frozen encoder keeps the latent space."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from _tiny_model import TINY, make_tiny_model_dir
from ldmkit.cli import main
from ldmkit.config import load_config
from ldmkit.errors import ConfigError, UserError
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.training.checkpoint import load_latest_checkpoint
from ldmkit.training.common import Budget
from ldmkit.training.diffusion_trainer import train_diffusion
from ldmkit.training.init_from import check_fits, model_config

RUN = ["data.num_items=16", "train.batch_size=4", "train.steps=4", "train.log_every=1",
       "train.checkpoint_every=2", "train.validation_prompts=[]", "sample.steps=2",
       "train.mixed_precision=no", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("base"))


def fitting_overrides(model) -> list[str]:
    encoder = json.loads((model / "text_encoder.json").read_text())["name"]
    return TINY + [f"text.encoder={json.dumps(encoder)}", "text.max_length=12"] + RUN


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ----------------------------------------------------------------------------- config


def test_without_a_config_the_run_takes_the_model_s_settings(model):
    cfg = model_config(model, RUN)
    assert cfg.unet.base_channels == 16 and cfg.text.max_length == 12
    assert cfg.diffusion.timesteps == 50 and cfg.diffusion.objective == "v"
    assert cfg.data.image_size == 16 and cfg.vae.scale_factor == 0.5
    assert cfg.train.steps == 4  # the overrides still apply
    check_fits(cfg, model)


def test_a_config_that_does_not_fit_is_refused_naming_every_key(model):
    cfg = load_config(None, fitting_overrides(model) + ["unet.base_channels=32",
                                                       "diffusion.timesteps=60",
                                                       "text.max_length=16"])
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, model)
    message = str(err.value)
    for part in ("unet.base_channels: config 32, model 16", "diffusion.timesteps: config 60, "
                 "model 50", "text.max_length: config 16, model 12"):
        assert part in message


def test_the_cli_refuses_a_misfit_with_exit_2_and_writes_nothing(model, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[unet]\nbase_channels = 32\n")
    out = tmp_path / "run"
    assert main(["train", "--init-from", str(model), "--config", str(config),
                 "--out", str(out)]) == 2
    assert "does not fit the config" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "--out", str(out), "lora.rank=4"]) == 2  # no --config, no model
    assert main(["train", "--config", str(config), "--vae", str(model / "vae"),
                 "--out", str(out), "lora.rank=4"]) == 2
    assert "give --init-from MODEL_DIR" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- full fine-tune


def test_fine_tuning_starts_from_the_model_s_weights(model, tmp_path):
    cfg = model_config(model, RUN + ["train.lr=0"])  # no update: the model comes back
    run = train_diffusion(cfg, model / "vae", tmp_path / "ft", init_from=model)
    before, after = weights(model / "unet/model.safetensors"), weights(
        run.model_dir / "unet/model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((run.model_dir / "text_encoder.json").read_text()) == json.loads(
        (model / "text_encoder.json").read_text())
    assert json.loads((run.model_dir / "scheduler.json").read_text()) == json.loads(
        (model / "scheduler.json").read_text())


def test_fine_tuning_through_the_cli_changes_the_weights(model, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--init-from", str(model), "--out", str(out), *RUN]) == 0
    before, after = weights(model / "unet/model.safetensors"), weights(
        out / "model/unet/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- LoRA


def test_a_lora_run_s_hint_names_the_decoder_it_was_trained_on(model, tmp_path, capsys):
    """`sample --lora` on the base model decodes with the base VAE: an adapter trained on
    another decoder is shown with its --vae, one trained on the model's own without."""
    for vae, run in ((None, "own"), (model / "vae", "given")):
        extra = [] if vae is None else ["--vae", str(vae)]
        assert main(["train", "--init-from", str(model), "--out", str(tmp_path / run), *extra,
                     *RUN, "lora.rank=2"]) == 0
        hint = next(line for line in capsys.readouterr().out.splitlines()
                    if line.startswith("LoRA adapter saved"))
        assert ("--vae" in hint) == (vae is not None), hint
        assert f"--lora {tmp_path / run / 'lora'}" in hint


def test_a_lora_run_trains_only_the_adapter_and_saves_it(model, tmp_path):
    cfg = model_config(model, RUN + ["lora.rank=2", "train.lr=1e-2"])
    run = train_diffusion(cfg, model / "vae", tmp_path / "lora", init_from=model)
    adapter = tmp_path / "lora" / "lora"
    assert run.adapter_dir == adapter
    saved = weights(adapter / "adapter_model.safetensors")
    assert saved and all(".lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    ckpt = load_latest_checkpoint(tmp_path / "lora" / "checkpoints")
    base = weights(model / "unet/model.safetensors")
    for key, value in ckpt.modules["unet"].items():  # the base layers never moved
        if "lora_" not in key:
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert size < 0.1 * (model / "unet/model.safetensors").stat().st_size
    # the adapter on the base model = the merged model the run also saved
    pipe = TextToImagePipeline.from_pretrained(model).load_lora(adapter)
    merged = TextToImagePipeline.from_pretrained(run.model_dir)
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    a = pipe.generate_latents(["a red circle"], num_inference_steps=3, generator=g[0])
    b = merged.generate_latents(["a red circle"], num_inference_steps=3, generator=g[1])
    assert torch.allclose(a, b, atol=1e-3)


def test_a_resumed_lora_run_ends_with_the_uninterrupted_run_s_adapter(model, tmp_path,
                                                                      monkeypatch):
    cfg = model_config(model, RUN + ["lora.rank=2", "train.lr=1e-2"])
    train_diffusion(cfg, model / "vae", tmp_path / "straight", init_from=model)
    real_done = Budget.done
    monkeypatch.setattr(Budget, "done", lambda self, step: step >= 2 or real_done(self, step))
    train_diffusion(cfg, model / "vae", tmp_path / "resumed", init_from=model)
    monkeypatch.setattr(Budget, "done", real_done)
    assert load_latest_checkpoint(tmp_path / "resumed" / "checkpoints").step == 2
    train_diffusion(cfg, model / "vae", tmp_path / "resumed", resume=True, init_from=model)
    a = weights(tmp_path / "straight/lora/adapter_model.safetensors")
    b = weights(tmp_path / "resumed/lora/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_with_lora_scale_zero_is_the_base_model(model, tmp_path):
    cfg = model_config(model, RUN + ["lora.rank=2", "train.lr=1e-2"])
    train_diffusion(cfg, model / "vae", tmp_path / "l", init_from=model)
    common = ["sample", "--model", str(model), "--prompt", "a red circle", "--n", "1",
              "--steps", "3"]
    assert main(common + ["--out", str(tmp_path / "base")]) == 0
    assert main(common + ["--out", str(tmp_path / "zero"), "--lora", str(tmp_path / "l/lora"),
                          "--lora-scale", "0"]) == 0
    assert main(common + ["--out", str(tmp_path / "one"), "--lora", str(tmp_path / "l/lora"),
                          "--merge"]) == 0
    read = [(tmp_path / d / "0000.png").read_bytes() for d in ("base", "zero", "one")]
    assert read[0] == read[1] and read[0] != read[2]
    assert main(common + ["--out", str(tmp_path / "bad"), "--lora", str(tmp_path / "l/lora"),
                          "--lora-scale", "9"]) == 2
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- the VAE


def test_vae_fine_tune_with_a_frozen_encoder_keeps_the_latent_space(model, tmp_path):
    config = tmp_path / "vae.toml"
    config.write_text("")
    args = TINY + ["vae.steps=3", "vae.batch_size=4", "data.num_items=8", "data.val_items=4",
                   "vae.freeze_encoder=true", "vae.warmup_steps=0", "vae.lr=1e-2",
                   "train.mixed_precision=no", "data.extra_colors=['pink']"]
    args = [a for a in args if not a.startswith("vae.scale_factor")]
    out = tmp_path / "vae"
    assert main(["train-vae", "--init-from", str(model), "--config", str(config),
                 "--out", str(out), *args]) == 0
    before, after = weights(model / "vae/model.safetensors"), weights(
        out / "model/model.safetensors")
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same == key.startswith(("encoder.", "quant_conv.")), key
    scale = json.loads((out / "model/config.json").read_text())["scale_factor"]
    assert scale == 0.5  # the model's, not re-estimated: the denoiser still reads it


def test_vae_fine_tune_refuses_another_architecture(model, tmp_path, capsys):
    config = tmp_path / "vae.toml"
    config.write_text("")
    out = tmp_path / "vae"
    assert main(["train-vae", "--init-from", str(model), "--config", str(config),
                 "--out", str(out), *TINY, "vae.base_channels=16"]) == 2
    assert "vae.base_channels: config 16, model 8" in capsys.readouterr().err
    assert main(["train-vae", "--config", str(config), "--out", str(out), *TINY,
                 "vae.freeze_encoder=true"]) == 2
    assert not out.exists()


def test_a_vae_folder_of_another_latent_size_is_refused_for_the_denoiser(model, tmp_path):
    from ldmkit.models.vae import AutoencoderKL

    cfg = load_config(None, TINY + ["vae.latent_channels=3"])
    AutoencoderKL(cfg.vae, 16).save_pretrained(tmp_path / "vae3")
    with pytest.raises(UserError, match="3 latent channels"):
        train_diffusion(model_config(model, RUN), tmp_path / "vae3", tmp_path / "r",
                        init_from=model)
