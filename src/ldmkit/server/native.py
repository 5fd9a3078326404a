"""ldmkit's own API (the page uses it):

    POST /v1/images          prompt, negative_prompt, n, steps, guidance, sampler, seed
                             -> base64 PNGs + the settings used (seed included); with
                             `image` (base64), `strength`, `mask`: img2img / inpainting
    POST /v1/images/stream   the same, as server-sent events: `queued`, `preview` (the x0
                             estimate every `preview_every` steps), then `done` (or `error`)
    GET  /v1/model           image size, text encoder, schedule, samplers, defaults, limits

Bad fields answer 422 naming the field, a full queue 503 + Retry-After (errors.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ldmkit import __version__
from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.sampling_args import GUIDANCE_MAX, SamplingArgumentError, check_count
from ldmkit.server.auth import require_key
from ldmkit.server.batcher import Job
from ldmkit.server.errors import BODY_UNREADABLE, NativeRoute
from ldmkit.server.service import (
    MAX_IMAGES_PER_REQUEST,
    MAX_PROMPT_CHARS,
    ImageService,
    Refusal,
    decode_base64,
    failure,
    invalid,
)

router = APIRouter(route_class=NativeRoute, dependencies=[Depends(require_key)],
                   tags=["ldmkit"])
ERRORS = {400: BODY_UNREADABLE,
          401: {"description": "an API key is needed (`ldmkit serve --api-key`)"},
          422: {"description": "a field out of range (named in `detail`)"},
          503: {"description": "queue full (see Retry-After) or shutting down"}}


# ----------------------------------------------------------------------------- schemas


class ImageRequest(BaseModel):
    """What to generate. Ranges are checked by ldmkit.sampling_args (422 names the field)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="\"\" (or blank) = an unconditional sample")
    negative_prompt: str | None = None
    n: int = Field(1, description=f"images, 1..{MAX_IMAGES_PER_REQUEST}")
    steps: int = Field(HEADLINE.steps, description="denoising steps, 1..T")
    guidance: float = Field(HEADLINE.guidance,
                            description=f"classifier-free guidance scale, 0..{GUIDANCE_MAX:g}")
    sampler: str = Field(HEADLINE.sampler, description=f"one of {', '.join(SAMPLERS)}")
    guidance_rescale: float = Field(HEADLINE.guidance_rescale,
                                    description="Lin et al. 2024's phi, 0..1; 0 = plain CFG")
    seed: int | None = Field(None, description="0..2**63-1; omitted = a random one, "
                                               "reported in `settings`")
    # an edit (docs/editing.md): the same checks as `ldmkit sample --init-image`
    image: str | None = Field(None, description="img2img: the picture to start from, a "
                              "base64 PNG/JPEG (square; resized to the model's size)")
    mask: str | None = Field(None, description="inpainting: base64 image of the picture's "
                             "size, white = repaint, black = keep")
    strength: float | None = Field(None, description="how much of `image` to redraw, 0..1 "
                                   "(default 0.8; 1 with a mask)")
    resample_steps: int | None = Field(None, description="RePaint passes per inpainting step")
    mask_feather: int | None = Field(None, description="latent cells of soft mask edge (1)")
    source_prompt: str | None = Field(None, description="layout edit: what `image` shows "
                                      "(\"a red square\"); the prompt's change then keeps "
                                      "its shapes and places (no mask; try guidance 20)")


class StreamRequest(ImageRequest):
    preview_every: int = Field(2, description="send the x0 preview every this many steps")


class Settings(BaseModel):
    prompt: str
    negative_prompt: str | None
    n: int
    steps: int
    guidance: float
    sampler: str
    guidance_rescale: float
    seed: int
    strength: float | None = Field(None, description="the edit's strength (edits only)")
    source_prompt: str | None = Field(None, description="a layout edit's source prompt")


class Timing(BaseModel):
    queued_s: float
    run_s: float
    batch_images: int = Field(description="images in the U-Net batch this request shared")


class ImageResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNGs")
    settings: Settings
    warnings: list[str]
    timing: Timing


# ----------------------------------------------------------------------------- routes


def service(request: Request) -> ImageService:
    return request.app.state.service


EDIT_FIELDS = ("image", "mask", "strength", "resample_steps", "mask_feather", "source_prompt")


