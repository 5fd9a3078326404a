"""Configs as data: one dataclass per section, loaded from TOML, overridden by
`section.key=value`, validated once at the edge so the inner code can trust them."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# Colours the shapes data can add to its six (their RGB: data/shapes.py EXTRA_COLORS).
EXTRA_COLOR_NAMES = ("pink", "cyan", "brown")


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None,
         choices: tuple | None = None, doc: str = "") -> Any:
    """A field with its validation rule kept beside its default."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """[data]: where the images and captions come from (docs/training.md, "Data")."""

    dataset: str = _opt("shapes", choices=("shapes", "coco", "folder"),
                        doc="shapes: built-in, generated from data.seed; coco: MS-COCO captions "
                            "under data.root; folder: images + metadata.jsonl or .txt captions")
    root: str = _opt("", doc="dataset folder for coco / folder")
    split: str = _opt("train", doc="coco split name (train, val)")
    image_size: int = _opt(64, lo=8, hi=1024, doc="side of the square images in pixels (coco / "
                                                  "folder: resized on the short side, "
                                                  "centre-cropped)")
    seed: int = _opt(0, lo=0, doc="shapes: the seed every scene is drawn from")
    num_items: int = _opt(20000, lo=1, doc="length of one epoch of the shapes data")
    val_items: int = _opt(256, lo=1, doc="held-out images for reconstructions and metrics")
    two_object_fraction: float = _opt(0.5, lo=0.0, hi=1.0, doc="shapes: the share of scenes with "
                                                               "two objects and a relation")
    heldout: list[str] = _opt(["purple triangle", "orange circle"],
                              doc="'colour shape' pairs never shown in training")
    num_workers: int = _opt(0, lo=0, doc="DataLoader worker processes; 0 = load in the training "
                                         "process")
    balance_by: str = _opt("", doc="folder data: a metadata.jsonl field; the U-Net draws "
                                   "each of its values equally often (empty = every image "
                                   "equally often)")
    extra_colors: list[str] = _opt([], choices=EXTRA_COLOR_NAMES,
                                   doc="shapes data: colours beyond the six the demo model "
                                       "knows (RGB in data/shapes.py), e.g. to teach a "
                                       "trained model one by fine-tuning")
    extra_color_fraction: float = _opt(0.5, lo=0.0, hi=1.0,
                                       doc="shapes data with extra_colors: the share of "
                                           "objects drawn in one of them (the rest keep "
                                           "the six, so a fine-tune rehearses them)")


@dataclass
class VAEArchitecture:
    """What builds the VAE network, and all a VAE model folder's config.json holds
    (as nanoGPT's model_args and diffusers' @register_to_config: no training settings)."""

    downsample_factor: int = _opt(8, choices=(4, 8), doc="image side / latent side (64x64 images "
                                                         "-> 8x8 latents at 8)")
    base_channels: int = _opt(64, lo=8, doc="channels of the first level; level i has "
                                            "base_channels x channel_mult[i]")
    channel_mult: list[int] = _opt([1, 2, 2, 4], doc="one entry per level: log2(factor) + 1")
    num_res_blocks: int = _opt(1, lo=1, doc="ResNet blocks per level")
    latent_channels: int = _opt(4, lo=1, doc="channels of the latent the U-Net sees")
    attention: bool = _opt(True, doc="self-attention at the lowest resolution")
    norm_group_channels: int = _opt(0, lo=0, doc="channels per GroupNorm group; 0 = 32 "
                                                 "groups where the width allows (LDM's), "
                                                 "which at widths <= 32 is one channel "
                                                 "per group (instance norm)")
    scale_factor: float = _opt(0.0, lo=0.0, doc="1/std of latents; 0 = compute after training")

    def architecture(self) -> VAEArchitecture:
        """Only the fields that build the network (drops a VAEConfig's training settings)."""
        names = [f.name for f in dataclasses.fields(VAEArchitecture)]
        return VAEArchitecture(**{n: copy.deepcopy(getattr(self, n)) for n in names})


@dataclass
class VAEConfig(VAEArchitecture):
    """[vae]: the architecture above plus how stage 1 trains it. One TOML section keeps
    configs short; the model folder saves only `architecture()`."""

    kl_weight: float = _opt(1e-6, lo=0.0, doc="relative to per-pixel reconstruction loss")
    recon_loss: str = _opt("mse", choices=("mse", "l1", "charbonnier"),
                           doc="the per-pixel term: squared error, absolute error, or "
                               "Charbonnier sqrt(e^2 + 1e-6) (a smooth L1)")
    # The other terms (training/vae_losses.py) are off by default, which is the shapes
    # demo's recipe; configs/emoji64.toml turns on what BENCHMARKS.md "VAE recipe for real
    # images" measured to pay on real pictures.
    ssim_weight: float = _opt(0.0, lo=0.0, doc="weight of 1 - SSIM (pytorch-msssim, 11x11 "
                                               "Gaussian window) beside the pixel term")
    ffl_weight: float = _opt(0.0, lo=0.0, doc="weight of the focal frequency loss (Jiang "
                                              "et al. 2021, alpha = 1), on image spectra")
    blur_weight: float = _opt(0.0, lo=0.0, doc="weight of an L1 term between 4x4-average-"
                                               "pooled images: the colour of each region, "
                                               "against colour drift")
    gan_weight: float = _opt(0.0, lo=0.0, doc="PatchGAN hinge term (taming / LDM), times "
                                              "the adaptive weight from the decoder's last "
                                              "layer; 0 = no discriminator")
    gan_start: int = _opt(0, lo=0, doc="step at which the discriminator and its term start")
    disc_channels: int = _opt(32, lo=4, doc="discriminator width (taming's ndf is 64)")
    disc_layers: int = _opt(2, lo=1, hi=5, doc="stride-2 layers of the discriminator "
                                               "(taming: 3, for 256-pixel images)")
    ema_decay: float = _opt(0.0, lo=0.0, hi=1.0, doc="EMA of the VAE weights, saved and "
                                                     "evaluated instead of the live ones; "
                                                     "0 = off")
    adam_beta1: float = _opt(0.9, lo=0.0, hi=1.0, doc="Adam's beta1 (LDM's VAE: 0.5)")
    adam_beta2: float = _opt(0.999, lo=0.0, hi=1.0, doc="Adam's beta2 (LDM's VAE: 0.9)")
    freeze_encoder: bool = _opt(False, doc="train-vae --init-from: train the decoder only, "
                                           "so the latent space a denoiser was trained on "
                                           "stays exactly as it was (as Stability's "
                                           "ft-MSE VAE fine-tune)")
    include_heldout: bool = _opt(False, doc="shapes data: the VAE also trains on images of "
                                            "the held-out pairs (images only; the U-Net "
                                            "never sees those pairs)")
    steps: int = _opt(2000, lo=1, doc="stage 1 optimizer updates")
    batch_size: int = _opt(32, lo=1, doc="images per update (per process)")
    lr: float = _opt(2e-4, lo=0.0, doc="Adam learning rate: linear warm-up, then cosine decay over "
                                       "the steps (or the minutes)")
    warmup_steps: int = _opt(100, lo=0, doc="updates of linear LR warm-up")
    minutes: float = _opt(0.0, lo=0.0, doc="wall-clock budget; 0 = run all steps")


@dataclass
class TextConfig:
    """[text]: the frozen, pretrained text encoder and how captions become tokens."""

    encoder: str = _opt("sentence-transformers/all-MiniLM-L6-v2",
                        doc="Hugging Face name or local folder")
    max_length: int = _opt(32, lo=2, hi=1024, doc="token positions per caption; a longer caption "
                                                  "is cut, with a warning")
    dtype: str = _opt("float32", choices=("float32", "bfloat16"), doc="dtype of the frozen "
                                                                      "encoder's weights")
    revision: str = _opt("", doc="hub revision; empty = default")
    cache_dir: str = _opt("", doc="embedding cache folder; empty = <run>/cache")
    hidden_layers: list[int] = _opt([-1], doc="hidden states joined per token: -1 = the last "
                                              "layer, 0 = the embedding layer")


@dataclass
class UNetConfig:
    """[unet]: the denoiser. `kind` picks the backbone; base_channels .. text_width build
    the U-Net, width .. mlp_ratio the transformers (num_heads and pooled_text serve all)."""

    kind: str = _opt("unet", choices=("unet", "dit", "mmdit"),
                     doc="unet: the convolutional U-Net with cross-attention; dit: a "
                         "transformer over latent patches with adaLN-Zero and "
                         "cross-attention (Peebles & Xie 2023); mmdit: joint attention over "
                         "patches and text tokens with weights per stream (SD3)")
    base_channels: int = _opt(64, lo=8, doc="unet: channels of the top level")
    channel_mult: list[int] = _opt([1, 2, 2], doc="unet: one entry per level, channels = "
                                                  "base_channels x entry")
    num_res_blocks: int = _opt(2, lo=1, doc="unet: ResBlocks per level")
    cross_attn_levels: list[int] = _opt([1, 2], doc="levels with cross-attention (0 = top)")
    self_attn: bool = _opt(True, doc="unet: self-attention before the cross-attention at the "
                                     "cross-attention levels")
    num_heads: int = _opt(4, lo=1, doc="attention heads")
    dropout: float = _opt(0.0, lo=0.0, hi=1.0, doc="dropout inside the U-Net's ResBlocks; in "
                                                "DiT / MMDiT on each attention and MLP "
                                                "branch's output")
    pooled_text: bool = _opt(False, doc="add the masked mean of the text tokens to the "
                                        "time embedding (global conditioning, as Imagen)")
    text_layers: int = _opt(0, lo=0, doc="trainable transformer blocks over the frozen text "
                                         "tokens (a residual side path); 0 = none")
    text_width: int = _opt(256, lo=8, doc="width of those blocks")
    width: int = _opt(256, lo=8, doc="dit/mmdit: the transformer's hidden width")
    depth: int = _opt(6, lo=1, doc="dit/mmdit: number of transformer blocks")
    patch_size: int = _opt(2, lo=1, hi=16, doc="dit/mmdit: latent pixels per patch side "
                                               "(8x8 latents, 2 -> 16 tokens)")
    mlp_ratio: float = _opt(4.0, lo=0.5, hi=16.0, doc="dit/mmdit: MLP width / hidden width")


@dataclass
class DiffusionConfig:
    """[diffusion]: what the denoiser learns and the noise schedule (the model folder's
    scheduler.json)."""

    schedule: str = _opt("cosine", choices=("cosine", "linear"), doc="the DDPM noise schedule "
                                                                     "(eps, v)")
    timesteps: int = _opt(1000, lo=2, doc="T: the training timesteps; samplers take at most T "
                                          "steps")
    objective: str = _opt("eps", choices=("eps", "v", "flow"),
                          doc="what the network learns: the noise (eps) or v on the DDPM "
                              "schedule, or the velocity of rectified flow (flow: straight "
                              "paths x_t = (1 - t) x0 + t eps; `schedule` is then unused). "
                              "Old configs' `prediction` key means the same")
    flow_shift: float = _opt(1.0, lo=0.01, hi=100.0,
                             doc="flow: SD3's time shift s, t' = s t / (1 + (s - 1) t), for "
                                 "training draws and the sampler's grid; > 1 spends more at "
                                 "high noise")
    t_sampling: str = _opt("logit-normal", choices=("uniform", "logit-normal"),
                           doc="flow: how training draws t (SD3's logit-normal weights the "
                               "middle of the path)")
    logit_mean: float = _opt(0.0, lo=-5.0, hi=5.0, doc="flow, logit-normal: mean of the normal")
    logit_std: float = _opt(1.0, lo=0.01, hi=5.0, doc="flow, logit-normal: std of the normal")
    min_snr_gamma: float = _opt(0.0, lo=0.0, doc="Min-SNR-gamma loss weighting (Hang "
                                                 "et al. 2023): 0 = off; 5 is the paper's value "
                                                 "(eps/v only: flow ignores it)")
    p_uncond: float = _opt(0.15, lo=0.0, hi=1.0, doc="probability that a training caption is "
                                                     "dropped (the empty prompt), so one network "
                                                     "also learns the unconditional prediction "
                                                     "guidance needs")
    x0_clamp: float = _opt(0.0, lo=0.0, doc="clamp x0 estimates to +-this in latent units; 0 = off")


@dataclass
class TrainConfig:
    """[train]: how stage 2 trains the denoiser. Stage 1 reads its own steps, batch, LR
    and budget from [vae], and mixed_precision, seed, grad_clip, weight_decay, log_every
    and checkpoint_every from here."""

    steps: int = _opt(2000, lo=1, doc="optimizer updates (each of grad_accum_steps "
                                      "micro-batches on every process)")
    batch_size: int = _opt(128, lo=1, doc="per process and micro-batch: one update sees "
                                          "batch_size x grad_accum_steps x processes images")
    grad_accum_steps: int = _opt(1, lo=1, doc="micro-batches whose gradients make one update "
                                              "(stage 2), for a large batch on a small GPU")
    lr: float = _opt(2e-4, lo=0.0, doc="AdamW learning rate: linear warm-up, then cosine decay "
                                       "over the steps (or the minutes)")
    weight_decay: float = _opt(0.0, lo=0.0, doc="AdamW weight decay")
    warmup_steps: int = _opt(100, lo=0, doc="updates of linear LR warm-up")
    grad_clip: float = _opt(1.0, lo=0.0, doc="0 = off")
    mixed_precision: str = _opt("auto", choices=("auto", "no", "bf16", "fp16"),
                                doc="auto: bf16 on CPUs and bf16-capable GPUs, fp16 with loss "
                                    "scaling on other GPUs; no = fp32")
    compile: str = _opt("off", choices=("off", "default", "reduce-overhead"),
                        doc="torch.compile the U-Net's training forward (stage 2): "
                            "reduce-overhead adds CUDA graphs on a GPU; off on a CPU, where "
                            "it does not pay (BENCHMARKS.md)")
    ema_decay: float = _opt(0.999, lo=0.0, hi=1.0, doc="EMA of the weights; the model folder saves "
                                                       "the EMA weights")
    use_cache: bool = _opt(True, doc="cache latents and text embeddings once")
    log_every: int = _opt(25, lo=1, doc="updates between logged losses (metrics.jsonl); the loss "
                                        "is read from the device only then")
    checkpoint_every: int = _opt(500, lo=1, doc="updates between checkpoints (--resume continues "
                                                "from the latest)")
    report_to: list[str] = _opt([], choices=("tensorboard", "wandb"),
                                doc="experiment trackers (both stages, through Accelerate): "
                                    "loss, LR, grad norm, images/s, validation images; "
                                    "wandb runs offline unless WANDB_MODE says otherwise; "
                                    "[] = none (docs/training-trackers.md)")
    sample_every: int = _opt(500, lo=1, doc="updates between grids of the validation prompts "
                                            "(samples/)")
    seed: int = _opt(0, lo=0, doc="seed of the weights, draws and noise: the same seed and number "
                                  "of processes give the same run")
    minutes: float = _opt(0.0, lo=0.0, doc="wall-clock budget; 0 = run all steps")
    validation_prompts: list[str] = _opt(["a red circle", "a blue square on the left",
                                          "a small green triangle at the top",
                                          "a yellow cross left of a purple square"],
                                         doc="prompts of the validation grids (sample.n "
                                             "images each, sampled with [sample])")


@dataclass
class SampleConfig:
    """[sample]: how a training run draws its validation grids (train.sample_every).
    `ldmkit sample`, the server and the pipeline take their own arguments."""

    sampler: str = _opt(HEADLINE.sampler, choices=tuple(SAMPLERS), doc="sampler of the validation "
                                                                       "grids")
    steps: int = _opt(HEADLINE.steps, lo=1, doc="denoising steps")
    guidance: float = _opt(HEADLINE.guidance, lo=0.0, doc="classifier-free guidance scale w (1 = "
                                                          "none)")
    guidance_rescale: float = _opt(HEADLINE.guidance_rescale, lo=0.0, hi=1.0,
                                   doc="guidance rescale phi (Lin et al. 2023): 0 = off")
    eta: float = _opt(0.0, lo=0.0, hi=1.0, doc="DDIM's eta: 0 = deterministic, 1 = DDPM-like "
                                               "noise (ddim only)")
    n: int = _opt(4, lo=1, hi=16, doc="images per validation prompt (one row of the grid)")
    seed: int = _opt(0, lo=0, doc="seed of the grids' noise, the same at every step")


@dataclass
class LoRAConfig:
    """[lora]: train a LoRA adapter (Hu et al. 2021, through PEFT; models/lora.py) on a
    trained denoiser instead of all its weights: `ldmkit train --init-from MODEL_DIR`."""

    rank: int = _opt(0, lo=0, hi=1024, doc="the adapter's rank r; 0 = no adapter (the "
                                           "whole denoiser trains)")
    alpha: float = _opt(0.0, lo=0.0, doc="LoRA's alpha: the update is scaled by alpha / "
                                         "rank; 0 = rank (a scale of 1)")
    targets: list[str] = _opt(["attention"], choices=("attention", "conv"),
                              doc="attention: every attention's to_q/to_k/to_v/to_out "
                                  "projections; conv: also the ResBlocks' 3x3 convolutions")
    dropout: float = _opt(0.0, lo=0.0, hi=1.0, doc="dropout on the adapter's input "
                                                   "(PEFT's lora_dropout)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_json(self, path: str | Path) -> None:
        from ldmkit.io import write_json_atomic  # local: io imports nothing from here

        write_json_atomic(path, self.to_dict())


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or the defaults), apply `section.key=value` overrides, validate."""
    source = str(path) if path else "<defaults>"
    raw = _read_toml(Path(path)) if path is not None else {}
    return config_from_dict(_with_overrides(raw, overrides or [], source), source)


def override_config(cfg: Config, overrides: list[str], source: str = "<override>") -> Config:
    """A copy of `cfg` with `section.key=value` overrides applied, validated again."""
    return config_from_dict(_with_overrides(cfg.to_dict(), overrides, source), source)


def _with_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    for item in overrides:
        section, key, value = _parse_override(item)
        key = RENAMED.get((section, key), key)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        raw[section][key] = value
    return raw


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Build and validate a Config from nested dicts (TOML or JSON shaped)."""
    cfg = Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}] "
                              f"(known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys")
        target = getattr(cfg, section)
        values = _renamed_keys(section, values, source)
        known = {f.name: f for f in dataclasses.fields(target)}
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {section}.{key} "
                                  f"(known: {', '.join(known)})")
            setattr(target, key, _check_value(f"{section}.{key}", hints[key],
                                                 known[key].metadata, value, source))
    _check_cross_field(cfg, source)
    return cfg


