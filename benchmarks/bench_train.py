"""Row 1: diffusion training images/s, ldmkit's fast path against the seed's way.

Both contenders run the trainer's own step (the public `DiffusionStep` of
ldmkit.training.diffusion_step: caption dropout, loss, backward, clipping, AdamW, LR
schedule, EMA) on the same U-Net (same initial weights), batch and images, at the
seed's 64x64 -> 8x8x4 geometry with the seed's VAE (base 128, random weights) and the
demo's U-Net and text encoder (configs/shapes-demo.toml): the seed's U-Net, base 152 x
(1, 2, 4, 8), 392M parameters, is too slow to time on a CPU within the suite's budget.
`vae_width_cost` shows what the demo's much smaller VAE would leave of the seed path's
extra cost.

- fast:  cached latents + cached text embeddings (`training_batches` with
         train.use_cache = true), bf16 autocast;
- seed:  fp32, VAE encode + text encode inside every step (`LiveBatches`, use_cache = false);
- cached_fp32: the cache without bf16, to show which half of the gap each change buys.

The batches come from `training_batches`, the same function `train_diffusion` calls, so the
timed work is what training runs; the once-per-run cache build is timed separately.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchlib import (
    DEMO_CONFIG,
    RESULTS_DIR,
    SEED_CONFIG,
    Sizes,
    alternate,
    profile_table,
    rates,
    ratio_summary,
    summarize,
)

TARGET = 3.0


def demo_config(batch: int, overrides: tuple[str, ...] = ()):
    from ldmkit.config import load_config

    return load_config(DEMO_CONFIG, [f"train.batch_size={batch}", *overrides])


def load_vae(cfg, save_to: Path):
    """The seed's VAE (configs/seed-coco64.toml: base 128 x (1, 1, 2, 4), 2 blocks per
    level), untrained: random weights cost the same to run, and the seed path's main extra
    cost is exactly this encoder. Saved to `save_to` because the latent cache keys on it."""
    from ldmkit.config import load_config
    from ldmkit.models.vae import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(load_config(SEED_CONFIG).vae, cfg.data.image_size)
    vae.save_pretrained(save_to, image_size=cfg.data.image_size)
    return vae.eval().requires_grad_(False), "the seed's widths, untrained (random weights)"


def training_images(cfg, n: int):
    """n shapes images rendered once into RAM: both paths read the same decoded images,
    as a real run reads them from disk."""
    from ldmkit.data.memory import materialize
    from ldmkit.data.shapes import ShapesDataset

    return materialize(ShapesDataset(image_size=cfg.data.image_size, num_items=n, seed=0))


def make_step(cfg, text, vae, init: dict, bf16: bool):
    """The trainer's public step around a fresh U-Net loaded with `init`, without an
    Accelerator (whose process-wide precision could not alternate bf16 and fp32)."""
    from ldmkit.config import override_config
    from ldmkit.models.unet import UNet
    from ldmkit.training.diffusion_step import DiffusionStep

    cfg = override_config(cfg, [f"train.mixed_precision={'bf16' if bf16 else 'no'}"])
    unet = UNet(cfg.unet, vae.config.latent_channels, text.hidden_size)
    unet.load_state_dict(init)
    return DiffusionStep(unet, cfg, text.null())


class Stepper:
    """k training steps of one run on its batch stream."""

    def __init__(self, step, batches, k: int):
        self.train_step, self.batches, self.k = step, batches, k

    def __call__(self) -> None:
        for _ in range(self.k):
            self.train_step(*self.batches.next())


def prepare(sz: Sizes, work: Path, text=None) -> dict:
    """Config, text encoder, VAE, images and one initial U-Net state for every run."""
    from ldmkit.models.text import TextEncoder
    from ldmkit.models.unet import UNet

    cfg = demo_config(sz.train_batch)
    text = text or TextEncoder.from_config(cfg.text)
    vae, vae_source = load_vae(cfg, work / "vae")
    data = training_images(cfg, sz.train_items)
    torch.manual_seed(0)
    init = UNet(cfg.unet, vae.config.latent_channels, text.hidden_size).state_dict()
    return {"cfg": cfg, "text": text, "vae": vae, "vae_source": vae_source, "data": data,
            "init": init, "work": work}


def stream(p: dict, cached: bool):
    """The trainer's own batch stream (`training_batches`): cached, or live like the seed."""
    from ldmkit.training.latent_cache import training_batches

    cfg = p["cfg"] if cached else demo_config(p["cfg"].train.batch_size,
                                              ("train.use_cache=false",))
    out = p["work"] / ("fast" if cached else "seed")
    return cfg, training_batches(cfg, p["vae"], p["work"] / "vae", p["text"], p["data"], out,
                         torch.device("cpu"), 0)


