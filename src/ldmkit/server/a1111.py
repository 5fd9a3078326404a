"""AUTOMATIC1111's web-UI API, the part its clients use (Open WebUI's second engine,
LibreChat's SD tool, the `webuiapi` package):

    POST /sdapi/v1/txt2img      prompt, negative_prompt, steps, cfg_scale, seed (-1 =
                                random), batch_size x n_iter, width/height (the images
                                are the model's size), sampler_name
                                -> {"images", "parameters", "info"}
    POST /sdapi/v1/img2img      the same + init_images (base64), denoising_strength,
                                mask (base64, white = repaint), inpainting_mask_invert
    GET  /sdapi/v1/sd-models, loras, samplers, schedulers, options (and POST options),
         scripts

As in A1111, image i of a request has seed `seed + i` (all in `info["all_seeds"]`), so
each image alone is `ldmkit sample --n 1 --seed SEED+i` (with `--init-image` for
img2img: image i starts from init_images[i % len(init_images)]). Fields of A1111's that
change nothing here (hires fix, face restoration, scripts...) are accepted and ignored,
as A1111's clients send all of them. Errors are FastAPI's `detail`, as A1111's own are.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from ldmkit import __version__
from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.edit_inputs import open_image
from ldmkit.editing import EditInputs
from ldmkit.sampling_args import SEED_LIMIT, SamplingArgs, SamplingArgumentError
from ldmkit.server.auth import require_key
from ldmkit.server.errors import BODY_UNREADABLE, NativeRoute
from ldmkit.server.service import (
    MAX_IMAGES_PER_REQUEST,
    RANDOM_SEEDS,
    ImageService,
    decode_base64,
    invalid,
)

router = APIRouter(route_class=NativeRoute, dependencies=[Depends(require_key)],
                   prefix="/sdapi/v1", tags=["A1111 API"])
ERRORS = {400: BODY_UNREADABLE,
          401: {"description": "an API key is needed (Bearer, x-api-key, or Basic with "
                               "the key as password)"},
          422: {"description": "a field out of range (named in `detail`)"}}

# A1111's names for ours (sampler_name in, info["sampler_name"] out), and the A1111 names
# that mean one of ours: "Euler a" is ancestral sampling, which DDPM is.
A1111_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "dpmpp-2m": "DPM++ 2M"}
ALIASES = {"euler a": "ddpm", "euler_a": "ddpm", "ancestral": "ddpm", "dpm++ 2m": "dpmpp-2m",
           "dpmpp_2m": "dpmpp-2m"}
# A1111's clients often send their own default size (512, 1024) whatever the model: the
# images are then the model's size, said in info's warnings, rather than an error
MAX_SIDE = 8192
SCHEDULE_SUFFIXES = (" karras", " exponential", " uniform", " sgm uniform", " automatic")


def a1111_name(sampler: str) -> str:
    return A1111_NAMES.get(sampler, SAMPLERS[sampler].title)


def our_sampler(name: str | None) -> tuple[str, str | None]:
    """(our sampler, a warning or None) for an A1111 sampler name; an unknown one falls
    back to the headline sampler, said in the warning."""
    if not name:
        return HEADLINE.sampler, None
    wanted = name.strip().lower()
    for suffix in SCHEDULE_SUFFIXES:  # the noise-schedule part is ours to choose
        wanted = wanted.removesuffix(suffix)
    candidates = {**{k: k for k in SAMPLERS}, **{a1111_name(k).lower(): k for k in SAMPLERS},
                  **ALIASES}
    if candidates.get(wanted) in SAMPLERS:
        return candidates[wanted], None
    return HEADLINE.sampler, (f"sampler_name {name!r} is not offered; used "
                              f"{a1111_name(HEADLINE.sampler)}")


class Txt2ImgRequest(BaseModel):
    """A1111's txt2img fields that matter here; any other is accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    prompt: str = Field("", description="\"\" (or blank) = an unconditional sample")
    negative_prompt: str = ""
    steps: int | None = Field(None, description=f"default {HEADLINE.steps}")
    cfg_scale: float | None = Field(None, description=f"default {HEADLINE.guidance}")
    guidance_rescale: float | None = Field(None, description="ldmkit's; 0 = plain CFG")
    seed: int = Field(-1, description="-1 = random; image i gets seed + i")
    batch_size: int = 1
    n_iter: int = 1
    width: int | None = Field(None, description="the images are the model's size whatever "
                                                "is asked (another is said in info)")
    height: int | None = Field(None, description="as width")
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="A1111's older name for sampler_name")


class Img2ImgRequest(Txt2ImgRequest):
    """txt2img's fields and the picture(s) to start from; with `mask`, inpainting."""

    init_images: list[str] = Field(description="base64 images (a data: URL prefix is "
                                   "fine); one for all images, or one per image of the batch")
    denoising_strength: float | None = Field(None, description="0..1 (default 0.8, 1 with "
                                             "a mask); 0 = the picture's VAE round trip")
    mask: str | None = Field(None, description="base64, the pictures' size: white = "
                             "repaint, black = keep (RGBA: the opaque pixels, as A1111)")
    inpainting_mask_invert: int = Field(0, description="1 = black is repainted")
    include_init_images: bool = Field(False, description="echo init_images and mask in "
                                      "`parameters`")
    resample_steps: int | None = Field(None, description="ldmkit's: RePaint passes")
    mask_feather: int | None = Field(None, description="ldmkit's: latent cells of soft edge")
    source_prompt: str | None = Field(None, description="ldmkit's layout edit: what the "
                                      "pictures show; no mask")


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNGs")
    parameters: dict = Field(description="the request's fields")
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, ...")


