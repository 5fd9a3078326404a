"""Peak resident memory of one task, run alone in this fresh process (the suite starts it
as a subprocess so the tasks' allocations never mix). Prints one JSON line.

    python benchmarks/bench_rss.py train|train-seed|sample [--quick]

train:      the fast path (latent + text cache build, then bf16 steps), as training runs;
train-seed: the seed's way (fp32, VAE + text encoder every step);
sample:     load the sampling row's model (bench_model.py; --model DIR another), DPM-Solver++
            20 steps, decode.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_sample import load_pipeline, sampler_fns
from bench_train import Stepper, make_step, prepare, stream
from benchlib import peak_rss_mb, set_threads, sizes


def train(quick: bool, cached: bool) -> dict:
    sz = sizes(quick)
    with tempfile.TemporaryDirectory() as tmp:
        p = prepare(sz, Path(tmp))
        cfg, batches = stream(p, cached)
        step = make_step(cfg, p["text"], p["vae"], p["init"], bf16=cached)
        setup = peak_rss_mb()
        Stepper(step, batches, max(2, sz.train_steps))()
    return {"rss_after_setup_mb": round(setup), "batch": sz.train_batch,
            "items_cached": sz.train_items if cached else 0}


def sample(quick: bool, model_dir: Path | None) -> dict:
    sz = sizes(quick)
    pipe, about = load_pipeline(sz, model_dir, train=False)  # training would swell the peak
    if pipe is None:
        return {"skipped": about["skipped"]}
    from ldmkit.evaluation.fidelity import PROMPT_SEED
    from ldmkit.evaluation.prompts import prompt_set

    batch = max(sz.sample_batch, min(sz.fidelity_n, 64))
    setup = peak_rss_mb()
    sampler_fns(pipe, prompt_set("single", batch, PROMPT_SEED))["fast"]()
    return {"rss_after_setup_mb": round(setup), "batch": batch, "model": about["model"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=("train", "train-seed", "sample"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", type=Path, default=None,
                    help="model folder to sample from (default: the sampling row's)")
    ap.add_argument("--threads", type=int, default=0, help="0 = every available core")
    args = ap.parse_args()
    set_threads(args.threads)
    if args.task == "sample":
        out = sample(args.quick, args.model)
    else:
        out = train(args.quick, cached=args.task == "train")
    print(json.dumps({"task": args.task, "peak_rss_mb": round(peak_rss_mb()),
                      "measure": "VmHWM of this process (see benchlib.peak_rss_mb)", **out}))


if __name__ == "__main__":
    main()
