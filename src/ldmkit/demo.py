"""`ldmkit demo`: both stages on the built-in shapes data, then generation, judging and a
report — what a newcomer runs first (`make demo`), on a CPU, offline, within minutes.

    runs/demo/
      data_preview.png   vae/ (stage-1 run)   diffusion/ (stage-2 run)   model/ (pipeline)
      prompts_grid.png   progress*.png/.gif   cfg_sweep.png   fidelity_vs_steps.png
      evaluation.json    timings.json         report.md
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import time
from pathlib import Path

import torch

from ldmkit.config import Config, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes-demo.toml"
VAE_SHARE = 0.4  # of --minutes when the config sets no budgets; the U-Net gets the rest
EARLY_FRACTION = 0.25  # the early checkpoint of the CFG sweep: a quarter of the budget


class Stopwatch:
    """Wall time per named stage, printed at the end and written to timings.json."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = time.monotonic()

    @contextlib.contextmanager
    def stage(self, name: str):
        print(f"\n== {name} ==", flush=True)
        start = time.monotonic()
        yield
        self.times[name] = round(time.monotonic() - start, 1)

    @property
    def total(self) -> float:
        return round(time.monotonic() - self._start, 1)


def demo_config(args: argparse.Namespace) -> tuple[Config, float]:
    """The demo's config: the TOML, the minutes budget split over the stages, and for
    --tiny a seconds-long version that still passes through every stage."""
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    overrides = list(args.overrides or [])
    if args.tiny:
        overrides = TINY_OVERRIDES + overrides
    cfg = load_config(path, overrides + [f"train.seed={args.seed}", f"data.seed={args.seed}"])
    configured = cfg.vae.minutes + cfg.train.minutes
    minutes = configured if args.minutes is None else args.minutes
    if minutes and not args.tiny:
        # --minutes rescales both stages' budgets, keeping the config's split
        vae_share = cfg.vae.minutes / configured if configured else VAE_SHARE
        cfg.vae.minutes = round(minutes * vae_share, 3)
        cfg.train.minutes = round(minutes - cfg.vae.minutes, 3)
        # the step counts become ceilings the minutes will hit first
        cfg.vae.steps, cfg.train.steps = 100_000, 100_000
    if not cfg.text.cache_dir:
        # beside the run, not in it: the demo starts by wiping its folder, and the caption
        # embeddings (keyed by the encoder's identity) stay valid from one demo to the next
        cfg.text.cache_dir = str(Path(args.out).parent / ".ldmkit-cache")
    return cfg, minutes


TINY_OVERRIDES = [
    "data.image_size=32", "data.num_items=96", "data.val_items=8",
    "vae.downsample_factor=4", "vae.channel_mult=[1, 2, 2]", "vae.base_channels=8",
    "vae.steps=3", "vae.batch_size=8",
    "unet.base_channels=16", "unet.channel_mult=[1, 2]", "unet.cross_attn_levels=[1]",
    "unet.num_res_blocks=1", "unet.num_heads=2", "diffusion.timesteps=20",
    "train.steps=4", "train.batch_size=8", "train.sample_every=1000",
    "train.checkpoint_every=1000", "train.log_every=1", "vae.minutes=0", "train.minutes=0",
]


def cli_demo(args: argparse.Namespace) -> int:
    run_demo(args)
    return 0


def run_demo(args: argparse.Namespace) -> Path:
    from ldmkit.data import build_dataset
    from ldmkit.data.memory import materialize
    from ldmkit.models.text import TextEncoder
    from ldmkit.training.diffusion_trainer import train_diffusion
    from ldmkit.training.vae_trainer import train_vae
    from ldmkit.viz import save_image_grid

    cfg, minutes = demo_config(args)
    out = Path(args.out)
    if out.exists():  # a demo run is a fresh start: old checkpoints would be resumed
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg.save_json(out / "config.json")
    watch = Stopwatch()

    with watch.stage("data"):
        train_set = materialize(build_dataset(cfg.data, "train"), num_workers=2)
        preview = [train_set[i] for i in range(16)]
        save_image_grid(torch.stack([img for img, _ in preview]), out / "data_preview.png",
                        nrow=8, captions=[c for _, c in preview])
    with watch.stage("vae"):
        vae_dir = train_vae(cfg, out / "vae", dataset=train_set)
    with watch.stage("text encoder"):
        text = TextEncoder.from_config(cfg.text)
    with watch.stage("unet"):
        model_dir = train_diffusion(cfg, vae_dir, out / "diffusion", dataset=train_set,
                                    text=text, early_fraction=EARLY_FRACTION)
        shutil.copytree(model_dir, out / "model")
    with watch.stage("generate and judge"):
        from ldmkit.report import evaluate_and_illustrate

        results = evaluate_and_illustrate(out, text, tiny=args.tiny)
    from ldmkit.report import write_report

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timings = {**watch.times, "total": watch.total, "peak_rss_mb": round(peak_mb),
               "minutes_budget": minutes}
    write_report(out, cfg, results, timings)
    print("\n" + "\n".join(f"{k:>20s}: {v}" for k, v in timings.items()))
    print(f"\nreport: {out / 'report.md'}")
    return out
