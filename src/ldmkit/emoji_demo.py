"""`ldmkit demo-emoji`: the demo on real images — emoji artwork (data/emoji.py), a VAE and
a U-Net trained on it, generation, judging by the emoji judge and a report.

    runs/emoji/
      data_preview.png   vae/ (stage-1 run)   diffusion/ (stage-2 run)   model/ (pipeline)
      prompts_grid.png   heldout_grid.png   styles_grid.png   judged.png
      progress*.png/.gif   cfg_sweep.png   evaluation.json   timings.json   report.md

It reuses the shapes demo's pieces (ldmkit/demo.py: Stopwatch, machine) and decides,
like it, what is written where; the numbers are in evaluation/emoji_fidelity.py.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ldmkit.config import Config, load_config
from ldmkit.demo import Stopwatch, write_run_summary
from ldmkit.devices import resolve_device
from ldmkit.diffusion.registry import HEADLINE
from ldmkit.errors import UserError
from ldmkit.io import write_json_atomic

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "emoji64.toml"
DEFAULT_DATA = "runs/emoji-data"

# Trained emoji (names as the captions spell them); the grid shows those the data has.
SHOWCASE = ["red apple", "dog face", "grinning face", "rocket",
            "smiling face with heart-shaped eyes", "green heart", "slice of pizza",
            "flag: japan"]
HELDOUT_SHOWCASE = ["peach", "crying face", "flag: germany", "white heart", "rabbit",
                    "police car"]
SEEDS = 6
SWEEP = (1.0, 3.0, HEADLINE.guidance, 7.5)
N_IDENTITY = 200  # identity prompts per guidance scale (95 % interval about +-6 points)

TINY_OVERRIDES = [
    "data.image_size=32", "data.val_items=2",
    "vae.downsample_factor=4", "vae.channel_mult=[1, 2, 2]", "vae.base_channels=8",
    "vae.steps=3", "vae.batch_size=4",
    "unet.base_channels=16", "unet.channel_mult=[1, 2]", "unet.cross_attn_levels=[1]",
    "unet.num_res_blocks=1", "unet.num_heads=2", "diffusion.timesteps=20",
    "train.steps=3", "train.batch_size=8", "train.log_every=1",
]


def cli_demo_emoji(args: argparse.Namespace) -> int:
    run_emoji_demo(args)
    return 0


def emoji_config(args: argparse.Namespace) -> Config:
    """The TOML (budgets in steps), --tiny's seconds-long version, the data folder."""
    overrides = (TINY_OVERRIDES if args.tiny else []) + list(args.overrides or [])
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides + [
        f"train.seed={args.seed}", f"data.seed={args.seed}",
        f"data.root={str(Path(args.data) / 'train')!r}"])
    return cfg  # caches in the run, as the shapes demo's (see demo.demo_config)


def run_emoji_demo(args: argparse.Namespace) -> Path:
    """Every stage in order; this function alone decides what is written where."""
    from ldmkit.data import train_subset
    from ldmkit.data.emoji import build_emoji_folder, load_split, open_emoji_folder
    from ldmkit.emoji_report import format_emoji_report
    from ldmkit.evaluation.emoji_judge import load_emoji_judge
    from ldmkit.models.text import TextEncoder
    from ldmkit.pipeline import TextToImagePipeline
    from ldmkit.training.diffusion_trainer import train_diffusion
    from ldmkit.training.vae_trainer import train_vae

    cfg = emoji_config(args)
    device = resolve_device(getattr(args, "device", "auto"))
    judge, classes = load_emoji_judge(args.judge)  # a bad --judge fails before any work
    out = Path(args.out)
    if out.exists():  # a fresh start: old checkpoints would be resumed
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg.save_json(out / "config.json")
    watch = Stopwatch()

    with watch.stage("data"):
        folder = open_emoji_folder(args.data) if not (args.archive or args.vendors) else None
        if folder is None:  # written once, then reused (nothing is fetched at training time)
            vendors = args.vendors.split(",") if args.vendors else None
            folder = build_emoji_folder(args.data, vendors, args.archive or [],
                                        args.allow_unpinned)
        everything = load_split(folder.train, cfg.data.balance_by)
        # as the folder dataset splits it: its last items validate the VAE
        train_set = train_subset(everything, cfg.data.val_items)
        heldout = load_split(folder.heldout)
        _check_judge_knows(classes, everything.rows + heldout.rows, args.judge)
        _preview(train_set, out / "data_preview.png")
    with watch.stage("vae"):
        vae_run = train_vae(cfg, out / "vae", dataset=train_set)
    with watch.stage("text encoder"):
        text = TextEncoder.from_config(cfg.text)
    with watch.stage("unet"):
        unet_run = train_diffusion(cfg, vae_run.model_dir, out / "diffusion",
                                   dataset=train_set, text=text)
        shutil.copytree(unet_run.model_dir, out / "model")
    with watch.stage("generate and judge"):
        pipe = TextToImagePipeline.from_pretrained(out / "model", device, text_encoder=text)
        real = _RealImages(train_set, heldout)
        held_names = [r["name"] for r in heldout.rows if r["unified"] == r["base"]]
        showcase(pipe, real, held_names, out, seeds=2 if args.tiny else SEEDS)
        evaluation = evaluate(pipe, judge, classes, train_set, heldout, out,
                              n_identity=8 if args.tiny else N_IDENTITY, judge_path=args.judge)

    timings = watch.timings()
    write_run_summary(out, format_emoji_report(cfg, _command(args), folder.counts, vae_run,
                                               unet_run, evaluation, timings),
                      timings, evaluation)
    return out