NAMES = {"guidance": "cfg_scale", "sampler": "sampler_name", "n": "batch_size"}


def _checked(svc: ImageService, body: Txt2ImgRequest, batch_size: int | None = None
             ) -> tuple[list[SamplingArgs], list[str]]:
    """One n = 1 request per image with its own seed, and the warnings to pass on.
    `batch_size` overrides the body's (img2img with several pictures: one each)."""
    for name in ("batch_size", "n_iter"):
        if getattr(body, name) < 1:
            raise invalid(name, f"must be an integer >= 1, got {getattr(body, name)}")
    count = (batch_size or body.batch_size) * body.n_iter
    if count > MAX_IMAGES_PER_REQUEST:
        raise invalid("batch_size", f"batch_size x n_iter must be at most "
                      f"{MAX_IMAGES_PER_REQUEST} per request, got {count}")
    size, warnings = svc.pipe.image_size, []
    for name in ("width", "height"):
        value = getattr(body, name)
        if value is not None and not 1 <= value <= MAX_SIDE:
            raise invalid(name, f"must be in 1..{MAX_SIDE} (and the images are the model's "
                          f"{size}x{size} whatever is asked), got {value}")
    if (body.width or size, body.height or size) != (size, size):
        warnings.append(f"{body.width}x{body.height} asked: this model makes {size}x{size} "
                        "images, and these are that size")
    if body.seed < -1 or body.seed + count > SEED_LIMIT:
        raise invalid("seed", f"must be -1 (random) or in 0..2**63-{count + 1}, got {body.seed}")
    seed = body.seed if body.seed != -1 else secrets.randbelow(RANDOM_SEEDS)
    sampler, warning = our_sampler(body.sampler_name or body.sampler_index)
    negative = body.negative_prompt or None
    args = [svc.args(body.prompt, negative, 1, body.steps, body.cfg_scale, sampler, seed + i,
                     body.guidance_rescale, names=NAMES) for i in range(count)]
    return args, warnings + ([warning] if warning else [])


def _info(svc: ImageService, body: Txt2ImgRequest, args: list[SamplingArgs],
          warnings: list[str], strength: float | None = None) -> str:
    """A1111's `info`: a JSON string (not an object), with the infotext of each image."""
    a, size = args[0], svc.pipe.image_size
    name = a1111_name(a.sampler)
    negative = a.negative_prompt or ""
    edit = "" if strength is None else f"Denoising strength: {strength}, "

    def infotext(one: SamplingArgs) -> str:
        head = one.prompt + (f"\nNegative prompt: {negative}" if negative else "")
        return (f"{head}\nSteps: {one.steps}, Sampler: {name}, CFG scale: {one.guidance}, "
                f"Seed: {one.seed}, Size: {size}x{size}, Model: {svc.model_id}, {edit}"
                f"Guidance rescale: {one.guidance_rescale}, Version: ldmkit {__version__}")

    return json.dumps({
        "prompt": a.prompt, "all_prompts": [x.prompt for x in args],
        "negative_prompt": negative, "all_negative_prompts": [negative] * len(args),
        "seed": a.seed, "all_seeds": [x.seed for x in args],
        "subseed": -1, "all_subseeds": [-1] * len(args), "subseed_strength": 0,
        "width": size, "height": size, "sampler_name": name, "cfg_scale": a.guidance,
        "steps": a.steps, "batch_size": body.batch_size, "n_iter": body.n_iter,
        "restore_faces": False, "sd_model_name": svc.model_id, "sd_model_hash": None,
        "index_of_first_image": 0, "infotexts": [infotext(x) for x in args],
        "styles": [], "version": f"ldmkit {__version__}",
        **({} if strength is None else {"denoising_strength": strength}),
        "ldmkit": {"sampler": a.sampler, "guidance_rescale": a.guidance_rescale,
                   "warnings": warnings}})


@router.post("/txt2img", response_model=Txt2ImgResponse, responses={
    **ERRORS, 500: {"description": "the output was not finite (NaN)"},
    503: {"description": "queue full (see Retry-After) or shutting down"}})
async def txt2img(body: Txt2ImgRequest, request: Request) -> dict | Response:
    """batch_size x n_iter images; image i from seed + i."""
    svc: ImageService = request.app.state.service
    args, warnings = _checked(svc, body)
    return await _generate(svc, body, request, args, warnings)


