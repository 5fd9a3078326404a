"""`ldmkit demo`: both stages on the built-in shapes data, then generation, judging and a
report — what a newcomer runs first (`make demo`), on a CPU, offline, within minutes.

    runs/demo/
      data_preview.png   vae/ (stage-1 run)   diffusion/ (stage-2 run)   model/ (pipeline)
      prompts_grid.png   progress*.png/.gif   cfg_sweep.png   fidelity_vs_steps.png
      evaluation.json    timings.json         report.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from ldmkit.config import Config, load_config
from ldmkit.devices import resolve_device
from ldmkit.diffusion.registry import HEADLINE
from ldmkit.io import atomic_write, write_json_atomic

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes-demo.toml"
# Of a --minutes time box when the config's budgets are steps (as the shipped one's are):
# about the VAE's share of the demo's training time on a 2-core CPU; the U-Net gets the rest.
VAE_SHARE = 0.25
EARLY_FRACTION = 0.25  # the early checkpoint of the CFG sweep: a quarter of the budget


class Stopwatch:
    """Wall time per named stage, printed at the end and written to timings.json."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = time.monotonic()

    @contextlib.contextmanager
    def stage(self, name: str):
        print(f"\n== {name} ==", flush=True)
        start = time.monotonic()
        yield
        self.times[name] = round(time.monotonic() - start, 1)

    @property
    def total(self) -> float:
        return round(time.monotonic() - self._start, 1)

    def timings(self, **extra) -> dict:
        """Stage times, total, peak memory, what `extra` adds, and the machine."""
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {**self.times, "total": self.total, "peak_rss_mb": round(peak_mb), **extra,
                "machine": machine()}


def write_run_summary(out: Path, report: str, timings: dict, evaluation) -> None:
    """report.md and timings.json (with the evaluation's per-row wall times, which
    evaluation.json leaves out), then the times on the console."""
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(report))
    write_json_atomic(out / "timings.json", {**timings,
                                             "evaluation_rows_s": evaluation.wall_times()})
    print("\n" + "\n".join(f"{k:>20s}: {v}" for k, v in timings.items()))
    print(f"\nreport: {out / 'report.md'}")


def demo_config(args: argparse.Namespace) -> tuple[Config, float]:
    """The demo's config: the TOML (budgets in steps: the same run on every machine),
    a --minutes time box split over the stages when asked for one, and for --tiny a
    seconds-long version that still passes through every stage."""
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    overrides = list(args.overrides or [])
    if args.tiny:
        overrides = TINY_OVERRIDES + overrides
    cfg = load_config(path, overrides + [f"train.seed={args.seed}", f"data.seed={args.seed}"])
    configured = cfg.vae.minutes + cfg.train.minutes
    minutes = configured if args.minutes is None else args.minutes
    if minutes and not args.tiny:
        # --minutes rescales both stages' budgets, keeping the config's split
        vae_share = cfg.vae.minutes / configured if configured else VAE_SHARE
        cfg.vae.minutes = round(minutes * vae_share, 3)
        cfg.train.minutes = round(minutes - cfg.vae.minutes, 3)
        # the step counts become ceilings the minutes will hit first
        cfg.vae.steps, cfg.train.steps = 100_000, 100_000
    # The caches stay in the run (the config's default, <run>/cache), not shared between
    # demos: a run is everything it used, deleting it leaves nothing behind, and nothing
    # another demo wrote can reach its bits (a shared cache once did, before captions were
    # padded per caption: `ldmkit demo --seed 2` read 98 % held-out instead of 93 %).
    return cfg, minutes


TINY_OVERRIDES = [
    "data.image_size=32", "data.num_items=96", "data.val_items=8",
    "vae.downsample_factor=4", "vae.channel_mult=[1, 2, 2]", "vae.base_channels=8",
    "vae.steps=3", "vae.batch_size=8",
    "unet.base_channels=16", "unet.channel_mult=[1, 2]", "unet.cross_attn_levels=[1]",
    "unet.num_res_blocks=1", "unet.num_heads=2", "unet.width=32", "unet.depth=2",
    "diffusion.timesteps=20", "train.steps=4", "train.batch_size=8", "train.sample_every=1000",
    "train.checkpoint_every=1000", "train.log_every=1", "vae.minutes=0", "train.minutes=0",
]