def build(sz: Sizes, work: Path, text=None) -> dict:
    """Both batch streams and three runs (same initial U-Net): fast, seed, cached_fp32."""
    import time

    p = prepare(sz, work, text)
    start = time.perf_counter()
    cfg, cached = stream(p, cached=True)
    build_s = time.perf_counter() - start
    cfg_live, live = stream(p, cached=False)
    text, vae, init = p["text"], p["vae"], p["init"]
    runs = {"fast": make_step(cfg, text, vae, init, True),
            "seed": make_step(cfg_live, text, vae, init, False),
            "cached_fp32": make_step(cfg, text, vae, init, False)}
    streams = {"fast": cached, "seed": live, "cached_fp32": cached}
    return {"cfg": cfg, "text": text, "vae": vae, "vae_source": p["vae_source"],
            "cache_build_s": build_s,
            "runs": runs, "streams": streams,
            "unet_params": sum(q.numel() for q in runs["fast"].unet.parameters())}


def vae_width_cost(cfg, rounds: int, batch: int = 8) -> dict:
    """ms per image of the live VAE encode (the seed path's main extra cost) with the demo's
    VAE widths against the seed's (configs/seed-coco64.toml): how much the scaled-down
    widths shrink row 1's gap. Random weights, fp32, as the seed path runs it."""
    from ldmkit.config import load_config
    from ldmkit.models.vae import AutoencoderKL

    seed_cfg = load_config(SEED_CONFIG)
    x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size)
    vaes = {"demo": AutoencoderKL(cfg.vae), "seed": AutoencoderKL(seed_cfg.vae)}

    def encode(vae):
        def go():
            with torch.no_grad():
                vae.encode_latents(x, sample=True)
        return go

    seconds = alternate({k: encode(v) for k, v in vaes.items()}, rounds)
    return {f"train_live_vae_encode_ms_per_image_{k}_widths": summarize(
        [1e3 * t / batch for t in v], 2) for k, v in seconds.items()}


def train_row(sz: Sizes, text=None, profile_dir: Path = RESULTS_DIR,
              force_profile: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        b = build(sz, Path(tmp), text)
        steppers = {name: Stepper(run, b["streams"][name], sz.train_steps)
                    for name, run in b["runs"].items()}
        seconds = alternate(steppers, sz.train_rounds)
        batch_only = alternate({"fast": b["streams"]["fast"].next,
                                "seed": b["streams"]["seed"].next}, sz.train_rounds)
        images = sz.train_batch * sz.train_steps
        speedup = ratio_summary(seconds["seed"], seconds["fast"])
        cfg, vae_cfg = b["cfg"], b["vae"].config  # the demo's trained VAE may differ from the toml
        side = cfg.data.image_size // vae_cfg.downsample_factor
        row = {
            "train_speedup_vs_seed": speedup["median_of_medians"],
            "train_speedup_vs_seed_spread": speedup,
            "train_target": TARGET, "train_target_met": speedup["median_of_medians"] >= TARGET,
            **{f"train_ips_{name}": summarize(rates(images, s), 2)
               for name, s in seconds.items()},
            "train_speedup_cached_fp32_vs_seed":
                ratio_summary(seconds["seed"], seconds["cached_fp32"])["median_of_medians"],
            "train_bf16_speedup_over_cached_fp32":
                ratio_summary(seconds["cached_fp32"], seconds["fast"])["median_of_medians"],
            "train_batch_fetch_ms": {k: summarize([1e3 * x for x in v], 2)
                                     for k, v in batch_only.items()},
            "train_cache_build_s": round(b["cache_build_s"], 2),
            "train_cache_items": sz.train_items,
            "train_setup": {
                "batch": sz.train_batch, "steps_per_round": sz.train_steps,
                "rounds": sz.train_rounds, "image_size": cfg.data.image_size,
                "latent": f"{vae_cfg.latent_channels}x{side}x{side}",
                "vae": f"base {vae_cfg.base_channels} x {tuple(vae_cfg.channel_mult)}",
                "vae_weights": b["vae_source"],
                "unet": f"base {cfg.unet.base_channels} x {tuple(cfg.unet.channel_mult)}",
                "unet_params": b["unet_params"],
                "text_encoder": f"{cfg.text.encoder} (max_length {cfg.text.max_length})",
                "widths": "VAE at the seed's widths; U-Net and text at the demo's"},
        }
        row.update(vae_width_cost(cfg, sz.train_rounds))
        if force_profile or not row["train_target_met"]:
            row["train_profiles"] = [str(profile_table(
                steppers[name], profile_dir / f"profile_train_{name}.txt",
                f"training step, {name} path, batch {sz.train_batch}", calls=1))
                for name in ("fast", "seed")]
    return row
