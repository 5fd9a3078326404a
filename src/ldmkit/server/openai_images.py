"""OpenAI's images API, so the openai SDK, Open WebUI and LibreChat work unchanged:

    GET  /v1/models                 the one model, as {"object": "list", "data": [...]}
    GET  /v1/models/{model}         it, or 404 model_not_found
    POST /v1/images/generations     prompt, n, size, response_format, output_format, stream
                                    + partial_images; the diffusion controls as extra
                                    fields (negative_prompt, steps | num_inference_steps,
                                    guidance | guidance_scale, guidance_rescale, sampler,
                                    seed)
    POST /v1/images/edits           OpenAI's multipart form: image (or image[], several:
                                    each edited n times), mask (a PNG whose transparent
                                    pixels are repainted), prompt, n, size, ... as for
                                    generations, + strength, resample_steps, mask_feather

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: 400 for any bad or
unknown field (never FastAPI's 422), 401, 404, 429 + Retry-After when the queue is full,
500 for an output that is not finite.
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from ldmkit.diffusion.editing import steps_run
from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.editing import EditInputs
from ldmkit.sampling_args import SamplingArgs
from ldmkit.server.auth import require_key
from ldmkit.server.errors import STATUS, NativeRoute, refusal_headers
from ldmkit.server.service import (
    MAX_IMAGES_PER_REQUEST,
    MAX_UPLOAD_BYTES,
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


def from_validation(exc: RequestValidationError | ValidationError) -> Refusal:
    """FastAPI's (or pydantic's) first complaint about the body as OpenAI words it (a 400)."""
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


def _settings(args: SamplingArgs, edit: EditInputs | None = None) -> dict:
    settings = {"negative_prompt": args.negative_prompt, "n": args.n, "steps": args.steps,
                "guidance": args.guidance, "guidance_rescale": args.guidance_rescale,
                "sampler": args.sampler, "seed": args.seed}
    return settings if edit is None else {**settings, "strength": edit.strength}


# ----------------------------------------------------------------------------- routes


def _model(svc: ImageService) -> dict:
    """OpenAI's model object; ours adds `lora` when the server runs an adapter."""
    adapter = {"lora": svc.lora} if svc.lora else {}
    return {"id": svc.model_id, "object": "model", "created": svc.created,
            "owned_by": "ldmkit", **adapter}


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


RESPONSES = {
    **ERRORS, 200: {"content": {"application/json": {}, "text/event-stream": {}},
                    "description": "the images; with stream, image_generation.* events"},
    429: {"description": "queue full: see Retry-After"},
    500: {"description": "the output was not finite (NaN): `non_finite_output`"},
    503: {"description": "the server is shutting down"}}


@router.post("/v1/images/generations", responses=RESPONSES)
async def generations(body: GenerationRequest, request: Request) -> Response:
    """Generate `n` images of the prompt (the same PNGs as `ldmkit sample` for a seed)."""
    svc: ImageService = request.app.state.service
    return await _answer(svc, body, [_checked(svc, body)], request)


