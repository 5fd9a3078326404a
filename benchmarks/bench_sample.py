"""Row 2: sampling images/s, ldmkit's default against the seed's sampler, on one trained
model, with the judge's prompt fidelity of each.

- fast: the headline setting (registry.HEADLINE: DPM-Solver++(2M), 20 steps, w = 5),
        conditional and unconditional halves in one batched U-Net call per step
        (`TextToImagePipeline.generate_latents`, the default);
- seed: the reference sampler (ancestral DDPM) over all T steps, two separate U-Net
        calls per step (`two_pass=True`), as the seed samples.

The model is the suite's own (bench_model.py: the seed's 64x64 -> 8x8x4 geometry, trained
with a fixed step budget the first time, then reused), so a fresh clone writes the row;
`--model DIR` (run_all.py) samples from another folder instead, e.g. runs/demo/model, and
the setup line says which was used. Both contenders include text encoding and the VAE
decode, i.e. prompt to image. Speed is timed on a small batch (the seed's sampler costs 2T
U-Net calls); fidelity is judged on a larger set of fresh single-object prompts, the same
prompts and initial noise for both. The fidelity run of the seed's sampler uses the batched
CFG call: the guided output is the same function of (x_t, t), so the images match the
two-pass ones up to float rounding, and the time is the same either way.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from benchlib import (
    RESULTS_DIR,
    Sizes,
    alternate,
    display_path,
    profile_table,
    rates,
    ratio_summary,
    summarize,
)
from ldmkit.diffusion.registry import HEADLINE, reference_sampler

TARGET_SPEEDUP = 25.0
TARGET_FIDELITY_GAP = 0.03  # fast may trail the seed's fidelity by at most 3 points


def load_pipeline(sz: Sizes, model_dir: Path | None = None, train: bool = True):
    """(pipeline on the CPU, what it is) for `model_dir`, else for the suite's own model
    (trained now if it is not there yet and `train`); (None, why not) when there is none."""
    from bench_model import folder_for, sample_model
    from ldmkit.pipeline import TextToImagePipeline

    if model_dir is not None:
        about = {"model": f"{display_path(model_dir)} (given with --model)"}
    elif train or (folder_for(sz) / "recipe.json").is_file():
        model_dir, about = sample_model(sz)
    else:
        return None, {"skipped": "the sampling row's model is not trained yet (run the "
                                 "sample row first)"}
    # the folder names its own text encoder
    return TextToImagePipeline.from_pretrained(model_dir, "cpu"), about


def sampler_fns(pipe, prompts: list[str], seed_steps: int = 0) -> dict:
    """Prompt-to-image callables for the two contenders (`seed_steps` < T: a shortened
    seed sampler with the same per-step work, for profiling)."""
    T = seed_steps or pipe.schedule.timesteps

    def run(steps: int, sampler: str, two_pass: bool):
        def go():
            gen = torch.Generator().manual_seed(0)
            return pipe.decode(pipe.generate_latents(prompts, None, steps, HEADLINE.guidance,
                                                     sampler, gen, two_pass=two_pass))
        return go

    return {"fast": run(HEADLINE.steps, HEADLINE.sampler, False),
            "seed": run(T, reference_sampler(), True)}


def fidelity(pipe, n: int) -> dict:
    """Judge fidelity of both samplers on n single-object prompts (or why it was skipped)."""
    from ldmkit.errors import UserError
    from ldmkit.evaluation.fidelity import Entry, FidelityEvaluator

    try:
        evaluator = FidelityEvaluator(batch_size=max(n, 1))
    except (UserError, OSError) as exc:
        return {"sample_fidelity_skipped": f"judge unavailable: {exc}"}
    out: dict = {}
    for name, sampler, steps in (("fast", HEADLINE.sampler, HEADLINE.steps),
                                 ("seed", reference_sampler(), pipe.schedule.timesteps)):
        start = time.perf_counter()
        images = evaluator.images(pipe, Entry("single", sampler, steps, HEADLINE.guidance, n))
        seconds = time.perf_counter() - start
        score = evaluator.score(images, "single")
        out[f"sample_fidelity_{name}"] = round(score, 4)
        # binomial standard error: the judge counts n pass/fail images
        out[f"sample_fidelity_{name}_stderr"] = round(math.sqrt(score * (1 - score) / n), 4)
        out[f"sample_fidelity_{name}_ips"] = round(n / seconds, 3)
    out["sample_fidelity_gap"] = round(out["sample_fidelity_fast"] - out["sample_fidelity_seed"], 4)
    out["sample_fidelity_n"] = n
    return out


def sample_row(sz: Sizes, model_dir: Path | None = None,
               profile_dir: Path = RESULTS_DIR, force_profile: bool = False) -> dict:
    pipe, about = load_pipeline(sz, model_dir)
    if pipe is None:
        return {"sample_speedup_vs_seed": None, "sample_skipped": about["skipped"]}
    from ldmkit.evaluation.fidelity import PROMPT_SEED
    from ldmkit.evaluation.prompts import prompt_set

    prompts = prompt_set("single", sz.sample_batch, PROMPT_SEED)
    fns = sampler_fns(pipe, prompts)
    # the fast sampler is ~2T/20 times quicker: repeat it so its rounds are timeable too
    repeat = {"fast": 2 if sz.quick else 5}
    seconds = alternate(fns, sz.sample_rounds, warmup={"fast": 1, "seed": 0}, repeat=repeat)
    speedup = ratio_summary(seconds["seed"], seconds["fast"])
    row = {
        "sample_speedup_vs_seed": speedup["median_of_medians"],
        "sample_speedup_vs_seed_spread": speedup,
        **{f"sample_ips_{k}": summarize(rates(sz.sample_batch, s), 3)
           for k, s in seconds.items()},
        "sample_setup": {
            **about, "timesteps": pipe.schedule.timesteps, "prediction": pipe.prediction,
            "x0_clamp": pipe.x0_clamp, "guidance": HEADLINE.guidance,
            "fast": f"{HEADLINE.sampler} {HEADLINE.steps} steps, batched CFG "
                    "(1 U-Net call of 2B per step)",
            "seed": f"{reference_sampler()} {pipe.schedule.timesteps} steps, "
                    "2 U-Net calls of B per step",
            "speed_batch": sz.sample_batch, "rounds": sz.sample_rounds,
            "fast_repeats_per_round": repeat["fast"],
            "includes": "text encoding, sampling, VAE decode"},
    }
    row.update(fidelity(pipe, sz.fidelity_n))
    gap_ok = row.get("sample_fidelity_gap", -1.0) >= -TARGET_FIDELITY_GAP
    row["sample_target"] = f">= {TARGET_SPEEDUP:g}x with fidelity within " \
                           f"{100 * TARGET_FIDELITY_GAP:g} points"
    row["sample_target_met"] = bool(speedup["median_of_medians"] >= TARGET_SPEEDUP and gap_ok)
    if force_profile or not row["sample_target_met"]:
        # the seed's sampler profiled over a tenth of its steps: the same per-step work
        short = max(1, pipe.schedule.timesteps // 10)
        row["sample_profiles"] = [
            profile_table(fns["fast"], profile_dir / "profile_sample_fast.txt",
                          f"prompt to image, fast sampler, batch {sz.sample_batch}"),
            profile_table(sampler_fns(pipe, prompts, short)["seed"],
                          profile_dir / "profile_sample_seed.txt",
                          f"prompt to image, seed sampler (two-pass DDPM) over {short} of "
                          f"its {pipe.schedule.timesteps} steps, batch {sz.sample_batch}")]
    return row
