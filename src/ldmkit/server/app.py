"""`ldmkit serve`: one loaded model behind three HTTP APIs and a web page (FastAPI +
uvicorn). The routes live with their API; this file puts them together:

    native.py         ldmkit's own: POST /v1/images (+ image/mask/strength for edits),
                      /v1/images/stream, GET /v1/model
    openai_images.py  OpenAI's images API: GET /v1/models, POST /v1/images/generations,
                      /v1/images/edits (multipart)
    a1111.py          AUTOMATIC1111's: POST /sdapi/v1/txt2img, img2img, and the GETs its
                      clients probe
    GET /health       liveness and queue counters (open even with an API key)
    GET /             the page (static/index.html); /docs is FastAPI's own

Every route checks its fields with `ldmkit.sampling_args` and queues on the one
`batcher.Batcher` (service.py), so a request gives the same images, limits and queue
whichever API it uses; the U-Net runs on the batcher's thread, never on the event loop.
Keys and origins: auth.py; error shapes: errors.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ldmkit import __version__
from ldmkit.devices import resolve_device
from ldmkit.errors import UserError
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.server import a1111, errors, native, openai_images
from ldmkit.server.auth import KEY_ENV, add_cors, check_exposure, check_key
from ldmkit.server.batcher import Batcher
from ldmkit.server.service import MAX_IMAGES_PER_REQUEST, MAX_PROMPT_CHARS, ImageService

__all__ = ["MAX_IMAGES_PER_REQUEST", "MAX_PROMPT_CHARS", "create_app", "cli_serve"]
STATIC = Path(__file__).parent / "static"
DEFAULT_MODEL_ID = "ldmkit"


def create_app(pipe: TextToImagePipeline, queue_size: int = 64, max_batch: int = 32,
               batcher: Batcher | None = None, *, api_key: str | None = None,
               cors_origins: Sequence[str] = (), model_id: str = DEFAULT_MODEL_ID,
               created: int | None = None) -> FastAPI:
    """The app around a loaded pipeline; its batcher's thread runs while the app does.
    `api_key`: every API route then needs it; `model_id`: the model's name in the OpenAI
    and A1111 APIs (another name is a 404 there)."""
    batcher = batcher or Batcher(pipe, queue_size, max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="ldmkit", version=__version__, lifespan=lifespan,
                  description="Text-to-image and edits with a latent diffusion model: "
                              "ldmkit's own API, OpenAI's images API and A1111's txt2img "
                              "and img2img. See docs/serving.md.")
    app.state.batcher = batcher
    app.state.api_key = check_key(api_key)
    app.state.service = ImageService(pipe, batcher, model_id,
                                     int(time.time()) if created is None else created)
    errors.install(app)
    for module in (native, openai_images, a1111):
        app.include_router(module.router)
    add_cors(app, list(cors_origins))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", tags=["server"])
    def health() -> dict:
        """Liveness and the queue's counters; needs no key."""
        return {"status": "ok", "auth": app.state.api_key is not None, **batcher.snapshot()}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


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
    key = check_key(args.api_key if args.api_key is not None else os.environ.get(KEY_ENV))
    check_exposure(args.host, key, args.insecure)
    if not args.model_id.strip():
        raise UserError("--model-id is empty")
    device = resolve_device(args.device)  # before the model loads: a bad flag fails fast
    check_address(args.host, args.port)
    from ldmkit.sample import load_adapter, with_decoder

    pipe = with_decoder(TextToImagePipeline.from_pretrained(args.model, device), args.vae)
    if getattr(args, "lora", None):
        # every request uses the one adapter: merged, sampling costs what the base model's
        # does, and no request can change its scale
        load_adapter(pipe, args.lora, args.lora_scale, merge=True)
    created = int((Path(args.model) / "model_index.json").stat().st_mtime)
    app = create_app(pipe, args.queue_size, args.max_batch, api_key=key,
                     cors_origins=args.cors_origin or (), model_id=args.model_id.strip(),
                     created=created)
    adapter = f" + LoRA {args.lora} x {args.lora_scale:g}" if getattr(args, "lora", None) else ""
    adapter += f" + decoder {args.vae}" if args.vae else ""
    print(f"ldmkit serve: {args.model}{adapter} on {device}; open http://{args.host}:{args.port}/ "
          f"(OpenAI base URL http://{args.host}:{args.port}/v1, model {args.model_id!r}; "
          f"{'an API key is needed' if key else 'no API key'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
