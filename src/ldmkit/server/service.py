"""What every route shares: the checks and limits on a request, the one batcher's queue,
waiting for the result (and dropping the work when the client hangs up), and what a
failure means. The routers (native.py, openai_images.py, a1111.py) only translate their
API's fields to `SamplingArgs` and a `Refusal` to their API's error shape, so a request
gives the same images, queue and limits whichever door it came in by."""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from ldmkit.edit_inputs import ImageResizedWarning
from ldmkit.editing import EditInputs, prepare_edit
from ldmkit.errors import UserError
from ldmkit.layout_edit import check_layout_model
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.sampling_args import (
    NonFiniteOutputError,
    SamplingArgs,
    SamplingArgumentError,
    check_prompt,
)
from ldmkit.server.batcher import Batcher, Job, QueueFull, ServerStopping

MAX_IMAGES_PER_REQUEST = 16  # a response holds every image of a request in memory
MAX_PROMPT_CHARS = 10_000  # only bounds tokenizing; the encoder's window cuts far sooner
RANDOM_SEEDS = 2**31  # a drawn seed fits every client's integer (A1111's, JavaScript's)
MAX_UPLOAD_BYTES = 50 * 2**20  # an edit's picture or mask, encoded (OpenAI's own limit)


@dataclass
class Refusal(Exception):
    """A request that gets no images, in no API's words yet. `kind`: "invalid" (a field,
    named in `field`), "busy" (queue full; `retry_after` seconds), "stopping", "non_finite"
    (the model produced NaN/inf), "failed" (a bug: see the server log), "unauthorized",
    "not_found"."""

    kind: str
    message: str
    field: str | None = None
    retry_after: int | None = None
    code: str | None = None  # a machine-readable reason where an API has a word for it

    def __str__(self) -> str:
        return self.message


def invalid(field_name: str, reason: str) -> Refusal:
    """A field's value refused; `reason` reads after the field's name."""
    return Refusal("invalid", f"{field_name}: {reason}", field_name, code="invalid_value")


