"""VAE training throughput (images/s), float32 against bf16 autocast, on this machine.

One training step = forward, the loss of ldmkit.models.vae.vae_loss, backward and a fused
AdamW step, on a fixed batch of shapes images (data loading is not timed). The two modes
alternate A B A B ... so drift in machine load hits both alike; each round times `--steps`
steps after one untimed warm-up step per mode, and the medians over rounds are reported.
Prints one JSON object.

    .venv/bin/python benchmarks/vae_throughput.py [--config configs/shapes-demo.toml]
        [--rounds 5] [--steps 4] [--batch-size N] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ldmkit.config import load_config  # noqa: E402
from ldmkit.data.shapes import ShapesDataset  # noqa: E402
from ldmkit.models.vae import AutoencoderKL, vae_loss  # noqa: E402
from ldmkit.training.common import make_optimizer  # noqa: E402

MODES = {"fp32": None, "bf16": torch.bfloat16}


def train_steps(vae, opt, x, dtype, steps: int, kl_weight: float) -> float:
    """Seconds for `steps` training steps in the given autocast dtype (None = fp32)."""
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            recon, posterior = vae(x)
        loss = vae_loss(x, recon, posterior, kl_weight)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes-demo.toml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and mode")
    parser.add_argument("--batch-size", type=int, default=None, help="default: vae.batch_size")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    batch = args.batch_size or cfg.vae.batch_size

    torch.manual_seed(0)
    data = ShapesDataset(image_size=cfg.data.image_size, num_items=batch, seed=0)
    x = torch.stack([data[i][0] for i in range(batch)])
    vae = AutoencoderKL(cfg.vae, cfg.data.image_size)
    opt = make_optimizer(vae.parameters(), lr=1e-4)
    for dtype in MODES.values():  # warm-up: oneDNN builds its kernels on first use
        train_steps(vae, opt, x, dtype, 1, cfg.vae.kl_weight)

    per_round: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode, dtype in MODES.items():
            seconds = train_steps(vae, opt, x, dtype, args.steps, cfg.vae.kl_weight)
            per_round[mode].append(args.steps * batch / seconds)
    medians = {m: statistics.median(v) for m, v in per_round.items()}
    print(json.dumps({
        "benchmark": "vae_training_throughput",
        "config": args.config, "overrides": args.overrides,
        "image_size": cfg.data.image_size, "batch_size": batch,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "images_per_s_median": medians,
        "bf16_speedup": medians["bf16"] / medians["fp32"],
        "images_per_s_rounds": per_round,
        "rounds": args.rounds, "steps_per_round": args.steps,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }, indent=2))


if __name__ == "__main__":
    main()
