"""Which changes make the demo's U-Net bind attributes to the right object, per step?

Side by side on one VAE per data seed: each variant (a list of config overrides on top of
configs/shapes-demo.toml) trains the U-Net for the same number of steps, then the judge
scores the headline setting on 200 fresh prompts per set (single, two objects, held-out
pairs) and w = 1 on the two-object set. Budgets are in steps, so the fidelity numbers do
not depend on how busy the machine was; seconds per step are recorded beside them (they
do, and the JSON says what the load was).

    python benchmarks/binding.py --steps 500 --seeds 0 1 --variants baseline text2
    -> benchmarks/results/binding.json (merged: reruns replace their own rows)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchlib import DEMO_CONFIG, RESULTS_DIR  # noqa: E402
from ldmkit.config import load_config  # noqa: E402
from ldmkit.io import read_json, write_json_atomic  # noqa: E402

VARIANTS = {
    "baseline": [],
    "text1": ["unet.text_layers=1"],
    "text2": ["unet.text_layers=2"],  # the residual side path (see models/unet.TextBlocks)
    "text2-nopool": ["unet.text_layers=2", "unet.pooled_text=false"],
    "xattn8": ["unet.cross_attn_levels=[0, 1, 2]"],
    "text2-xattn8": ["unet.text_layers=2", "unet.cross_attn_levels=[0, 1, 2]"],
    "layers03": ["text.hidden_layers=[0, 3]"],
    "batch64": ["train.batch_size=64"],
    "two70": ["data.two_object_fraction=0.7"],
    "two70-text1": ["data.two_object_fraction=0.7", "unet.text_layers=1",
                    "unet.text_width=128"],
}
OUT = RESULTS_DIR / "binding.json"


def run_variant(name: str, seed: int, steps: int, vae_dir: Path, train_set, work: Path,
                n: int, snapshots: tuple[float, ...] = ()) -> dict:
    from ldmkit.diffusion.registry import HEADLINE
    from ldmkit.evaluation.fidelity import PROMPT_SETS, Entry, FidelityEvaluator
    from ldmkit.pipeline import TextToImagePipeline
    from ldmkit.training.diffusion_trainer import train_diffusion

    cfg = load_config(DEMO_CONFIG, VARIANTS[name] + [
        f"train.steps={steps}", "train.minutes=0", f"train.seed={seed}", f"data.seed={seed}",
        f"text.cache_dir={json.dumps(str(work / 'cache'))}", "train.sample_every=100000",
        "train.checkpoint_every=100000"])
    load = os.getloadavg()[0]
    run = train_diffusion(cfg, vae_dir, work / f"{name}-{seed}-{steps}", dataset=train_set,
                          snapshot_at=snapshots)
    pipe = TextToImagePipeline.from_pretrained(run.model_dir)
    evaluator = FidelityEvaluator()
    entries = [Entry(s, HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, n)
               for s in PROMPT_SETS] + [Entry("two", HEADLINE.sampler, HEADLINE.steps, 1.0, n)]
    rows, _ = evaluator.evaluate(pipe, entries, desc=f"{name} seed {seed}")
    fid = {(r.prompt_set if r.guidance == HEADLINE.guidance else "two_w1"): r.fidelity
           for r in rows}
    # when binding emerges: the two-object set at the snapshots along the way
    two = Entry("two", HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, n)
    curve = {str(snap.step): evaluator.evaluate(pipe.with_unet(snap.unet), [two],
                                                desc=f"step {snap.step}")[0][0].fidelity
             for snap in run.snapshots}
    return {"variant": name, "overrides": VARIANTS[name], "seed": seed, "steps": run.steps,
            "seconds_per_step": round(run.train_seconds / max(run.steps, 1), 3),
            "load_avg_at_start": round(load, 2), **fid, "two_by_step": curve,
            "unet_params": sum(p.numel() for p in pipe.unet.parameters())}


def train_shared_vae(seed: int, work: Path):
    """One VAE per data seed, at the demo's step budget, reused by every variant."""
    from ldmkit.data import build_dataset
    from ldmkit.data.memory import materialize
    from ldmkit.training.vae_trainer import train_vae

    cfg = load_config(DEMO_CONFIG, [f"train.seed={seed}", f"data.seed={seed}"])
    train_set = materialize(build_dataset(cfg.data, "train"), num_workers=2)
    model_dir = work / f"vae-{seed}" / "model"
    if (model_dir / "model.safetensors").is_file():  # a rerun into the same --work
        return model_dir, train_set
    return train_vae(cfg, work / f"vae-{seed}", dataset=train_set).model_dir, train_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None, help="keep models here (default: tmp)")
    ap.add_argument("--snapshots", type=float, nargs="*", default=[],
                    help="fractions of the budget at which to judge the two-object set too")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="binding-"))
    results = read_json(OUT, "binding results")["rows"] if OUT.is_file() else []
    for seed in args.seeds:
        vae_dir, train_set = train_shared_vae(seed, work)
        for name in args.variants:
            start = time.monotonic()
            row = run_variant(name, seed, args.steps, vae_dir, train_set, work, args.n,
                              tuple(args.snapshots))
            row["wall_s"] = round(time.monotonic() - start, 1)
            print(json.dumps(row), flush=True)
            results = [r for r in results if (r["variant"], r["seed"], r["steps"]) !=
                       (name, seed, args.steps)] + [row]
            write_json_atomic(OUT, {"machine": "see BENCHMARKS.md", "torch": torch.__version__,
                                    "n_per_set": args.n, "rows": results})


if __name__ == "__main__":
    main()
