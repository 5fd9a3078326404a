"""Row 1: diffusion training images/s, ldmkit's fast path against the seed's way.

Both contenders run the trainer's own step (the public `DiffusionStep` of
ldmkit.training.diffusion_step: caption dropout, loss, backward, clipping, AdamW, LR
schedule, EMA) on the same U-Net (same initial weights), batch and images. The setup is
pinned in benchlib (`bench_config`), whatever configs/shapes-demo.toml says today:

- at the seed's geometry, 64x64 -> 8x8x4 with the seed's VAE widths (base 128 x
  (1, 1, 2, 4), 2 blocks, random weights), the bench U-Net (base 64 x (1, 2, 2), 5.6M
  parameters) and MiniLM: the seed's own U-Net, base 152 x (1, 2, 4, 8), 392M parameters,
  is too slow to time on a CPU within the suite's budget;
- at the demo's geometry, 32x32 -> 8x8x4 (f = 4) with the demo's VAE widths (base 16):
  what the cache buys the demo itself (`train_speedup_vs_seed_demo_geometry`).

- fast:  cached latents + cached text embeddings (`training_batches` with
         train.use_cache = true), bf16 autocast;
- seed:  fp32, VAE encode + text encode inside every step (`LiveBatches`, use_cache = false);
- cached_fp32: the cache without bf16, to show which half of the gap each change buys.

The batches come from `training_batches`, the same function `train_diffusion` calls, so the
timed work is what training runs; the once-per-run cache build is timed separately.
`vae_width_cost` times the live VAE encode per image with each geometry's VAE.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchlib import (
    RESULTS_DIR,
    Sizes,
    alternate,
    bench_config,
    describe,
    profile_table,
    rates,
    ratio_summary,
    summarize,
)

TARGET = 3.0


def load_vae(cfg, save_to: Path):
    """The row's VAE at `cfg`'s widths, untrained: random weights cost the same to run,
    and the seed path's main extra cost is exactly this encoder. Saved to `save_to`
    because the latent cache keys on it."""
    from ldmkit.models.vae import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(cfg.vae, cfg.data.image_size)
    vae.save_pretrained(save_to, image_size=cfg.data.image_size)
    return vae.eval().requires_grad_(False), "untrained (random weights)"


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


def prepare(sz: Sizes, work: Path, text=None, geometry: str = "seed") -> dict:
    """Config, text encoder, VAE, images and one initial U-Net state for every run."""
    from ldmkit.models.text import TextEncoder
    from ldmkit.models.unet import UNet

    cfg = bench_config(geometry, sz.train_batch)
    text = text or TextEncoder.from_config(cfg.text)
    vae, vae_source = load_vae(cfg, work / "vae")
    data = training_images(cfg, sz.train_items)
    torch.manual_seed(0)
    init = UNet(cfg.unet, vae.config.latent_channels, text.hidden_size).state_dict()
    return {"cfg": cfg, "text": text, "vae": vae, "vae_source": vae_source, "data": data,
            "init": init, "work": work}


def stream(p: dict, cached: bool):
    """The trainer's own batch stream (`training_batches`): cached, or live like the seed."""
    from ldmkit.config import override_config
    from ldmkit.training.latent_cache import training_batches

    cfg = p["cfg"] if cached else override_config(p["cfg"], ["train.use_cache=false"])
    out = p["work"] / ("fast" if cached else "seed")
    return cfg, training_batches(cfg, p["vae"], p["work"] / "vae", p["text"], p["data"], out,
                                 torch.device("cpu"), 0)


