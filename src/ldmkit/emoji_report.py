"""The emoji demo's report.md: text only. Every number arrives as a value (the trainers'
results, the evaluation, the timings); the pictures it links are written by
ldmkit/emoji_demo.py, so this module formats and nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldmkit.report import headline_setting

if TYPE_CHECKING:  # types only
    from ldmkit.config import Config
    from ldmkit.evaluation.emoji_fidelity import EmojiEvaluation
    from ldmkit.training.diffusion_trainer import DiffusionRun
    from ldmkit.training.vae_trainer import VAERun


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def sweep_table(evaluation: EmojiEvaluation) -> str:
    lines = ["| guidance w | identity top-1 | identity top-5 | held-out category | "
             "held-out subcategory | fd_judge |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.guidance:g} | {_pct(r.identity_top1)} | {_pct(r.identity_top5)} | "
              f"{_pct(r.heldout_category)} | {_pct(r.heldout_subcategory)} | "
              f"{r.fd_judge:.1f} |" for r in evaluation.rows]
    return "\n".join(lines)


def format_emoji_report(cfg: Config, command: str, counts: dict, vae: VAERun,
                        unet: DiffusionRun, evaluation: EmojiEvaluation,
                        timings: dict) -> str:
    stages = {k: v for k, v in timings.items() if k != "machine"}
    parts = [_intro(cfg, command, counts, evaluation), _judge(evaluation),
             _stage1(vae, evaluation), _stage2(unet, evaluation),
             "## Time and memory\n\n"
             f"Machine: {timings.get('machine', 'not recorded')}. Budgets are steps, so the "
             "numbers above are the same on any machine with the same torch build; these "
             "times are what they cost here.\n\n| stage | seconds |\n|---|---:|\n"
             + "\n".join(f"| {k} | {v} |" for k, v in stages.items()),
             "## Attribution\n\nNoto Emoji images (Google) under the Apache License 2.0; "
             "Twemoji graphics (Twitter, Inc and other contributors) under CC-BY 4.0; "
             "emoji.json from emoji-data by Cal Henderson (MIT). The data folder's "
             "ATTRIBUTION.md has the details."]
    return "\n\n".join(parts) + "\n"


def _intro(cfg: Config, command: str, counts: dict, evaluation: EmojiEvaluation) -> str:
    head = evaluation.headline()
    size = cfg.data.image_size
    side = size // cfg.vae.downsample_factor
    train, held = counts["train"], counts["heldout"]
    return f"""# ldmkit emoji demo report

Made by `{command}` (`make demo-emoji`): {train['images']} real emoji images of
{train['emoji']} emoji (Noto Emoji and Twemoji, every skin tone) captioned with their
names, {held['emoji']} more emoji ({held['images']} images) held out;
{size}x{size} images, a KL-VAE to {side}x{side}x{cfg.vae.latent_channels} latents, the text
encoder `{cfg.text.encoder}`, a {cfg.diffusion.objective}-objective {cfg.unet.kind} denoiser
with classifier-free guidance (p_uncond {cfg.diffusion.p_uncond}), T = {cfg.diffusion.timesteps}.

## Headline ({headline_setting()})

| measure | value |
|---|---:|
| identity top-1 (trained emoji, n = {head.n_identity}) | **{_pct(head.identity_top1)}** |
| identity top-5 | {_pct(head.identity_top5)} |
| held-out category (never-trained names, n = {head.n_heldout}) | \
**{_pct(head.heldout_category)}** |
| held-out subcategory | {_pct(head.heldout_subcategory)} |
| identity top-1 from three noise seeds | {_seeds(evaluation)} |
| fd_judge (lower = closer to real) | {head.fd_judge:.1f} |
| VAE PSNR on the held-out emoji | {evaluation.vae_psnr:.2f} dB |

Identity: the emoji judge reads the prompted emoji back off the generated image.
Held-out: prompts name emoji the model never saw ("peach"); the judge says whether the
picture lands in the named emoji's category and subcategory (chance is about 1/9 and
1/98).