# Keys renamed since 0.1: an old config (a TOML or a run folder's config.json) still loads.
RENAMED = {("diffusion", "prediction"): "objective"}


def _renamed_keys(section: str, values: dict, source: str) -> dict:
    out = dict(values)
    for (sec, old), new in RENAMED.items():
        if sec != section or old not in out:
            continue
        value = out.pop(old)
        if new in out and out[new] != value:
            raise ConfigError(f"{source}: {sec}.{old} = {value!r} (the old name of {sec}.{new}) "
                              f"contradicts {sec}.{new} = {out[new]!r}")
        out[new] = value
    return out


def load_config_json(path: str | Path) -> Config:
    """Load a resolved config saved by `Config.save_json` (validated again)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config JSON ({exc})") from exc
    return config_from_dict(raw, str(path))


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:  # TOML syntax first (numbers, bools, lists, quoted strings) ...
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # ... and a bare word is a string: data.dataset=coco
    return section, key, value


# ----------------------------------------------------------------------------- validation


def _check_value(name: str, expected: Any, meta: Any, value: Any, source: str) -> Any:
    value = _coerce(name, expected, value, source)
    items = value if isinstance(value, list) else [value]
    for item in items:
        if meta.get("choices") and item not in meta["choices"]:
            raise ConfigError(f"{source}: {name} = {item!r} is not one of "
                              f"{', '.join(map(repr, meta['choices']))}")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if not math.isfinite(item):  # NaN slips past every range comparison
                raise ConfigError(f"{source}: {name} = {item!r} must be a finite number")
            if meta.get("lo") is not None and item < meta["lo"]:
                raise ConfigError(f"{source}: {name} = {item!r} is out of range "
                                  f"(must be >= {meta['lo']})")
            if meta.get("hi") is not None and item > meta["hi"]:
                raise ConfigError(f"{source}: {name} = {item!r} is out of range "
                                  f"(must be <= {meta['hi']})")
    return value


def _coerce(name: str, expected: Any, value: Any, source: str) -> Any:
    origin = typing.get_origin(expected)
    if origin is list:
        (inner,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name} must be a list of {inner.__name__}, got {value!r}")
        return [_coerce(f"{name}[{i}]", inner, v, source) for i, v in enumerate(value)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{source}: {name} must be {expected.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _check_cross_field(cfg: Config, source: str) -> None:
    levels = cfg.vae.downsample_factor.bit_length()  # log2(f) + 1 for a power of two
    if len(cfg.vae.channel_mult) != levels:
        raise ConfigError(f"{source}: vae.channel_mult has {len(cfg.vae.channel_mult)} entries; "
                          f"downsample_factor {cfg.vae.downsample_factor} needs {levels}")
    if cfg.data.image_size % cfg.vae.downsample_factor:
        raise ConfigError(f"{source}: data.image_size = {cfg.data.image_size} is not divisible "
                          f"by vae.downsample_factor = {cfg.vae.downsample_factor}")
    if cfg.unet.kind != "unet":
        _check_transformer(cfg, source)
    bad = [lvl for lvl in cfg.unet.cross_attn_levels if not 0 <= lvl < len(cfg.unet.channel_mult)]
    if bad:
        raise ConfigError(f"{source}: unet.cross_attn_levels {bad} outside "
                          f"0..{len(cfg.unet.channel_mult) - 1}")
    if cfg.data.dataset in ("coco", "folder") and not cfg.data.root:
        raise ConfigError(f"{source}: data.root must name the folder for "
                          f"data.dataset = {cfg.data.dataset!r}")
    if cfg.vae.include_heldout and cfg.data.dataset != "shapes":
        raise ConfigError(f"{source}: vae.include_heldout adds the shapes data's held-out "
                          f"pairs to the VAE's images; data.dataset is {cfg.data.dataset!r}")
    if cfg.data.extra_colors and cfg.data.dataset != "shapes":
        raise ConfigError(f"{source}: data.extra_colors adds colours to the shapes data; "
                          f"data.dataset is {cfg.data.dataset!r}")
    if cfg.data.balance_by and cfg.data.dataset != "folder":
        raise ConfigError(f"{source}: data.balance_by = {cfg.data.balance_by!r} balances "
                          f"folder data by a metadata.jsonl field; data.dataset is "
                          f"{cfg.data.dataset!r}")


def _check_transformer(cfg: Config, source: str) -> None:
    u = cfg.unet
    if u.width % u.num_heads:
        raise ConfigError(f"{source}: unet.width = {u.width} is not divisible by "
                          f"unet.num_heads = {u.num_heads}")
    latent = cfg.data.image_size // cfg.vae.downsample_factor
    if latent % u.patch_size:
        raise ConfigError(f"{source}: unet.patch_size = {u.patch_size} does not divide the "
                          f"{latent}x{latent} latents (data.image_size / "
                          f"vae.downsample_factor)")