def _command(args: argparse.Namespace) -> str:
    parts = ["ldmkit demo-emoji", f"--out {args.out}", f"--data {args.data}"]
    parts += [f"--seed {args.seed}"] if args.seed else []
    parts += ["--tiny"] if args.tiny else []
    parts += [f"--config {args.config}"] if args.config else []
    return " ".join(parts + list(args.overrides or []))


def _check_judge_knows(classes, rows: list[dict], judge_path) -> None:
    known = set(classes.base)
    missing = sorted({r["base"] for r in rows} - known)
    if missing:
        raise UserError(f"the emoji judge ({judge_path or 'shipped'}) does not know "
                        f"{len(missing)} emoji of this data (e.g. {missing[0]}); train one "
                        f"for it: python scripts/train_emoji_judge.py --data DIR")


def _preview(dataset, path: Path) -> None:
    from ldmkit.viz import save_image_grid

    idx = range(min(16, len(dataset)))
    save_image_grid(torch.stack([dataset[i][0] for i in idx]), path, nrow=8,
                    captions=[dataset.captions(i)[0] for i in idx])


class _RealImages:
    """Real renderings by caption name: the ones trained on and the held-out ones."""

    def __init__(self, *datasets):
        self.by_name: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for data in datasets:
            for i, row in enumerate(data.rows):
                self.by_name.setdefault(row["name"], []).append((row["vendor"], data.images[i]))

    def of(self, name: str, count: int = 2) -> list[tuple[str, torch.Tensor]]:
        return sorted(self.by_name.get(name, []), key=lambda vi: vi[0])[:count]

    def names(self) -> list[str]:
        return list(self.by_name)


# ----------------------------------------------------------------------------- pictures


def _setting(guidance: float = HEADLINE.guidance) -> dict:
    return {"num_inference_steps": HEADLINE.steps, "guidance_scale": guidance,
            "sampler": HEADLINE.sampler}


def pick(wanted: list[str], available: list[str], k: int) -> list[str]:
    """The wanted names the data has, topped up with the first available ones."""
    have = set(available)
    names = [n for n in wanted if n in have]
    return (names + [n for n in available if n not in names])[:k]


@torch.no_grad()
def showcase(pipe, real: _RealImages, heldout_names: list[str], out: Path,
             seeds: int = SEEDS) -> None:
    """prompts x seeds beside the real images; held-out prompts; vendor styles; progress."""
    from ldmkit.sample import sample_with_frames, write_progress

    held = pick(HELDOUT_SHOWCASE, list(dict.fromkeys(heldout_names)), len(HELDOUT_SHOWCASE))
    trained = pick(SHOWCASE, [n for n in real.names() if n not in set(heldout_names)
                              and "skin tone" not in n], len(SHOWCASE))
    _grid_with_real(pipe, trained, real, seeds, out / "prompts_grid.png")
    _grid_with_real(pipe, held, real, seeds, out / "heldout_grid.png")
    styled = [f"{n}, {v} style" for n in trained[:4] for v in ("google", "twitter")]
    _grid_with_real(pipe, styled, real, seeds, out / "styles_grid.png")
    final, frames = sample_with_frames(pipe, trained[:4], frames=8,
                                       generator=torch.Generator().manual_seed(1),
                                       **_setting())
    write_progress(frames, final, out, stem="progress")


def _grid_with_real(pipe, prompts: list[str], real: _RealImages, seeds: int,
                    path: Path) -> None:
    """A row per prompt: its real renderings (google, twitter), then `seeds` samples."""
    from ldmkit.viz import save_image_grid

    images = pipe.decode(pipe.generate_latents([p for p in prompts for _ in range(seeds)],
                                               generator=torch.Generator().manual_seed(0),
                                               **_setting()))
    blank = torch.ones(3, pipe.image_size, pipe.image_size)
    tiles, captions = [], []
    for i, prompt in enumerate(prompts):
        name = prompt.rsplit(", ", 1)[0] if prompt.endswith(" style") else prompt
        found = real.of(name)
        for j in range(2):
            vendor, image = found[j] if j < len(found) else ("", None)
            tiles.append(_resized(image, pipe.image_size) if image is not None else blank)
            captions.append(f"real {vendor}: {name}" if vendor else "")
        tiles += list(images[i * seeds:(i + 1) * seeds])
        captions += [prompt] + [""] * (seeds - 1)
    save_image_grid(torch.stack(tiles), path, nrow=seeds + 2, captions=captions)