SHOWCASE_PROMPTS = [
    "a red circle",
    "a large blue square on the left",
    "a small yellow triangle at the top",
    "a green cross in the center",
    "a purple triangle",  # held out of training: never seen as a pair
    "an orange circle on the right",  # held out too
    "a red square left of a blue circle",
    "a yellow cross above a green square",
]
SEEDS = 6
PROGRESS_PROMPTS = SHOWCASE_PROMPTS[1:3] + SHOWCASE_PROMPTS[4:5] + SHOWCASE_PROMPTS[6:7]
SWEEP_COLUMNS = 8


def cli_demo(args: argparse.Namespace) -> int:
    run_demo(args)
    return 0


def run_demo(args: argparse.Namespace) -> Path:
    """Every stage in order; this function alone decides what is written where."""
    from ldmkit.data.memory import materialize_stages
    from ldmkit.models.text import TextEncoder
    from ldmkit.pipeline import TextToImagePipeline
    from ldmkit.report import format_report
    from ldmkit.training.diffusion_trainer import train_diffusion
    from ldmkit.training.vae_trainer import train_vae
    from ldmkit.viz import save_image_grid

    cfg, minutes = demo_config(args)
    device = resolve_device(getattr(args, "device", "auto"))  # a bad --device fails first
    out = Path(args.out)
    if out.exists():  # a demo run is a fresh start: old checkpoints would be resumed
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg.save_json(out / "config.json")
    watch = Stopwatch()

    with watch.stage("data"):
        train_set, vae_set = materialize_stages(cfg)
        preview = [train_set[i] for i in range(16)]
        save_image_grid(torch.stack([img for img, _ in preview]), out / "data_preview.png",
                        nrow=8, captions=[c for _, c in preview])
    with watch.stage("vae"):
        vae_run = train_vae(cfg, out / "vae", dataset=vae_set)
    with watch.stage("text encoder"):
        text = TextEncoder.from_config(cfg.text)
    with watch.stage("unet"):
        unet_run = train_diffusion(cfg, vae_run.model_dir, out / "diffusion", dataset=train_set,
                                   text=text, snapshot_at=(EARLY_FRACTION,))
        shutil.copytree(unet_run.model_dir, out / "model")
    with watch.stage("generate and judge"):
        pipe = TextToImagePipeline.from_pretrained(out / "model", device, text_encoder=text)
        showcase(pipe, out)
        evaluation = evaluate(pipe, unet_run.snapshots, out, tiny=args.tiny)

    timings = watch.timings(minutes_budget=minutes)
    write_run_summary(out, format_report(cfg, _command(args), vae_run, unet_run, evaluation,
                                         timings), timings, evaluation)
    return out


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, for the report."""
    parts = ["ldmkit demo", f"--out {args.out}"]
    parts += [f"--seed {args.seed}"] if args.seed else []
    parts += [f"--minutes {args.minutes:g}"] if args.minutes is not None else []
    parts += ["--tiny"] if args.tiny else []
    parts += [f"--config {args.config}"] if args.config else []
    return " ".join(parts + list(args.overrides or []))


def machine() -> str:
    """What ran the demo: the numbers are the same on any machine, the times are not."""
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in
                 Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{device}; torch {torch.__version__}")


@torch.no_grad()
def showcase(pipe, out: Path) -> None:
    """prompts x seeds grid, and the progressive denoising of a few prompts."""
    from ldmkit.sample import sample_with_frames, write_progress
    from ldmkit.viz import save_image_grid

    setting = {"num_inference_steps": HEADLINE.steps, "guidance_scale": HEADLINE.guidance,
               "sampler": HEADLINE.sampler}
    prompts = [p for p in SHOWCASE_PROMPTS for _ in range(SEEDS)]
    images = pipe.decode(pipe.generate_latents(
        prompts, generator=torch.Generator().manual_seed(0), **setting))
    captions = [p if i % SEEDS == 0 else "" for i, p in enumerate(prompts)]
    save_image_grid(images, out / "prompts_grid.png", nrow=SEEDS, captions=captions)
    final, frames = sample_with_frames(pipe, PROGRESS_PROMPTS, frames=8,
                                       generator=torch.Generator().manual_seed(1), **setting)
    write_progress(frames, final, out, stem="progress")


def evaluate(pipe, snapshots: list, out: Path, tiny: bool = False):
    """Judge the final model (CFG sweep, samplers) and the early snapshot (CFG sweep);
    write evaluation.json and the fidelity figures."""
    from ldmkit.diffusion.registry import SAMPLERS, reference_sampler
    from ldmkit.evaluation import fidelity as fid
    from ldmkit.viz import plot_fidelity_vs_guidance, plot_fidelity_vs_steps

    evaluator = fid.FidelityEvaluator()
    n_head, n_other, n_slow = (4, 4, 4) if tiny else (200, 100, 50)
    timesteps = pipe.schedule.timesteps
    sweep = fid.guidance_entries(n_head, n_other)
    final_rows, kept = evaluator.evaluate(pipe, sweep, keep_images=SWEEP_COLUMNS,
                                          desc="CFG sweep")
    others = fid.standard_entries(n_head, n_other, timesteps)[len(sweep):]
    sampler_rows, _ = evaluator.evaluate(pipe, fid.with_n(others, n_slow, 100), desc="samplers")
    cfg_sweep_grid(kept, evaluator, final_rows, out / "cfg_sweep.png")
    result = fid.Evaluation(evaluator.judge_accuracy(n=200 if tiny else 1000,
                                                     image_size=pipe.image_size),
                            final_rows + sampler_rows)
    sweeps = [("final", final_rows)]
    if snapshots:
        early = snapshots[0]
        rows, _ = evaluator.evaluate(pipe.with_unet(early.unet), fid.guidance_entries(n_slow),
                                     desc="early CFG")
        result.early_checkpoint = fid.SnapshotFidelity(early.step, early.elapsed_s, rows)
        sweeps.append((f"early (step {early.step})", rows))
    write_json_atomic(out / "evaluation.json", result.to_json())

    single = [r for r in result.fidelity if r.prompt_set == "single" and r.at_headline_guidance]
    distinct = [name for name, info in SAMPLERS.items() if not info.same_as]
    plot_fidelity_vs_steps(single, out / "fidelity_vs_steps.png", distinct, timesteps,
                           reference_sampler(), f"fidelity vs steps (w = {HEADLINE.guidance:g})")
    plot_fidelity_vs_guidance(sweeps, out / "cfg_fidelity.png",
                              f"what guidance buys ({SAMPLERS[HEADLINE.sampler].title}, "
                              f"{HEADLINE.steps} steps, rescale {HEADLINE.guidance_rescale:g})")
    return result


def cfg_sweep_grid(kept: dict, evaluator, rows: list, path: Path) -> None:
    """Rows: guidance scales; columns: the same prompts and initial noise."""
    from ldmkit.evaluation.fidelity import GUIDANCE_SWEEP
    from ldmkit.viz import save_image_grid

    score = {(r.prompt_set, r.guidance): r.fidelity for r in rows}
    tiles, captions = [], []
    for w in GUIDANCE_SWEEP:
        for prompt_set in ("single", "two"):
            entry = next(e for e in kept if e.prompt_set == prompt_set and e.guidance == w)
            images = kept[entry][: SWEEP_COLUMNS // 2]
            prompts = evaluator.prompts(prompt_set, entry.n)[: len(images)]
            tiles.append(images)
            captions += [f"w={w:g} ({score[(prompt_set, w)]:.0%}): {p}" for p in prompts]
    save_image_grid(torch.cat(tiles), path, nrow=SWEEP_COLUMNS, captions=captions)
