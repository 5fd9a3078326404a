"""Guidance rescale on trained demo models: what Lin et al.'s phi buys at w = 5.

For each model folder, every prompt set (single, two objects, held-out pairs), DPM-Solver++
at 20 and 10 steps, phi = 0 (plain CFG), 0.5 and 0.7, on the same 400 prompts and initial
noise per set (paired rows, so differences are the rescale's). Fidelity is the judge's, as
in the demo's evaluation.json; nothing here depends on the machine's speed.

    python benchmarks/guidance_rescale.py runs/demo/model runs/demo-seed1/model \
        runs/demo-seed2/model
    -> benchmarks/results/guidance_rescale.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchlib import RESULTS_DIR, machine_info, set_threads  # noqa: E402
from ldmkit.diffusion.registry import HEADLINE  # noqa: E402
from ldmkit.evaluation.fidelity import PROMPT_POOL, PROMPT_SETS, Entry, FidelityEvaluator  # noqa: E402
from ldmkit.io import write_json_atomic  # noqa: E402

PHIS = (0.0, 0.5, 0.7)
STEPS = (HEADLINE.steps, 10)


def measure(model: Path, evaluator: FidelityEvaluator, n: int) -> dict:
    from ldmkit.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(model, "cpu")
    table: dict = {}
    for prompt_set in PROMPT_SETS:
        for steps in STEPS:
            for phi in PHIS:
                entry = Entry(prompt_set, HEADLINE.sampler, steps, HEADLINE.guidance, n, phi)
                score = evaluator.score(evaluator.images(pipe, entry), prompt_set)
                table.setdefault(prompt_set, {})[f"{steps} steps, phi {phi:g}"] = score
                print(f"{model} {prompt_set:8s} {steps:3d} steps phi {phi:g}: {score:.4f}",
                      flush=True)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="model folders (ldmkit demo's model/)")
    ap.add_argument("--n", type=int, default=PROMPT_POOL, help="prompts per set")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "guidance_rescale.json")
    args = ap.parse_args()
    set_threads(args.threads)
    evaluator = FidelityEvaluator()
    results = {"machine": machine_info(), "guidance": HEADLINE.guidance, "n": args.n,
               "sampler": HEADLINE.sampler,
               "models": {str(m): measure(m, evaluator, args.n) for m in args.models}}
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
