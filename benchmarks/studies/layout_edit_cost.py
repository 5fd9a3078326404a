# Question: what does a layout edit (`source_prompt=`) cost against plain img2img?
# Answer: BENCHMARKS.md "Editing pictures"; results/layout_edit_cost.json
"""Seconds per batch of the layout edit against img2img at the same strength (0.8), steps
(20) and guidance (20), on the shapes demo model: img2img with the headline sampler
(DPM-Solver++) and with DDPM, the layout edit's own sampler. One batch of 64 of
editing.py's pictures; the three run in turn, A B C A B C, in one process, and the
ratios are of rounds run back to back, so machine load hits them alike.

The layout edit does more work per step: the source pass (unguided) on the way in, then
the guided edit pass, both with the softmax spelled out so the maps can be recorded and
swapped.

    .venv/bin/python benchmarks/studies/layout_edit_cost.py runs/demo/model
    -> benchmarks/results/layout_edit_cost.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # editing.py: the same cases
import torch  # noqa: E402
from editing import img2img_cases  # noqa: E402

from benchlib import (  # noqa: E402
    DEMO_MODEL,
    RESULTS_DIR,
    alternate,
    machine_info,
    ratio_summary,
    run_study,
    set_threads,
    summarize,
)

BATCH, STRENGTH, STEPS, GUIDANCE = 64, 0.8, 20, 20.0


def main() -> None:
    from ldmkit.data.shapes import with_articles
    from ldmkit.editing import prepare_edit
    from ldmkit.io import write_json_atomic
    from ldmkit.pipeline import TextToImagePipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, nargs="?", default=DEMO_MODEL)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "layout_edit_cost.json")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.model, "cpu")
    pictures, scenes, _, prompts = img2img_cases(BATCH, pipe.image_size)
    sources = [with_articles(f"a {s.objects[0].color} {s.objects[0].shape}") for s in scenes]
    plain = prepare_edit(pictures, None, BATCH, pipe.image_size, STRENGTH)
    layout = prepare_edit(pictures, None, BATCH, pipe.image_size, STRENGTH,
                          source_prompt=sources)

    def run(edit, sampler: str):
        return lambda: pipe.edit_images(prompts, edit, None, STEPS, GUIDANCE, sampler,
                                        torch.Generator().manual_seed(0))

    seconds = alternate({"img2img, dpmpp-2m": run(plain, "dpmpp-2m"),
                         "img2img, ddpm": run(plain, "ddpm"),
                         "layout edit": run(layout, "ddpm")}, args.rounds)
    results = {"machine": machine_info(), "threads": threads, "model": str(args.model),
               "batch": BATCH, "strength": STRENGTH, "steps": STEPS, "guidance": GUIDANCE,
               "seconds": {k: summarize(v) for k, v in seconds.items()},
               "layout_edit_over": {k: ratio_summary(seconds["layout edit"], v)
                                    for k, v in seconds.items() if k != "layout edit"}}
    write_json_atomic(args.out, results)
    for name, ratio in results["layout_edit_over"].items():
        print(f"layout edit / {name}: {ratio['median']:.2f}x "
              f"({ratio['min']:.2f}-{ratio['max']:.2f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_study(main)
