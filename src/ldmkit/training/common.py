"""What every trainer shares: the Accelerator, AdamW with warmup + cosine decay, a stop
rule (steps or wall-clock minutes, whichever first), a resumable deterministic batch
stream, a metrics.jsonl logger and an images/s meter."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldmkit.training.distributed import rank_seed

# ----------------------------------------------------------------------------- accelerator


def resolve_mixed_precision(mode: str) -> str:
    """"auto" -> bf16 on CPU and bf16-capable GPUs, fp16 (with loss scaling) on other GPUs."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def make_accelerator(mixed_precision: str = "auto", **kwargs: Any):
    """An `accelerate.Accelerator` for this stage (also under `accelerate launch`).

    Accelerate keeps one global state per process and refuses a second Accelerator with a
    different precision; each ldmkit stage picks its own, so the per-stage part of that
    state is reset (the process group, kept in PartialState, survives). Accelerate 1.15
    has no public way to do this: its maintainers point users to the private
    `_reset_state` (skorch PR #873), and transformers' TrainingArguments calls it too.
    This is the one place ldmkit touches it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    kwargs.setdefault("cpu", _launched_without_gpus())
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), **kwargs)


def _launched_without_gpus() -> bool:
    """Under `torchrun` (or any launcher that sets WORLD_SIZE) on a machine without CUDA,
    Accelerate only joins the processes into one multi-CPU (gloo) run when told `cpu=True`;
    left alone it starts N independent runs that write into the same folder."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float,
                   weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where this torch supports it, else the foreach path."""
    params = [p for p in params if p.requires_grad]
    kwargs = {"lr": lr, "weight_decay": weight_decay, "betas": betas}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # device or dtype without a fused kernel
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def warmup_cosine(step: int, warmup_steps: int, progress: float) -> float:
    """LR multiplier: linear warmup over `warmup_steps`, then cosine from 1 to 0 as
    `progress` (fraction of the run done) goes from 0 to 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def make_lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                     progress: Callable[[int], float] | None = None
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup + cosine decay over `total_steps`. Pass `progress` (e.g.
    `Budget.progress`) to decay over a wall-clock budget instead, so a run cut short by
    `minutes` still ends at a low LR rather than mid-plateau."""
    def fraction(step: int) -> float:
        if progress is not None:
            return progress(step)
        return (step - warmup_steps) / max(1, total_steps - warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, fraction(step)))


class Budget:
    """Stop at `steps` or after `minutes` of wall time (0 = no time limit), whichever first.
    `elapsed` carries over a resumed run's time already spent."""

    def __init__(self, steps: int, minutes: float = 0.0, elapsed: float = 0.0):
        self.steps, self.seconds = steps, minutes * 60.0
        self._carried = elapsed
        self._start = time.monotonic() - elapsed

    def restart_clock(self) -> None:
        """Start counting now (keeping a resumed run's carried time): one-off set-up such
        as building a cache is not training time."""
        self._start = time.monotonic() - self._carried

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def progress(self, step: int) -> float:
        by_steps = step / self.steps
        return max(by_steps, self.elapsed / self.seconds) if self.seconds else by_steps

    def done(self, step: int) -> bool:
        return step >= self.steps or bool(self.seconds and self.elapsed >= self.seconds)

    def sync(self, accelerator) -> None:
        """Under several processes, adopt the main process's clock, so that all of them
        stop at the same step and use the same time-driven LR (call once per step)."""
        if self.seconds and accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            shared = broadcast(torch.tensor([self.elapsed], device=accelerator.device))
            self._start = time.monotonic() - float(shared[0])


class BudgetBar:
    """A tqdm bar over whatever bounds the run: steps, or seconds when a minutes budget is
    set (a bar of 100 000 step ceilings with an ETA in hours would mislead)."""

    def __init__(self, budget: Budget, step: int, desc: str, disable: bool = False):
        from tqdm.auto import tqdm

        self.budget, self.timed = budget, bool(budget.seconds)
        total = round(budget.seconds) if self.timed else budget.steps
        self.bar = tqdm(total=total, initial=0 if self.timed else step, desc=desc,
                        unit="s" if self.timed else "it", disable=disable, dynamic_ncols=True)
        self.shown: dict = {}

    def set_postfix(self, values: dict) -> None:
        self.shown = dict(values)

    def update(self, step: int) -> None:
        """Call once per step; tqdm redraws at its own pace."""
        self.bar.set_postfix({"step": step, **self.shown} if self.timed else self.shown,
                             refresh=False)
        if self.timed:
            self.bar.n = min(round(self.budget.elapsed), self.bar.total)
            self.bar.update(0)
        else:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- data


class StreamSampler(Sampler[int]):
    """An endless, resumable index stream: epoch e is a permutation seeded by (seed, e),
    epochs are concatenated, and step s of a run reads positions [s*B, (s+1)*B) of it
    (this process's slice of them under several processes). Resuming at step s is then
    just starting at s*B, and gives the very batches an uninterrupted run would see.
    With `weights` (data.balance_by), epoch e is n draws with replacement in proportion to
    them, seeded the same way, so it stays resumable."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, weights: torch.Tensor | None = None):
        self.n, self.batch, self.seed = num_items, batch_size, seed
        self.start, self.rank, self.world = start_step, rank, world_size
        self.weights = weights
        self._epoch_id, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __iter__(self) -> Iterator[int]:
        step = self.start
        global_batch = self.batch * self.world
        while True:
            first = step * global_batch + self.rank * self.batch
            for pos in range(first, first + self.batch):
                yield int(self._epoch(pos // self.n)[pos % self.n])
            step += 1

    def _epoch(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch_id:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch_id = epoch
            self._perm = (torch.randperm(self.n, generator=g) if self.weights is None else
                          torch.multinomial(self.weights, self.n, True, generator=g))
        return self._perm


def infinite_loader(dataset: Dataset, batch_size: int, seed: int = 0, start_step: int = 0,
                    num_workers: int = 0, rank: int = 0, world_size: int = 1,
                    weights: torch.Tensor | None = None) -> Iterator:
    """Batches forever, in the order `StreamSampler` fixes (see there)."""
    sampler = StreamSampler(len(dataset), batch_size, seed, start_step, rank, world_size,
                            weights)
    # An own generator: DataLoader otherwise draws its worker seed from the global torch
    # RNG, which would shift a resumed run's noise away from the uninterrupted run's. One
    # per rank, so workers of different ranks do not share their random augmentations.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                        num_workers=num_workers, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(rank_seed(seed, rank)))
    return iter(loader)


# ----------------------------------------------------------------------------- logging


class MetricsLogger:
    """Appends one JSON object per line. Given `resume_step`, first drops lines logged
    after that step (work lost with the interrupted run, about to be redone)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, **values: float) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:  # a line torn by a crash
        return math.inf


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


class Throughput:
    """Images per second over the last `window` steps."""

    def __init__(self, window: int = 20):
        self.window = window
        self._marks: list[tuple[float, int]] = [(time.monotonic(), 0)]

    def update(self, images: int) -> float:
        now = time.monotonic()
        total = self._marks[-1][1] + images
        self._marks = (self._marks + [(now, total)])[-(self.window + 1):]
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)


class RunningMean:
    """Exponential moving averages of named losses, for the progress bar."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.values = beta, {}

    def update(self, **values: float) -> dict[str, float]:
        for k, v in values.items():
            old = self.values.get(k)
            v = float(v)
            self.values[k] = v if old is None else self.beta * old + (1 - self.beta) * v
        return dict(self.values)