def _admit(svc: ImageService, body: ImageRequest, preview_every: int = 0
           ) -> tuple[Job, list[str]]:
    """The queued job and the warnings its checks gave (a resized picture)."""
    args = svc.args(body.prompt, body.negative_prompt, body.n, body.steps, body.guidance,
                    body.sampler, body.seed, body.guidance_rescale)
    if preview_every:
        try:
            check_count(preview_every, "preview_every")
        except SamplingArgumentError as exc:
            raise invalid(exc.field, exc.reason) from None
    edit, warnings = None, []
    if any(getattr(body, name) is not None for name in EDIT_FIELDS):
        image = None if body.image is None else decode_base64(body.image, "image")
        mask = None if body.mask is None else decode_base64(body.mask, "mask")
        edit, warnings = svc.edit(image, mask, body.strength, body.resample_steps,
                                  body.mask_feather, source_prompt=body.source_prompt)
    return svc.submit([args], preview_every, edits=[edit])[0], warnings


def _result(job: Job, payload: dict, warnings: list[str]) -> dict:
    args = job.args
    settings = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "n": args.n,
                "steps": args.steps, "guidance": args.guidance, "sampler": args.sampler,
                "guidance_rescale": args.guidance_rescale, "seed": args.seed,
                "strength": None if job.edit is None else job.edit.strength,
                "source_prompt": None if job.edit is None else job.edit.source_prompt}
    return {"images": payload["images"], "warnings": warnings + payload["warnings"],
            "timing": payload["timing"], "settings": settings}


@router.post("/v1/images", response_model=ImageResponse,
             responses={**ERRORS, 500: {"description": "the output was not finite (NaN)"}})
async def images(body: ImageRequest, request: Request) -> dict | Response:
    """Generate `n` images; returns when they are done (or drops the work when the
    client disconnects first)."""
    svc = service(request)
    job, warnings = _admit(svc, body)
    payloads = await svc.results([job], request)
    if payloads is None:  # the client left; the work is dropped
        return Response(status_code=499)  # nginx's "client closed request"
    return _result(job, payloads[0], warnings)


@router.post("/v1/images/stream", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "events: queued, preview..., done | error"},
                        **ERRORS})
async def images_stream(body: StreamRequest, request: Request) -> StreamingResponse:
    """The same generation as server-sent events: `queued`, then `preview` every
    `preview_every` steps (the x0 estimate, decoded), then `done` with the result."""
    svc = service(request)
    job, warnings = _admit(svc, body, body.preview_every)

    async def events() -> AsyncIterator[str]:
        try:  # cancelled by Starlette when the client disconnects
            yield sse("queued", {"queued": svc.batcher.snapshot()["queued"]})
            while True:
                kind, payload = await job.events.get()
                if kind == "preview":
                    yield sse("preview", payload)
                elif kind == "done":
                    yield sse("done", _result(job, payload, warnings))
                    return
                else:
                    refusal: Refusal = failure(payload)
                    status = {"stopping": 503, "invalid": 422}.get(refusal.kind, 500)
                    yield sse("error", {"status": status, "detail": str(refusal)})
                    return
        finally:
            job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.get("/v1/model", responses={401: ERRORS[401]})
def model(request: Request) -> dict:
    """What the model is and what a request may ask of it."""
    svc = service(request)
    pipe, batcher = svc.pipe, svc.batcher
    enc = pipe.text_encoder
    return {
        "id": svc.model_id,
        "image_size": pipe.image_size, "latent_shape": list(pipe.latent_shape(1)[1:]),
        "text_encoder": {"name": enc.name, "max_length": enc.max_length,
                         "hidden_layers": list(enc.hidden_layers)},
        "schedule": {**pipe.schedule.to_dict(), "prediction": pipe.prediction},
        "samplers": [{"name": name, "title": info.title, "paper": info.paper,
                      "batched": not info.stochastic} for name, info in SAMPLERS.items()],
        "defaults": {"sampler": HEADLINE.sampler, "steps": HEADLINE.steps,
                     "guidance": HEADLINE.guidance,
                     "guidance_rescale": HEADLINE.guidance_rescale},
        "limits": {"n": MAX_IMAGES_PER_REQUEST, "steps": pipe.schedule.timesteps,
                   "guidance": [0.0, GUIDANCE_MAX], "prompt_chars": MAX_PROMPT_CHARS,
                   "queue_size": batcher.queue_size, "max_batch": batcher.max_batch},
        "lora": svc.lora, "device": str(pipe.device), "ldmkit_version": __version__}


def sse(event: str, data: dict) -> str:
    """One server-sent event (the data is one line of JSON)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
