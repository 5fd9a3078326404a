"""`ldmkit data check` (read every item, report problems) and `ldmkit data preview`."""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch
from tqdm import tqdm

from ldmkit.data import build_dataset, build_source
from ldmkit.errors import UserError


def check_dataset(dataset, desc: str = "checking") -> dict:
    """Read every item alone (no substitution); count the readable ones, list the rest."""
    problems = []
    for i in tqdm(range(len(dataset)), desc=desc, file=sys.stderr, disable=None,
                  mininterval=1.0):
        problem = dataset.check_item(i) if hasattr(dataset, "check_item") else _check_generated(
            dataset, i)
        if problem:
            problems.append(problem)
    return {"items": len(dataset), "ok": len(dataset) - len(problems),
            "skipped": len(problems), "problems": problems}


def _check_generated(dataset, i: int) -> dict | None:
    """For datasets without files (shapes): the item has the promised type, shape and range."""
    image, caption = dataset[i]
    size = getattr(dataset, "image_size", image.shape[-1])
    if not isinstance(image, torch.Tensor) or tuple(image.shape) != (3, size, size):
        return {"path": f"item {i}", "reason": f"image shape {tuple(image.shape)}"}
    if not torch.isfinite(image).all() or image.min() < -1 or image.max() > 1:
        return {"path": f"item {i}", "reason": "pixel values outside [-1, 1]"}
    if not isinstance(caption, str) or not caption.strip():
        return {"path": f"item {i}", "reason": "empty caption"}
    return None


def cli_check(args: argparse.Namespace) -> int:
    cfg = args.cfg.data
    report = {"dataset": cfg.dataset, "root": cfg.root, "split": cfg.split,
              **check_dataset(build_source(cfg), desc=f"checking {cfg.dataset}")}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        where = f" {cfg.root}" if cfg.root else ""
        print(f"{cfg.dataset} {cfg.split}{where}: {report['items']} items, "
              f"{report['ok']} ok, {report['skipped']} skipped")
        for p in report["problems"]:
            print(f"  {p['reason']}: {p['path']}")
    if report["ok"] == 0:
        print("ldmkit: error: no readable items", file=sys.stderr)
        return 2
    return 0


def cli_preview(args: argparse.Namespace) -> int:
    from ldmkit.viz import save_image_grid

    cfg = args.cfg.data
    if args.n < 1:
        raise UserError(f"--n {args.n}: need at least one image")
    dataset = build_dataset(cfg, "train")
    count = min(args.n, len(dataset))
    # Spread over the dataset: a folder's first items are often near-duplicates.
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()
    images, captions = zip(*(dataset[i] for i in indices))
    scale = max(1, 128 // cfg.image_size)  # 32/64 px tiles are too small to judge by eye
    save_image_grid(torch.stack(images), args.out, nrow=math.ceil(math.sqrt(count)),
                    captions=list(captions), scale=scale)
    print(f"wrote {args.out} ({count} items of {cfg.dataset})")
    if getattr(dataset, "skipped", 0):
        print(f"skipped {dataset.skipped} unreadable image(s)", file=sys.stderr)
    return 0