def build(sz: Sizes, work: Path, text=None, geometry: str = "seed",
          names: tuple[str, ...] = ("fast", "seed", "cached_fp32")) -> dict:
    """The batch streams and the runs `names` (same initial U-Net): fast, seed,
    cached_fp32."""
    import time

    p = prepare(sz, work, text, geometry)
    start = time.perf_counter()
    cfg, cached = stream(p, cached=True)
    build_s = time.perf_counter() - start
    cfg_live, live = stream(p, cached=False)
    text, vae, init = p["text"], p["vae"], p["init"]
    made = {"fast": lambda: make_step(cfg, text, vae, init, True),
            "seed": lambda: make_step(cfg_live, text, vae, init, False),
            "cached_fp32": lambda: make_step(cfg, text, vae, init, False)}
    runs = {name: made[name]() for name in names}
    streams = {name: live if name == "seed" else cached for name in names}
    return {"cfg": cfg, "text": text, "vae": vae, "vae_source": p["vae_source"],
            "cache_build_s": build_s, "runs": runs, "streams": streams,
            "unet_params": sum(q.numel() for q in runs["fast"].unet.parameters())}


def vae_width_cost(rounds: int, batch: int = 8) -> dict:
    """ms per image of the live VAE encode (the seed path's main extra cost) with the seed's
    VAE at 64x64 and with the demo's at 32x32: how much the smaller VAE shrinks row 1's
    gap. Random weights, fp32, as the seed path runs it."""
    from ldmkit.models.vae import AutoencoderKL

    def encode(geometry: str):
        cfg = bench_config(geometry, batch)
        vae = AutoencoderKL(cfg.vae)
        x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size)

        def go():
            with torch.no_grad():
                vae.encode_latents(x, sample=True)
        return go

    seconds = alternate({k: encode(k) for k in ("demo", "seed")}, rounds)
    return {f"train_live_vae_encode_ms_per_image_{k}_widths": summarize(
        [1e3 * t / batch for t in v], 2) for k, v in seconds.items()}


def demo_geometry_row(sz: Sizes, text=None) -> dict:
    """fast against seed at the demo's geometry: what the cache buys the demo itself."""
    with tempfile.TemporaryDirectory() as tmp:
        b = build(sz, Path(tmp), text, "demo", ("fast", "seed"))
        steppers = {name: Stepper(run, b["streams"][name], sz.train_steps)
                    for name, run in b["runs"].items()}
        seconds = alternate(steppers, sz.train_rounds)
    speedup = ratio_summary(seconds["seed"], seconds["fast"])
    images = sz.train_batch * sz.train_steps
    return {"train_speedup_vs_seed_demo_geometry": speedup["median_of_medians"],
            "train_speedup_vs_seed_demo_geometry_spread": speedup,
            **{f"train_ips_{name}_demo_geometry": summarize(rates(images, s), 2)
               for name, s in seconds.items()},
            "train_demo_geometry_setup": {**describe(b["cfg"]), "batch": sz.train_batch,
                                          "rounds": sz.train_rounds,
                                          "vae_weights": b["vae_source"]}}


def train_row(sz: Sizes, text=None, profile_dir: Path = RESULTS_DIR,
              force_profile: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        b = build(sz, Path(tmp), text)
        steppers = {name: Stepper(run, b["streams"][name], sz.train_steps)
                    for name, run in b["runs"].items()}
        seconds = alternate(steppers, sz.train_rounds)
        # fetching alone: the seed's is most of its step (timed above), so one round does
        batch_only = {**alternate({"fast": b["streams"]["fast"].next}, sz.train_rounds),
                      **alternate({"seed": b["streams"]["seed"].next}, 1, warmup=0)}
        images = sz.train_batch * sz.train_steps
        speedup = ratio_summary(seconds["seed"], seconds["fast"])
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
                "geometry": "the seed's", **describe(b["cfg"]),
                "batch": sz.train_batch, "steps_per_round": sz.train_steps,
                "rounds": sz.train_rounds, "vae_weights": b["vae_source"],
                "unet_params": b["unet_params"],
                "widths": "VAE at the seed's widths; U-Net and text: the bench's "
                          "(benchlib.BENCH_UNET, BENCH_TEXT)"},
        }
        if force_profile or not row["train_target_met"]:
            row["train_profiles"] = [str(profile_table(
                steppers[name], profile_dir / f"profile_train_{name}.txt",
                f"training step, {name} path, batch {sz.train_batch}", calls=1))
                for name in ("fast", "seed")]
    row.update(vae_width_cost(sz.train_rounds))
    row.update(demo_geometry_row(sz, text))
    return row
