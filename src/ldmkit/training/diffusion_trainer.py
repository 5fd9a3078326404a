"""Stage 2: train the conditional U-Net on frozen-VAE latents with caption dropout (CFG).

A straight line from config to loop on Hugging Face Accelerate. Settings: [unet] the
network, [diffusion] the schedule, prediction target, min-SNR weighting and p_uncond,
[text] the frozen encoder, [train] steps, batch, LR, EMA, precision, cache switch.

A run directory ends up holding:
    config.json        the resolved config the run started with
    metrics.jsonl      step, loss, lr, images/s
    loss.png           the diffusion loss curve
    samples/           validation-prompt grids (EMA weights) every train.sample_every steps
    checkpoints/       resumable state: U-Net, EMA, optimizer, scheduler, RNG
    model/             the pipeline folder (vae/, unet/ = EMA weights, text_encoder.json, ...)
    early/unet/        EMA weights at `early_fraction` of the budget, when asked for
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from ldmkit.config import Config
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.io import write_json_atomic
from ldmkit.models.text import TextEncoder
from ldmkit.models.unet import UNet
from ldmkit.models.vae import AutoencoderKL
from ldmkit.training.checkpoint import previous_checkpoint, restore_checkpoint, save_checkpoint
from ldmkit.training.common import (
    Budget,
    BudgetBar,
    MetricsLogger,
    RunningMean,
    Throughput,
    make_accelerator,
    make_lr_schedule,
    make_optimizer,
)
from ldmkit.training.latent_cache import CachedBatches, LiveBatches, cached_latents
from ldmkit.training.text_cache import TextEmbeddingCache


def cli_train(args: argparse.Namespace) -> int:
    from ldmkit.cli import config_from_args

    model_dir = train_diffusion(config_from_args(args), Path(args.vae), Path(args.out),
                                resume=args.resume)
    print(f"model saved to {model_dir}  (try: ldmkit sample --model {model_dir} "
          f"--prompt 'a red circle' --out samples)")
    return 0


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)


def ema_decay(step: int, target: float) -> float:
    """Ramp the EMA decay up from 0 so early weights don't freeze the average (as in
    many DDPM codebases: min(target, (1 + step) / (10 + step)))."""
    return min(target, (1.0 + step) / (10.0 + step))


def train_diffusion(cfg: Config, vae_dir: Path, out_dir: Path, resume: bool = False,
                    dataset=None, text: TextEncoder | None = None,
                    early_fraction: float | None = None) -> Path:
    """Train (or resume) the U-Net in `out_dir`; returns the saved pipeline folder.
    `dataset` / `text` let a caller (the demo) reuse ones it already built."""
    from ldmkit.data import build_dataset

    out_dir = Path(out_dir)
    ckpt = previous_checkpoint(out_dir / "checkpoints", resume)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    device = accelerator.device
    torch.manual_seed(cfg.train.seed)
    vae = AutoencoderKL.from_pretrained(vae_dir, device).eval().requires_grad_(False)
    text = text or TextEncoder.from_config(cfg.text, device)
    schedule = NoiseSchedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    dataset = dataset if dataset is not None else build_dataset(cfg.data, "train")

    unet = UNet(cfg.unet, vae.config.latent_channels, text.hidden_size).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    optimizer = make_optimizer(unet.parameters(), cfg.train.lr, cfg.train.weight_decay)
    budget = Budget(cfg.train.steps, cfg.train.minutes,
                    elapsed=ckpt.extra.get("elapsed", 0.0) if ckpt else 0.0)
    scheduler = make_lr_schedule(optimizer, cfg.train.warmup_steps, cfg.train.steps,
                                 progress=budget.progress if cfg.train.minutes else None)
    step = restore_checkpoint(ckpt, {"unet": unet, "ema": ema}, optimizer, scheduler,
                              scaler=accelerator.scaler) if ckpt else 0
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_json(out_dir / "config.json")
    batches = _batches(cfg, vae, Path(vae_dir), text, dataset, out_dir, device, step)
    budget.restart_clock()  # the one-off cache build does not eat the training minutes
    model, optimizer = accelerator.prepare(unet, optimizer)

    run = _Run(cfg, accelerator, model, unet, ema, optimizer, scheduler, schedule, budget,
               text, vae, out_dir, early_fraction)
    step = run.loop(batches, step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(run, step, dataset)
    accelerator.wait_for_everyone()
    return out_dir / "model"


def _batches(cfg: Config, vae: AutoencoderKL, vae_dir: Path, text: TextEncoder, dataset,
             out_dir: Path, device: torch.device, step: int):
    if not cfg.train.use_cache:
        return LiveBatches(dataset, vae, text, cfg.train.batch_size, cfg.train.seed, step,
                           device, cfg.data.num_workers)
    cache_dir = Path(cfg.text.cache_dir) if cfg.text.cache_dir else out_dir / "cache"
    latents, captions = cached_latents(vae, vae_dir, dataset, cache_dir,
                                       cfg.to_dict()["data"], device)
    text_cache = TextEmbeddingCache(cache_dir / "text", text)
    batches = CachedBatches(latents, captions, text_cache, vae.scale_factor,
                            cfg.train.batch_size, device)
    text_cache.save()
    return batches


class _Run:
    """The state of one training run, so the loop and its side jobs stay short."""

    def __init__(self, cfg, accelerator, model, unet, ema, optimizer, scheduler, schedule,
                 budget, text, vae, out_dir, early_fraction):
        self.cfg, self.acc, self.model, self.unet, self.ema = cfg, accelerator, model, unet, ema
        self.optimizer, self.scheduler, self.schedule = optimizer, scheduler, schedule
        self.budget, self.text, self.vae, self.out_dir = budget, text, vae, out_dir
        self.early_fraction = early_fraction
        null = text.null().to(accelerator.device)
        self.null_tokens, self.null_mask = null.tokens.float(), null.mask

    def drop_captions(self, tokens, mask, p_uncond: float):
        """Replace each caption by the null prompt (tokens and its own mask) with
        probability p_uncond, so one network also learns the unconditional score."""
        drop = (torch.rand(tokens.shape[0]) < p_uncond).to(tokens.device)
        tokens = torch.where(drop[:, None, None], self.null_tokens, tokens)
        return tokens, torch.where(drop[:, None], self.null_mask, mask)

    def loss(self, latents, tokens, mask) -> torch.Tensor:
        """Weighted MSE to the eps or v target, with captions dropped at rate p_uncond."""
        d, b = self.cfg.diffusion, latents.shape[0]
        tokens, mask = self.drop_captions(tokens, mask, d.p_uncond)
        t = torch.randint(0, self.schedule.timesteps, (b,)).to(latents.device)
        noise = torch.randn_like(latents)
        x_t = self.schedule.q_sample(latents, t, noise)
        target = self.schedule.training_target(latents, noise, t, d.prediction)
        with self.acc.autocast():
            out = self.model(x_t, t, tokens, mask)
        per_item = (out.float() - target).pow(2).mean(dim=(1, 2, 3))
        weight = self.schedule.loss_weight(t, d.prediction, d.min_snr_gamma)
        return (per_item * weight).mean()

    def train_step(self, batch, step: int) -> torch.Tensor:
        """One optimisation step on `batch` = (latents, tokens, mask): loss, backward,
        clipping, AdamW, LR schedule, EMA. Returns the loss unread (no host sync);
        benchmarks/ times exactly this."""
        loss = self.loss(*batch)
        self.acc.backward(loss)
        if self.cfg.train.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.unet, ema_decay(step, self.cfg.train.ema_decay))
        return loss

    def loop(self, batches, step: int) -> int:
        cfg, acc = self.cfg, self.acc
        main = acc.is_main_process
        logger = MetricsLogger(self.out_dir / "metrics.jsonl", resume_step=step or None) \
            if main else None
        speed, running = Throughput(), RunningMean()
        bar = BudgetBar(self.budget, step, "unet", disable=not main)
        saved_at, early_saved = step, (self.out_dir / "early").exists()
        while True:
            self.budget.sync(acc)  # every process stops at the same step
            if self.budget.done(step):
                break
            loss = self.train_step(batches.next(), step)
            step += 1

            ips = speed.update(cfg.train.batch_size * acc.num_processes)
            if step % cfg.train.log_every == 0 or step == 1:  # .item() syncs: not every step
                value = loss.item()
                bar.set_postfix({"loss": f"{running.update(loss=value)['loss']:.4f}",
                                 "img/s": f"{ips:.0f}"})
                if main:
                    logger.log(step, loss=value, lr=self.scheduler.get_last_lr()[0],
                               images_per_s=ips, elapsed_s=self.budget.elapsed)
            bar.update(step)
            if main and step % cfg.train.sample_every == 0:
                self.validation_grid(step)
            if self.early_fraction and not early_saved and \
                    self.budget.progress(step) >= self.early_fraction:
                if main:
                    self.ema.save_pretrained(self.out_dir / "early" / "unet")
                    write_json_atomic(self.out_dir / "early" / "info.json",
                                      {"step": step, "elapsed_s": self.budget.elapsed})
                early_saved = True
            if step % cfg.train.checkpoint_every == 0:
                self.checkpoint(step)
                saved_at = step
        bar.close()
        if saved_at != step:
            self.checkpoint(step)
        return step

    def checkpoint(self, step: int) -> None:
        if self.acc.is_main_process:
            modules = {"unet": self.unet, "ema": self.ema}
            save_checkpoint(self.out_dir / "checkpoints", step, modules,
                            self.optimizer, self.scheduler, extra={"elapsed": self.budget.elapsed},
                            scaler=self.acc.scaler)
        self.acc.wait_for_everyone()

    def pipeline(self):
        from ldmkit.pipeline import TextToImagePipeline

        return TextToImagePipeline(self.vae, self.ema, self.text, self.schedule,
                                   self.cfg.diffusion.prediction, self.cfg.diffusion.x0_clamp,
                                   self.cfg.data.image_size)

    def validation_grid(self, step: int) -> None:
        """The fixed validation prompts, fixed seeds, EMA weights: comparable across steps."""
        from ldmkit.viz import save_image_grid

        prompts = self.cfg.train.validation_prompts
        if not prompts:
            return
        s, per_prompt = self.cfg.sample, 4
        pipe = self.pipeline()
        images = pipe.decode(pipe.generate_latents(
            [p for p in prompts for _ in range(per_prompt)], None, s.steps, s.guidance,
            s.sampler, torch.Generator().manual_seed(s.seed)))
        captions = [p for p in prompts for _ in range(per_prompt)]
        save_image_grid(images, self.out_dir / "samples" / f"step-{step:07d}.png",
                        nrow=per_prompt, captions=captions)


def _finish(run: _Run, step: int, dataset) -> None:
    from ldmkit.viz import plot_metrics

    run.pipeline().save_pretrained(run.out_dir / "model")
    plot_metrics(run.out_dir / "metrics.jsonl", ["loss"], run.out_dir / "loss.png",
                 f"diffusion loss ({run.cfg.diffusion.prediction}-prediction)")
    if run.cfg.train.validation_prompts:
        run.validation_grid(step)
    skipped = int(getattr(dataset, "skipped", 0))
    write_json_atomic(run.out_dir / "summary.json", {
        "steps": step, "train_seconds": run.budget.elapsed, "skipped_items": skipped})
    print(f"trained {step} steps in {run.budget.elapsed / 60:.2f} min; "
          f"skipped bad data items: {skipped}")
