# Question: what does guidance rescale (phi = 0, 0.5, 0.7) buy at w = 5?
# Answer: BENCHMARKS.md "Guidance rescale"; results/guidance_rescale*.json
"""Guidance rescale on trained demo models: what Lin et al.'s phi buys at w = 5.

For each model folder, every prompt set (single, two objects, held-out pairs), DPM-Solver++
at 20 and 10 steps, phi = 0 (plain CFG), 0.5 and 0.7, on the same 400 prompts and initial
noise per set (paired rows, so differences are the rescale's). Fidelity is the judge's, as
in the demo's evaluation.json; nothing here depends on the machine's speed.

    python benchmarks/studies/guidance_rescale.py runs/demo/model runs/demo-seed1/model \
        runs/demo-seed2/model
    -> benchmarks/results/guidance_rescale.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
from benchlib import RESULTS_DIR, judge_demo_models, run_study  # noqa: E402
from ldmkit.diffusion.registry import HEADLINE  # noqa: E402
from ldmkit.evaluation.fidelity import PROMPT_SETS, Entry, FidelityEvaluator  # noqa: E402

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


if __name__ == "__main__":
    run_study(lambda: judge_demo_models(
        __doc__.split("\n\n")[0], RESULTS_DIR / "guidance_rescale.json", measure,
        {"guidance": HEADLINE.guidance, "sampler": HEADLINE.sampler}))