async def _answer(svc: ImageService, body: GenerationRequest, args: list[SamplingArgs],
                  request: Request, edits: list[EditInputs] | None = None,
                  warnings: list[str] | tuple = ()) -> Response:
    """Queue one job per args (each its own edit, for /edits) and answer with all their
    images, in order: as one JSON body, or as events when streaming."""
    fmt = body.output_format or "png"
    edits = edits or [None] * len(args)
    previews = [spread_steps(body.partial_images or 0, _steps_run(a, e)) if body.stream
                else frozenset() for a, e in zip(args, edits)]
    jobs = svc.submit(args, preview_steps=previews, edits=edits)
    if body.stream:
        return StreamingResponse(_events(jobs, svc, fmt, body.output_compression,
                                         list(warnings)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    payloads = await svc.results(jobs, request)
    if payloads is None:
        return Response(status_code=499)  # the client left; the work was dropped
    said = list(warnings) + sorted({w for p in payloads for w in p["warnings"]})
    return JSONResponse({
        "created": int(time.time()), "background": "opaque", "output_format": fmt,
        "size": svc.size, "usage": _usage(payloads[0]["prompt_tokens"]),
        "data": [{"b64_json": encode(b64, fmt, body.output_compression),
                  "revised_prompt": None} for done in payloads for b64 in done["images"]],
        "ldmkit": {"settings": _settings(args[0], edits[0]), "warnings": said}})


def _steps_run(args: SamplingArgs, edit: EditInputs | None) -> int:
    """The sampler steps a job takes: an edit runs the last part of the grid only."""
    return args.steps if edit is None else steps_run(args.steps, edit.strength)


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _events(jobs: list, svc: ImageService, fmt: str, compression: int | None,
                  warnings: list[str]) -> AsyncIterator[str]:
    """partial_image events (the x0 estimate, decoded) then one completed event per
    image, job after job; `image_index` (ours) says which of the images an event is for."""
    common = {"background": "opaque", "output_format": fmt, "quality": "auto",
              "size": svc.size}
    partials, first = 0, 0
    try:  # cancelled by Starlette when the client disconnects
        for job in jobs:
            while True:
                kind, payload = await job.events.get()
                now = int(time.time())
                if kind == "preview":
                    for i, b64 in enumerate(payload["images"], first):
                        yield _event("image_generation.partial_image", {
                            "type": "image_generation.partial_image", "created_at": now,
                            "b64_json": encode(b64, fmt, compression), "image_index": i,
                            "partial_image_index": partials, **common})
                    partials += 1
                elif kind == "done":
                    for i, b64 in enumerate(payload["images"], first):
                        yield _event("image_generation.completed", {
                            "type": "image_generation.completed", "created_at": now,
                            "b64_json": encode(b64, fmt, compression), "image_index": i,
                            "usage": _usage(payload["prompt_tokens"]), **common,
                            "ldmkit": {"settings": _settings(job.args, job.edit),
                                       "warnings": warnings + payload["warnings"]}})
                    first += job.args.n
                    break
                else:
                    yield _event("error", error_body(failure(payload)))
                    return
    finally:
        for job in jobs:
            job.cancel()


# ----------------------------------------------------------------------------- edits


class EditRequest(GenerationRequest):
    """The text fields of the edits form (the files are `image` / `image[]` and `mask`)."""

    strength: float | None = Field(None, description="how much of the picture to redraw, "
                                   "0..1 (default 1 with a mask, else 0.8)")
    resample_steps: int | None = Field(None, description="RePaint passes per inpainting "
                                       "step (default 0)")
    mask_feather: int | None = Field(None, description="latent cells of soft mask edge "
                                     "(default 1)")
    source_prompt: str | None = Field(None, description="ldmkit's layout edit: what the "
                                      "picture shows; the prompt's change keeps its shapes "
                                      "and places (no mask)")
    input_fidelity: str | None = None  # accepted and ignored, as quality is


FILES = {"image": "the picture to edit (PNG, JPEG or WebP; square, resized to the model's "
                  "size)",
         "image[]": "several pictures (the openai SDK's list): each is edited n times",
         "mask": "a PNG of the picture's size: its transparent pixels are repainted, the "
                 "opaque ones kept (applied to every picture)"}


def _form_schema() -> dict:
    """The multipart form in the OpenAPI schema: the files, then EditRequest's fields
    with their null alternative dropped (a form field is text or absent, never null)."""
    fields = {}
    for name, spec in EditRequest.model_json_schema()["properties"].items():
        choices = [c for c in spec.get("anyOf", [spec]) if c.get("type") != "null"]
        fields[name] = {**{k: v for k, v in spec.items() if k not in ("anyOf", "default")},
                        **choices[0]}
    files = {"image": {"type": "string", "format": "binary", "description": FILES["image"]},
             "image[]": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": FILES["image[]"]},
             "mask": {"type": "string", "format": "binary", "description": FILES["mask"]}}
    schema = {"type": "object", "properties": {**files, **fields},
              "required": ["image", "prompt"]}
    return {"requestBody": {"required": True,
                            "content": {"multipart/form-data": {"schema": schema}}}}


async def _read_form(request: Request) -> tuple[dict[str, str], list[bytes], bytes | None]:
    """(text fields, the pictures' bytes, the mask's bytes or None) of the edits form; a
    field sent twice, a file where text belongs or text where a file does: refused."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise Refusal("invalid", "The body must be multipart/form-data (as the openai SDK "
                      f"sends images.edit), not {kind or 'without a content type'!r}.",
                      code="invalid_content_type")
    form = await request.form(max_files=MAX_IMAGES_PER_REQUEST + 1, max_fields=200)
    fields, images, mask = {}, [], None
    for name, value in form.multi_items():
        is_file = not isinstance(value, str)
        if name in FILES:
            if not is_file:
                raise invalid(name, "must be a file (a multipart upload with a filename), "
                              "not text")
            data = await _upload(value, name)
            if name == "mask":
                if mask is not None:
                    raise invalid("mask", "give one mask (it applies to every picture)")
                mask = data
            else:
                images.append(data)
        elif is_file:
            raise invalid(name, "must be text, not a file")
        elif name in fields:
            raise invalid(name, "was given twice")
        else:
            fields[name] = value
    return fields, images, mask


async def _upload(upload, name: str) -> bytes:
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise invalid(name, f"is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
    return data


@router.post("/v1/images/edits", openapi_extra=_form_schema(), responses=RESPONSES)
async def edits(request: Request) -> Response:
    """Edit pictures with the prompt: img2img, or inpainting under a mask (its transparent
    pixels). Each picture gives n images, the same PNGs as `ldmkit sample --init-image
    PICTURE [--mask ...] --strength S --n N --seed SEED` (the mask's alpha made black and
    white: transparent = white)."""
    svc: ImageService = request.app.state.service
    fields, images, mask = await _read_form(request)
    try:
        body = EditRequest.model_validate(fields)
    except ValidationError as exc:
        raise from_validation(exc) from None
    args = _checked(svc, body)
    if not images:
        raise Refusal("invalid", "Missing required parameter: 'image'.", "image",
                      code="missing_required_parameter")
    if len(images) * args.n > MAX_IMAGES_PER_REQUEST:
        raise invalid("n", f"{len(images)} pictures x n = {args.n} is more than "
                      f"{MAX_IMAGES_PER_REQUEST} images per request")
    checked, warnings = [], []
    for picture in images:  # one job per picture, each with the request's seed
        edit, said = svc.edit(picture, mask, body.strength, body.resample_steps,
                              body.mask_feather, mask_from_alpha=True,
                              source_prompt=body.source_prompt)
        checked.append(edit)
        warnings += [w for w in said if w not in warnings]
    return await _answer(svc, body, [args] * len(images), request, checked, warnings)