def _resized(image: torch.Tensor, size: int) -> torch.Tensor:
    x = image.float()[None] / 127.5 - 1
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
    return x[0]


# ----------------------------------------------------------------------------- numbers


def evaluate(pipe, judge, classes, train_set, heldout, out: Path,
             n_identity: int = N_IDENTITY, judge_path: str | None = None):
    """vae_psnr / vae_color_error on the held-out emoji, the guidance sweep, the headline
    identity from three noise seeds, the judge on VAE round trips; evaluation.json, the CFG
    sweep grid and the judged examples."""
    from ldmkit.evaluation.emoji_fidelity import EmojiEvaluation, EmojiEvaluator, prompt_sets
    from ldmkit.evaluation.emoji_judge import accuracy, frechet_distance, read
    from ldmkit.evaluation.vae_metrics import evaluate_vae
    from ldmkit.viz import save_image_grid

    images = {r["file_name"]: train_set.images[i] for i, r in enumerate(train_set.rows)}
    sets = prompt_sets(classes, train_set.rows, heldout.rows, images, n_identity)
    evaluator = EmojiEvaluator(judge, sets)
    rows, kept = evaluator.evaluate(pipe, keep=16)
    by_seed = evaluator.identity_by_noise_seed(pipe, rows)
    vae = pipe.vae
    held_vae = evaluate_vae(vae, heldout)
    roundtrip = _roundtrip(vae, heldout.images, pipe.image_size)
    labels = classes.labels([r["base"] for r in heldout.rows])
    by_vendor = {v: [i for i, r in enumerate(train_set.rows)
                     if r["vendor"] == v and r["unified"] == r["base"]]
                 for v in ("google", "twitter")}
    read_back = accuracy(judge, roundtrip, labels)
    extra = {
        "vae_color_error": round(held_vae["color_error"], 3),  # mean CIEDE2000
        "vae_ssim": round(held_vae["ssim"], 4),
        "vae_roundtrip_identity_top1": read_back["identity_top1"],
        "identity_top1_by_noise_seed": by_seed,
        "judge_on_heldout_real": accuracy(judge, heldout.images, labels),
        "judge_on_heldout_vae_roundtrip": read_back,
        "n_heldout_images": len(heldout),
    }
    if all(by_vendor.values()):  # scale for fd_judge: one real vendor against the other
        feats = {v: read(judge, train_set.images[idx]).features for v, idx in by_vendor.items()}
        extra["fd_judge_google_vs_twitter_real"] = frechet_distance(feats["google"],
                                                                    feats["twitter"])
    result = EmojiEvaluation(round(held_vae["psnr"], 2), rows, _judge_meta(judge_path), extra)
    write_json_atomic(out / "evaluation.json", result.to_json())

    _cfg_sweep(pipe, rows, sets.identity[:8], out / "cfg_sweep.png")
    head = kept[HEADLINE.guidance]
    picked = read(judge, head).top("identity")[:, 0]
    captions = [f"{p}\n-> {classes.names[int(k)]}" for p, k in zip(sets.identity, picked)]
    save_image_grid(head, out / "judged.png", nrow=8, captions=captions[: len(head)])
    return result


@torch.no_grad()
def _roundtrip(vae, images: torch.Tensor, size: int) -> torch.Tensor:
    out = []
    for chunk in images.split(128):
        x = torch.stack([_resized(im, size) for im in chunk]).to(next(vae.parameters()).device)
        out.append(vae(x, sample_posterior=False)[0].float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _judge_meta(path: str | None) -> dict:
    """The judge's own measurements (emoji_judge.json beside its weights), for the report."""
    from ldmkit.evaluation.emoji_judge import default_weights_path
    from ldmkit.io import read_json

    meta = read_json(Path(path or default_weights_path()).with_suffix(".json"),
                     "emoji judge metadata")
    return {k: meta.get(k) for k in ("cross_vendor", "training_images", "train", "data")}


def _cfg_sweep(pipe, rows, prompts: list[str], path: Path) -> None:
    """Rows: w = 1, 3, 5, 7.5; columns: the same prompts (the evaluation's first identity
    prompts) from the same initial noise."""
    from ldmkit.evaluation.emoji_fidelity import generate
    from ldmkit.viz import save_image_grid

    score = {r.guidance: r.identity_top1 for r in rows}
    tiles, captions = [], []
    for w in SWEEP:
        tiles.append(generate(pipe, prompts, w))
        label = f"w={w:g}" + (f" (top-1 {score[w]:.0%})" if w in score else "")
        captions += [f"{label}: {p}" for p in prompts]
    save_image_grid(torch.cat(tiles), path, nrow=len(prompts), captions=captions)
