"""The OpenAI images API through TestClient: the response's fields, output formats,
partial images when streaming, and every bad request as a 400 in OpenAI's error shape
naming the field (never FastAPI's 422)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from ldmkit.server.service import spread_steps

APP_OPTIONS = {"model_id": "shapes-v1", "created": 1700000000}  # conftest's client


def _generate(client, **fields):
    return client.post("/v1/images/generations",
                       json={"prompt": "a red circle", "steps": 3, "seed": 5, **fields})


def test_models_are_listed_and_retrieved_in_openais_shape(client):
    assert client.get("/v1/models").json() == {"object": "list", "data": [
        {"id": "shapes-v1", "object": "model", "created": 1700000000, "owned_by": "ldmkit"}]}
    assert client.get("/v1/models/shapes-v1").json()["id"] == "shapes-v1"
    missing = client.get("/v1/models/dall-e-3")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_a_generation_answers_openais_fields(client):
    body = _generate(client, n=3, model="shapes-v1").json()
    assert set(body) >= {"created", "data", "output_format", "size", "usage"}
    assert body["size"] == "16x16" and body["output_format"] == "png"
    assert len(body["data"]) == 3
    assert all(set(d) == {"b64_json", "revised_prompt"} for d in body["data"])
    assert body["usage"]["input_tokens"] == body["usage"]["total_tokens"] > 0
    assert body["ldmkit"]["settings"]["seed"] == 5  # ours: the seed, for a rerun


def test_an_omitted_seed_is_drawn_and_reported(client):
    body = client.post("/v1/images/generations", json={"prompt": "x", "steps": 2}).json()
    seed = body["ldmkit"]["settings"]["seed"]
    again = _generate(client, prompt="x", steps=2, seed=seed).json()
    assert again["data"] == body["data"]


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client, fmt, pil):
    body = _generate(client, output_format=fmt, output_compression=80).json()
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert image.format == pil and image.size == (16, 16) and body["output_format"] == fmt


def test_synonyms_give_the_same_images(client):
    ours = _generate(client, steps=4, guidance=2.0).json()["data"]
    diffusers = _generate(client, steps=None, num_inference_steps=4,
                          guidance_scale=2.0).json()["data"]
    assert ours == diffusers


def _events(reply):
    out, name = [], None
    for line in reply.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[len("data: "):])))
    return out


def test_a_stream_spreads_partial_images_and_completes_each_image(client):
    with client.stream("POST", "/v1/images/generations",
                       json={"prompt": "a red circle", "steps": 8, "seed": 5, "n": 2,
                             "stream": True, "partial_images": 3}) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = _events(reply)
    kinds = [name for name, _ in events]
    assert kinds == ["image_generation.partial_image"] * 6 + ["image_generation.completed"] * 2
    assert all(data["type"] == name for name, data in events)
    assert [d["partial_image_index"] for _, d in events[:6]] == [0, 0, 1, 1, 2, 2]
    assert [d["image_index"] for _, d in events] == [0, 1] * 4
    plain = _generate(client, steps=8, n=2).json()["data"]
    assert [d["b64_json"] for _, d in events[-2:]] == [d["b64_json"] for d in plain]


def test_partial_images_fall_evenly_before_the_last_step():
    assert spread_steps(3, 8) == {1, 3, 5}
    assert spread_steps(1, 20) == {9}
    assert spread_steps(0, 20) == set()
    assert spread_steps(3, 1) == set()  # one step: the result is the only image


BAD = [({"size": "512x512"}, "size"), ({"size": "16"}, "size"),
       ({"response_format": "url"}, "response_format"),
       ({"output_format": "gif"}, "output_format"),
       ({"output_compression": 101}, "output_compression"),
       ({"partial_images": 4}, "partial_images"), ({"n": 0}, "n"), ({"n": 17}, "n"),
       ({"n": "two"}, "n"), ({"guidance": -1}, "guidance"),
       ({"guidance_scale": float("inf")}, "guidance_scale"),
       ({"guidance": float("nan")}, "guidance"), ({"steps": 51}, "steps"),
       ({"steps": None, "num_inference_steps": 0}, "num_inference_steps"),
       ({"num_inference_steps": 4}, "num_inference_steps"),
       ({"sampler": "euler-a"}, "sampler"), ({"seed": -3}, "seed"),
       ({"guidance_rescale": 2}, "guidance_rescale"), ({"prompt": 3}, "prompt"),
       ({"prompt": "x" * 10_001}, "prompt"), ({"stream": "maybe"}, "stream"),
       ({"colour": "red"}, "colour")]


@pytest.mark.parametrize("fields, param", BAD, ids=[f"{p}={str(f)[:20]}" for f, p in BAD])
def test_a_bad_field_is_a_400_in_openais_shape_naming_it(client, fields, param):
    reply = client.post("/v1/images/generations",
                        content=json.dumps({"prompt": "a red circle", "steps": 3, **fields}),
                        headers={"Content-Type": "application/json"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]


@pytest.mark.parametrize("content, code", [(b"{not json", "invalid_json"),
                                           (b"[1, 2]", "invalid_json"),
                                           (b"{}", "missing_required_parameter")])
def test_a_body_that_is_no_request_is_a_400(client, content, code):
    reply = client.post("/v1/images/generations", content=content,
                        headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == code


def test_another_model_is_a_404(client):
    reply = _generate(client, model="dall-e-3")
    assert reply.status_code == 404
    assert reply.json()["error"] == {
        "message": "The model 'dall-e-3' does not exist; this server serves 'shapes-v1'.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
