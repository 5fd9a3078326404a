"""OpenAI's images API, so the openai SDK, Open WebUI and LibreChat work unchanged:

    GET  /v1/models                 the one model, as {"object": "list", "data": [...]}
    GET  /v1/models/{model}         it, or 404 model_not_found
    POST /v1/images/generations     prompt, n, size, response_format, output_format, stream
                                    + partial_images; the diffusion controls as extra
                                    fields (negative_prompt, steps | num_inference_steps,
                                    guidance | guidance_scale, guidance_rescale, sampler,
                                    seed)

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: 400 for any bad or
unknown field (never FastAPI's 422), 401, 404, 429 + Retry-After when the queue is full,
500 for an output that is not finite. A route for /v1/images/edits belongs beside these,
on the same router.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.sampling_args import SamplingArgs
from ldmkit.server.auth import require_key
from ldmkit.server.errors import STATUS, NativeRoute, refusal_headers
from ldmkit.server.service import (
    MAX_IMAGES_PER_REQUEST,
    ImageService,
    Refusal,
    failure,
    invalid,
    spread_steps,
)

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit
TYPES = {"invalid": "invalid_request_error", "unauthorized": "invalid_request_error",
         "not_found": "invalid_request_error", "busy": "requests",
         "stopping": "server_error", "non_finite": "server_error", "failed": "server_error"}


def error_body(refusal: Refusal) -> dict:
    message = str(refusal)
    return {"error": {"message": message, "type": TYPES[refusal.kind],
                      "param": refusal.field, "code": refusal.code}}


def from_validation(exc: RequestValidationError) -> Refusal:
    """FastAPI's first complaint about the body as OpenAI words it (a 400)."""
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    name = loc[0] if loc else None
    if error.get("type") == "json_invalid":
        return Refusal("invalid", "The body is not valid JSON "
                       f"({error.get('ctx', {}).get('error', 'decode error')}).",
                       code="invalid_json")
    if error.get("type") == "extra_forbidden":
        return Refusal("invalid", f"Unknown parameter: '{name}'.", name,
                       code="unknown_parameter")
    if error.get("type") == "missing":
        return Refusal("invalid", f"Missing required parameter: '{name}'.", name,
                       code="missing_required_parameter")
    if name is None:  # the body as a whole: not JSON, or not an object
        return Refusal("invalid", f"The body must be a JSON object ({error.get('msg')}).",
                       code="invalid_json")
    return Refusal("invalid", f"Invalid value for '{name}': {error.get('msg')}.", name,
                   code="invalid_type")


class OpenAIRoute(NativeRoute):
    """Errors in OpenAI's shape and statuses."""

    @staticmethod
    async def refused(request: Request, refusal: Refusal) -> Response:
        status = {"invalid": 400, "busy": 429}.get(refusal.kind, STATUS[refusal.kind])
        return JSONResponse(error_body(refusal), status, headers=refusal_headers(refusal))

    @staticmethod
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return await OpenAIRoute.refused(request, from_validation(exc))

    @staticmethod
    async def http_error(request: Request, exc: HTTPException) -> Response:
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error",
                          "param": None, "code": None}}
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))


router = APIRouter(route_class=OpenAIRoute, dependencies=[Depends(require_key)],
                   tags=["OpenAI images API"])
ERRORS = {400: {"description": "a bad or unknown field (`error.param` names it), or a "
                               "body that is not JSON"},
          401: {"description": "an API key is needed, or it is wrong"},
          404: {"description": "no such model (`model_not_found`)"}}


# ----------------------------------------------------------------------------- models


