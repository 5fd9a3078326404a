"""Stage 2: train the conditional U-Net on frozen-VAE latents with caption dropout (CFG).

A straight line from config to loop on Hugging Face Accelerate; the update itself is
`DiffusionStep` (training/diffusion_step.py). Settings: [unet] the network, [diffusion]
the schedule, prediction target, min-SNR weighting and p_uncond, [text] the frozen
encoder, [train] steps, batch, gradient accumulation, LR, EMA, precision, cache switch.

Under `torchrun` / `accelerate launch` every process builds the same initial weights
(seeded with train.seed), then draws from a stream of its own (training/distributed.py);
one update sees train.batch_size x train.grad_accum_steps x processes images. Only the
main process writes into the run folder, which it locks for the run.

A run directory ends up holding:
    config.json        the resolved config the run started with
    metrics.jsonl      step, loss, lr, images/s
    loss.png           the diffusion loss curve
    samples/           validation-prompt grids (EMA weights) every train.sample_every steps
    checkpoints/       resumable state: U-Net, EMA, optimizer, scheduler, RNG
    model/             the pipeline folder (vae/, unet/ = EMA weights, text_encoder.json, ...)
    summary.json       steps, seconds, skipped data items, world size, images seen
    .lock              held while a run writes here (a second run is refused)
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmkit.config import Config
from ldmkit.errors import UserError
from ldmkit.io import write_json_atomic
from ldmkit.models.denoiser import FolderModel, build_denoiser
from ldmkit.models.text import TextEncoder
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
    make_accelerator,
)
from ldmkit.training.diffusion_step import DiffusionStep
from ldmkit.training.distributed import is_main_process, run_folder_lock, split_random_streams
from ldmkit.training.latent_cache import training_batches
from ldmkit.training.trackers import Trackers, accelerator_kwargs, grad_norm_value


def cli_train(args: argparse.Namespace) -> int:
    from ldmkit.training.init_from import fine_tune_config

    init_from = Path(args.init_from) if args.init_from else None
    cfg = args.cfg
    if init_from is not None:  # the model's own config, or the given one checked against it
        cfg = fine_tune_config(None if args.config is None else cfg, init_from, args.overrides)
    elif args.config is None:
        raise UserError("ldmkit train: --config FILE is required (or --init-from MODEL_DIR)")
    vae = args.vae or (init_from / "vae" if init_from else None)
    if vae is None:
        raise UserError("ldmkit train: --vae VAE_DIR is required (or --init-from MODEL_DIR, "
                        "whose vae/ is then used)")
    run = train_diffusion(cfg, Path(vae), Path(args.out), resume=args.resume,
                          init_from=init_from)
    if is_main_process():
        print(f"model saved to {run.model_dir}  (try: ldmkit sample --model {run.model_dir} "
              f"--prompt 'a red circle' --out samples)")
        if run.adapter_dir is not None:  # an adapter trained on another decoder needs it
            with_vae = "" if args.vae is None else f" --vae {args.vae}"
            print(f"LoRA adapter saved to {run.adapter_dir}  (ldmkit sample --model "
                  f"{init_from}{with_vae} --lora {run.adapter_dir} ...)")
    return 0


@dataclass
class Snapshot:
    """EMA weights taken part-way through a run, kept in memory (a CPU copy)."""

    fraction: float  # of the budget, as asked for
    step: int
    elapsed_s: float
    unet: FolderModel


@dataclass
class DiffusionRun:
    """What `train_diffusion` produced."""

    model_dir: Path
    steps: int
    train_seconds: float
    skipped_items: int
    snapshots: list[Snapshot] = field(default_factory=list)
    world_size: int = 1  # processes that trained together
    images_seen: int = 0  # steps x batch_size x grad_accum_steps x world_size
    adapter_dir: Path | None = None  # a LoRA run's adapter folder


def train_diffusion(cfg: Config, vae_dir: Path, out_dir: Path, resume: bool = False,
                    dataset=None, text: TextEncoder | None = None,
                    snapshot_at: tuple[float, ...] = (),
                    init_from: Path | None = None) -> DiffusionRun:
    """Train (or resume) the U-Net in `out_dir` and save the pipeline folder there.
    `dataset` / `text` let a caller (the demo) reuse ones it already built; `snapshot_at`
    lists fractions of the budget at which to keep a copy of the EMA weights.
    `init_from`: a model folder to fine-tune (its denoiser's weights; with [lora] rank > 0
    an adapter on them, saved as out_dir/lora beside the merged model)."""
    if cfg.lora.rank and init_from is None:
        raise UserError(f"lora.rank = {cfg.lora.rank} trains an adapter on a trained model: "
                        "give --init-from MODEL_DIR")
    out_dir = Path(out_dir)
    accelerator = make_accelerator(cfg.train.mixed_precision,
                                   **accelerator_kwargs(cfg.train.report_to, out_dir))
    with run_folder_lock(accelerator, out_dir):
        return _train(cfg, accelerator, Path(vae_dir), out_dir, resume, dataset, text,
                      snapshot_at, init_from)


def _train(cfg: Config, accelerator, vae_dir: Path, out_dir: Path, resume: bool, dataset,
           text: TextEncoder | None, snapshot_at: tuple[float, ...],
           init_from: Path | None = None) -> DiffusionRun:
    from ldmkit.data import build_dataset

    ckpt = previous_checkpoint(out_dir / "checkpoints", resume)
    device = accelerator.device
    torch.manual_seed(cfg.train.seed)  # the same initial weights in every process
    vae = AutoencoderKL.from_pretrained(vae_dir, device).eval().requires_grad_(False)
    text = text or TextEncoder.from_config(cfg.text, device)
    dataset = dataset if dataset is not None else build_dataset(cfg.data, "train")

    unet = build_denoiser(cfg.unet, vae.config.latent_channels, text.hidden_size)
    if init_from is not None:
        from ldmkit.training.init_from import start_from_model

        start_from_model(unet, cfg, init_from, vae.config.latent_channels)
    unet = unet.to(device)
    budget = Budget(cfg.train.steps, cfg.train.minutes,
                    elapsed=ckpt.extra.get("elapsed", 0.0) if ckpt else 0.0)
    trainer = DiffusionStep(unet, cfg, text.null(), accelerator,
                            progress=budget.progress if cfg.train.minutes else None)
    split_random_streams(cfg.train.seed, accelerator.process_index)
    if ckpt:
        trainer.step = restore_checkpoint(ckpt, {"unet": unet, "ema": trainer.ema},
                                          trainer.optimizer, trainer.scheduler,
                                          scaler=accelerator.scaler,
                                          rank=accelerator.process_index,
                                          world_size=accelerator.num_processes)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_json(out_dir / "config.json")
    batches = training_batches(cfg, vae, vae_dir, text, dataset, out_dir, device,
                               trainer.step, accelerator)
    budget.restart_clock()  # the one-off cache build does not eat the training minutes

    run = _Run(cfg, accelerator, trainer, budget, text, vae, out_dir, init_from)
    snapshots = run.loop(batches, snapshot_at)
    accelerator.wait_for_everyone()
    world = accelerator.num_processes
    result = DiffusionRun(out_dir / "model", trainer.step, budget.elapsed,
                          int(getattr(dataset, "skipped", 0)), snapshots, world,
                          trainer.step * _images_per_update(cfg, world),
                          out_dir / "lora" if cfg.lora.rank else None)
    if accelerator.is_main_process:
        run.finish(result)
    run.trackers.close()
    accelerator.wait_for_everyone()
    return result


def _images_per_update(cfg: Config, world_size: int) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum_steps * world_size


class _Run:
    """One training run's side jobs around the step: logging, checkpoints, validation
    grids, snapshots, the final save. Built only by `train_diffusion`."""

    def __init__(self, cfg: Config, accelerator, trainer: DiffusionStep, budget: Budget,
                 text: TextEncoder, vae: AutoencoderKL, out_dir: Path,
                 init_from: Path | None = None):
        self.cfg, self.acc, self.trainer, self.budget = cfg, accelerator, trainer, budget
        self.text, self.vae, self.out_dir, self.init_from = text, vae, out_dir, init_from
        self.trackers = Trackers(accelerator, cfg, out_dir, "unet", trainer.step)

    def loop(self, batches, snapshot_at: tuple[float, ...]) -> list[Snapshot]:
        cfg, acc, trainer = self.cfg, self.acc, self.trainer
        main = acc.is_main_process
        step = trainer.step
        logger = MetricsLogger(self.out_dir / "metrics.jsonl", resume_step=step or None) \
            if main else None
        speed, running = Throughput(), RunningMean()
        bar = BudgetBar(self.budget, step, "unet", disable=not main)
        # a resumed run does not retake the snapshots it had already passed
        pending = sorted(f for f in snapshot_at if self.budget.progress(step) < f)
        snapshots, saved_at = [], step
        while True:
            self.budget.sync(acc)  # every process stops at the same step
            if self.budget.done(step):
                break
            loss = trainer(*batches.next())
            step = trainer.step

            ips = speed.update(_images_per_update(cfg, acc.num_processes))
            if step % cfg.train.log_every == 0 or step == 1:  # .item() syncs: not every step
                value = loss.item()
                bar.set_postfix({"loss": f"{running.update(loss=value)['loss']:.4f}",
                                 "img/s": f"{ips:.0f}"})
                logged = {"loss": value, "lr": trainer.scheduler.get_last_lr()[0],
                          "images_per_s": ips, **grad_norm_value(trainer.grad_norm)}
                if main:
                    logger.log(step, **logged, elapsed_s=self.budget.elapsed)
                    self.trackers.scalars(step, logged)
            bar.update(step)
            if main and step % cfg.train.sample_every == 0:
                self.validation_grid(step)
            while pending and self.budget.progress(step) >= pending[0]:
                snapshots.append(Snapshot(pending.pop(0), step, self.budget.elapsed,
                                          copy.deepcopy(trainer.ema).cpu()))
            if step % cfg.train.checkpoint_every == 0:
                self.checkpoint(step)
                saved_at = step
        bar.close()
        if saved_at != step:
            self.checkpoint(step)
        return snapshots

    def checkpoint(self, step: int) -> None:
        rng_ranks = rng_states_of_every_rank(self.acc)  # every process takes part
        if self.acc.is_main_process:
            t = self.trainer
            save_checkpoint(self.out_dir / "checkpoints", step, {"unet": t.unet, "ema": t.ema},
                            t.optimizer, t.scheduler, extra={"elapsed": self.budget.elapsed},
                            scaler=self.acc.scaler, rng_ranks=rng_ranks)
        self.acc.wait_for_everyone()

    def pipeline(self):
        from ldmkit.pipeline import TextToImagePipeline

        d = self.cfg.diffusion
        return TextToImagePipeline(self.vae, self.trainer.ema, self.text, self.trainer.schedule,
                                   d.objective, d.x0_clamp, self.cfg.data.image_size)

    def validation_grid(self, step: int) -> None:
        """The fixed validation prompts, fixed seeds, EMA weights: comparable across steps."""
        from ldmkit.viz import save_image_grid

        prompts = self.cfg.train.validation_prompts
        if not prompts:
            return
        s = self.cfg.sample
        pipe = self.pipeline()
        captions = [p for p in prompts for _ in range(s.n)]
        images = pipe.decode(pipe.generate_latents(
            captions, None, s.steps, s.guidance, s.sampler,
            torch.Generator().manual_seed(s.seed), eta=s.eta,
            guidance_rescale=s.guidance_rescale))
        path = self.out_dir / "samples" / f"step-{step:07d}.png"
        save_image_grid(images, path, nrow=s.n, captions=captions)
        if self.trackers.names:  # the very picture written to samples/
            from PIL import Image

            with Image.open(path) as grid:
                self.trackers.image(step, "samples", grid.convert("RGB"))

    def finish(self, result: DiffusionRun) -> None:
        from ldmkit.viz import plot_metrics

        pipe = self.pipeline()
        if result.adapter_dir is not None:  # the adapter, and the model with it merged in
            from ldmkit.models.lora import merged_copy, save_lora

            save_lora(self.trainer.ema, result.adapter_dir, {"model": str(self.init_from)})
            pipe = pipe.with_unet(merged_copy(self.trainer.ema))
        pipe.save_pretrained(result.model_dir)
        plot_metrics(self.out_dir / "metrics.jsonl", ["loss"], self.out_dir / "loss.png",
                     f"diffusion loss ({self.cfg.diffusion.objective}-prediction)")
        if self.cfg.train.validation_prompts and result.steps % self.cfg.train.sample_every:
            self.validation_grid(result.steps)  # the last step, unless the loop drew it
        t = self.cfg.train
        write_json_atomic(self.out_dir / "summary.json", {
            "steps": result.steps, "train_seconds": result.train_seconds,
            "skipped_items": result.skipped_items, "world_size": result.world_size,
            "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps,
            "images_seen": result.images_seen})
        print(f"trained {result.steps} steps in {result.train_seconds / 60:.2f} min; "
              f"skipped bad data items: {result.skipped_items}")