Prompts (rows): two real renderings (Noto, Twemoji), then {headline_setting()} samples
from six seeds:

![prompts x seeds](prompts_grid.png)

Held-out emoji, never trained:

![held-out prompts](heldout_grid.png)

The vendor as a style phrase (", google style" / ", twitter style"):

![styles](styles_grid.png)

## What guidance buys

Same prompts and initial noise at w = 1 (no guidance), 3, 5, 7.5:

![cfg sweep](cfg_sweep.png)

{sweep_table(evaluation)}

What the judge read (prompt, then the judge's top-1), w = {head.guidance:g}:

![judged](judged.png)

## Data

![data preview](data_preview.png)"""


def _judge(evaluation: EmojiEvaluation) -> str:
    extra, meta = evaluation.extra, evaluation.judge
    real, rt = extra.get("judge_on_heldout_real", {}), \
        extra.get("judge_on_heldout_vae_roundtrip", {})
    lines = ["## The judge",
             "", "A small CNN (evaluation/emoji_judge.py) trained on every real image of "
             "both vendors with augmentation. How far to trust it:", "",
             "| images | identity top-1 | top-5 | category | subcategory |",
             "|---|---:|---:|---:|---:|"]
    for name, scores in (meta.get("cross_vendor") or {}).items():
        for kind in ("clean", "augmented"):
            s = scores[kind]
            lines.append(f"| never-seen vendor {name} ({kind}) | {_pct(s['identity_top1'])} | "
                         f"{_pct(s['identity_top5'])} | {_pct(s['category'])} | "
                         f"{_pct(s['subcategory'])} |")
    for label, s in (("held-out emoji, real (seen by the judge)", real),
                     ("the same through this run's VAE", rt)):
        if s:
            lines.append(f"| {label} | {_pct(s['identity_top1'])} | "
                         f"{_pct(s['identity_top5'])} | {_pct(s['category'])} | "
                         f"{_pct(s['subcategory'])} |")
    fd = extra.get("fd_judge_google_vs_twitter_real")
    if fd is not None:
        lines += ["", f"For scale: fd_judge between the two vendors' real images of the "
                      f"trained emoji is {fd:.1f}."]
    return "\n".join(lines)


def _seeds(evaluation: EmojiEvaluation) -> str:
    found = evaluation.extra.get("identity_top1_by_noise_seed") or []
    return " / ".join(_pct(v) for v in found) or "—"


def _vae_colour(evaluation: EmojiEvaluation) -> str:
    """SSIM, colour error and the judge on the round trips, where the run measured them."""
    extra = evaluation.extra
    if "vae_color_error" not in extra:
        return ""
    return (f", SSIM {extra['vae_ssim']:.4f}, colour error (mean CIEDE2000) "
            f"**{extra['vae_color_error']:.2f}**, the judge reads "
            f"{_pct(extra['vae_roundtrip_identity_top1'])} of the round trips right")


def _stage1(vae: VAERun, evaluation: EmojiEvaluation) -> str:
    return f"""## Stage 1: VAE

{vae.steps} steps ({vae.train_seconds / 60:.1f} min): PSNR **{evaluation.vae_psnr:.2f} dB**
on the held-out emoji{_vae_colour(evaluation)}; {vae.psnr:.2f} dB, SSIM {vae.ssim:.4f} on the
folder's own validation images; latent scale factor {vae.scale_factor:.4f}.

![reconstruction loss](vae/recon.png)

Originals (top) and reconstructions (bottom):

![reconstructions](vae/reconstructions.png)"""


def _stage2(unet: DiffusionRun, evaluation: EmojiEvaluation) -> str:
    return f"""## Stage 2: diffusion

{unet.steps} steps in {unet.train_seconds / 60:.1f} min ({unet.images_seen} images seen).

![diffusion loss](diffusion/loss.png)

Progressive denoising (the x0 estimate along the way; GIF: [progress.gif](progress.gif)):

![progress](progress.png)"""
