# Question: does DPM-Solver++ at 10 steps keep up with 20 on the demo's models?
# Answer: BENCHMARKS.md "Few-step DPM-Solver++"; results/few_step*.json
"""Few-step sampling on trained demo models: does DPM-Solver++ at 10 steps keep up with 20?

For each model folder, every prompt set (single, two objects, held-out pairs) at w = 5 on
the same 400 prompts and initial noise per set (paired rows, so differences are the
sampler's): DPM-Solver++ 2M at 20 and 10 steps as ldmkit runs it, at 10 steps with
diffusers' rule for the last updates (only the readout first order,
`samplers.LOWER_ORDER_FINAL_BELOW = 0` here), and DDIM at 10 steps. Fidelity is the judge's,
as in the demo's evaluation.json; nothing here depends on the machine's speed.

    python benchmarks/studies/few_step.py runs/demo/model runs/demo-seed1/model \
        runs/demo-seed2/model
    -> benchmarks/results/few_step.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
from benchlib import RESULTS_DIR, judge_demo_models, run_study  # noqa: E402
from ldmkit.diffusion import samplers  # noqa: E402
from ldmkit.evaluation.fidelity import PROMPT_SETS, Entry, FidelityEvaluator  # noqa: E402

GUIDANCE = 5.0
# (row name, sampler, steps, LOWER_ORDER_FINAL_BELOW for the row)
ROWS = [("dpmpp-2m 20", "dpmpp-2m", 20, samplers.LOWER_ORDER_FINAL_BELOW),
        ("dpmpp-2m 10", "dpmpp-2m", 10, samplers.LOWER_ORDER_FINAL_BELOW),
        ("dpmpp-2m 10, diffusers' final rule", "dpmpp-2m", 10, 0),
        ("ddim 10", "ddim", 10, samplers.LOWER_ORDER_FINAL_BELOW)]


def measure(model: Path, evaluator: FidelityEvaluator, n: int) -> dict:
    from ldmkit.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(model, "cpu")
    table = {}
    for prompt_set in PROMPT_SETS:
        for name, sampler, steps, threshold in ROWS:
            samplers.LOWER_ORDER_FINAL_BELOW = threshold
            try:
                images = evaluator.images(pipe, Entry(prompt_set, sampler, steps, GUIDANCE, n))
            finally:
                samplers.LOWER_ORDER_FINAL_BELOW = ROWS[0][3]
            table.setdefault(prompt_set, {})[name] = evaluator.score(images, prompt_set)
            print(f"{model} {prompt_set:8s} {name:36s} {table[prompt_set][name]:.4f}",
                  flush=True)
    return table


if __name__ == "__main__":
    run_study(lambda: judge_demo_models(
        __doc__.split("\n\n")[0], RESULTS_DIR / "few_step.json", measure,
        {"guidance": GUIDANCE, "lower_order_final_below": samplers.LOWER_ORDER_FINAL_BELOW}))
