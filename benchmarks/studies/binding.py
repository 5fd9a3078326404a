# Question: which changes make the demo's U-Net bind two objects, and after how many steps?
# Answer: BENCHMARKS.md "What makes the U-Net bind two objects"; results/binding*.json
"""Which changes make the demo's U-Net bind attributes to the right object, per step?

Side by side on one VAE per data seed: each variant (a list of config overrides on top of
configs/shapes-demo.toml) trains the U-Net for the same number of steps, then the judge
scores the headline setting on 200 fresh prompts per set (single, two objects, held-out
pairs) and w = 1 on the two-object set. Budgets are in steps, so the fidelity numbers do
not depend on how busy the machine was; seconds per step are recorded beside them (they
do, and the JSON says what the load was).

    python benchmarks/studies/binding.py --steps 500 --seeds 0 1 --variants baseline text2
    -> benchmarks/results/binding.json (merged: reruns replace their own rows)

On a GPU machine the training step is host-bound (issue 16), so one GPU runs many variants
at once: `--jobs N` trains each (variant, seed) in its own process, N at a time, within
`--deadline-s`; `--vae-from DIR` reuses VAEs trained elsewhere (DIR/vae-<seed>/model), so a
sweep can start from the CPU's own VAEs. A variant may pin its own step budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
from benchlib import DEMO_CONFIG, RESULTS_DIR, run_study  # noqa: E402
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
    # captions are at most 13 MiniLM tokens: 24 positions pay cross-attention for padding
    "len16": ["text.max_length=16"],
    "len16-2000": ["text.max_length=16", "train.steps=2000"],
    "text1w128-len16": ["text.max_length=16", "unet.text_layers=1", "unet.text_width=128"],
    "text2w128-len16": ["text.max_length=16", "unet.text_layers=2", "unet.text_width=128"],
    "text2w128-len16-nopool": ["text.max_length=16", "unet.text_layers=2",
                               "unet.text_width=128", "unet.pooled_text=false"],
    "text2w128-len16-1800": ["text.max_length=16", "unet.text_layers=2",
                             "unet.text_width=128", "train.steps=1800"],
    "layers03-len16": ["text.max_length=16", "text.hidden_layers=[0, 3]"],
    "layers013-len16": ["text.max_length=16", "text.hidden_layers=[0, 3, -1]"],
    "lr12-len16": ["text.max_length=16", "train.lr=1.2e-3"],
    "two65-len16": ["text.max_length=16", "data.two_object_fraction=0.65"],
    # held-out pairs: a pooled caption is one vector for "purple triangle", never seen
    "len16-2000-nopool": ["text.max_length=16", "train.steps=2000", "unet.pooled_text=false"],
    # ... and MiniLM's last layer mixes "purple" into "triangle"; its embedding layer does not
    "len16-2000-layer0": ["text.max_length=16", "train.steps=2000", "text.hidden_layers=[0]"],
    # ... MiniLM's first transformer layer instead of its last: a little context
    "len16-2000-layers01": ["text.max_length=16", "train.steps=2000",
                            "text.hidden_layers=[0, 1]"],
    # the demo config; with the experiment patch text-layers-as-tokens.diff applied and
    # EXP_JOIN=tokens, layers 0 and -1 as two token blocks instead of side by side (not
    # adopted; the patch: `git show c81dc6e:benchmarks/patches/text-layers-as-tokens.diff`)
    "len16-2000-tokens": ["text.max_length=16", "train.steps=2000"],
    # the demo config since its VAE sees the held-out pairs' images (vae.include_heldout);
    # rows made with --vae-from the demo runs' own VAEs
    "demo-2000": ["train.steps=2000"],
    "demo-2400": ["train.steps=2400"],  # 20 % more updates than the demo can afford
    # with the experiment patch context-dropout.diff and EXP_CTXDROP=0.3: the last layer's
    # half of each token zeroed for 30 % of captions, so colour and shape must also be read
    # from the context-free embedding layer (not adopted; the patch:
    # `git show c81dc6e:benchmarks/patches/context-dropout.diff`)
    "demo-2000-ctxdrop": ["train.steps=2000"],
}
OUT = RESULTS_DIR / "binding.json"


def run_variant(name: str, seed: int, steps: int, vae_dir: Path, train_set, work: Path,
                n: int, snapshots: tuple[float, ...] = (), cache: str = "cache") -> dict:
    from ldmkit.diffusion.registry import HEADLINE
    from ldmkit.evaluation.fidelity import PROMPT_SETS, Entry, FidelityEvaluator
    from ldmkit.pipeline import TextToImagePipeline
    from ldmkit.training.diffusion_trainer import train_diffusion

    cfg = load_config(DEMO_CONFIG, [
        f"train.steps={steps}", "train.minutes=0", f"train.seed={seed}", f"data.seed={seed}",
        f"text.cache_dir={json.dumps(str(work / cache))}", "train.sample_every=100000",
        "train.checkpoint_every=100000"] + VARIANTS[name])  # a variant's own steps win
    load = os.getloadavg()[0]
    run = train_diffusion(cfg, vae_dir, work / f"{name}-{seed}-{steps}", dataset=train_set,
                          snapshot_at=snapshots)
    pipe = TextToImagePipeline.from_pretrained(run.model_dir)
    evaluator = FidelityEvaluator()
    entries = [Entry(s, HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, n)
               for s in PROMPT_SETS] + [Entry("two", HEADLINE.sampler, HEADLINE.steps, 1.0, n),
                                        Entry("single", HEADLINE.sampler, 10, HEADLINE.guidance, n)]
    rows, _ = evaluator.evaluate(pipe, entries, desc=f"{name} seed {seed}")
    fid = {(r.prompt_set if r.guidance == HEADLINE.guidance and r.steps == HEADLINE.steps
            else "two_w1" if r.guidance != HEADLINE.guidance else "single_10steps"): r.fidelity
           for r in rows}
    # when binding emerges: the two-object set at the snapshots along the way
    two = Entry("two", HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, n)
    curve = {str(snap.step): evaluator.evaluate(pipe.with_unet(snap.unet), [two],
                                                desc=f"step {snap.step}")[0][0].fidelity
             for snap in run.snapshots}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"variant": name, "overrides": VARIANTS[name], "seed": seed, "steps": run.steps,
            "device": device, "threads": torch.get_num_threads(),
            "seconds_per_step": round(run.train_seconds / max(run.steps, 1), 3),
            "load_avg_at_start": round(load, 2), **fid, "two_by_step": curve,
            "unet_params": sum(p.numel() for p in pipe.unet.parameters())}


def train_shared_vae(seed: int, work: Path, vae_from: Path | None = None):
    """One VAE per data seed, at the demo's step budget, reused by every variant."""
    from ldmkit.data.memory import materialize_stages
    from ldmkit.training.vae_trainer import train_vae

    cfg = load_config(DEMO_CONFIG, [f"train.seed={seed}", f"data.seed={seed}"])
    train_set, vae_set = materialize_stages(cfg)  # the demo's: the VAE sees every pair
    model_dir = work / f"vae-{seed}" / "model"
    if vae_from is not None and not model_dir.is_dir():
        shutil.copytree(vae_from / f"vae-{seed}" / "model", model_dir)
    if (model_dir / "model.safetensors").is_file():  # a rerun into the same --work
        return model_dir, train_set
    return train_vae(cfg, work / f"vae-{seed}", dataset=vae_set).model_dir, train_set


