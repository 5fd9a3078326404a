# Question: which stage-1 recipe keeps real pictures' colour and edges at equal CPU time?
# Answer: BENCHMARKS.md "VAE recipe for real images"; results/vae_recipe.json
"""Stage-1 recipes for real pictures side by side at equal CPU time (issue 25): today's
emoji VAE, then one change at a time (L1, SSIM, FFL, GAN, EMA, Adam betas, width, depth,
batch, latent channels). Writes benchmarks/results/vae_recipe.json.

Equal cost, not equal wall-clock: the machine is shared, so `--time` first measures every
recipe's seconds per update on real emoji batches in one process, one torch thread,
alternating the recipes round by round (a change in load hits them all alike), and keeps
each one's fastest round (load only adds time). Each recipe then trains for budget / (its
seconds per update) steps — a fixed step count, so what it learns does not depend on the
load while it trains — and is read on the 802 held-out emoji: PSNR, SSIM, colour error
(mean CIEDE2000), the emoji judge on the round trips, and a picture of reconstructions.

    .venv/bin/python benchmarks/studies/vae_recipe.py --data runs/emoji-data --time
    .venv/bin/python benchmarks/studies/vae_recipe.py --data runs/emoji-data \
        --budget 300 [--only NAME ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ldmkit.config import Config, load_config  # noqa: E402
from ldmkit.io import read_json, write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "emoji64.toml"
RESULTS = ROOT / "benchmarks" / "results" / "vae_recipe.json"
# Today's emoji recipe (configs/emoji64.toml before issue 25), written out so the rows keep
# measuring what they claim when the config moves.
TODAY = ["vae.base_channels=16", "vae.channel_mult=[1, 2, 4, 4]", "vae.num_res_blocks=1",
         "vae.latent_channels=4", "vae.kl_weight=1e-6", "vae.batch_size=8", "vae.lr=1e-3",
         "vae.warmup_steps=50", 'vae.recon_loss="mse"', "vae.ssim_weight=0",
         "vae.ffl_weight=0", "vae.blur_weight=0", "vae.gan_weight=0", "vae.ema_decay=0",
         "vae.adam_beta1=0.9", "vae.adam_beta2=0.999", "vae.minutes=0"]
L1 = ['vae.recon_loss="l1"']
SSIM1 = L1 + ["vae.ssim_weight=1.0"]  # the first chain: SSIM this strong washes colour out
GN4_ADAM = ["vae.norm_group_channels=4", "vae.adam_beta1=0.5", "vae.adam_beta2=0.9"]
GAN_FRACTION = 0.5  # the discriminator starts half way through a recipe's steps
# name -> overrides on top of TODAY: one change at a time to today's recipe
RECIPES: dict[str, list[str]] = {
    "today": [],
    "+ L1": L1,
    "+ SSIM 0.2": ["vae.ssim_weight=0.2"],
    "+ FFL": ["vae.ffl_weight=1.0"],
    "+ blur": ["vae.blur_weight=1.0"],
    "+ GAN": ["vae.gan_weight=0.5"],
    "+ EMA 0.999": ["vae.ema_decay=0.999"],
    "GroupNorm 4 channels/group": ["vae.norm_group_channels=4"],
    "Adam (0.5, 0.9)": ["vae.adam_beta1=0.5", "vae.adam_beta2=0.9"],
    "lr 2e-3": ["vae.lr=2e-3"],
    "batch 4": ["vae.batch_size=4"],
    "base 32 (wider)": ["vae.base_channels=32"],
    "2 blocks (deeper)": ["vae.num_res_blocks=2"],
    "latent 8": ["vae.latent_channels=8"],
    "latent 16": ["vae.latent_channels=16"],
    "GroupNorm 8 channels/group": ["vae.norm_group_channels=8"],
    "GroupNorm 16 channels/group": ["vae.norm_group_channels=16"],
    # the pieces that paid, together (run at the demo's budget and at about twice it)
    "GN 4 + Adam (0.5, 0.9)": GN4_ADAM,
    "GN 4 + Adam (0.5, 0.9), latent 8": GN4_ADAM + ["vae.latent_channels=8"],
    "GN 4 + Adam (0.5, 0.9), latent 16": GN4_ADAM + ["vae.latent_channels=16"],
    # the first chain, kept for its rows: L1 + SSIM at weight 1 desaturates every colour
    "+ L1 + SSIM 1.0": SSIM1,
    "+ L1 + SSIM 1.0, latent 16": SSIM1 + ["vae.latent_channels=16"],
}
# Rows whose computation is (nearly) that of a row timed: they take its measured cost.
# The loss terms were timed on top of L1 + SSIM, so a row that adds one to today's MSE is
# charged SSIM's few ms more than it costs (a few % fewer steps: against it, not for it);
# optimiser settings and GroupNorm's grouping do not change the computation (timing noise
# under load is about 10 %, more than a separate measurement would resolve).
TIMED_AS = {"+ SSIM 0.2": "+ L1 + SSIM", "+ FFL": "+ L1 + SSIM + FFL",
            "+ blur": "+ L1 + SSIM + blur", "+ GAN": "+ L1 + SSIM + GAN",
            "+ EMA 0.999": "+ L1 + SSIM + EMA", "GroupNorm 4 channels/group": "today",
            "Adam (0.5, 0.9)": "today", "GroupNorm 8 channels/group": "today",
            "GroupNorm 16 channels/group": "today", "GN 4 + Adam (0.5, 0.9)": "today",
            "GN 4 + Adam (0.5, 0.9), latent 8": "+ L1 + SSIM, latent 8",
            "GN 4 + Adam (0.5, 0.9), latent 16": "+ L1 + SSIM, latent 16",
            "lr 2e-3": "today", "+ L1": "today",
            "batch 4": "+ L1 + SSIM, batch 4",
            "base 32 (wider)": "+ L1 + SSIM, base 32 (wider)",
            "2 blocks (deeper)": "+ L1 + SSIM, 2 blocks (deeper)",
            "latent 8": "+ L1 + SSIM, latent 8", "latent 16": "+ L1 + SSIM, latent 16",
            "+ L1 + SSIM 1.0": "+ L1 + SSIM",
            "+ L1 + SSIM 1.0, latent 16": "+ L1 + SSIM, latent 16"}
# what `--time` measured under these names (the first chain's recipes)
TIMING_ONLY = {
    "+ L1 + SSIM": SSIM1,
    "+ L1 + SSIM + FFL": SSIM1 + ["vae.ffl_weight=1.0"],
    "+ L1 + SSIM + blur": SSIM1 + ["vae.blur_weight=1.0"],
    "+ L1 + SSIM + GAN": SSIM1 + ["vae.gan_weight=0.5"],
    "+ L1 + SSIM + EMA": SSIM1 + ["vae.ema_decay=0.999"],
    "+ L1 + SSIM, batch 4": SSIM1 + ["vae.batch_size=4"],
    "+ L1 + SSIM, base 32 (wider)": SSIM1 + ["vae.base_channels=32"],
    "+ L1 + SSIM, 2 blocks (deeper)": SSIM1 + ["vae.num_res_blocks=2"],
    "+ L1 + SSIM, latent 8": SSIM1 + ["vae.latent_channels=8"],
    "+ L1 + SSIM, latent 16": SSIM1 + ["vae.latent_channels=16"],
}
SHOW = ["grinning face", "green heart", "yellow heart", "white heart", "red apple", "rocket",
        "sun", "banana"]


def recipe_config(data: Path, name: str, extra: list[str] = ()) -> Config:
    overrides = {**TIMING_ONLY, **RECIPES}[name]
    return load_config(CONFIG, [*TODAY, *overrides, f"data.root={str(data / 'train')!r}",
                                *extra])


# ----------------------------------------------------------------------------- cost


def seconds_per_step(data: Path, names: list[str], rounds: int, steps: int) -> dict:
    """Seconds of one update per recipe (and of the GAN phase where there is one), the
    recipes taking turns round by round in this one process: the fastest round, and the
    median beside it."""
    from ldmkit.data.emoji import load_split
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.training.common import make_accelerator
    from ldmkit.training.vae_step import VAEStep

    images = load_split(data / "train").images[:512].float() / 127.5 - 1
    contenders = {}
    for name in names:
        gan = bool(recipe_config(data, name).vae.gan_weight)
        # a GAN recipe costs one thing before its discriminator starts, another after
        for phase, extra in [("plain", ["vae.gan_weight=0"])] + ([("gan", [])] if gan else []):
            cfg = recipe_config(data, name, extra + ["vae.gan_start=0"])
            torch.manual_seed(0)
            update = VAEStep(AutoencoderKL(cfg.vae, 64), cfg)
            update.prepare(make_accelerator(cfg.train.mixed_precision))
            contenders[(name, phase)] = (update, cfg.vae.batch_size)
    times: dict = {key: [] for key in contenders}
    for r in range(rounds + 1):  # round 0 warms up
        for key, (update, batch) in contenders.items():
            start = time.perf_counter()
            for i in range(steps):
                first = (i * batch) % (len(images) - batch)
                update(images[first:first + batch], i)
            if r:
                times[key].append((time.perf_counter() - start) / steps)
        print(f"round {r}: " + ", ".join(f"{k[0]}/{k[1]} {1e3 * v[-1]:.0f} ms"
                                         for k, v in times.items() if v), flush=True)
    out: dict = {}
    for (name, phase), values in times.items():
        # the fastest round: other jobs on the machine only ever add time to a round
        out.setdefault(name, {})[phase] = min(values)
        out[name][f"{phase}_median"] = statistics.median(values)
    return out


def steps_for(cost: dict, budget: float) -> tuple[int, int]:
    """(steps, gan_start) that spend `budget` seconds at the measured cost."""
    if "gan" not in cost:
        return max(1, round(budget / cost["plain"])), 0
    per = GAN_FRACTION * cost["plain"] + (1 - GAN_FRACTION) * cost["gan"]
    steps = max(2, round(budget / per))
    return steps, round(GAN_FRACTION * steps)


# ----------------------------------------------------------------------------- quality


@torch.no_grad()
def roundtrip(vae, images_uint8: torch.Tensor) -> torch.Tensor:
    out = []
    for chunk in images_uint8.split(128):
        out.append(vae(chunk.float() / 127.5 - 1, sample_posterior=False)[0].float().clamp(-1, 1))
    return torch.cat(out)


def measure(vae, data: Path, picture: Path, name: str) -> dict:
    """Held-out PSNR / SSIM / colour error, the judge on round trips, and the picture."""
    from ldmkit.data.emoji import load_split
    from ldmkit.evaluation.emoji_judge import accuracy, load_emoji_judge
    from ldmkit.evaluation.vae_metrics import evaluate_vae

    held = load_split(data / "heldout")
    judge, classes = load_emoji_judge()
    quality = evaluate_vae(vae, held)
    labels = classes.labels([r["base"] for r in held.rows])
    read = accuracy(judge, roundtrip(vae, held.images), labels)
    _picture(vae, data, held, picture, name)
    return {"heldout_psnr": round(quality["psnr"], 2), "heldout_ssim": round(quality["ssim"], 4),
            "color_error": round(quality["color_error"], 3),
            "roundtrip_identity_top1": read["identity_top1"],
            "roundtrip_category": read["category"]}


def _picture(vae, data: Path, held, path: Path, name: str) -> None:
    """Upper row: real images (SHOW's trained emoji the data has, then held-out ones);
    lower row: their round trips."""
    from ldmkit.data.emoji import load_split
    from ldmkit.viz import save_image_grid

    train = load_split(data / "train")
    by_name = {r["name"]: i for i, r in enumerate(train.rows) if r["vendor"] == "google"}
    picked = [train.images[by_name[n]] for n in SHOW if n in by_name]
    real = torch.cat([torch.stack(picked), held.images[: 12 - len(picked)]])
    save_image_grid(torch.cat([real.float() / 127.5 - 1, roundtrip(vae, real)]), path,
                    nrow=len(real), captions=[name] + [""] * (2 * len(real) - 1))


def train_and_measure(data: Path, name: str, steps: int, gan_start: int, out: Path) -> dict:
    from ldmkit.data import train_subset
    from ldmkit.data.emoji import load_split
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.training.vae_trainer import train_vae

    cfg = recipe_config(data, name, [f"vae.steps={steps}", f"vae.gan_start={gan_start}",
                                     "train.checkpoint_every=1000000"])
    train_set = train_subset(load_split(data / "train"), cfg.data.val_items)
    with tempfile.TemporaryDirectory() as tmp:
        run = train_vae(cfg, Path(tmp) / "vae", dataset=train_set)
        vae = AutoencoderKL.from_pretrained(run.model_dir).eval()
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    row = {"recipe": name, "overrides": {**TIMING_ONLY, **RECIPES}[name], "steps": steps,
           "gan_start": gan_start,
           "train_wall_seconds": run.train_seconds,
           **measure(vae, data, out / f"vae_recipe_{slug}.png", name)}
    print(row, flush=True)
    return row


# ----------------------------------------------------------------------------- main


def table(results: dict) -> str:
    """The rows as BENCHMARKS.md's markdown table."""
    costs = results.get("seconds_per_step", {})
    lines = ["| recipe | steps | CPU-s (1 thread) | held-out PSNR | SSIM | colour error "
             "(CIEDE2000) | judge on round trips: identity | category |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.get("rows", []):
        cost = costs.get(TIMED_AS.get(r["recipe"], r["recipe"]), {})
        if "gan" in cost:
            cpu = r["gan_start"] * cost["plain"] + (r["steps"] - r["gan_start"]) * cost["gan"]
        else:
            cpu = r["steps"] * cost.get("plain", float("nan"))
        lines.append(f"| {r['recipe']} | {r['steps']:,} | {cpu:.0f} | {r['heldout_psnr']:.2f} dB "
                     f"| {r['heldout_ssim']:.3f} | {r['color_error']:.2f} | "
                     f"{r['roundtrip_identity_top1']:.1%} | {r['roundtrip_category']:.1%} |")
    return "\n".join(lines)



def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="folder of `ldmkit data emoji`")
    p.add_argument("--time", action="store_true", help="measure seconds per update only")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="updates per timing round")
    p.add_argument("--budget", type=float, default=300.0,
                   help="one-thread CPU seconds of training per recipe")
    p.add_argument("--today-steps", type=int, default=1500,
                   help="also train today's recipe at the step count it ships with")
    p.add_argument("--only", nargs="*", default=None,
                   choices=tuple(RECIPES) + tuple(TIMING_ONLY))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the rows as markdown")
    args = p.parse_args(argv)
    if args.table:
        print(table(read_json(args.out, "results")))
        return 0
    torch.set_num_threads(args.threads)
    names = args.only or list(RECIPES)
    results = read_json(args.out, "results") if args.out.exists() else {}
    results["machine"] = machine()
    if args.time:
        cost = seconds_per_step(args.data, names, args.rounds, args.steps)
        results.setdefault("seconds_per_step", {}).update(cost)
        write_json_atomic(args.out, results)
        print(f"wrote {args.out}")
        return 0
    costs = results.get("seconds_per_step", {})
    missing = [n for n in names if TIMED_AS.get(n, n) not in costs]
    if missing:
        sys.exit(f"no measured seconds per step for {missing}: run --time first")
    rows = {f"{r['recipe']} @ {r.get('budget_s')}": r for r in results.get("rows", [])}
    out_dir = args.out.parent
    if args.today_steps and (args.only is None or "today" in args.only):
        row = train_and_measure(args.data, "today", args.today_steps, 0, out_dir)
        rows["today @ None"] = {**row, "budget_s": None,
                                         "cpu_seconds": round(args.today_steps *
                                                              costs["today"]["plain"], 1)}
    for name in names:
        steps, gan_start = steps_for(costs[TIMED_AS.get(name, name)], args.budget)
        row = train_and_measure(args.data, name, steps, gan_start, out_dir)
        rows[f"{name} @ {args.budget}"] = {**row, "budget_s": args.budget}
        results["rows"] = list(rows.values())
        write_json_atomic(args.out, results)
    results["rows"] = list(rows.values())
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