async def _generate(svc: ImageService, body: Txt2ImgRequest, request: Request,
                    args: list[SamplingArgs], warnings: list[str],
                    edits: list[EditInputs] | None = None,
                    parameters: dict | None = None) -> dict | Response:
    """Queue the images (one job each) and answer A1111's response: txt2img's and
    img2img's."""
    payloads = await svc.results(svc.submit(args, edits=edits), request)
    if payloads is None:
        return Response(status_code=499)  # the client left; the work was dropped
    warnings += sorted({w for p in payloads for w in p["warnings"]})
    strength = None if edits is None else edits[0].strength
    return {"images": [p["images"][0] for p in payloads],
            "parameters": body.model_dump() if parameters is None else parameters,
            "info": _info(svc, body, args, warnings, strength)}


@router.post("/img2img", response_model=Txt2ImgResponse, responses={
    **ERRORS, 500: {"description": "the output was not finite (NaN)"},
    503: {"description": "queue full (see Retry-After) or shutting down"}})
async def img2img(body: Img2ImgRequest, request: Request) -> dict | Response:
    """img2img, or inpainting with `mask`: batch_size x n_iter images, image i from
    seed + i and init_images[i % len(init_images)]. Several pictures make batch_size
    their count, as A1111 does."""
    svc: ImageService = request.app.state.service
    pictures = body.init_images
    if not pictures:
        raise invalid("init_images", "give at least one picture (base64)")
    if len(pictures) > MAX_IMAGES_PER_REQUEST:
        raise invalid("init_images", f"at most {MAX_IMAGES_PER_REQUEST} pictures per "
                      f"request, got {len(pictures)}")
    args, warnings = _checked(svc, body, len(pictures) if len(pictures) > 1 else None)
    mask = None if body.mask is None else _a1111_mask(body.mask, body.inpainting_mask_invert)
    checked = []
    for picture in pictures:
        edit, said = svc.edit(decode_base64(picture, "init_images"), mask,
                              body.denoising_strength, body.resample_steps, body.mask_feather,
                              names=EDIT_NAMES, source_prompt=body.source_prompt)
        checked.append(edit)
        warnings += [w for w in said if w not in warnings]
    edits = [checked[i % len(checked)] for i in range(len(args))]
    parameters = body.model_dump()
    if not body.include_init_images:  # as A1111: the pictures are not sent back
        parameters.update(init_images=None, mask=None)
    return await _generate(svc, body, request, args, warnings, edits, parameters)


EDIT_NAMES = {"image": "init_images", "strength": "denoising_strength"}


def _a1111_mask(value: str, invert: int) -> Image.Image:
    """A1111's mask as ours (white = repaint): an RGBA mask with transparency means its
    opaque pixels, as A1111 reads it; `inpainting_mask_invert` 1 swaps the two."""
    if invert not in (0, 1):
        raise invalid("inpainting_mask_invert", f"must be 0 or 1, got {invert}")
    try:
        mask = open_image(decode_base64(value, "mask"), "mask")
    except SamplingArgumentError as exc:
        raise invalid(exc.field, exc.reason) from None
    if mask.mode == "RGBA" and mask.getchannel("A").getextrema() != (255, 255):
        mask = mask.getchannel("A")
    mask = mask.convert("L")
    return ImageOps.invert(mask) if invert else mask


# ----------------------------------------------------------------------------- the probes


@router.get("/sd-models", responses={401: ERRORS[401]})
def sd_models(request: Request) -> list[dict]:
    svc = request.app.state.service
    model_id, adapter = svc.model_id, ({"lora": svc.lora} if svc.lora else {})
    return [{"title": model_id, "model_name": model_id, "hash": None, "sha256": None,
             "filename": model_id, "config": None, **adapter}]


@router.get("/loras", responses={401: ERRORS[401]})
def loras(request: Request) -> list[dict]:
    """The adapter `ldmkit serve --lora` merged in (none, or one: it is always on)."""
    lora = request.app.state.service.lora
    if lora is None:
        return []
    return [{"name": lora["name"], "alias": lora["name"], "path": lora["path"],
             "metadata": {"scale": lora["scale"], "rank": lora["rank"], "merged": True}}]


@router.get("/samplers", responses={401: ERRORS[401]})
def samplers() -> list[dict]:
    return [{"name": a1111_name(name), "aliases": [name], "options": {}} for name in SAMPLERS]


@router.get("/schedulers", responses={401: ERRORS[401]})
def schedulers() -> list[dict]:
    """The model's own noise schedule is the only one."""
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
             "need_inner_model": False}]


@router.get("/options", responses={401: ERRORS[401]})
def options(request: Request) -> dict:
    return {"sd_model_checkpoint": request.app.state.service.model_id,
            "samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0}


@router.post("/options", responses=ERRORS)
def set_options(request: Request, settings: Annotated[dict, Body()]) -> None:
    """Clients select the checkpoint here: this server's one is fine, another is a 422;
    other options are accepted and change nothing."""
    model_id = request.app.state.service.model_id
    wanted = settings.get("sd_model_checkpoint")
    if wanted is not None and wanted != model_id:
        raise invalid("sd_model_checkpoint", f"this server serves {model_id!r} only, "
                      f"not {wanted!r:.80}")


@router.get("/scripts", responses={401: ERRORS[401]})
def scripts() -> dict:
    return {"txt2img": [], "img2img": []}
