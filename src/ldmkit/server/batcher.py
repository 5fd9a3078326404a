"""The queue and the one worker thread that runs the U-Net for the server.

Requests wait in a bounded FIFO queue (full -> `QueueFull`, the server's 503). When the
worker is free it takes the oldest job and every queued job that can share its U-Net
call, up to `max_batch` images, and samples them as one batch:

- Jobs share a batch when they agree on steps, sampler and guidance (the denoiser mixes
  one guidance scale for the whole batch) and the sampler is deterministic given x_T
  (DDIM at eta = 0, DPM-Solver++). A stochastic sampler (DDPM) draws fresh noise at every
  step from one generator for the whole batch, so its jobs run alone, each with its own
  generator: exactly what `ldmkit sample` and the Python API do.
- Edits (img2img, inpainting; `Job.edit`) share a batch with edits that start from the
  same grid level (steps and strength) and are all masked or all not; each row carries
  its own picture, noised start and mask, as it carries its own prompt, so edits of
  different pictures batch without mixing (KnownRegion blends row by row). They never
  join a text-to-image batch (its rows would go through the edit's denoiser wrapper), and
  RePaint resampling runs alone: its renoising draws from the job's generator.
- Each job's rows carry its own initial noise, drawn from its own seed
  (`pipe.initial_noise`), and its own conditioning (`pipe.conditioning`), bit for bit what
  the pipeline uses for that request alone. Rows never mix in the sampler's arithmetic.
  The U-Net's float kernels (oneDNN convolutions, BLAS matmuls) do pick their blocking by
  batch size, so a batched image can differ from the alone one in the last float bits
  (measured in tests/test_server.py); `max_batch = 1` turns batching off for bit-exactness.

A job whose client went away is cancelled: dropped if still queued, and a running batch
stops at its next step once every job in it is cancelled (rows of the others go on).
Results and previews reach the event loop through `loop.call_soon_threadsafe`, so the
loop never waits on torch.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from ldmkit.diffusion.editing import start_index, steps_run
from ldmkit.diffusion.registry import SAMPLERS
from ldmkit.editing import EditInputs, EditStart, edit_start, edited_images
from ldmkit.errors import UserError
from ldmkit.models.text import TextEmbeddings, is_blank
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.sampling_args import SamplingArgs
from ldmkit.viz import to_pil


class QueueFull(Exception):
    """The queue holds `queue_size` jobs; come back in `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class ServerStopping(Exception):
    """Sent to the jobs still waiting when the server shuts down."""


class _Cancelled(Exception):
    """Raised from the sampler callback to stop a batch nobody waits for any more."""


def png_base64(images: torch.Tensor) -> list[str]:
    """Images in [-1, 1] -> base64 PNGs, encoded as `ldmkit sample` writes its files."""
    out = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


@dataclass(eq=False)  # a job is itself, not its contents
class Job:
    """One request: checked arguments, where its events go, and whether anyone still
    waits. Events are ("preview", dict), ("done", dict) or ("error", Exception)."""

    args: SamplingArgs
    loop: asyncio.AbstractEventLoop
    preview_every: int = 0  # 0 = no previews (the plain POST)
    preview_steps: frozenset[int] = frozenset()  # step indices with a preview, besides
    edit: EditInputs | None = None  # one picture (and mask) to edit args.n times
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple | None:
        """Jobs with equal keys can share a U-Net batch; None = runs alone."""
        a, edit = self.args, self.edit
        if SAMPLERS[a.sampler].stochastic or (edit is not None and (
                edit.resample_steps or edit.source_prompt is not None)):
            return None  # a layout edit is its own loop (layout_edit.py)
        kind = None if edit is None else ("edit", start_index(a.steps, edit.strength),
                                          edit.masks is not None)
        return a.sampler, a.steps, a.guidance, a.guidance_rescale, kind

    @property
    def previews(self) -> bool:
        return bool(self.preview_every or self.preview_steps)

    def wants_preview(self, step: int) -> bool:
        every = self.preview_every
        return step in self.preview_steps or bool(every and step % every == 0)

    def cancel(self) -> None:
        self.cancelled.set()

    def post(self, kind: str, payload: object) -> None:
        """Hand an event to the request's coroutine (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the request's event loop is gone: nobody to tell
            self.cancel()


@dataclass
class Stats:
    completed: int = 0  # jobs answered
    images: int = 0
    batches: int = 0
    cancelled: int = 0  # jobs dropped or stopped because their client went away
    rejected: int = 0  # 503s
    errors: int = 0
    busy_seconds: float = 0.0
    last_batch_seconds: float = 0.0


class Batcher:
    """A bounded queue of jobs and the worker thread that runs them in batches."""

    def __init__(self, pipe: TextToImagePipeline, queue_size: int = 64, max_batch: int = 32):
        self.pipe, self.queue_size, self.max_batch = pipe, queue_size, max_batch
        self.stats = Stats()
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="ldmkit-unet", daemon=True)

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            for job in [*self._pending, *self._running]:
                job.post("error", ServerStopping("the server is shutting down"))
                job.cancel()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> int:
        """Queue a job; its place in the queue (0 = next), or QueueFull."""
        return self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> int:
        """Queue every job or none (QueueFull): one request's images are not half-served.
        The first job's place in the queue (0 = next)."""
        with self._cond:
            if self._stopping or len(self._pending) + len(jobs) > self.queue_size:
                self.stats.rejected += 1
                raise QueueFull(self.retry_after())
            self._pending.extend(jobs)
            self._cond.notify()
            return len(self._pending) - len(jobs)

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: the time of one more batch."""
        return max(1, math.ceil(self.stats.last_batch_seconds))

    def snapshot(self) -> dict:
        with self._cond:
            return {"queued": len(self._pending), "queue_size": self.queue_size,
                    "running": sum(job.args.n for job in self._running),
                    "max_batch": self.max_batch, **vars(self.stats)}

    # ------------------------------------------------------------------ worker side

    def _take(self) -> list[Job]:
        """The oldest live job and the queued jobs that can share its batch."""
        with self._cond:
            while True:
                for job in [j for j in self._pending if j.cancelled.is_set()]:
                    self._pending.remove(job)
                    self.stats.cancelled += 1
                if self._stopping:
                    return []
                if self._pending:
                    break
                self._cond.wait()
            first = self._pending.popleft()
            batch, images = [first], first.args.n
            if first.key is not None:
                for job in list(self._pending):
                    if job.key == first.key and images + job.args.n <= self.max_batch:
                        self._pending.remove(job)
                        batch.append(job)
                        images += job.args.n
            self._running = batch
            return batch

    def _work(self) -> None:
        while batch := self._take():
            start, stopped = time.monotonic(), 0
            try:
                self._run(batch, start)
            except _Cancelled:
                stopped = len(batch)
            except Exception as exc:  # one bad batch must not kill the server
                if not isinstance(exc, UserError):  # a UserError says why by itself
                    traceback.print_exc(file=sys.stderr)
                self.stats.errors += len(batch)
                for job in batch:
                    job.post("error", exc)
            finally:
                took = time.monotonic() - start
                with self._cond:  # one update, so /health never sees a half-finished batch
                    self._running = []
                    self.stats.cancelled += stopped
                    self.stats.batches += 1
                    self.stats.busy_seconds += took
                    self.stats.last_batch_seconds = took

    @torch.no_grad()
    def _run(self, batch: list[Job], start: float) -> None:
        if batch[0].edit is not None and batch[0].edit.source_prompt is not None:
            return self._run_layout_edit(batch[0], start)  # alone, by its key
        pipe, first = self.pipe, batch[0].args
        begins, conds, unconds, rows, warnings = [], [], [], [], []
        for job in batch:
            a = job.args
            generator = torch.Generator().manual_seed(a.seed)
            cond, uncond = pipe.conditioning([a.prompt] * a.n, a.negative_prompt)
            begins.append(self._begin(job, pipe.initial_noise(a.n, generator)))
            conds.append(cond)
            unconds.append(uncond.expand(a.n))
            offset = rows[-1].stop if rows else 0
            rows.append(slice(offset, offset + a.n))
            warnings.append(self._prompt_report(a))
        # by the batch key, every job is an edit of one kind (start level, mask or not), or
        # none is
        lead, edit = begins[0], batch[0].edit
        held = None if lead.lmask is None else (torch.cat([b.known for b in begins]),
                                                torch.cat([b.lmask for b in begins]))
        latents = pipe.denoise(
            torch.cat([b.x for b in begins]), TextEmbeddings.cat(conds),
            TextEmbeddings.cat(unconds), first.steps, first.guidance, first.sampler,
            generator=generator if len(batch) == 1 else None,  # stochastic jobs run alone
            callback=self._callback(batch, rows, first.steps - lead.first),
            guidance_rescale=first.guidance_rescale, start=lead.first, known=held,
            resample=0 if edit is None else edit.resample_steps)
        ran = time.monotonic() - start
        images = sum(job.args.n for job in batch)
        for job, row, begin, report in zip(batch, rows, begins, warnings):
            self._finish(job, self._pixels(job, latents[row], begin), report, start, ran,
                         images)

    def _finish(self, job: Job, pixels: torch.Tensor, report: tuple[list[str], int],
                start: float, ran: float, batch_images: int) -> None:
        if job.cancelled.is_set():
            self.stats.cancelled += 1
            return
        warning, tokens = report
        job.post("done", {"images": png_base64(pixels), "warnings": warning,
                          "prompt_tokens": tokens,
                          "timing": {"queued_s": round(start - job.created, 4),
                                     "run_s": round(ran, 4), "batch_images": batch_images}})
        self.stats.completed += 1
        self.stats.images += job.args.n

    def _run_layout_edit(self, job: Job, start: float) -> None:
        """A layout edit (its own inversion and attention control), as
        `pipe(..., source_prompt=)` runs it alone."""
        a = job.args
        callback = self._callback([job], [slice(0, a.n)], steps_run(a.steps, job.edit.strength))
        pixels = self.pipe.edit_images(
            [a.prompt] * a.n, job.edit.repeat(a.n), a.negative_prompt, a.steps, a.guidance,
            a.sampler, torch.Generator().manual_seed(a.seed), callback,
            guidance_rescale=a.guidance_rescale)
        warnings, tokens = self._prompt_report(a)
        if a.sampler != "ddpm":
            warnings.append(f"sampler: a layout edit samples with the DDPM posterior (its "
                            f"inversion is defined for it); {a.sampler} was not used")
        self._finish(job, pixels, (warnings, tokens), start, time.monotonic() - start, a.n)

    def _begin(self, job: Job, noise: torch.Tensor) -> EditStart:
        """The job's rows at the sampler's start: its noise, or for an edit its picture
        noised to the strength's level, as `pipe.edit_images` starts it alone."""
        if job.edit is None:
            return EditStart(noise, None, None, 0)
        return edit_start(self.pipe, job.edit.repeat(job.args.n), noise, job.args.steps)

    def _pixels(self, job: Job, latents: torch.Tensor, begin: EditStart) -> torch.Tensor:
        """The job's images; an inpainting edit laid over its picture's VAE round trip."""
        if job.edit is None:
            return self.pipe.decode(latents)
        lmask = None if begin.lmask is None else begin.lmask.cpu()
        return edited_images(self.pipe, latents, begin.known, lmask)

    def _prompt_report(self, args: SamplingArgs) -> tuple[list[str], int]:
        """What the client should know: prompts cut to the text encoder's window, and the
        prompt's token count as encoded (0 for a blank prompt; OpenAI's `usage`). Counted
        here, on the worker thread: a fast tokenizer must not be used by two threads."""
        encoder, out, tokens = self.pipe.text_encoder, [], 0
        for name, text in (("prompt", args.prompt), ("negative_prompt", args.negative_prompt)):
            if not text or is_blank(text):
                continue
            length = len(encoder.tokenizer(text, truncation=False, verbose=False)["input_ids"])
            cut = max(0, length - encoder.max_length)
            if name == "prompt":
                tokens = length - cut
            if cut:
                out.append(f"{name} is {cut} tokens longer than the text encoder's "
                           f"{encoder.max_length}; its tail was ignored")
        return out, tokens

    def _callback(self, batch: list[Job], rows: list[slice], steps: int):
        """Per step: stop when nobody waits (or the server stops); decode the x0 estimate
        for the jobs that stream previews."""
        streaming = [(job, row) for job, row in zip(batch, rows) if job.previews]

        def on_step(i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
            if self._stopping or all(job.cancelled.is_set() for job in batch):
                raise _Cancelled
            for job, row in streaming:
                if job.wants_preview(i) and not job.cancelled.is_set():
                    job.post("preview", {"step": i + 1, "steps": steps, "t": int(t),
                                         "images": png_base64(self.pipe.decode(x0[row]))})

        return on_step
