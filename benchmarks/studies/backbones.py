# Question: which backbone x objective (U-Net v, U-Net flow, DiT, MMDiT) reaches the shapes
# demo's bars in the fewest CPU-seconds? Answer: BENCHMARKS.md "Backbones and objectives";
# results/backbones.json, results/backbones.png
"""Backbones and objectives side by side on the shapes demo, at equal CPU-seconds.

Each variant (config overrides on top of configs/shapes-demo.toml) trains on one VAE per
data seed (binding.py's) for a step budget; EMA snapshots along the way and the final model
are judged at the headline setting on every prompt set, so each variant gives fidelity
against updates. Seconds per step come from a separate quiet timing in one process
(`--time`: each variant's training step side by side, the same batch), so the seconds axis
does not depend on what else ran during the long trainings.

    python benchmarks/studies/backbones.py --time                        # seconds per step
    python benchmarks/studies/backbones.py --variants unet-v dit-flow --seeds 0 --jobs 2
    python benchmarks/studies/backbones.py --plot                        # fidelity vs seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parent))
from binding import train_shared_vae  # noqa: E402

from benchlib import DEMO_CONFIG, RESULTS_DIR, run_study  # noqa: E402
from ldmkit.config import load_config  # noqa: E402
from ldmkit.io import read_json, write_json_atomic  # noqa: E402

FLOW = ["diffusion.objective=flow"]
DIT = ["unet.kind=dit", "unet.width=192", "unet.depth=6", "unet.num_heads=4"]
MMDIT = ["unet.kind=mmdit", "unet.width=192", "unet.depth=6", "unet.num_heads=4"]
VARIANTS: dict[str, list[str]] = {
    "unet-v": [],  # the demo as it was: U-Net, v-prediction with min-SNR 5
    "unet-flow": FLOW,
    "dit-v": DIT,
    "dit-flow": DIT + FLOW,
    "mmdit-flow": MMDIT + FLOW,
    "dit-flow-w256d4": ["unet.kind=dit", "unet.width=256", "unet.depth=4"] + FLOW,
    "dit-flow-w128d6": ["unet.kind=dit", "unet.width=128", "unet.depth=6"] + FLOW,
    "mmdit-flow-w128d6": ["unet.kind=mmdit", "unet.width=128", "unet.depth=6"] + FLOW,
    "unet-flow-lr12": FLOW + ["train.lr=1.2e-3"],
    "dit-flow-lr12": DIT + FLOW + ["train.lr=1.2e-3"],
    "dit-flow-b64": DIT + FLOW + ["train.batch_size=64"],
}
OUT = RESULTS_DIR / "backbones.json"
SNAPSHOTS = (0.5, 0.75)


def _cfg(name: str, seed: int, steps: int, work: Path, cache: str):
    return load_config(DEMO_CONFIG, [
        f"train.steps={steps}", "train.minutes=0", f"train.seed={seed}", f"data.seed={seed}",
        f"text.cache_dir={json.dumps(str(work / cache))}", "train.sample_every=100000",
        "train.checkpoint_every=100000"] + VARIANTS[name])


def run_variant(name: str, seed: int, steps: int, work: Path, n: int) -> dict:
    """Train, then judge the snapshots and the final model on every prompt set."""
    from ldmkit.diffusion.registry import HEADLINE
    from ldmkit.evaluation.fidelity import PROMPT_SETS, Entry, FidelityEvaluator
    from ldmkit.pipeline import TextToImagePipeline
    from ldmkit.training.diffusion_trainer import train_diffusion

    vae_dir, train_set = train_shared_vae(seed, work)
    cfg = _cfg(name, seed, steps, work, f"cache-{name}-{seed}")
    run = train_diffusion(cfg, vae_dir, work / f"{name}-{seed}-{steps}", dataset=train_set,
                          snapshot_at=SNAPSHOTS)
    pipe = TextToImagePipeline.from_pretrained(run.model_dir)
    evaluator = FidelityEvaluator()
    entries = [Entry(s, HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, n)
               for s in PROMPT_SETS]
    curve = {}
    for step, unet in [(s.step, s.unet) for s in run.snapshots] + [(run.steps, pipe.unet)]:
        rows, _ = evaluator.evaluate(pipe.with_unet(unet), entries, desc=f"{name} {step}")
        curve[str(step)] = {r.prompt_set: r.fidelity for r in rows}
    return {"variant": name, "overrides": VARIANTS[name], "seed": seed, "steps": run.steps,
            "n_per_set": n, "fidelity_by_step": curve,
            "unet_params": sum(p.numel() for p in pipe.unet.parameters())}


def time_steps(names: list[str], repeats: int = 10) -> dict[str, float]:
    """Seconds per training step of each variant, side by side in this process: the demo's
    batch, bf16 autocast as the demo, random latents and caption tokens of its shapes."""
    from ldmkit.models.denoiser import build_denoiser
    from ldmkit.models.text import TextEmbeddings
    from ldmkit.training.diffusion_step import DiffusionStep

    out = {}
    for name in names:
        cfg = _cfg(name, 0, 1000, Path(tempfile.gettempdir()), "unused")
        torch.manual_seed(0)
        side = cfg.data.image_size // cfg.vae.downsample_factor
        width = 384 * len(cfg.text.hidden_layers)  # MiniLM's hidden size per joined layer
        model = build_denoiser(cfg.unet, cfg.vae.latent_channels, width)
        length, b = cfg.text.max_length, cfg.train.batch_size
        null = TextEmbeddings(torch.zeros(1, length, width), torch.ones(1, length, dtype=bool))
        step = DiffusionStep(model, cfg, null=null)
        latents = torch.randn(b, cfg.vae.latent_channels, side, side)
        text = TextEmbeddings(torch.randn(b, length, width), torch.ones(b, length, dtype=bool))
        for _ in range(3):
            step(latents, text)
        start = time.perf_counter()
        for _ in range(repeats):
            step(latents, text)
        out[name] = round((time.perf_counter() - start) / repeats, 4)
        print(f"{name}: {out[name]} s/step", flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    """Fidelity of each prompt set against training seconds, one line per variant/seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = ("single", "two", "heldout")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    per_step = results.get("seconds_per_step", {})
    colours = {}
    for row in results["rows"]:
        if row["variant"] not in per_step:
            continue
        colour = colours.setdefault(row["variant"], f"C{len(colours)}")
        steps = sorted(int(s) for s in row["fidelity_by_step"])
        seconds = [s * per_step[row["variant"]] for s in steps]
        for ax, name in zip(axes, sets):
            ax.plot(seconds, [100 * row["fidelity_by_step"][str(s)][name] for s in steps],
                    "o-", color=colour, alpha=0.8,
                    label=row["variant"] if name == "single" and row["seed"] == 0 else None)
    for ax, name in zip(axes, sets):
        ax.set_title(f"{name} (judge, headline setting)")
        ax.set_xlabel("U-Net training seconds (quiet 2-core timing x steps)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fidelity %")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["unet-v", "unet-flow", "dit-flow",
                                                      "mmdit-flow"], choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="one budget per variant (default: 2000 each)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "backbones")
    ap.add_argument("--time", action="store_true", help="only time each variant's step")
    ap.add_argument("--plot", action="store_true", help="only redraw the plot")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    results = read_json(args.out, "backbone results") if args.out.is_file() else {"rows": []}
    if args.time:
        results["seconds_per_step"] = {**results.get("seconds_per_step", {}),
                                       **time_steps(args.variants)}
        results["timing"] = (f"quiet, {torch.get_num_threads()} threads, torch "
                             f"{torch.__version__}")
    elif not args.plot:
        steps = args.steps or [2000] * len(args.variants)
        args.work.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for name, budget in zip(args.variants, steps):
                row = run_variant(name, seed, budget, args.work, args.n)
                print(json.dumps(row), flush=True)
                results["rows"] = [r for r in results["rows"] if (r["variant"], r["seed"],
                                   r["steps"]) != (name, seed, row["steps"])] + [row]
                write_json_atomic(args.out, results)
    write_json_atomic(args.out, results)
    if results["rows"]:
        plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    run_study(main)
