"""The stage-2 training step as a public object: what `train_diffusion` loops over and what
benchmarks/bench_train.py times.

    step = DiffusionStep(unet, cfg, null=text.null())    # plain PyTorch, cfg's precision
    loss = step(latents, text_embeddings)                  # one optimiser update
    # the same in two halves: the gradients, then the update
    loss = step.backward(latents, text_embeddings); step.apply()

An update's randomness (dropped captions, timesteps, noise) is drawn for the whole batch
at once (`draw`), then the batch runs as train.grad_accum_steps micro-batches whose
gradients add up, so k micro-batches of B give the update one batch of kB would give.

Inside `train_diffusion` the step gets the run's Accelerator, which then owns mixed
precision, gradient sync (once per update, on the last micro-batch) and loss scaling.
Without one it runs plain PyTorch with bf16 autocast when asked: that lets a benchmark
alternate precisions in one process, which Accelerate's process-wide state does not allow.

train.compile puts the U-Net's forward (the Accelerator's wrapper, if any) under
torch.compile; "reduce-overhead" also replays it as CUDA graphs on a GPU, where a small
U-Net's step is otherwise bound by Python and kernel launches. Nothing in the step reads a
value back to the host, and the draws made on the CPU go to the device without waiting for
it (benchmarks/gpu_check.py checks the step with CUDA's sync debug mode).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ldmkit.config import Config, DiffusionConfig
from ldmkit.diffusion.objective import Schedule, make_schedule
from ldmkit.models.text import TextEmbeddings
from ldmkit.training.common import make_lr_schedule, make_optimizer, resolve_mixed_precision


def drop_captions(text: TextEmbeddings, null: TextEmbeddings, p_uncond: float,
                  drop: torch.Tensor | None = None) -> TextEmbeddings:
    """Replace each caption by the null prompt (its tokens and its own mask) with
    probability p_uncond, so one network also learns the unconditional score (CFG).
    `drop` (bool per caption) replaces the draw."""
    if drop is None:
        drop = torch.rand(len(text)) < p_uncond
    return text.where(~drop.to(text.tokens.device, non_blocking=True), null)


def diffusion_loss(model: nn.Module, schedule: Schedule, latents: torch.Tensor,
                   text: TextEmbeddings, cfg: DiffusionConfig,
                   autocast: Callable[[], AbstractContextManager],
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Weighted MSE to the objective's target (eps, v or the flow's velocity) at timesteps
    drawn by the schedule (or the given `t` and `noise`). `text` is used as given: caption
    dropout happens before."""
    if t is None:
        t = schedule.draw_timesteps(latents.shape[0]).to(latents.device, non_blocking=True)
    if noise is None:
        noise = torch.randn_like(latents)
    x_t = schedule.q_sample(latents, t, noise)
    target = schedule.training_target(latents, noise, t, cfg.objective)
    with autocast():
        out = model(x_t, t, text.tokens, text.mask)
    per_item = (out.float() - target).pow(2).mean(dim=(1, 2, 3))
    return (per_item * schedule.loss_weight(t, cfg.objective, cfg.min_snr_gamma)).mean()


@dataclass
class Draws:
    """An update's randomness, one row per batch item: which captions are dropped, the
    timesteps, the noise. Drawn in the order one plain step always drew them."""

    drop: torch.Tensor  # bool (B,), on the CPU
    t: torch.Tensor  # (B,) on the latents' device: long DDPM steps or float flow times
    noise: torch.Tensor  # like the latents

    @staticmethod
    def draw(latents: torch.Tensor, p_uncond: float, schedule: Schedule) -> Draws:
        n = latents.shape[0]
        drop = torch.rand(n) < p_uncond
        # drawn on the CPU (the same draws on any device); the copy does not wait for it
        t = schedule.draw_timesteps(n).to(latents.device, non_blocking=True)
        return Draws(drop, t, torch.randn_like(latents))

    @staticmethod
    def cat(parts: list[Draws]) -> Draws:
        return Draws(*(torch.cat([getattr(p, k) for p in parts]) for k in ("drop", "t", "noise")))


def micro_batches(latents: torch.Tensor, text: TextEmbeddings, draws: Draws, k: int
                  ) -> Iterator[tuple[torch.Tensor, TextEmbeddings, Draws]]:
    """The batch cut into k nearly equal consecutive parts (fewer if it has fewer rows)."""
    n = latents.shape[0]
    bounds = [round(i * n / k) for i in range(k + 1)]
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            yield latents[a:b], text[a:b], Draws(draws.drop[a:b], draws.t[a:b],
                                                 draws.noise[a:b])


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)


def compile_unet(model: nn.Module, mode: str, backend: str | Callable = "inductor"
                 ) -> nn.Module:
    """`model` under torch.compile in train.compile's `mode`, or `model` itself for "off".
    Static shapes (dynamic=False): a training batch keeps its shape, and a new one (say a
    shorter last micro-batch) compiles once more. backend="eager" only traces (TorchDynamo,
    no generated code): for tests and gpu_check's CPU dry run, where inductor's C++ build
    of even a tiny U-Net takes minutes."""
    if mode == "off":
        return model
    if backend != "inductor":  # other backends take no mode
        return torch.compile(model, backend=backend, dynamic=False)
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def ema_decay(step: int, target: float) -> float:
    """Ramp the EMA decay up from 0 so early weights don't freeze the average (as in
    many DDPM codebases: min(target, (1 + step) / (10 + step)))."""
    return min(target, (1.0 + step) / (10.0 + step))


