"""The demo's report.md: text only. Everything it states arrives as values (the trainers'
results, the evaluation, the timings); the pictures it links are written by the demo
(ldmkit/demo.py decides what goes where), so this module formats and nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ldmkit.diffusion.registry import HEADLINE, SAMPLERS

if TYPE_CHECKING:  # types only: formatting needs none of these modules at run time
    from ldmkit.config import Config
    from ldmkit.evaluation.fidelity import Evaluation, FidelityRow
    from ldmkit.training.diffusion_trainer import DiffusionRun
    from ldmkit.training.vae_trainer import VAERun


def headline_setting() -> str:
    """'DPM-Solver++ 2M 20 steps, guidance 5, rescale 0.7': the setting every headline
    number uses."""
    return (f"{SAMPLERS[HEADLINE.sampler].title} {HEADLINE.steps} steps, "
            f"guidance {HEADLINE.guidance:g}, rescale {HEADLINE.guidance_rescale:g}")


def fidelity_table(rows: Sequence[FidelityRow]) -> str:
    lines = ["| prompt set | sampler | steps | guidance | rescale | fidelity | n |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.prompt_set} | {r.sampler} | {r.steps} | {r.guidance:g} | "
              f"{r.guidance_rescale:g} | {r.fidelity:.1%} | {r.n} |" for r in rows]
    return "\n".join(lines)


def _table(header: str, rows: dict) -> str:
    return "\n".join([header, "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows.items()])


def format_report(cfg: Config, command: str, vae: VAERun, unet: DiffusionRun,
                  evaluation: Evaluation, timings: dict) -> str:
    """report.md for one demo run, pictures linked relatively (GitHub renders them)."""
    stages = {k: v for k, v in timings.items() if k != "machine"}
    parts = [_intro(cfg, command, evaluation), _stage1(vae), _stage2(unet),
             _guidance(evaluation, unet), _samplers(evaluation),
             "## Time and memory\n\n"
             f"Machine: {timings.get('machine', 'not recorded')}. Budgets are steps, so the "
             "numbers above are the same on any machine with the same torch build; these "
             "times are what they cost here.\n\n" + _table("| stage | seconds |", stages)]
    return "\n\n".join(parts) + "\n"


def _intro(cfg: Config, command: str, evaluation: Evaluation) -> str:
    acc = evaluation.judge_accuracy
    side = cfg.data.image_size // cfg.vae.downsample_factor
    headline = {k: f"{v:.1%}" for k, v in evaluation.headline().items()}
    return f"""# ldmkit demo report

Made by `{command}` (`make demo`): built-in shapes data at
{cfg.data.image_size}x{cfg.data.image_size}, a KL-VAE to {side}x{side}x{cfg.vae.latent_channels}
latents,
the offline text encoder `{cfg.text.encoder}` (hidden states {cfg.text.hidden_layers} per
token), a {cfg.diffusion.objective}-objective {cfg.unet.kind} denoiser
with classifier-free guidance (p_uncond {cfg.diffusion.p_uncond}), {_path_name(cfg)} schedule,
T = {cfg.diffusion.timesteps}.

## Headline ({headline_setting()})

{_table("| prompt set | fidelity |", headline)}

Prompt fidelity = fraction of generated images whose attributes, read back by the judge,
match everything the prompt states. Judge accuracy on held-out real images:
shape {acc['shape']:.1%}, colour {acc['color']:.1%}, size {acc['size']:.1%},
position {acc['position']:.1%}.

## Data

![data preview](data_preview.png)"""


def _stage1(vae: VAERun) -> str:
    return f"""## Stage 1: VAE

Held-out PSNR **{vae.psnr:.2f} dB**, SSIM {vae.ssim:.4f} after {vae.steps} steps
({vae.train_seconds / 60:.1f} min); latent scale factor {vae.scale_factor:.4f}.

![reconstruction loss](vae/recon.png) ![KL](vae/kl.png)

Originals (top) and reconstructions (bottom):

![reconstructions](vae/reconstructions.png)"""


def _stage2(unet: DiffusionRun) -> str:
    return f"""## Stage 2: diffusion

{unet.steps} steps in {unet.train_seconds / 60:.1f} min.

![diffusion loss](diffusion/loss.png)

Prompts (rows) x seeds (columns), {headline_setting()}:

![prompts x seeds](prompts_grid.png)

Progressive denoising (the x0 estimate along the way; GIF: [progress.gif](progress.gif)):

![progress](progress.png)"""


def _guidance(evaluation: Evaluation, unet: DiffusionRun) -> str:
    sweep = [r for r in evaluation.fidelity if r.in_guidance_sweep]
    text = f"""## What guidance buys

Same prompts and initial noise, w = 1 (no guidance) to 7.5:

![cfg sweep](cfg_sweep.png)

![fidelity vs guidance](cfg_fidelity.png)

{fidelity_table(sweep)}"""
    early = evaluation.early_checkpoint
    if early is not None and unet.snapshots:
        text += (f"\n\nEarly checkpoint (step {early.step}, "
                 f"{unet.snapshots[0].fraction:.0%} of the budget):\n\n"
                 f"{fidelity_table(early.fidelity)}")
    return text


def _samplers(evaluation: Evaluation) -> str:
    rows = [r for r in evaluation.fidelity
            if r.prompt_set == "single" and r.at_headline_guidance]
    text = f"""## Samplers

![fidelity vs steps](fidelity_vs_steps.png)

{fidelity_table(rows)}"""
    pairs = [(r, h) for r in evaluation.fidelity if r.is_plain_cfg_headline
             for h in evaluation.fidelity if h.is_headline and h.prompt_set == r.prompt_set]
    if pairs:
        text += ("\n\nGuidance rescale (Lin et al. 2024) against plain CFG, the same prompts "
                 "and noise:\n\n" + fidelity_table([row for pair in pairs for row in pair]))
    return text


def _path_name(cfg: Config) -> str:
    """The noise path's name: the DDPM schedule's kind, or flow's straight line."""
    return "straight-path" if cfg.diffusion.objective == "flow" else cfg.diffusion.schedule
