"""Fine-tuning from a trained model: `ldmkit train --init-from MODEL_DIR` starts the
denoiser from the folder's weights, `ldmkit train-vae --init-from DIR` the VAE.

The model's text encoder, schedule and geometry stay what it was trained with: without
--config the run's config is read from the folder (training settings from the defaults
and the overrides); with --config every setting that shapes the network or its inputs
must agree with the folder, and a config that differs is refused naming each key, before
any work (a denoiser trained on other tokens or another noise level would be fed inputs
it never learnt; loading its weights would at best fail on a shape).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from ldmkit.config import Config, config_from_dict, override_config
from ldmkit.errors import ConfigError, UserError
from ldmkit.io import load_state_into, read_json

UNET_TRAINING_KEYS = ("dropout",)  # [unet] keys that do not shape the network
VAE_NON_GEOMETRY = ("scale_factor",)  # kept from the model, not compared


def check_model_dir(model_dir: str | Path) -> Path:
    from ldmkit.pipeline import check_model_dir as check

    return check(model_dir)


# ----------------------------------------------------------------------------- reading a folder


def model_sections(model_dir: Path) -> dict:
    """The config sections a model folder fixes, as a raw config dict."""
    from ldmkit.diffusion.objective import schedule_from_dict

    index = read_json(model_dir / "model_index.json", "model index")
    text = read_json(model_dir / "text_encoder.json", "text encoder reference")
    sched = read_json(model_dir / "scheduler.json", "scheduler config")
    schedule, objective = schedule_from_dict(sched, str(model_dir / "scheduler.json"))
    diffusion = {"objective": objective, "timesteps": schedule.timesteps,
                 "x0_clamp": float(sched.get("x0_clamp", 0.0))}
    if objective == "flow":
        diffusion.update(flow_shift=schedule.shift, t_sampling=schedule.t_sampling,
                         logit_mean=schedule.logit_mean, logit_std=schedule.logit_std)
    else:
        diffusion["schedule"] = schedule.kind
    return {"data": {"image_size": index.get("image_size")},
            "vae": _vae_architecture(model_dir / "vae"),
            "text": {"encoder": text["name"], "max_length": int(text.get("max_length", 77)),
                     "dtype": text.get("dtype", "float32"),
                     "revision": text.get("revision", ""),
                     "hidden_layers": list(text.get("hidden_layers", [-1]))},
            "unet": _unet_config(model_dir / "unet"), "diffusion": diffusion}


def _unet_config(unet_dir: Path) -> dict:
    raw = dict(read_json(unet_dir / "config.json", "denoiser config"))
    for key in ("in_channels", "context_dim"):
        raw.pop(key, None)
    # through the validator: keys an older folder lacks take the defaults that rebuilt it
    return dataclasses.asdict(config_from_dict({"unet": raw}, str(unet_dir)).unet)


def _vae_architecture(vae_dir: Path) -> dict:
    raw = dict(read_json(vae_dir / "config.json", "VAE config"))
    raw.pop("image_size", None)
    cfg = config_from_dict({"vae": raw}, str(vae_dir / "config.json")).vae
    return dataclasses.asdict(cfg.architecture())


def model_config(model_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The run's config when only --init-from is given: the folder's sections, the
    defaults for the rest, then the command line's overrides."""
    model_dir = check_model_dir(model_dir)
    cfg = config_from_dict(model_sections(model_dir), str(model_dir))
    return override_config(cfg, list(overrides or []), "<command line>")


# ----------------------------------------------------------------------------- fit checks


def differences(cfg: Config, sections: dict, skip: dict[str, tuple[str, ...]]) -> list[str]:
    """'section.key: config X, model Y' for every key the folder fixes that differs."""
    out = []
    for section, values in sections.items():
        mine = getattr(cfg, section)
        for key, theirs in values.items():
            if key in skip.get(section, ()) or theirs is None:
                continue
            ours = getattr(mine, key)
            if ours != theirs:
                out.append(f"{section}.{key}: config {ours!r}, model {theirs!r}")
    return out