class DiffusionStep:
    """Owns what one update touches: the U-Net, its EMA copy, AdamW, the LR schedule and
    the noise schedule. `progress(step) -> [0, 1]` drives the LR's cosine when a run is
    bounded by minutes (see `Budget.progress`); by default it follows cfg.train.steps.
    `compile_backend` is torch.compile's backend when cfg.train.compile is on."""

    def __init__(self, unet: nn.Module, cfg: Config, null: TextEmbeddings, accelerator=None,
                 progress: Callable[[int], float] | None = None,
                 compile_backend: str | Callable = "inductor"):
        t = cfg.train
        self.cfg, self.unet, self.accelerator = cfg, unet, accelerator
        self.ema = copy.deepcopy(unet).requires_grad_(False).eval()
        self.schedule = make_schedule(cfg.diffusion)
        self.optimizer = make_optimizer(unet.parameters(), t.lr, t.weight_decay)
        self.scheduler = make_lr_schedule(self.optimizer, t.warmup_steps, t.steps, progress)
        self.model = unet  # what forward runs: the Accelerator's wrapper when there is one
        if accelerator is not None:
            self.model, self.optimizer = accelerator.prepare(unet, self.optimizer)
        self.model = compile_unet(self.model, t.compile, compile_backend)
        self._cuda_graphs = t.compile == "reduce-overhead"
        self.null = null.to(next(unet.parameters()).device)
        self.step = 0  # optimiser updates done (set by the trainer on resume)
        self.grad_norm: torch.Tensor | None = None  # the last update's, when clipping is on
        self._bf16 = accelerator is None and _plain_bf16(t.mixed_precision)

    def autocast(self) -> AbstractContextManager:
        if self.accelerator is not None:
            return self.accelerator.autocast()
        device = next(self.unet.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self._bf16)

    def __call__(self, latents: torch.Tensor, text: TextEmbeddings,
                 draws: Draws | None = None) -> torch.Tensor:
        """One update: caption dropout, loss, backward, clipping, AdamW, LR schedule, EMA.
        Returns the loss unread, so the step never waits for the device (no host sync)."""
        loss = self.backward(latents, text, draws)
        self.apply()
        return loss

    def draw(self, latents: torch.Tensor) -> Draws:
        d = self.cfg.diffusion
        return Draws.draw(latents, d.p_uncond, self.schedule)

    def backward(self, latents: torch.Tensor, text: TextEmbeddings,
                 draws: Draws | None = None) -> torch.Tensor:
        """The update's gradients into `.grad` (averaged over processes under DDP): the
        batch's loss, as train.grad_accum_steps micro-batches, each weighted by its share
        of the rows. Returns the batch's mean loss (unread)."""
        d, k = self.cfg.diffusion, self.cfg.train.grad_accum_steps
        draws = draws if draws is not None else self.draw(latents)
        parts = list(micro_batches(latents, text, draws, k))
        total = torch.zeros((), device=latents.device)
        for i, (lat, txt, dr) in enumerate(parts):
            with self._no_sync(last=i == len(parts) - 1):
                if self._cuda_graphs:  # a new forward: the graphs' last outputs are spent
                    torch.compiler.cudagraph_mark_step_begin()
                txt = drop_captions(txt, self.null, d.p_uncond, dr.drop)
                loss = diffusion_loss(self.model, self.schedule, lat, txt, d, self.autocast,
                                      dr.t, dr.noise)
                if len(parts) > 1:
                    loss = loss * (lat.shape[0] / latents.shape[0])
                self._backward(loss)
            total = total + loss.detach()
        return total

    def apply(self) -> None:
        """Clip, AdamW, LR schedule, EMA, on the gradients `backward` left."""
        t = self.cfg.train
        if t.grad_clip:
            self._clip(t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.unet, ema_decay(self.step, t.ema_decay))
        self.step += 1

    def _no_sync(self, last: bool) -> AbstractContextManager:
        """Gradients are all-reduced once per update, on its last micro-batch."""
        if last or self.accelerator is None:
            return nullcontext()
        return self.accelerator.no_sync(self.model)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _clip(self, max_norm: float) -> None:
        """Clip, keeping the norm before clipping (unread: the trackers read it when they
        log, so the step still never waits for the device)."""
        if self.accelerator is not None:
            self.grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)


def _plain_bf16(mixed_precision: str) -> bool:
    """Precision without an Accelerator: bf16 autocast or none. fp16 needs the loss
    scaling an Accelerator brings."""
    mode = resolve_mixed_precision(mixed_precision)
    if mode == "fp16":
        raise ValueError("train.mixed_precision = 'fp16' needs an Accelerator (loss scaling); "
                         "use 'bf16' or 'no' for a plain DiffusionStep")
    return mode == "bf16"