@dataclass
class ImageService:
    """The loaded pipeline, its batcher, and what the model is called in the APIs."""

    pipe: TextToImagePipeline
    batcher: Batcher
    model_id: str = "ldmkit"
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def size(self) -> str:
        return f"{self.pipe.image_size}x{self.pipe.image_size}"

    @property
    def lora(self) -> dict | None:
        """The LoRA adapter the model serves with (`ldmkit serve --lora`), or None."""
        record = self.pipe.lora
        if record is None:
            return None
        state = getattr(self.pipe.unet, "_ldmkit_lora", {})
        return {"name": Path(record["path"]).name, "path": record["path"],
                "scale": state.get("scale"), "rank": record.get("rank"),
                "alpha": record.get("alpha"), "merged": bool(state.get("merged"))}

    def args(self, prompt: object, negative_prompt: object = None, n: object = 1,
             steps: object = None, guidance: object = None, sampler: object = None,
             seed: object = None, guidance_rescale: object = None,
             names: dict[str, str] | None = None) -> SamplingArgs:
        """Checked arguments; None = the default (a drawn seed for `seed`). A bad field
        is a Refusal naming it as the caller's API spells it (`names`: ours -> theirs)."""
        given = {"steps": steps, "guidance": guidance, "sampler": sampler,
                 "guidance_rescale": guidance_rescale}
        raw = SamplingArgs(prompt, negative_prompt, n,
                           seed=secrets.randbelow(RANDOM_SEEDS) if seed is None else seed,
                           **{k: v for k, v in given.items() if v is not None})
        try:
            return raw.checked(self.pipe.schedule.timesteps, MAX_IMAGES_PER_REQUEST,
                               MAX_PROMPT_CHARS)
        except SamplingArgumentError as exc:
            raise invalid((names or {}).get(exc.field, exc.field), exc.reason) from None

    def edit(self, image: object, mask: object = None, strength: object = None,
             resample_steps: object = None, mask_feather: object = None, *,
             mask_from_alpha: bool = False, names: dict[str, str] | None = None,
             source_prompt: object = None) -> tuple[EditInputs, list[str]]:
        """One picture (encoded bytes) and mask checked for an edit, and what the client
        should be told (a picture resized to the model's size). None = the default
        (strength: 1 with a mask, else the pipeline's); `source_prompt` makes it a layout
        edit. A bad one is a Refusal naming the field as the caller's API spells it
        (`names`: ours -> theirs)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ImageResizedWarning)
            try:
                if source_prompt is not None:  # bounded as the prompt is
                    check_prompt(source_prompt, "source_prompt", MAX_PROMPT_CHARS)
                edit = prepare_edit(image, mask, 1, self.pipe.image_size, strength,
                                    0 if resample_steps is None else resample_steps,
                                    1 if mask_feather is None else mask_feather,
                                    mask_from_alpha=mask_from_alpha, fields=names,
                                    source_prompt=source_prompt)
                if edit.source_prompt is not None:  # its words: on the worker (tokenizer)
                    check_layout_model(self.pipe)
            except SamplingArgumentError as exc:
                raise invalid(exc.field, exc.reason) from None
        return edit, [str(w.message) for w in caught if w.category is ImageResizedWarning]

    def submit(self, args: Iterable[SamplingArgs], preview_every: int = 0,
               preview_steps: frozenset[int] | Sequence[frozenset[int]] = frozenset(),
               edits: Sequence[EditInputs | None] | None = None) -> list[Job]:
        """Queue one job per args (with `edits`, each its own edit; `preview_steps` one
        set for all or one per job), all or none (a Refusal "busy" when the queue is
        full)."""
        loop = asyncio.get_running_loop()
        args = list(args)
        edits = list(edits) if edits is not None else [None] * len(args)
        steps = [preview_steps] * len(args) if isinstance(preview_steps, frozenset) \
            else list(preview_steps)
        jobs = [Job(a, loop, preview_every, s, e) for a, s, e in zip(args, steps, edits)]
        try:
            self.batcher.submit_all(jobs)
        except QueueFull as exc:
            raise Refusal("busy", "the queue is full; retry later",
                          retry_after=exc.retry_after) from None
        return jobs

    async def results(self, jobs: list[Job], request: Request) -> list[dict] | None:
        """Each job's "done" payload, in order; None if the client hung up first (the
        work is then dropped); a Refusal when generation failed."""
        finals = asyncio.ensure_future(asyncio.gather(*(final_event(j) for j in jobs)))
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({finals, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not finals.done():
                return None
            out = []
            for kind, payload in finals.result():
                if kind == "error":
                    raise failure(payload)
                out.append(payload)
            return out
        finally:
            finals.cancel()
            gone.cancel()
            for job in jobs:
                job.cancel()  # no-op once done; drops queued or running work otherwise


def decode_base64(value: str, field_name: str) -> bytes:
    """An image sent as base64 text (a `data:image/...;base64,` prefix allowed, as A1111's
    clients send it), or a Refusal naming the field."""
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())  # MIME base64 comes in lines
    if len(text) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise invalid(field_name, f"is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field_name, "is not base64 (an encoded PNG or JPEG is expected)") from None


def failure(exc: BaseException) -> Refusal:
    """What a worker-side exception means for the client."""
    if isinstance(exc, ServerStopping):
        return Refusal("stopping", str(exc), code="server_shutting_down")
    if isinstance(exc, NonFiniteOutputError):  # said, never shown as a black image
        return Refusal("non_finite", f"generation failed: {exc}", code="non_finite_output")
    if isinstance(exc, SamplingArgumentError):  # found by the worker: still the request's
        return invalid(exc.field, exc.reason)
    if isinstance(exc, UserError):
        return Refusal("failed", f"generation failed: {exc}")
    return Refusal("failed", f"generation failed ({type(exc).__name__}); see the server log")


async def final_event(job: Job) -> tuple[str, object]:
    """The job's "done" or "error" event, skipping previews."""
    while True:
        kind, payload = await job.events.get()
        if kind != "preview":
            return kind, payload


async def disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is already read: only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def spread_steps(count: int, steps: int) -> frozenset[int]:
    """`count` step indices spread evenly before the last step (whose image is the
    result): the moments a client asking for `count` partial images gets one."""
    return frozenset(round((j + 1) * steps / (count + 1)) - 1 for j in range(count)) \
        - {steps - 1, -1}
