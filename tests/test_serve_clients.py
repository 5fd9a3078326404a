"""The clients people already have, unchanged, against a real `ldmkit serve` process with
an API key: the official `openai` package (models, images.generate with n, size and
extra_body controls, streaming with partial images, its error classes) and the
`webuiapi` package's txt2img (A1111's API). Every image is compared byte for byte with
`ldmkit sample`. The process runs with --max-batch 1 so no two requests share a U-Net
batch: batching may move a pixel by one level (tests/test_server.py measures that)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
import webuiapi
from PIL import Image

from _serve_process import serve_in_thread, serve_process
from ldmkit.cli import main
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.sampling_args import SamplingArgs
from ldmkit.server.app import create_app
from ldmkit.server.batcher import Batcher, Job

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def port(model_dir, tmp_path_factory):
    """The key comes from LDMKIT_API_KEY, as a user keeping it out of `ps` would give it."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(model_dir, log, "--max-batch", "1",
                       env={"LDMKIT_API_KEY": KEY}) as port:
        yield port


@pytest.fixture(scope="module")
def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)


def sample_files(model_dir, out, *flags) -> list[bytes]:
    """What `ldmkit sample` writes for these flags, image by image."""
    assert main(["sample", "--model", str(model_dir), "--out", str(out), *flags]) == 0
    return [p.read_bytes() for p in sorted(out.glob("0*.png"))]


# ----------------------------------------------------------------------------- openai


def test_models_list_names_the_one_model(client):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("ldmkit", "model", "ldmkit")]
    assert client.models.retrieve("ldmkit").id == "ldmkit"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert caught.value.code == "model_not_found"


def test_images_generate_gives_ldmkit_samples_files(client, model_dir, tmp_path):
    result = client.images.generate(
        model="ldmkit", prompt="a red circle", n=2, size="16x16",
        extra_body={"seed": 7, "num_inference_steps": 4, "guidance_scale": 3.0,
                    "negative_prompt": "a blue square", "sampler": "ddim"})
    served = [base64.b64decode(image.b64_json) for image in result.data]
    expected = sample_files(model_dir, tmp_path, "--prompt", "a red circle", "--n", "2",
                            "--seed", "7", "--steps", "4", "--guidance", "3",
                            "--negative-prompt", "a blue square", "--sampler", "ddim")
    assert served == expected
    assert result.size == "16x16" and result.output_format == "png"
    assert result.usage.input_tokens > 0 and result.data[0].revised_prompt is None


def test_images_generate_ignores_openais_own_choices(client):
    result = client.images.generate(prompt="a red circle", quality="high", style="vivid",
                                    background="auto", moderation="low", user="u1",
                                    size="auto", response_format="b64_json",
                                    output_format="jpeg", output_compression=90,
                                    extra_body={"steps": 2, "seed": 1})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "JPEG" and image.size == (16, 16)


def test_a_stream_sends_partial_images_then_completed(client):
    events = list(client.images.generate(prompt="a red circle", stream=True,
                                         partial_images=2,
                                         extra_body={"steps": 6, "seed": 3}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + \
        ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    plain = client.images.generate(prompt="a red circle", extra_body={"steps": 6, "seed": 3})
    assert events[-1].b64_json == plain.data[0].b64_json


@pytest.mark.parametrize("extra, param", [
    ({"size": "1024x1024"}, "size"),
    ({"extra_body": {"guidance": "NaN"}}, "guidance"),
    ({"extra_body": {"guidance_scale": "nan"}}, "guidance_scale"),
    ({"extra_body": {"steps": 0}}, "steps"),
    ({"n": 17}, "n"),
    ({"response_format": "url"}, "response_format"),
    ({"extra_body": {"colour": "red"}}, "colour"),
])
def test_a_bad_field_is_a_bad_request_error_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red circle", **extra)
    assert caught.value.status_code == 400 and caught.value.param == param
    assert caught.value.type == "invalid_request_error"


def test_a_literal_nan_is_refused_naming_guidance(port):
    """The SDK refuses to write NaN; a lenient client (or curl) sends it as JSON allows."""
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations",
                       content=json.dumps({"prompt": "x", "guidance": float("nan")}),
                       headers={"Authorization": f"Bearer {KEY}",
                                "Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "guidance"


def test_a_wrong_key_is_an_authentication_error(port):
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope",
                          max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="a red circle")


class _Parked(Batcher):
    """A batcher whose worker never starts: what is queued stays queued."""

    def start(self) -> None:
        pass


def test_a_full_queue_is_a_rate_limit_error_with_retry_after(model_dir):
    import asyncio

    pipe = TextToImagePipeline.from_pretrained(model_dir)
    batcher = _Parked(pipe, queue_size=1)
    loop = asyncio.new_event_loop()
    batcher.submit(Job(SamplingArgs("a red circle"), loop))
    try:
        with serve_in_thread(create_app(pipe, batcher=batcher, api_key=KEY)) as port:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                                   max_retries=0)
            with pytest.raises(openai.RateLimitError) as caught:
                client.images.generate(prompt="a red circle")
            assert int(caught.value.response.headers["Retry-After"]) >= 1
    finally:
        loop.close()


# ----------------------------------------------------------------------------- A1111


def test_webuiapi_txt2img_gives_a_batch_with_a_seed_per_image(port, model_dir, tmp_path):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DPM++ 2M", steps=4)
    api.set_auth("anyone", KEY)  # A1111's --api-auth: HTTP Basic, the key as password
    result = api.txt2img(prompt="a red circle", negative_prompt="a blue square",
                         seed=40, batch_size=2, cfg_scale=3.0, width=16, height=16)
    assert len(result.images) == 2 and result.images[0].size == (16, 16)
    assert result.info["all_seeds"] == [40, 41] and result.info["seed"] == 40
    assert result.info["sampler_name"] == "DPM++ 2M" and result.info["steps"] == 4
    assert "Seed: 41" in result.info["infotexts"][1]
    for i in range(2):  # each image is ldmkit sample at its own seed
        expected = sample_files(model_dir, tmp_path / str(i), "--prompt", "a red circle",
                                "--n", "1", "--seed", str(40 + i), "--steps", "4",
                                "--guidance", "3", "--negative-prompt", "a blue square")
        assert base64.b64decode(result.json["images"][i]) == expected[0]


def test_webuiapi_probes_and_a_random_seed(port):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=2)
    api.session.headers["Authorization"] = f"Bearer {KEY}"
    assert [m["model_name"] for m in api.get_sd_models()] == ["ldmkit"]
    assert "DPM++ 2M" in [s["name"] for s in api.get_samplers()]
    assert api.get_options()["sd_model_checkpoint"] == "ldmkit"
    result = api.txt2img(prompt="a red circle", width=16, height=16)  # seed -1, "Euler a"
    assert 0 <= result.info["seed"] < 2**31 and result.info["sampler_name"] == "DDPM"
    assert result.images[0].size == (16, 16)
