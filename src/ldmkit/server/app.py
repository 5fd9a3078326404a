"""`ldmkit serve`: the HTTP API and the web page, on FastAPI + uvicorn.

    POST /v1/images          prompt, negative_prompt, n, steps, guidance, sampler, seed
                             -> base64 PNGs + the settings used (seed included)
    POST /v1/images/stream   the same, as server-sent events: `queued`, `preview` (the x0
                             estimate every `preview_every` steps), then `done` (or `error`)
    GET  /v1/model           image size, text encoder, schedule, samplers, defaults, limits
    GET  /health             liveness and queue counters
    GET  /                   the page (static/index.html); /docs is FastAPI's own

The model is loaded once; requests are checked by `ldmkit.sampling_args` (422 naming the
field), queued and batched by `batcher.Batcher` (503 + Retry-After when the queue is
full), and the U-Net runs on the batcher's one thread, never on the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from ldmkit import __version__
from ldmkit.devices import resolve_device
from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.errors import UserError
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.sampling_args import (
    GUIDANCE_MAX,
    SamplingArgs,
    SamplingArgumentError,
    check_count,
)
from ldmkit.server.batcher import Batcher, Job, QueueFull, ServerStopping

STATIC = Path(__file__).parent / "static"
MAX_IMAGES_PER_REQUEST = 16  # a response holds every image of a request in memory
MAX_PROMPT_CHARS = 10_000  # only bounds tokenizing; the encoder's window cuts far sooner


# ----------------------------------------------------------------------------- schemas


class ImageRequest(BaseModel):
    """What to generate. Ranges are checked by ldmkit.sampling_args (422 names the field)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
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


class Timing(BaseModel):
    queued_s: float
    run_s: float
    batch_images: int = Field(description="images in the U-Net batch this request shared")


class ImageResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNGs")
    settings: Settings
    warnings: list[str]
    timing: Timing


# ----------------------------------------------------------------------------- the app


def create_app(pipe: TextToImagePipeline, queue_size: int = 64, max_batch: int = 32,
               batcher: Batcher | None = None) -> FastAPI:
    """The app around a loaded pipeline; its batcher's thread runs while the app does."""
    batcher = batcher or Batcher(pipe, queue_size, max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="ldmkit", version=__version__, lifespan=lifespan,
                  description="Text-to-image with a latent diffusion model. See the README, "
                              "section Serving.")
    app.state.batcher = batcher
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def admit(body: ImageRequest, preview_every: int = 0) -> Job:
        """Check the request and queue it: 422 naming the field, or 503 when full."""
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        try:
            args = SamplingArgs(body.prompt, body.negative_prompt, body.n, body.steps,
                                body.guidance, body.sampler, seed,
                                body.guidance_rescale).checked(
                pipe.schedule.timesteps, MAX_IMAGES_PER_REQUEST, MAX_PROMPT_CHARS)
            if preview_every:
                check_count(preview_every, "preview_every")
        except SamplingArgumentError as exc:
            raise RequestValidationError([{"type": "value_error", "loc": ("body", exc.field),
                                           "msg": exc.reason}]) from None
        job = Job(args, asyncio.get_running_loop(), preview_every)
        try:
            batcher.submit(job)
        except QueueFull as exc:
            raise HTTPException(503, "the queue is full; retry later",
                                headers={"Retry-After": str(exc.retry_after)}) from None
        return job

    def result(job: Job, payload: dict) -> dict:
        a = job.args
        settings = {"prompt": a.prompt, "negative_prompt": a.negative_prompt, "n": a.n,
                    "steps": a.steps, "guidance": a.guidance, "sampler": a.sampler,
                    "guidance_rescale": a.guidance_rescale, "seed": a.seed}
        return {**payload, "settings": settings}

    @app.post("/v1/images", response_model=ImageResponse,
              responses={422: {"description": "a field out of range (named in `detail`)"},
                         503: {"description": "queue full; see Retry-After"}})
    async def images(body: ImageRequest, request: Request) -> dict | Response:
        """Generate `n` images; returns when they are done (or drops the work when the
        client disconnects first)."""
        job = admit(body)
        final = asyncio.ensure_future(_final_event(job))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({final, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not final.done():  # the client left; `finally` drops the work
                return Response(status_code=499)  # nginx's "client closed request"
            kind, payload = final.result()
            if kind == "error":
                raise _http_error(payload)
            return result(job, payload)
        finally:
            final.cancel()
            gone.cancel()
            job.cancel()  # no-op once done; drops queued or running work otherwise

    @app.post("/v1/images/stream", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "events: queued, preview..., done | error"},
                         422: {"description": "a field out of range"},
                         503: {"description": "queue full; see Retry-After"}})
    async def images_stream(body: StreamRequest) -> StreamingResponse:
        """The same generation as server-sent events: `queued`, then `preview` every
        `preview_every` steps (the x0 estimate, decoded), then `done` with the result."""
        job = admit(body, body.preview_every)

        async def events() -> AsyncIterator[str]:
            try:  # cancelled by Starlette when the client disconnects
                yield _sse("queued", {"queued": batcher.snapshot()["queued"]})
                while True:
                    kind, payload = await job.events.get()
                    if kind == "preview":
                        yield _sse("preview", payload)
                    elif kind == "done":
                        yield _sse("done", result(job, payload))
                        return
                    else:
                        error = _http_error(payload)
                        yield _sse("error", {"status": error.status_code,
                                             "detail": error.detail})
                        return
            finally:
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/v1/model")
    def model() -> dict:
        """What the model is and what a request may ask of it."""
        enc = pipe.text_encoder
        return {
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
            "device": str(pipe.device), "ldmkit_version": __version__}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **batcher.snapshot()}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


async def _final_event(job: Job) -> tuple[str, object]:
    """The job's "done" or "error" event (a plain POST gets no previews)."""
    while True:
        kind, payload = await job.events.get()
        if kind != "preview":
            return kind, payload


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is already read: only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(event: str, data: dict) -> str:
    """One server-sent event (the data is one line of JSON)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _http_error(exc: BaseException) -> HTTPException:
    if isinstance(exc, UserError):  # e.g. the model produced NaN: said, never shown black
        return HTTPException(500, f"generation failed: {exc}")
    if isinstance(exc, ServerStopping):
        return HTTPException(503, str(exc))
    return HTTPException(500, f"generation failed ({type(exc).__name__}); see the server log")


# ----------------------------------------------------------------------------- CLI


def check_address(host: str, port: int) -> None:
    """Refuse a port outside 0..65535 or already taken, before the model loads."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be in 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(f"--host {host} --port {port}: cannot listen there "
                            f"({exc.strerror})") from None


def cli_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.queue_size < 1 or args.max_batch < 1:
        raise UserError("--queue-size and --max-batch must be >= 1")
    device = resolve_device(args.device)  # before the model loads: a bad flag fails fast
    check_address(args.host, args.port)
    pipe = TextToImagePipeline.from_pretrained(args.model, device)
    app = create_app(pipe, args.queue_size, args.max_batch)
    print(f"ldmkit serve: {args.model} on {device}; open http://{args.host}:{args.port}/",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

