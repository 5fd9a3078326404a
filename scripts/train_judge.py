"""Train the shapes judge and write the weights ldmkit ships.

    .venv/bin/python scripts/train_judge.py            # -> src/ldmkit/evaluation/judge.*

Writes judge.safetensors (weights) and judge.json (architecture, training settings,
per-attribute accuracy on fresh real images, time, date), so the shipped file can be
reproduced and its trust level read without running anything. Refuses to write a judge
below 98 % on any attribute: fidelity numbers from such a judge would mean little.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ldmkit.evaluation.judge import (
    default_weights_path,
    judge_accuracy,
    judge_parameters,
    save_judge,
    scene_accuracy,
    train_judge,
)

TRUST = 0.98


def main(argv: list[str] | None = None) -> int:
    signature = inspect.signature(train_judge)  # the recipe's defaults live in one place
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=signature.parameters["steps"].default)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-items", type=int, default=signature.parameters["num_items"].default,
                   help="real training images")
    p.add_argument("--off-grid-items", type=int,
                   default=signature.parameters["off_grid_items"].default,
                   help="more real training images: one object anywhere, not only on the "
                        "data's five spots (generated objects land between them)")
    p.add_argument("--eval-n", type=int, default=2000, help="fresh real images to score")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--no-bf16", action="store_true", help="train in float32")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = torch's default. On a shared, busy machine 1 "
                        "is faster than 2: spinning threads lose to each other")
    p.add_argument("--out", default=str(default_weights_path()))
    p.add_argument("--untrusted", action="store_true",
                   help="write the judge even below the trust bar (experiments, controls)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    judge = train_judge(steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                        num_items=args.num_items, bf16=not args.no_bf16, log=print,
                        off_grid_items=args.off_grid_items)
    train_seconds = time.time() - start
    accuracy = judge_accuracy(judge, args.eval_n, args.eval_seed)
    degraded = judge_accuracy(judge, args.eval_n, args.eval_seed, augmented=True)
    # the demo generates 32x32 images (BENCHMARKS.md "64 vs 32"): the judge must read those
    at_32 = judge_accuracy(judge, args.eval_n, args.eval_seed, image_size=32)
    scenes = scene_accuracy(judge, args.eval_n, args.eval_seed)
    # position off the grid is the nearest spot, ambiguous near the midlines: not trusted
    off_grid = judge_accuracy(judge, args.eval_n, args.eval_seed, image_size=32, off_grid=True)
    print(f"trained in {train_seconds:.0f}s; accuracy {accuracy}; augmented {degraded}; "
          f"32x32 {at_32}; whole scene {scenes:.4f}; off the grid, 32x32 {off_grid}")
    trusted = [*accuracy.values(), *at_32.values(),
               *(v for k, v in off_grid.items() if k != "position")]
    if min(trusted) < TRUST and not args.untrusted:
        print(f"judge below {TRUST:.0%} on some attribute; not writing {args.out}",
              file=sys.stderr)
        return 1
    save_judge(judge, args.out, {
        "accuracy": accuracy, "accuracy_augmented": degraded, "accuracy_32": at_32,
        "scene_accuracy": scenes, "accuracy_off_grid_32": off_grid,
        "eval": {"n": args.eval_n, "seed": args.eval_seed, "split": "val"},
        "train": {"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size,
                  "num_items": args.num_items, "off_grid_items": args.off_grid_items,
                  "bf16": not args.no_bf16,
                  "include_heldout": True, "seconds": round(train_seconds, 1),
                  "threads": torch.get_num_threads()},
        "parameters": judge_parameters(judge),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/train_judge.py " + " ".join(argv or sys.argv[1:]),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
