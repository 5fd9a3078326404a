# Question: does the emoji demo's VAE do better at 32x32 / f = 4 than at 64x64 / f = 8?
# Answer: BENCHMARKS.md "Emoji demo"; results/emoji_geometry*.json
"""The emoji demo's geometry, measured: 64x64 images / f = 8 (the seed's, the demo's)
against 32x32 / f = 4. Both give 8x8x4 latents, so the U-Net costs the same; what
differs is the VAE. Each is trained with configs/emoji64.toml's VAE settings for a step
count that costs the same CPU time (the f = 4 VAE at 32x32 runs about 3x the steps per
minute: BENCHMARKS.md "Demo geometry"), then the emoji judge reads the round trips of
the held-out emoji's real images: how much of each emoji's identity survives the VAE, an
upper bound on identity accuracy whatever the U-Net. Writes
benchmarks/results/emoji_geometry.json.

    .venv/bin/python benchmarks/studies/emoji_geometry.py --data runs/emoji-data [--steps 1500]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchlib import run_study  # noqa: E402
from ldmkit.config import load_config  # noqa: E402
from ldmkit.data.emoji import EmojiImages, load_split  # noqa: E402
from ldmkit.evaluation.emoji_judge import Classes, accuracy, load_emoji_judge  # noqa: E402
from ldmkit.evaluation.vae_metrics import evaluate_vae  # noqa: E402
from ldmkit.io import write_json_atomic  # noqa: E402
from ldmkit.training.vae_trainer import train_vae  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "emoji64.toml"
GEOMETRIES = {  # overrides, and steps per step of the 64x64 VAE at equal CPU time
    "64x64 / f=8": ([], 1),
    "32x32 / f=4": (["data.image_size=32", "vae.downsample_factor=4",
                     "vae.channel_mult=[1, 2, 4]"], 3),
}


def resized(data: EmojiImages, size: int) -> EmojiImages:
    if size == data.images.shape[-1]:
        return data
    x = F.interpolate(data.images.float(), size=(size, size), mode="bilinear",
                      antialias=True, align_corners=False)
    return EmojiImages(x.round().clamp(0, 255).to(torch.uint8), data.rows)


@torch.no_grad()
def roundtrip(vae, data: EmojiImages) -> torch.Tensor:
    out = []
    for chunk in data.images.split(128):
        out.append(vae(chunk.float() / 127.5 - 1, sample_posterior=False)[0].clamp(-1, 1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder written by `ldmkit data emoji`")
    p.add_argument("--steps", type=int, default=1500, help="steps of the 64x64 VAE")
    p.add_argument("--ratio", type=float, default=None,
                   help="steps of the 32x32 VAE per 64x64 step (default 3: equal CPU time "
                        "on a quiet machine)")
    p.add_argument("--only", choices=tuple(GEOMETRIES), default=None)
    results = Path(__file__).resolve().parents[1] / "results"
    p.add_argument("--out", default=str(results / "emoji_geometry.json"))
    args = p.parse_args(argv)
    train, held = load_split(Path(args.data) / "train"), load_split(Path(args.data) / "heldout")
    judge, classes = load_emoji_judge()
    labels = Classes.labels(classes, [r["base"] for r in held.rows])
    results = {"machine": f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                          f"torch {torch.__version__}", "n_heldout_images": len(held),
               "judge_on_real_64": accuracy(judge, held.images, labels), "rows": []}
    for name, (overrides, ratio) in GEOMETRIES.items():
        if args.only and name != args.only:
            continue
        steps = int(args.steps * (args.ratio if args.ratio and ratio != 1 else ratio))
        cfg = load_config(CONFIG, overrides + [f"vae.steps={steps}",
                                               f"data.root={args.data}/train"])
        size = cfg.data.image_size
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            run = train_vae(cfg, Path(tmp) / "vae", dataset=resized(train, size))
            from ldmkit.models.vae import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(run.model_dir).eval()
        small = resized(held, size)
        row = {"geometry": name, "steps": steps, "train_seconds": run.train_seconds,
               "wall_seconds": round(time.monotonic() - start, 1),
               "heldout_psnr": round(evaluate_vae(vae, small)["psnr"], 2),
               "judge_on_real_at_size": accuracy(judge, small.images, labels),
               "judge_on_roundtrip": accuracy(judge, roundtrip(vae, small), labels)}
        print(row, flush=True)
        results["rows"].append(row)
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_study(main)
