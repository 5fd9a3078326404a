"""Stage 1: train the KL-VAE, then compute its latent scale factor and show what it learnt.

A straight line from config to loop (on Hugging Face Accelerate, so `accelerate launch`
spreads it over processes). Settings come from two config sections: [vae] holds what is
particular to this stage (architecture, the loss terms, discriminator, EMA, Adam betas,
steps, batch_size, lr, warmup_steps, minutes; one update is training/vae_step.py), [train]
what every trainer shares (mixed_precision, grad_clip, weight_decay, log_every,
checkpoint_every, seed).

A run directory ends up holding:
    config.json          the resolved config the run started with
    metrics.jsonl        step, losses, lr, images/s
    recon.png, kl.png    loss curves
    losses.png           the extra loss terms, when any is on (SSIM, FFL, blur, GAN)
    reconstructions.png  held-out originals (upper rows) above their reconstructions
    samples.png          decoded random latents
    summary.json         held-out PSNR / SSIM / colour error, scale factor, time, skipped
    checkpoints/         resumable state (see training/checkpoint.py): VAE, EMA, discriminator
                         and both optimisers
    model/               the trained VAE (the EMA weights when vae.ema_decay is set):
                         config.json (with scale_factor) + model.safetensors
    .lock                held while a run writes here (a second run is refused)

Under several processes each reads its own slice of the data stream and draws its own
posterior samples (training/distributed.py); only the main process writes.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ldmkit.config import Config
from ldmkit.errors import UserError
from ldmkit.io import write_json_atomic
from ldmkit.models.vae import AutoencoderKL
from ldmkit.training.checkpoint import (
    previous_checkpoint,
    restore_checkpoint,
    rng_states_of_every_rank,
    save_checkpoint,
)
from ldmkit.training.common import (
    Budget,
    BudgetBar,
    MetricsLogger,
    RunningMean,
    Throughput,
    infinite_loader,
    make_accelerator,
)
from ldmkit.training.distributed import is_main_process, run_folder_lock, split_random_streams
from ldmkit.training.trackers import Trackers, accelerator_kwargs, grad_norm_value
from ldmkit.training.vae_step import VAEStep

GRID_IMAGES = 8  # held-out images shown in the reconstruction grid
SCALE_SAMPLE = 512  # training images encoded to estimate the latent std


@dataclass
class VAERun:
    """What `train_vae` produced: the model folder and how good the VAE is."""

    model_dir: Path
    steps: int
    train_seconds: float
    psnr: float  # held-out, dB
    ssim: float
    scale_factor: float
    color_error: float  # held-out mean CIEDE2000
    skipped_items: int


def cli_train_vae(args: argparse.Namespace) -> int:
    cfg, init_from = args.cfg, getattr(args, "init_from", None)
    if init_from:
        from ldmkit.training.init_from import vae_fine_tune_config

        cfg = vae_fine_tune_config(cfg, init_from)
    run = train_vae(cfg, Path(args.out), resume=args.resume, init_from=init_from)
    if is_main_process():
        print(f"VAE saved to {run.model_dir}")
    return 0


def train_vae(cfg: Config, out_dir: Path, resume: bool = False, dataset=None,
              init_from: str | Path | None = None) -> VAERun:
    """Train (or resume) a VAE run in `out_dir` and save the model folder there.
    `dataset` lets a caller (the demo) pass a training set it already built. `init_from`
    (a VAE or model folder) starts from its weights: a fine-tune (training/init_from.py;
    with vae.freeze_encoder only the decoder trains)."""
    if cfg.vae.freeze_encoder and not init_from:
        raise UserError("vae.freeze_encoder keeps a trained encoder: give --init-from DIR")
    out_dir = Path(out_dir)
    accelerator = make_accelerator(cfg.train.mixed_precision,
                                   **accelerator_kwargs(cfg.train.report_to, out_dir))
    with run_folder_lock(accelerator, out_dir):
        return _train(cfg, accelerator, out_dir, resume, dataset, init_from)


def _train(cfg: Config, accelerator, out_dir: Path, resume: bool, dataset,
           init_from: str | Path | None = None) -> VAERun:
    from ldmkit.data import build_dataset, build_vae_dataset

    ckpt = previous_checkpoint(out_dir / "checkpoints", resume)
    torch.manual_seed(cfg.train.seed)  # the weights' init; RNG state comes back on resume
    train_set = dataset if dataset is not None else build_vae_dataset(cfg)
    val_set = build_dataset(cfg.data, "val")

    vae = AutoencoderKL(cfg.vae, image_size=cfg.data.image_size)
    if init_from:
        from ldmkit.training.init_from import init_vae

        init_vae(vae, init_from, cfg.vae.freeze_encoder)
    budget = Budget(cfg.vae.steps, cfg.vae.minutes,
                    elapsed=ckpt.extra.get("elapsed", 0.0) if ckpt else 0.0)
    update = VAEStep(vae, cfg, progress=budget.progress if cfg.vae.minutes else None)
    split_random_streams(cfg.train.seed, accelerator.process_index)  # after the shared init
    step = restore_checkpoint(ckpt, update.modules(), update.optimizer, update.scheduler,
                              scaler=accelerator.scaler, rank=accelerator.process_index,
                              world_size=accelerator.num_processes,
                              states=update.states()) if ckpt else 0
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_json(out_dir / "config.json")
        if ckpt:
            print(f"resuming {out_dir} from step {step}")
    update.prepare(accelerator)
    trackers = Trackers(accelerator, cfg, out_dir, "vae", step)

    step = _train_loop(cfg, accelerator, update, budget, train_set, out_dir, step,
                       _Watch(trackers, val_set))
    train_seconds = budget.elapsed
    accelerator.wait_for_everyone()
    # prepare() wrapped forward in autocast; measure and save the plain float32 model
    vae = update.ema if update.ema is not None else \
        accelerator.unwrap_model(update.model, keep_fp32_wrapper=False)
    result = _finish(cfg, vae.eval(), train_set, val_set, out_dir, accelerator.device, step,
                     train_seconds, write=accelerator.is_main_process)
    if accelerator.is_main_process and trackers.names and step % cfg.train.sample_every:
        trackers.image(step, "reconstructions",  # the last step, unless the loop logged it
                       reconstruction_grid(vae, val_set, accelerator.device))
    trackers.close()
    accelerator.wait_for_everyone()
    return result


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Watch:
    """What the trackers see during the loop: the numbers, and every train.sample_every
    updates the held-out reconstructions (only when a tracker is on)."""

    trackers: Trackers
    val_set: object


def _train_loop(cfg: Config, accelerator, update: VAEStep, budget: Budget, train_set,
                out_dir: Path, step: int, watch: _Watch) -> int:
    main = accelerator.is_main_process
    batches = infinite_loader(train_set, cfg.vae.batch_size, seed=cfg.train.seed,
                              start_step=step, num_workers=cfg.data.num_workers,
                              rank=accelerator.process_index,
                              world_size=accelerator.num_processes)
    logger = MetricsLogger(out_dir / "metrics.jsonl", resume_step=step or None) if main else None
    images_per_step = cfg.vae.batch_size * accelerator.num_processes
    speed, running = Throughput(), RunningMean()
    bar = BudgetBar(budget, step, "vae", disable=not main)
    saved_at = step
    while not budget.done(step):
        images = next(batches)[0].to(accelerator.device, non_blocking=True)
        losses = update(images, step)
        budget.sync(accelerator)  # before the time-driven LR and the stop test
        update.scheduler.step()
        step += 1

        ips = speed.update(images_per_step)
        bar.update(step)
        if step % cfg.train.log_every == 0 or step == 1:
            # reading a loss waits for the device: only when it is shown and logged, in one
            # copy, so a GPU is not drained every step (as in the U-Net's loop)
            values = dict(zip(losses, torch.stack(list(losses.values())).float().tolist()))
            shown = running.update(**values)
            bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()} | {"img/s": f"{ips:.1f}"})
            logged = {**values, "lr": update.scheduler.get_last_lr()[0],
                      "images_per_s": ips, **grad_norm_value(update.grad_norm)}
            if main:
                logger.log(step, **logged, elapsed_s=budget.elapsed)
                watch.trackers.scalars(step, logged)
        if main and watch.trackers.names and step % cfg.train.sample_every == 0:
            model = update.ema if update.ema is not None else update.vae
            watch.trackers.image(step, "reconstructions",
                                 reconstruction_grid(model, watch.val_set, accelerator.device))
        if step % cfg.train.checkpoint_every == 0:
            _checkpoint(accelerator, out_dir, step, update, budget)
            saved_at = step
    bar.close()
    if saved_at != step:  # the final state, whether steps or minutes ran out
        _checkpoint(accelerator, out_dir, step, update, budget)
    return step


def _checkpoint(accelerator, out_dir: Path, step: int, update: VAEStep,
                budget: Budget) -> None:
    rng_ranks = rng_states_of_every_rank(accelerator)  # every process takes part
    if accelerator.is_main_process:
        save_checkpoint(out_dir / "checkpoints", step, update.modules(), update.optimizer,
                        update.scheduler, extra={"elapsed": budget.elapsed},
                        scaler=accelerator.scaler, rng_ranks=rng_ranks,
                        states=update.states())
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- after training


@torch.no_grad()
def latent_scale_factor(vae: AutoencoderKL, dataset, n: int = SCALE_SAMPLE,
                        batch_size: int = 64, device: torch.device | str = "cpu") -> float:
    """1 / std of posterior samples over the first n items, so scaled latents have unit
    variance (LDM's rescaling; the diffusion schedule assumes data of about that scale)."""
    gen = torch.Generator(device=device).manual_seed(0)
    latents = []
    for start in range(0, min(n, len(dataset)), batch_size):
        stop = min(start + batch_size, n, len(dataset))
        x = torch.stack([dataset[i][0] for i in range(start, stop)]).to(device)
        latents.append(vae.encode(x).sample(gen).float().cpu())
    return float(1.0 / torch.cat(latents).std())


def _finish(cfg: Config, vae: AutoencoderKL, train_set, val_set, out_dir: Path, device,
            step: int, train_seconds: float, write: bool) -> VAERun:
    """Scale factor and held-out quality on every process (each returns the result);
    only the writing process saves the model, plots and summary."""
    from ldmkit.evaluation.vae_metrics import evaluate_vae

    scale = cfg.vae.scale_factor or latent_scale_factor(vae, train_set, device=device)
    vae.config = dataclasses.replace(vae.config, scale_factor=scale)
    quality = evaluate_vae(vae, val_set, n=len(val_set))
    skipped = int(getattr(train_set, "skipped", 0)) + int(getattr(val_set, "skipped", 0))
    result = VAERun(out_dir / "model", step, round(train_seconds, 1), quality["psnr"],
                    quality["ssim"], scale, quality["color_error"], skipped)
    if write:
        vae.save_pretrained(result.model_dir, image_size=cfg.data.image_size)
        _figures(cfg, vae, val_set, out_dir, device)
        write_json_atomic(out_dir / "summary.json", {**quality, **_summary(result)})
        print(f"step {step}: held-out PSNR {quality['psnr']:.2f} dB, SSIM "
              f"{quality['ssim']:.4f}, colour error (CIEDE2000) {quality['color_error']:.2f} "
              f"({quality['n']} images); latent scale factor "
              f"{scale:.4f}; training {train_seconds / 60:.2f} min; skipped bad data items: "
              f"{skipped}")
    return result


@torch.no_grad()
def reconstruction_grid(vae: AutoencoderKL, val_set, device):
    """Held-out originals (upper row) above their reconstructions (the posterior's mean),
    as one PIL image."""
    from ldmkit.viz import image_grid

    originals = torch.stack([val_set[i][0] for i in range(min(GRID_IMAGES, len(val_set)))])
    was_training = vae.training
    recon = vae.eval()(originals.to(device), sample_posterior=False)[0].float().cpu()
    vae.train(was_training)
    return image_grid(torch.cat([originals, recon]), nrow=len(originals))


def _summary(run: VAERun) -> dict:
    return {"scale_factor": run.scale_factor, "steps": run.steps,
            "train_seconds": run.train_seconds, "skipped_items": run.skipped_items}


@torch.no_grad()
def _figures(cfg: Config, vae: AutoencoderKL, val_set, out_dir: Path, device) -> None:
    """Loss curves, held-out reconstructions and decoded random latents."""
    from ldmkit.viz import plot_metrics, read_metrics, save_image, save_image_grid

    metrics = out_dir / "metrics.jsonl"
    plot_metrics(metrics, ["recon"], out_dir / "recon.png",
                 f"reconstruction loss ({cfg.vae.recon_loss})")
    plot_metrics(metrics, ["kl"], out_dir / "kl.png", "KL per image element")
    logged = set().union(*(row.keys() for row in read_metrics(metrics)))
    extra = [k for k in ("ssim", "ffl", "blur", "g_loss", "d_loss", "d_weight") if k in logged]
    if extra:  # the terms that were on (the GAN's only once it started)
        plot_metrics(metrics, extra, out_dir / "losses.png", "extra loss terms")
    save_image(reconstruction_grid(vae, val_set, device), out_dir / "reconstructions.png")
    z = torch.randn(16, cfg.vae.latent_channels, *vae.latent_size(cfg.data.image_size),
                    generator=torch.Generator().manual_seed(cfg.train.seed))
    save_image_grid(vae.decode_latents(z.to(device)).cpu(), out_dir / "samples.png", nrow=8)
