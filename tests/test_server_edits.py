"""Edits on `ldmkit serve` through TestClient: img2img and inpainting on ldmkit's own
route, OpenAI's multipart /v1/images/edits and A1111's /sdapi/v1/img2img give the PNG
bytes of `ldmkit sample --init-image ... --strength ... [--mask ...]` for the same seed;
edits of different pictures batch without mixing; a layout edit (`source_prompt`) gives the
bytes of `ldmkit sample --source-prompt` on every API; bad pictures, masks, strengths and
source prompts are refused naming the field in each API's words; `ldmkit serve --lora`
merges the adapter, says so, and refuses one for another model with exit 2."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from torch import nn

from _batch_jobs import run_jobs
from _tiny_model import make_tiny_pipeline
from ldmkit.cli import main
from ldmkit.diffusion.registry import HEADLINE
from ldmkit.editing import prepare_edit
from ldmkit.models import lora
from ldmkit.sampling_args import SamplingArgs
from ldmkit.server.batcher import Job

PROMPT, SEED, STEPS = "a red circle", 13, 4
# conftest's client: one job per U-Net call, so a request's several pictures give each
# picture's images alone byte for byte (batching may move a level: the batcher tests below)
APP_OPTIONS = {"max_batch": 1}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def picture(colour=(200, 40, 40), size=16) -> Image.Image:
    """A square of `colour` on blue, the model's size."""
    image = Image.new("RGB", (size, size), (30, 60, 200))
    image.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def white_left(size=16) -> Image.Image:
    """ldmkit's and A1111's mask: the left half white (repaint)."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    return mask


def clear_left(size=16) -> Image.Image:
    """OpenAI's mask for the same edit: the left half transparent."""
    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    mask.putalpha(ImageOps.invert(white_left(size)))
    return mask


