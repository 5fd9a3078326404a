# Question: does the shapes judge read objects off the data's five spots?
# Answer: BENCHMARKS.md "The judge off the five spots"; results/judge_off_grid.json
"""Does the shapes judge read objects between the data's five spots, and what does that
change in the demo's fidelity?

The data draws every object on one of five spots (left, right, top, bottom, centre, +-4 %);
generated objects sometimes land between them. Part 1 reads real renders (32x32, the demo's
size) on the spots and anywhere (`render_off_grid`: one object, centre uniform, up to 40 %
of it past an edge; position = the nearest spot) with each judge. Part 2 generates each
demo model's headline images (w = 5, DPM-Solver++ 20, the headline's rescale, 200 prompts
per set, the evaluation's prompts and noise) once and reads them with every judge: fidelity,
and how many verdicts and readings differ from the first --judges entry's (the reference).

    python benchmarks/studies/judge_off_grid.py \\
        --judges OLD/judge.safetensors CONTROL/judge.safetensors \\
        --models runs/demo/model runs/demo-seed1/model runs/demo-seed2/model
    -> benchmarks/results/judge_off_grid.json       (the shipped judge is always the first)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
from benchlib import RESULTS_DIR, machine_info, run_study, set_threads  # noqa: E402
from ldmkit.io import write_json_atomic  # noqa: E402

EVAL_SEED = 1234  # judge.json's


def read_renders(judges: dict, n: int) -> dict:
    from ldmkit.evaluation.judge import judge_accuracy

    return {name: {"on_the_spots": judge_accuracy(j, n, EVAL_SEED, image_size=32),
                   "off_the_spots": judge_accuracy(j, n, EVAL_SEED, image_size=32,
                                                   off_grid=True)}
            for name, j in judges.items()}


def read_models(judges: dict, models: list[Path], n: int) -> dict:
    from ldmkit.diffusion.registry import HEADLINE
    from ldmkit.evaluation.fidelity import PROMPT_SETS, Entry, FidelityEvaluator
    from ldmkit.evaluation.judge import judge_images
    from ldmkit.evaluation.prompts import prompt_matches
    from ldmkit.pipeline import TextToImagePipeline

    evaluator, out = FidelityEvaluator(), {}
    for model in models:
        pipe = TextToImagePipeline.from_pretrained(model, "cpu")
        for prompt_set in PROMPT_SETS:
            entry = Entry(prompt_set, HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, n)
            images, prompts = evaluator.images(pipe, entry), evaluator.prompts(prompt_set, n)
            scenes = {name: judge_images(j, images) for name, j in judges.items()}
            verdicts = {name: prompt_matches(s, prompts) for name, s in scenes.items()}
            ref = reference_judge(judges)
            out.setdefault(str(model), {})[prompt_set] = {name: {
                "fidelity": sum(verdicts[name]) / n,
                "verdicts_differing_from_reference": sum(
                    a != b for a, b in zip(verdicts[name], verdicts[ref])),
                "readings_differing_from_reference": sum(
                    a != b for a, b in zip(scenes[name], scenes[ref]))}
                for name in judges}
            print(model, prompt_set, {k: v["fidelity"] for k, v in
                                      out[str(model)][prompt_set].items()}, flush=True)
    return out


def reference_judge(judges: dict) -> str:
    """What the differences are counted against: the first judge given with --judges (the
    one shipped before, say), else the shipped one."""
    names = list(judges)
    return names[1] if len(names) > 1 else names[0]


def main() -> None:
    from ldmkit.evaluation.judge import default_weights_path, load_judge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judges", nargs="*", type=Path, default=[],
                    help="other judge weights (a .safetensors with its .json beside it)")
    ap.add_argument("--models", nargs="*", type=Path, default=[], help="demo model folders")
    ap.add_argument("--n", type=int, default=2000, help="real renders per judge and kind")
    ap.add_argument("--fidelity-n", type=int, default=200, help="prompts per set and model")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "judge_off_grid.json")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.set_grad_enabled(False)
    paths = [default_weights_path(), *args.judges]
    judges = {str(p): load_judge(p) for p in paths}
    results = {"machine": machine_info(), "judges": [str(p) for p in paths],
               "reference": reference_judge(judges),
               "renders": {"n": args.n, "seed": EVAL_SEED, "size": 32,
                           "accuracy": read_renders(judges, args.n)}}
    if args.models:
        results["models"] = {"n": args.fidelity_n,
                             "read": read_models(judges, args.models, args.fidelity_n)}
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_study(main)
