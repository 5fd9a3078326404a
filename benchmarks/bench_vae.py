"""Row 5a: VAE encode and decode images/s, fp32 against bf16 autocast, at the demo's
geometry pinned in benchlib (32x32 -> 8x8x4, f = 4, base 16 x (1, 2, 4)), with the demo's
trained VAE when `make demo` left one of those widths (random weights cost the same).
Also the VAE training step, fp32 against bf16, with vae_throughput.py's step.
Inference runs under no_grad, as the latent cache (encode) and the pipeline (decode) do.
"""

from __future__ import annotations

import dataclasses

import torch

from bench_train import training_images
from benchlib import (
    DEMO_VAE,
    Sizes,
    alternate,
    bench_config,
    describe,
    display_path,
    rates,
    ratio_summary,
    summarize,
)
from vae_throughput import MODES, train_steps


def autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None)


def demo_vae(cfg):
    """The demo's trained VAE if `make demo` left one at the pinned widths, else the
    pinned widths untrained (random weights cost the same to run)."""
    from ldmkit.models.vae import AutoencoderKL

    if (DEMO_VAE / "model.safetensors").is_file():
        trained = AutoencoderKL.from_pretrained(DEMO_VAE).eval()
        same = {k: v for k, v in dataclasses.asdict(trained.config).items()
                if k != "scale_factor"} == {k: v for k, v in
                                           dataclasses.asdict(cfg.vae.architecture()).items()
                                           if k != "scale_factor"}
        if same:
            return trained, display_path(DEMO_VAE)
    torch.manual_seed(0)
    return AutoencoderKL(cfg.vae, cfg.data.image_size).eval(), "untrained (random weights)"


def vae_row(sz: Sizes) -> dict:
    from ldmkit.training.common import make_optimizer

    cfg = bench_config("demo", sz.vae_batch)
    vae, source = demo_vae(cfg)
    data = training_images(cfg, sz.vae_batch)
    x = torch.stack([data[i][0] for i in range(sz.vae_batch)])
    with torch.no_grad():
        z = vae.encode(x).mean

    def encode(dtype):
        def go():
            with torch.no_grad(), autocast(dtype):
                return vae.encode(x).mean
        return go

    def decode(dtype):
        def go():
            with torch.no_grad(), autocast(dtype):
                return vae.decode(z)
        return go

    row: dict = {}
    for what, fn in (("encode", encode), ("decode", decode)):
        seconds = alternate({m: fn(d) for m, d in MODES.items()}, sz.vae_rounds)
        for mode, s in seconds.items():
            row[f"vae_{what}_ips_{mode}"] = summarize(rates(sz.vae_batch, s), 1)
        row[f"vae_{what}_bf16_speedup"] = \
            ratio_summary(seconds["fp32"], seconds["bf16"])["median_of_medians"]

    train = vae.requires_grad_(True).train()
    opt = make_optimizer(train.parameters(), lr=1e-4)
    seconds = alternate({m: (lambda d=d: train_steps(train, opt, x, d, 1, cfg.vae.kl_weight))
                         for m, d in MODES.items()}, sz.vae_rounds)
    for mode, s in seconds.items():
        row[f"vae_train_ips_{mode}"] = summarize(rates(sz.vae_batch, s), 1)
    row["vae_train_bf16_speedup"] = \
        ratio_summary(seconds["fp32"], seconds["bf16"])["median_of_medians"]
    setup = describe(cfg)
    row["vae_setup"] = {"geometry": "the demo's", "image_size": setup["image_size"],
                        "latent": setup["latent"], "vae": setup["vae"],
                        "batch": sz.vae_batch, "rounds": sz.vae_rounds, "weights": source,
                        "train_step": "vae_throughput.train_steps (vae_loss, fused AdamW)"}
    return row