class GenerationRequest(BaseModel):
    """OpenAI's fields, then the diffusion controls (`extra_body` in the openai SDK)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="\"\" (or blank) = an unconditional sample")
    model: str | None = Field(None, description="this server's model id (GET /v1/models)")
    n: int | None = Field(None, description=f"images, 1..{MAX_IMAGES_PER_REQUEST}")
    size: str | None = Field(None, description="the model's own WxH, or auto")
    response_format: str | None = Field(None, description="b64_json (url is not offered)")
    output_format: str | None = Field(None, description="png (default), jpeg or webp")
    output_compression: int | None = Field(None, description="jpeg/webp quality, 0..100")
    stream: bool | None = Field(None, description="server-sent events")
    partial_images: int | None = Field(None, description=f"previews when streaming, "
                                                         f"0..{MAX_PARTIAL_IMAGES}")
    # accepted and ignored: they choose among OpenAI's models and policies
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    complexity: str | None = None
    # the diffusion controls, in ldmkit's words or diffusers'
    negative_prompt: str | None = None
    steps: int | None = Field(None, description=f"denoising steps (default {HEADLINE.steps})")
    num_inference_steps: int | None = Field(None, description="= steps")
    guidance: float | None = Field(None, description=f"CFG scale (default {HEADLINE.guidance})")
    guidance_scale: float | None = Field(None, description="= guidance")
    guidance_rescale: float | None = Field(None, description="0..1 (default "
                                                             f"{HEADLINE.guidance_rescale})")
    sampler: str | None = Field(None, description=f"one of {', '.join(SAMPLERS)}")
    seed: int | None = Field(None, description="0..2**63-1; omitted = a random one")


def _one_of(body: GenerationRequest, a: str, b: str) -> tuple[object, str]:
    """The value of whichever of two synonyms was given, and its name."""
    if getattr(body, a) is not None and getattr(body, b) is not None:
        raise invalid(b, f"give {a} or {b}, not both")
    return (getattr(body, b), b) if getattr(body, b) is not None else (getattr(body, a), a)


def _checked(svc: ImageService, body: GenerationRequest) -> SamplingArgs:
    """The request as sampling arguments, or a Refusal naming the field as sent."""
    if body.model is not None and body.model != svc.model_id:
        raise Refusal("not_found", f"The model '{body.model}' does not exist; this server "
                      f"serves '{svc.model_id}'.", "model", code="model_not_found")
    if body.size not in (None, "auto", svc.size):
        raise invalid("size", f"this model makes {svc.size} images: ask for '{svc.size}' "
                      f"or 'auto', not {body.size!r}")
    if body.response_format not in (None, "b64_json"):
        raise invalid("response_format", "only 'b64_json' is offered: this server keeps no "
                      f"images to link to (got {body.response_format!r})")
    if body.output_format not in (None, *FORMATS):
        raise invalid("output_format", f"one of {', '.join(FORMATS)}, not "
                      f"{body.output_format!r}")
    if body.output_compression is not None and not 0 <= body.output_compression <= 100:
        raise invalid("output_compression", f"must be in 0..100, got {body.output_compression}")
    if body.partial_images is not None and not 0 <= body.partial_images <= MAX_PARTIAL_IMAGES:
        raise invalid("partial_images", f"must be in 0..{MAX_PARTIAL_IMAGES}, got "
                      f"{body.partial_images}")
    steps, steps_name = _one_of(body, "steps", "num_inference_steps")
    guidance, guidance_name = _one_of(body, "guidance", "guidance_scale")
    return svc.args(body.prompt, body.negative_prompt, 1 if body.n is None else body.n, steps,
                    guidance, body.sampler, body.seed, body.guidance_rescale,
                    names={"steps": steps_name, "guidance": guidance_name})


def encode(png_b64: str, fmt: str, compression: int | None) -> str:
    """A base64 PNG from the batcher in the asked-for format (PNG untouched)."""
    if fmt == "png":
        return png_b64
    image = Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=FORMATS[fmt], quality=100 if compression is None else compression)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _usage(tokens: int) -> dict:
    return {"input_tokens": tokens, "output_tokens": 0, "total_tokens": tokens,
            "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0}}


def _settings(args: SamplingArgs) -> dict:
    return {"negative_prompt": args.negative_prompt, "n": args.n, "steps": args.steps,
            "guidance": args.guidance, "guidance_rescale": args.guidance_rescale,
            "sampler": args.sampler, "seed": args.seed}


# ----------------------------------------------------------------------------- routes


def _model(svc: ImageService) -> dict:
    return {"id": svc.model_id, "object": "model", "created": svc.created,
            "owned_by": "ldmkit"}


@router.get("/v1/models", responses={401: ERRORS[401]})
def list_models(request: Request) -> dict:
    """The model this server runs (one)."""
    return {"object": "list", "data": [_model(request.app.state.service)]}


@router.get("/v1/models/{model}", responses={401: ERRORS[401], 404: ERRORS[404]})
def retrieve_model(model: str, request: Request) -> dict:
    svc: ImageService = request.app.state.service
    if model != svc.model_id:
        raise Refusal("not_found", f"The model '{model}' does not exist; this server "
                      f"serves '{svc.model_id}'.", "model", code="model_not_found")
    return _model(svc)


@router.post("/v1/images/generations", responses={
    **ERRORS, 200: {"content": {"application/json": {}, "text/event-stream": {}},
                    "description": "the images; with stream, image_generation.* events"},
    429: {"description": "queue full: see Retry-After"},
    500: {"description": "the output was not finite (NaN): `non_finite_output`"},
    503: {"description": "the server is shutting down"}})
async def generations(body: GenerationRequest, request: Request) -> Response:
    """Generate `n` images of the prompt (the same PNGs as `ldmkit sample` for a seed)."""
    svc: ImageService = request.app.state.service
    args = _checked(svc, body)
    fmt = body.output_format or "png"
    previews = spread_steps(body.partial_images or 0, args.steps) if body.stream else frozenset()
    job = svc.submit([args], preview_steps=previews)[0]
    if body.stream:
        return StreamingResponse(_events(job, svc, fmt, body.output_compression),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    payloads = await svc.results([job], request)
    if payloads is None:
        return Response(status_code=499)  # the client left; the work was dropped
    done = payloads[0]
    return JSONResponse({
        "created": int(time.time()), "background": "opaque", "output_format": fmt,
        "size": svc.size, "usage": _usage(done["prompt_tokens"]),
        "data": [{"b64_json": encode(b64, fmt, body.output_compression),
                  "revised_prompt": None} for b64 in done["images"]],
        "ldmkit": {"settings": _settings(args), "warnings": done["warnings"]}})


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _events(job, svc: ImageService, fmt: str, compression: int | None
                  ) -> AsyncIterator[str]:
    """partial_image events (the x0 estimate, decoded) then one completed event per
    image; `image_index` (ours) says which of the n images an event is for."""
    common = {"background": "opaque", "output_format": fmt, "quality": "auto",
              "size": svc.size}
    partials = 0
    try:  # cancelled by Starlette when the client disconnects
        while True:
            kind, payload = await job.events.get()
            now = int(time.time())
            if kind == "preview":
                for i, b64 in enumerate(payload["images"]):
                    yield _event("image_generation.partial_image", {
                        "type": "image_generation.partial_image", "created_at": now,
                        "b64_json": encode(b64, fmt, compression), "image_index": i,
                        "partial_image_index": partials, **common})
                partials += 1
            elif kind == "done":
                for i, b64 in enumerate(payload["images"]):
                    yield _event("image_generation.completed", {
                        "type": "image_generation.completed", "created_at": now,
                        "b64_json": encode(b64, fmt, compression), "image_index": i,
                        "usage": _usage(payload["prompt_tokens"]), **common,
                        "ldmkit": {"settings": _settings(job.args),
                                   "warnings": payload["warnings"]}})
                return
            else:
                yield _event("error", error_body(failure(payload)))
                return
    finally:
        job.cancel()