def check_fits(cfg: Config, model_dir: str | Path) -> Path:
    """Refuse (ConfigError, exit 2) a config whose geometry, text encoder or schedule is
    not the model's, naming every key that differs."""
    model_dir = check_model_dir(model_dir)
    sections = model_sections(model_dir)
    diffusion = sections["diffusion"]
    for key in ("x0_clamp", "t_sampling", "logit_mean", "logit_std"):  # training / sampling
        diffusion.pop(key, None)
    differ = differences(cfg, sections, {"unet": UNET_TRAINING_KEYS, "vae": VAE_NON_GEOMETRY})
    if differ:
        raise ConfigError(f"--init-from {model_dir}: the model does not fit the config: "
                          + "; ".join(differ))
    return model_dir


def fine_tune_config(cfg: Config | None, model_dir: str | Path,
                     overrides: list[str] | None = None) -> Config:
    """The config of a fine-tuning run: the folder's (no --config) or the given one,
    checked against the folder."""
    if cfg is None:
        return model_config(model_dir, overrides)
    check_fits(cfg, model_dir)
    return cfg


# ----------------------------------------------------------------------------- weights


def init_denoiser(model: nn.Module, model_dir: Path) -> None:
    """Load the folder's denoiser weights (its EMA weights) into a freshly built `model`."""
    load_state_into(model, Path(model_dir) / "unet" / "model.safetensors")


def vae_folder(path: str | Path) -> Path:
    """A VAE folder given directly, or the vae/ of a model folder."""
    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    raise UserError(f"--init-from {path}: neither a model folder nor a VAE folder "
                    "(config.json + model.safetensors)")


def vae_fine_tune_config(cfg: Config, path: str | Path) -> Config:
    """Check the [vae] architecture against the folder's and keep its latent scale factor
    (unless the config sets one): a denoiser trained on its latents still reads them."""
    vae_dir = vae_folder(path)
    theirs = _vae_architecture(vae_dir)
    differ = differences(cfg, {"vae": theirs}, {"vae": VAE_NON_GEOMETRY})
    if differ:
        raise ConfigError(f"--init-from {vae_dir}: the VAE does not fit the config: "
                          + "; ".join(differ))
    if not cfg.vae.scale_factor:
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(
            cfg.vae, scale_factor=theirs["scale_factor"]))
    return cfg


def init_vae(vae: nn.Module, path: str | Path, freeze_encoder: bool) -> None:
    """Load the folder's VAE weights; with `freeze_encoder` only the decoder trains, so
    the latent space (what a denoiser was trained on) stays exactly as it was, the way
    Stability fine-tuned SD's ft-MSE VAE (decoder only, a drop-in replacement)."""
    load_state_into(vae, vae_folder(path) / "model.safetensors")
    if freeze_encoder:
        for part in (vae.encoder, vae.quant_conv):
            part.requires_grad_(False)


def check_latent_channels(vae_channels: int, model_dir: Path) -> None:
    unet = read_json(Path(model_dir) / "unet" / "config.json", "denoiser config")
    if unet.get("in_channels") != vae_channels:
        raise UserError(f"--vae has {vae_channels} latent channels; the model in "
                        f"{model_dir} denoises {unet.get('in_channels')}")


def start_from_model(model: nn.Module, cfg: Config, model_dir: Path,
                     latent_channels: int) -> None:
    """A freshly built denoiser -> the folder's weights, plus a LoRA adapter when
    [lora] rank > 0 (then only the adapter trains)."""
    from ldmkit.models.lora import add_lora

    check_latent_channels(latent_channels, model_dir)
    init_denoiser(model, model_dir)
    lora = cfg.lora
    if lora.rank:
        add_lora(model, lora.rank, lora.alpha or float(lora.rank), lora.targets, lora.dropout)
