"""Train the emoji judge and write the weights ldmkit ships.

    ldmkit data emoji --out data/emoji                      # the images (npm, pinned)
    .venv/bin/python scripts/train_emoji_judge.py --data data/emoji --threads 1
        # -> src/ldmkit/evaluation/emoji_judge.safetensors.xz + emoji_judge.json

First measures how far such a judge can be trusted on real images it never trained on:
one judge per vendor, each trained on that vendor's artwork and tested on the other's
(clean and augmented). Then trains the shipped judge on every image of both vendors and
writes, beside it, those accuracies, the training settings and the label tables.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ldmkit.data.emoji import load_split
from ldmkit.evaluation.emoji_judge import (
    Classes,
    accuracy,
    default_weights_path,
    judge_parameters,
    save_emoji_judge,
    train_emoji_judge,
)
from ldmkit.evaluation.judge import augment


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder written by `ldmkit data emoji`")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--cross-steps", type=int, default=None,
                   help="steps of each cross-vendor judge (default: --steps)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    p.add_argument("--skip-cross", action="store_true", help="only train the shipped judge")
    p.add_argument("--out", default=str(default_weights_path()))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    images, rows = _load(args.data)
    classes = Classes.from_rows(rows)
    labels = classes.labels([r["base"] for r in rows])
    vendor = [r["vendor"] for r in rows]
    settings = {"batch_size": args.batch_size, "width": args.width, "hidden": args.hidden,
                "seed": args.seed}

    def fit(mask: torch.Tensor, steps: int):
        return train_emoji_judge(images[mask], {k: v[mask] for k, v in labels.items()},
                                 classes.sizes(), steps=steps, log=print, **settings)

    cross = {}
    if not args.skip_cross:
        for train_vendor, test_vendor in (("google", "twitter"), ("twitter", "google")):
            train_mask = torch.tensor([v == train_vendor for v in vendor])
            test_mask = torch.tensor([v == test_vendor for v in vendor])
            if not train_mask.any() or not test_mask.any():
                continue
            print(f"== cross-vendor: train on {train_vendor}, test on {test_vendor}")
            judge = fit(train_mask, args.cross_steps or args.steps)
            test = images[test_mask]
            test_labels = {k: v[test_mask] for k, v in labels.items()}
            cross[f"{train_vendor}->{test_vendor}"] = {
                "clean": accuracy(judge, test, test_labels),
                "augmented": accuracy(judge, _augmented(test, args.seed), test_labels),
                "n": int(test_mask.sum())}
            print(cross[f"{train_vendor}->{test_vendor}"])

    print("== the shipped judge: every image of every vendor")
    start = time.time()
    judge = fit(torch.ones(len(rows), dtype=torch.bool), args.steps)
    seconds = time.time() - start
    seen = {"clean": accuracy(judge, images, labels),
            "augmented": accuracy(judge, _augmented(images, args.seed + 1), labels)}
    print(seen)
    save_emoji_judge(judge, classes, args.out, {
        "cross_vendor": cross,
        "training_images": seen,
        "trust": "identity/category/subcategory of real emoji in a style the judge never "
                 "saw: read cross_vendor (train on one vendor, test on the other); "
                 "training_images only shows it fits its own data",
        "data": {"images": len(rows), "identities": len(classes.base),
                 "vendors": sorted(set(vendor))},
        "train": {**settings, "steps": args.steps, "seconds": round(seconds, 1),
                  "threads": torch.get_num_threads(), "augmentation": "ldmkit.evaluation."
                  "judge.augment (shift 3 px, soften, blur, colour jitter, noise)"},
        "parameters": judge_parameters(judge),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/train_emoji_judge.py " + " ".join(argv or sys.argv[1:]),
    })
    print(f"wrote {args.out}")
    return 0


def _load(data: str) -> tuple[torch.Tensor, list[dict]]:
    """Both splits: the judge learns every emoji, held-out ones included."""
    from pathlib import Path

    parts = [load_split(Path(data) / split) for split in ("train", "heldout")]
    return torch.cat([p.images for p in parts]), [r for p in parts for r in p.rows]


def _augmented(images: torch.Tensor, seed: int) -> torch.Tensor:
    return augment(images.float() / 127.5 - 1, torch.Generator().manual_seed(seed))


if __name__ == "__main__":
    sys.exit(main())