def sample_files(model_dir, out, *flags) -> list[bytes]:
    assert main(["sample", "--model", str(model_dir), "--prompt", PROMPT, "--steps",
                 str(STEPS), "--out", str(out), *flags]) == 0
    return [p.read_bytes() for p in sorted(out.glob("0*.png"))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The picture and mask as files, for `ldmkit sample`."""
    root = tmp_path_factory.mktemp("inputs")
    picture().save(root / "picture.png")
    picture((240, 220, 30)).save(root / "yellow.png")
    white_left().save(root / "mask.png")
    return root


def _openai_edit(client, pictures, mask=None, name="image", **fields):
    form = {"prompt": PROMPT, "steps": str(STEPS), "seed": str(SEED),
            **{k: str(v) for k, v in fields.items()}}
    uploads = [(name, (f"p{i}.png", data, "image/png")) for i, data in enumerate(pictures)]
    if mask is not None:
        uploads.append(("mask", ("mask.png", mask, "image/png")))
    return client.post("/v1/images/edits", data=form, files=uploads)


def _images(body) -> list[bytes]:
    if "data" in body:
        return [base64.b64decode(d["b64_json"]) for d in body["data"]]
    return [base64.b64decode(b) for b in body["images"]]


# ----------------------------------------------------------------------------- the same bytes


def test_native_img2img_is_ldmkit_sample_byte_for_byte(client, model_dir, files, tmp_path):
    reply = client.post("/v1/images", json={
        "prompt": PROMPT, "steps": STEPS, "seed": SEED, "n": 2, "strength": 0.6,
        "image": _b64(_png(picture()))})
    assert reply.status_code == 200, reply.text
    assert reply.json()["settings"]["strength"] == 0.6
    assert _images(reply.json()) == sample_files(
        model_dir, tmp_path, "--n", "2", "--seed", str(SEED), "--init-image",
        str(files / "picture.png"), "--strength", "0.6")


def test_native_inpainting_is_ldmkit_sample_byte_for_byte(client, model_dir, files, tmp_path):
    reply = client.post("/v1/images", json={
        "prompt": PROMPT, "steps": STEPS, "seed": SEED, "image": _b64(_png(picture())),
        "mask": _b64(_png(white_left())), "mask_feather": 2})
    assert reply.json()["settings"]["strength"] == 1.0  # a mask's default
    assert _images(reply.json()) == sample_files(
        model_dir, tmp_path, "--n", "1", "--seed", str(SEED), "--init-image",
        str(files / "picture.png"), "--mask", str(files / "mask.png"), "--mask-feather", "2")


def test_openai_edit_with_an_alpha_mask_is_ldmkit_sample_with_its_black_and_white(
        client, model_dir, files, tmp_path):
    reply = _openai_edit(client, [_png(picture())], _png(clear_left()), n=2, size="16x16",
                         guidance_scale=3.0)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["size"] == "16x16" and len(body["data"]) == 2
    assert body["ldmkit"]["settings"]["strength"] == 1.0
    assert _images(body) == sample_files(
        model_dir, tmp_path, "--n", "2", "--seed", str(SEED), "--guidance", "3",
        "--init-image", str(files / "picture.png"), "--mask", str(files / "mask.png"))


def test_openai_edit_without_a_mask_is_img2img_at_the_pipelines_strength(client):
    body = _openai_edit(client, [_png(picture())]).json()
    assert body["ldmkit"]["settings"]["strength"] == 0.8
    assert _images(body) == _images(_openai_edit(client, [_png(picture())],
                                                 strength=0.8).json())


def test_several_pictures_are_each_edited_n_times_in_order(client):
    red, yellow = _png(picture()), _png(picture((240, 220, 30)))
    both = _images(_openai_edit(client, [red, yellow], name="image[]", n=2,
                                strength=0.5).json())
    assert len(both) == 4
    assert both[:2] == _images(_openai_edit(client, [red], n=2, strength=0.5).json())
    assert both[2:] == _images(_openai_edit(client, [yellow], n=2, strength=0.5).json())
    assert both[0] != both[2]


def test_a_larger_square_picture_is_resized_with_a_warning(client):
    body = _openai_edit(client, [_png(picture(size=32))], strength=0.5).json()
    assert body["ldmkit"]["warnings"] == ["image: resized from 32x32 to the model's 16x16"]


def test_a_layout_edit_on_each_api_is_ldmkit_sample_source_prompt(client, model_dir, files,
                                                                  tmp_path):
    want = sample_files(model_dir, tmp_path, "--n", "2", "--seed", str(SEED), "--guidance",
                        "20", "--init-image", str(files / "picture.png"), "--source-prompt",
                        "a blue square")
    native = client.post("/v1/images", json={
        "prompt": PROMPT, "steps": STEPS, "seed": SEED, "n": 2, "guidance": 20,
        "image": _b64(_png(picture())), "source_prompt": "a blue square"})
    assert native.status_code == 200, native.text
    assert native.json()["settings"]["source_prompt"] == "a blue square"
    openai = _openai_edit(client, [_png(picture())], n=2, guidance_scale=20,
                          source_prompt="a blue square")
    a1111 = client.post("/sdapi/v1/img2img", json={
        "prompt": PROMPT, "steps": STEPS, "seed": SEED, "batch_size": 1, "n_iter": 2,
        "cfg_scale": 20, "init_images": [_b64(_png(picture()))],
        "source_prompt": "a blue square"})
    assert _images(native.json()) == _images(openai.json()) == want
    assert any(w.startswith("sampler: a layout edit samples with the DDPM posterior")
               for w in native.json()["warnings"])  # said, not silently swapped
    alone = sample_files(model_dir, tmp_path / "one", "--n", "1", "--seed", str(SEED),
                         "--guidance", "20", "--init-image", str(files / "picture.png"),
                         "--source-prompt", "a blue square")
    assert _images(a1111.json())[0] == alone[0]  # A1111: image i is seed + i, alone


def test_a1111_img2img_gives_each_image_at_its_seed(client, model_dir, files, tmp_path):
    reply = client.post("/sdapi/v1/img2img", json={
        "prompt": PROMPT, "steps": STEPS, "seed": SEED, "batch_size": 2,
        "denoising_strength": 0.7, "init_images": ["data:image/png;base64,"
                                                   + _b64(_png(picture()))]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [SEED, SEED + 1] and info["denoising_strength"] == 0.7
    assert "Denoising strength: 0.7" in info["infotexts"][0]
    assert body["parameters"]["init_images"] is None  # not echoed, as A1111
    for i in range(2):
        assert _images(body)[i] == sample_files(
            model_dir, tmp_path / str(i), "--n", "1", "--seed", str(SEED + i),
            "--init-image", str(files / "picture.png"), "--strength", "0.7")[0]


def test_a1111_inpainting_reads_white_as_repaint_or_inverted(client, model_dir, files,
                                                             tmp_path):
    def inpaint(mask: Image.Image, invert: int) -> list[bytes]:
        return _images(client.post("/sdapi/v1/img2img", json={
            "prompt": PROMPT, "steps": STEPS, "seed": SEED, "denoising_strength": 1.0,
            "init_images": [_b64(_png(picture()))], "mask": _b64(_png(mask)),
            "inpainting_mask_invert": invert}).json())

    expected = sample_files(model_dir, tmp_path, "--n", "1", "--seed", str(SEED),
                            "--init-image", str(files / "picture.png"), "--mask",
                            str(files / "mask.png"))
    assert inpaint(white_left(), 0) == expected
    assert inpaint(ImageOps.invert(white_left()), 1) == expected


def test_a1111_several_init_images_make_the_batch(client):
    red, yellow = _b64(_png(picture())), _b64(_png(picture((240, 220, 30))))
    body = client.post("/sdapi/v1/img2img", json={
        "prompt": PROMPT, "steps": STEPS, "seed": SEED, "init_images": [red, yellow]}).json()
    assert json.loads(body["info"])["all_seeds"] == [SEED, SEED + 1]
    alone = client.post("/sdapi/v1/img2img", json={
        "prompt": PROMPT, "steps": STEPS, "seed": SEED + 1, "init_images": [yellow]}).json()
    assert body["images"][1] == alone["images"][0]


# ----------------------------------------------------------------------------- the batcher


def _edit(image, mask=None, strength=0.6, resample=0):
    return prepare_edit(image, mask, 1, 16, strength, resample)


def test_edits_of_different_pictures_share_a_batch_without_mixing(pipe):
    specs = [SamplingArgs(PROMPT, None, 2, STEPS, 5.0, HEADLINE.sampler, 1),
             SamplingArgs("a big yellow cross", None, 1, STEPS, 5.0, HEADLINE.sampler, 2)]
    edits = [_edit(picture(), white_left()), _edit(picture((240, 220, 30)), white_left())]
    results, batcher = run_jobs(pipe, specs, edits=edits)
    assert batcher.stats.batches == 1
    assert all(p["timing"]["batch_images"] == 3 for _, p in results)
    for args, edit, (_, payload) in zip(specs, edits, results):  # as each alone
        alone = pipe.edit_images([args.prompt] * args.n, edit.repeat(args.n), None,
                                 args.steps, args.guidance, args.sampler,
                                 torch.Generator().manual_seed(args.seed))
        for got, image in zip(_images(payload), alone):
            pixels = np.asarray(Image.open(io.BytesIO(got)).convert("RGB"), dtype=np.int16)
            want = np.round((image.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int16)
            assert np.abs(pixels - want).max() <= 1  # the U-Net's batch-size rounding


def test_edits_that_start_elsewhere_or_mask_differently_run_apart(pipe):
    loop = None
    args = SamplingArgs(PROMPT, None, 1, STEPS, 5.0, HEADLINE.sampler, 1)
    keys = [Job(args, loop).key, Job(args, loop, edit=_edit(picture())).key,
            Job(args, loop, edit=_edit(picture(), strength=0.3)).key,
            Job(args, loop, edit=_edit(picture(), white_left())).key]
    assert len(set(keys)) == 4  # text-to-image, img2img at two levels, inpainting
    same_level = Job(args, loop, edit=_edit(picture((0, 255, 0)))).key
    assert same_level == keys[1]  # another picture, same start: one batch
    assert Job(args, loop, edit=_edit(picture(), white_left(), resample=1)).key is None


# ----------------------------------------------------------------------------- refusals

OPENAI_REFUSALS = [
    ({"pictures": [b"not an image"]}, "image", "not a readable image"),
    ({"mask": _png(clear_left(8))}, "mask", "is 8x8, not the image's 16x16"),
    ({"mask": _png(white_left())}, "mask", "has no alpha channel"),
    ({"mask": _png(Image.new("RGBA", (16, 16), (0, 0, 0, 255)))}, "mask", "no white pixel"),
    ({"pictures": [_png(Image.new("RGB", (16, 8)))]}, "image", "another aspect ratio"),
    ({"strength": 1.5}, "strength", "0..1"),
    ({"strength": "lots"}, "strength", "number"),
    ({"n": 9, "pictures": [_png(picture())] * 2}, "n", "more than 16"),
    ({"size": "64x64"}, "size", "16x16"),
    ({"bogus": 1}, "bogus", "Unknown parameter"),
    ({"pictures": []}, "image", "Missing required parameter"),
    ({"resample_steps": 2}, "resample_steps", "give a mask"),
    ({"source_prompt": "the"}, "source_prompt", "has none of the words"),  # the worker's
    ({"source_prompt": "a red circle", "mask": _png(clear_left())}, "source_prompt",
     "finds its own region"),
]


@pytest.mark.parametrize("given, param, words", OPENAI_REFUSALS,
                         ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(OPENAI_REFUSALS)])
def test_openai_edit_refusals_are_400s_naming_the_param(client, given, param, words):
    given = dict(given)
    reply = _openai_edit(client, given.pop("pictures", [_png(picture())]),
                         given.pop("mask", None), **given)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_openai_edit_wants_a_form_with_files(client):
    as_json = client.post("/v1/images/edits", json={"prompt": PROMPT})
    assert as_json.status_code == 400
    assert "multipart/form-data" in as_json.json()["error"]["message"]
    as_text = client.post("/v1/images/edits", data={"prompt": PROMPT, "image": "abc"})
    assert as_text.json()["error"]["param"] == "image"


@pytest.mark.parametrize("route, fields, loc", [
    ("/v1/images", {"image": "%%%"}, "image"),
    ("/v1/images", {"mask": _b64(_png(white_left()))}, "image"),  # a mask needs a picture
    ("/v1/images", {"image": _b64(_png(picture())), "strength": -0.1}, "strength"),
    ("/v1/images", {"image": _b64(_png(picture())), "mask": _b64(_png(white_left(8)))},
     "mask"),
    ("/v1/images", {"image": _b64(_png(picture())), "mask": _b64(_png(white_left())),
                    "mask_feather": 9}, "mask_feather"),
    ("/v1/images", {"image": _b64(_png(picture())), "mask": _b64(_png(white_left())),
                    "source_prompt": "a red circle"}, "source_prompt"),
    ("/v1/images", {"image": _b64(_png(picture())), "source_prompt": "the"}, "source_prompt"),
    ("/v1/images", {"source_prompt": "a red circle"}, "image"),
    ("/v1/images", {"image": _b64(_png(picture())), "source_prompt": "red " * 5000},
     "source_prompt"),  # bounded as the prompt is
    ("/sdapi/v1/img2img", {"init_images": [_b64(_png(picture()))], "source_prompt": "the"},
     "source_prompt"),
    ("/sdapi/v1/img2img", {"init_images": []}, "init_images"),
    ("/sdapi/v1/img2img", {"init_images": ["not base64!"]}, "init_images"),
    ("/sdapi/v1/img2img", {"init_images": [_b64(b"GIF89a nonsense")]}, "init_images"),
    ("/sdapi/v1/img2img", {"init_images": [_b64(_png(picture()))],
                           "denoising_strength": 2}, "denoising_strength"),
    ("/sdapi/v1/img2img", {"init_images": [_b64(_png(picture()))],
                           "mask": _b64(_png(white_left())), "inpainting_mask_invert": 2},
     "inpainting_mask_invert"),
    ("/sdapi/v1/img2img", {"init_images": [_b64(_png(picture()))],
                           "mask": _b64(_png(Image.new("L", (16, 16), 128)))}, "mask"),
])
def test_native_and_a1111_refusals_are_422s_naming_the_field(client, route, fields, loc):
    reply = client.post(route, json={"prompt": PROMPT, "steps": 2, **fields})
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"][0]["loc"] == ["body", loc]


# ----------------------------------------------------------------------------- serve --lora


def _adapter(model_dir, directory):
    """An adapter for the tiny model whose B is not zero (as if trained)."""
    pipe = make_tiny_pipeline(directory / "base")  # the model folder's very weights
    lora.add_lora(pipe.unet, 4, 8.0, ["attention"])
    torch.manual_seed(1)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    return lora.save_lora(pipe.unet, directory / "adapter", {"model": str(model_dir)})


def _served_app(monkeypatch, argv):
    """`ldmkit serve ARGV`'s app and exit code, uvicorn.run stopped before it listens."""
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    code = main(["serve", "--port", "0", *argv])
    return (apps[0] if apps else None), code


def test_serve_lora_merges_the_adapter_and_reports_it(model_dir, tmp_path, monkeypatch):
    adapter = _adapter(model_dir, tmp_path)
    app, code = _served_app(monkeypatch, ["--model", str(model_dir), "--device", "cpu",
                                          "--lora", str(adapter), "--lora-scale", "0.5"])
    assert code == 0
    with TestClient(app) as client:
        served = client.get("/v1/models").json()["data"][0]["lora"]
        assert served["scale"] == 0.5 and served["merged"] and served["rank"] == 4
        assert client.get("/sdapi/v1/sd-models").json()[0]["lora"]["name"] == "adapter"
        assert client.get("/sdapi/v1/loras").json()[0]["name"] == "adapter"
        assert client.get("/v1/model").json()["lora"]["path"] == str(adapter)
        body = client.post("/v1/images", json={"prompt": PROMPT, "steps": STEPS,
                                               "seed": SEED, "n": 2}).json()
    expected = sample_files(model_dir, tmp_path / "sample", "--n", "2", "--seed", str(SEED),
                            "--lora", str(adapter), "--lora-scale", "0.5", "--merge")
    assert _images(body) == expected
    assert expected != sample_files(model_dir, tmp_path / "base", "--n", "2", "--seed",
                                    str(SEED))


def test_serve_refuses_an_adapter_for_another_model_with_exit_2(model_dir, tmp_path,
                                                               monkeypatch, capsys):
    other = make_tiny_pipeline(tmp_path / "other", seed=5)
    lora.add_lora(other.unet, 2, 2.0, ["attention"])
    lora.save_lora(other.unet, tmp_path / "foreign")
    for folder, words in [(tmp_path / "foreign", "trained on other weights"),
                          (tmp_path / "missing", "LoRA adapter folder not found")]:
        app, code = _served_app(monkeypatch, ["--model", str(model_dir), "--device", "cpu",
                                              "--lora", str(folder)])
        assert code == 2 and app is None
        assert words in capsys.readouterr().err


def test_serve_vae_decodes_with_that_decoder_as_sample_vae_does(model_dir, tmp_path,
                                                                monkeypatch, capsys):
    make_tiny_pipeline(tmp_path / "other", seed=5).save_pretrained(tmp_path / "other-model")
    decoder = tmp_path / "other-model" / "vae"
    app, code = _served_app(monkeypatch, ["--model", str(model_dir), "--device", "cpu",
                                          "--vae", str(decoder)])
    assert code == 0 and f"+ decoder {decoder}" in capsys.readouterr().out
    with TestClient(app) as client:
        body = client.post("/v1/images", json={"prompt": PROMPT, "steps": STEPS,
                                               "seed": SEED}).json()
    expected = sample_files(model_dir, tmp_path / "sample", "--n", "1", "--seed", str(SEED),
                            "--vae", str(decoder))
    assert _images(body) == expected
    assert expected != sample_files(model_dir, tmp_path / "base", "--n", "1", "--seed",
                                    str(SEED))
    app, code = _served_app(monkeypatch, ["--model", str(model_dir), "--device", "cpu",
                                          "--vae", str(tmp_path / "missing")])
    assert code == 2 and app is None and "missing" in capsys.readouterr().err