def run_parallel(args, work: Path) -> list[dict]:
    """Each (variant, seed) in its own process, args.jobs at a time, until the deadline:
    a job still running then is stopped and recorded as such."""
    deadline = time.monotonic() + args.deadline_s
    # variant by variant, so a deadline cuts the last variants, not the last seed
    todo = [(name, seed) for name in args.variants for seed in args.seeds]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    rows = []
    while todo or running:
        while todo and len(running) < args.jobs:
            key = todo.pop(0)
            running[key] = (_start_worker(args, work, *key), time.monotonic())
        time.sleep(1)
        late = time.monotonic() >= deadline
        for key, (proc, began) in list(running.items()):
            if proc.poll() is None and not late:
                continue
            row = _collect(proc, *key)
            row["wall_s"] = round(time.monotonic() - began, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del running[key]
        if late:
            rows += [{"variant": n, "seed": s, "steps": None, "error": "not started: deadline"}
                     for n, s in todo]
            todo = []
    return rows


def _start_worker(args, work: Path, name: str, seed: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--variants", name, "--seeds", str(seed),
           "--steps", str(args.steps), "--n", str(args.n), "--work", str(work),
           "--snapshots", *map(str, args.snapshots)]
    with open(work / f"{name}-{seed}.log", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})


def _collect(proc: subprocess.Popen, name: str, seed: int) -> dict:
    """The worker's row (the last line it printed), or why there is none."""
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0].strip().splitlines()
    if proc.returncode == 0 and out:
        return json.loads(out[-1])
    return {"variant": name, "seed": seed, "steps": None,
            "error": f"exit {proc.returncode}; see {name}-{seed}.log"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None, help="keep models here (default: tmp)")
    ap.add_argument("--snapshots", type=float, nargs="*", default=[],
                    help="fractions of the budget at which to judge the two-object set too")
    ap.add_argument("--jobs", type=int, default=0, help="parallel processes (0 = in this one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per --jobs process")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="stop --jobs runs then")
    ap.add_argument("--vae-from", type=Path, default=None, help="DIR with vae-<seed>/model")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="binding-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:  # one (variant, seed); its row is the last line of stdout
        vae_dir, train_set = train_shared_vae(args.seeds[0], work)
        print(json.dumps(run_variant(args.variants[0], args.seeds[0], args.steps, vae_dir,
                                     train_set, work, args.n, tuple(args.snapshots),
                                     # concurrent workers never share a cache folder
                                     cache=f"cache-{args.variants[0]}-{args.seeds[0]}")))
        return
    results = read_json(args.out, "binding results")["rows"] if args.out.is_file() else []

    def save(row: dict) -> None:
        nonlocal results
        results = [r for r in results if (r["variant"], r["seed"], r["steps"]) !=
                   (row["variant"], row["seed"], row["steps"])] + [row]
        write_json_atomic(args.out, {"machine": "see BENCHMARKS.md", "torch": torch.__version__,
                                     "n_per_set": args.n, "rows": results})

    if args.jobs:
        for seed in args.seeds:  # before the workers, so they never race to train one
            train_shared_vae(seed, work, args.vae_from)
        for row in run_parallel(args, work):
            save(row)
        return
    for seed in args.seeds:
        vae_dir, train_set = train_shared_vae(seed, work, args.vae_from)
        for name in args.variants:
            start = time.monotonic()
            row = run_variant(name, seed, args.steps, vae_dir, train_set, work, args.n,
                              tuple(args.snapshots))
            row["wall_s"] = round(time.monotonic() - start, 1)
            print(json.dumps(row), flush=True)
            save(row)


if __name__ == "__main__":
    run_study(main)
