"""An empty prompt is how a user asks for an unconditional sample: "", whitespace and
control/format characters encode as the null prompt, on every surface (the encoder, the
pipeline, `ldmkit sample`, each server route: ours, OpenAI's, A1111's), and give the
image the null conditioning gives. (A per-caption padding change once made them an
IndexError everywhere.)"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_text import make_tiny_bert, make_tiny_clip, make_tiny_t5
from ldmkit.cli import main
from ldmkit.models.text import TextEncoder, is_blank

BLANKS = ["", " ", "\t\n  \r", "\x00", "\x07\x1b\x7f", "\u200b\u200d", "\u3000\xa0"]
IDS = ["empty", "space", "whitespace", "nul", "controls", "zero-width", "wide-spaces"]
STEPS, SEED = 3, 11


def test_is_blank_means_nothing_a_reader_would_see():
    assert all(is_blank(p) for p in BLANKS)
    assert not any(is_blank(p) for p in ["a", " a ", "\x00red", "\u200bx", "."])


# ----------------------------------------------------------------------------- encoder


@pytest.fixture(scope="module", params=["bert", "clip", "t5"])
def encoder(request, tmp_path_factory):
    maker = {"bert": make_tiny_bert, "clip": make_tiny_clip, "t5": make_tiny_t5}[request.param]
    return TextEncoder(str(maker(tmp_path_factory.mktemp(request.param))), max_length=12)


@pytest.mark.parametrize("prompt", BLANKS, ids=IDS)
def test_a_blank_prompt_alone_or_in_a_batch_encodes_as_null(encoder, prompt):
    null = encoder.null()
    for emb in (encoder.encode([prompt]), encoder.encode(prompt),
                encoder.encode([prompt, prompt]), encoder.encode(["red", prompt])[1]):
        assert torch.equal(emb.tokens, null.tokens.expand_as(emb.tokens))
        assert torch.equal(emb.mask, null.mask.expand_as(emb.mask))
        assert torch.equal(emb.pooled, null.pooled.expand_as(emb.pooled))


def test_an_all_blank_batch_costs_no_model_call(encoder, monkeypatch):
    encoder.null()

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran for blank prompts")

    monkeypatch.setattr(encoder, "_forward", refuse)
    assert len(encoder.encode(BLANKS)) == len(BLANKS)


# ----------------------------------------------------------------------------- pipeline


# model_dir, pipe and client (with APP_OPTIONS): tests/conftest.py


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def null_images(pipe, n: int, seed: int) -> list[bytes]:
    """`n` images from the null conditioning itself, PNG-encoded as every surface does."""
    from ldmkit.viz import to_pil

    null = pipe.text_encoder.null()
    generator = torch.Generator().manual_seed(seed)
    latents = pipe.denoise(pipe.initial_noise(n, generator), null.expand(n), null, STEPS,
                           5.0, "dpmpp-2m", generator)
    return [_png(image) for image in to_pil(pipe.decode(latents))]


@pytest.fixture(scope="module")
def unconditional(pipe) -> list[bytes]:
    return null_images(pipe, 2, SEED)


@pytest.mark.parametrize("prompt", BLANKS, ids=IDS)
def test_the_pipeline_gives_the_unconditional_images(pipe, unconditional, prompt):
    images = pipe([prompt, prompt], num_inference_steps=STEPS, guidance_scale=5.0,
                  sampler="dpmpp-2m", generator=torch.Generator().manual_seed(SEED))
    assert [_png(image) for image in images] == unconditional


@pytest.mark.parametrize("prompt", ["", "   ", "\x1b"], ids=["empty", "spaces", "esc"])
def test_ldmkit_sample_writes_the_unconditional_images(model_dir, unconditional, tmp_path,
                                                       prompt):
    assert main(["sample", "--model", str(model_dir), "--prompt", prompt, "--n", "2",
                 "--steps", str(STEPS), "--sampler", "dpmpp-2m", "--guidance", "5",
                 "--seed", str(SEED), "--out", str(tmp_path)]) == 0
    assert [(tmp_path / f"000{i}.png").read_bytes() for i in range(2)] == unconditional


# ----------------------------------------------------------------------------- server


APP_OPTIONS = {"max_batch": 1}  # for conftest's client: A1111's two images run alone


def _fields(prompt: str) -> dict:
    return {"prompt": prompt, "n": 2, "steps": STEPS, "guidance": 5.0,
            "sampler": "dpmpp-2m", "seed": SEED}


@pytest.mark.parametrize("prompt", BLANKS, ids=IDS)
def test_v1_images_answers_the_unconditional_images(client, unconditional, prompt):
    reply = client.post("/v1/images", json=_fields(prompt))
    assert reply.status_code == 200, reply.text
    assert [base64.b64decode(b) for b in reply.json()["images"]] == unconditional


def test_v1_images_stream_ends_with_the_unconditional_images(client, unconditional):
    with client.stream("POST", "/v1/images/stream", json=_fields(" \x00")) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    import json

    done = json.loads(lines[-1][len("data: "):])
    assert [base64.b64decode(b) for b in done["images"]] == unconditional


@pytest.mark.parametrize("prompt", BLANKS, ids=IDS)
def test_openai_generations_answer_the_unconditional_images(client, unconditional, prompt):
    fields = {**_fields(prompt), "guidance_scale": 5.0, "guidance": None}
    reply = client.post("/v1/images/generations", json=fields)
    assert reply.status_code == 200, reply.text
    assert [base64.b64decode(d["b64_json"]) for d in reply.json()["data"]] == unconditional


def test_an_openai_stream_completes_with_the_unconditional_images(client, unconditional):
    with client.stream("POST", "/v1/images/generations",
                       json={**_fields("\t"), "stream": True, "partial_images": 1}) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    import json

    completed = [json.loads(line[len("data: "):]) for line in lines][-2:]
    assert [base64.b64decode(c["b64_json"]) for c in completed] == unconditional


@pytest.mark.parametrize("prompt", BLANKS, ids=IDS)
def test_a1111_txt2img_answers_the_unconditional_images(client, pipe, prompt):
    """A1111 gives image i seed + i: each is the null sample at its own seed."""
    reply = client.post("/sdapi/v1/txt2img", json={
        "prompt": prompt, "negative_prompt": "", "batch_size": 2, "steps": STEPS,
        "cfg_scale": 5.0, "sampler_name": "DPM++ 2M", "seed": SEED})
    assert reply.status_code == 200, reply.text
    expected = null_images(pipe, 1, SEED) + null_images(pipe, 1, SEED + 1)
    assert [base64.b64decode(b) for b in reply.json()["images"]] == expected


def test_pixels_differ_from_a_real_prompt(client, unconditional):
    """The check above is not vacuous: a real prompt moves the pixels."""
    reply = client.post("/v1/images", json=_fields("a red circle")).json()
    real = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))), np.int16)
    blank = np.asarray(Image.open(io.BytesIO(unconditional[0])), np.int16)
    assert np.abs(real - blank).max() > 0
