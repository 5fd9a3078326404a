# Question: can the shapes demo keep the seed's 64x64 / f = 8, or does it need 32x32 / f = 4?
# Answer: BENCHMARKS.md "Demo geometry"; results/demo_geometry*.json
"""The demo's geometry, measured side by side: 64x64 images / f = 8 against 32x32 / f = 4.

Both give 8x8x4 latents, so the U-Net stage costs the same; what differs is the VAE. Each
geometry's VAE is trained for the same wall-clock minutes (the demo's VAE budget) with
the demo's settings, then judged: the shapes judge reads VAE round trips of fresh real
images (one and two objects), so "shape of a small object" says whether the VAE can draw
what the prompts ask for at all — an upper bound on prompt fidelity whatever the U-Net.
Runs one after the other (never two trainings at once on a 2-core CPU). Writes
benchmarks/results/demo_geometry.json and prints it.

    .venv/bin/python benchmarks/studies/demo_geometry.py [--minutes 2.25] [--n 600]
        [--small-radius 0.095]   # the data's old small size, for the record
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
from benchlib import RESULTS_DIR, machine_info, run_study  # noqa: E402
from ldmkit.config import load_config  # noqa: E402
from ldmkit.data import build_dataset, shapes  # noqa: E402
from ldmkit.data.memory import materialize  # noqa: E402
from ldmkit.evaluation.judge import (  # noqa: E402
    attribute_accuracy,
    load_judge,
    predict,
    render_labelled,
)
from ldmkit.io import write_json_atomic  # noqa: E402
from ldmkit.models.vae import AutoencoderKL  # noqa: E402
from ldmkit.training.vae_trainer import train_vae  # noqa: E402

GEOMETRIES = {
    "64x64 / f=8": ["data.image_size=64", "vae.downsample_factor=8",
                    "vae.channel_mult=[1, 2, 4, 8]"],
    "32x32 / f=4": ["data.image_size=32", "vae.downsample_factor=4",
                    "vae.channel_mult=[1, 2, 4]"],
}
EVAL_SEED = 4321  # fresh images: neither the VAE's nor the judge's training draws


def small_shape_accuracy(judge, images: torch.Tensor, labels: dict) -> float:
    """Shape read right, over small objects only (slot a and, for two objects, slot b)."""
    pred = predict(judge, images)
    small = shapes.SIZES.index("small")
    hits = total = 0
    for slot in ("a", "b"):
        mask = labels[f"size_{slot}"] == small
        hits += int((pred[f"shape_{slot}"][mask] == labels[f"shape_{slot}"][mask]).sum())
        total += int(mask.sum())
    return hits / max(total, 1)


def measure(name: str, overrides: list[str], minutes: float, n: int, judge) -> dict:
    cfg = load_config("configs/shapes-demo.toml", overrides + [f"vae.minutes={minutes}"])
    # rendered into RAM first, as the demo does, so rendering does not eat training time
    train_set = materialize(build_dataset(cfg.data, "train"), num_workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        run = train_vae(cfg, Path(tmp) / "vae", dataset=train_set)
        vae = AutoencoderKL.from_pretrained(run.model_dir).eval()
    images, labels, _ = render_labelled(n, EVAL_SEED, "val", cfg.data.image_size)
    with torch.no_grad():
        round_trip = vae.decode_latents(vae.encode_latents(images)).clamp(-1, 1)
    return {"geometry": name, "image_size": cfg.data.image_size,
            "downsample_factor": cfg.vae.downsample_factor,
            "channel_mult": cfg.vae.channel_mult, "minutes": minutes,
            "steps": run.steps, "heldout_psnr_db": run.psnr,
            "judged_round_trip": attribute_accuracy(judge, round_trip, labels),
            "small_object_shape": small_shape_accuracy(judge, round_trip, labels),
            "real_images_small_object_shape": small_shape_accuracy(judge, images, labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.25, help="VAE budget per geometry")
    parser.add_argument("--n", type=int, default=600, help="fresh images judged per geometry")
    parser.add_argument("--small-radius", type=float, default=None,
                        help="override the data's small-object half-extent (fraction)")
    args = parser.parse_args()
    if args.small_radius is not None:  # a what-if on the data, for the record
        shapes.SIZE_RADIUS["small"] = args.small_radius
    judge = load_judge()
    rows = [measure(name, overrides, args.minutes, args.n, judge)
            for name, overrides in GEOMETRIES.items()]
    result = {"machine": machine_info(), "small_radius": shapes.SIZE_RADIUS["small"],
              "rows": rows}
    suffix = "" if args.small_radius is None else f"_small{args.small_radius:g}"
    out = RESULTS_DIR / f"demo_geometry{suffix}.json"
    write_json_atomic(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_study(main)
