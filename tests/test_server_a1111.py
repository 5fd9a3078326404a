"""The A1111 shim through TestClient: txt2img's response and `info` string, seeds per
image, the sampler names A1111's clients send, the probes, and bad fields as 422s naming
the field (as A1111's own FastAPI answers)."""

from __future__ import annotations

import base64
import json

import pytest

from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.server.a1111 import our_sampler

APP_OPTIONS = {"max_batch": 1}  # conftest's client


def _txt2img(client, **fields):
    return client.post("/sdapi/v1/txt2img",
                       json={"prompt": "a red circle", "steps": 3, "seed": 9, **fields})


def test_txt2img_answers_images_parameters_and_an_info_string(client):
    reply = _txt2img(client, batch_size=2, n_iter=2, negative_prompt="green",
                     cfg_scale=4.5, sampler_name="DDIM", width=16, height=16)
    assert reply.status_code == 200
    body = reply.json()
    assert len(body["images"]) == 4 and body["parameters"]["batch_size"] == 2
    info = json.loads(body["info"])  # a JSON string, as A1111 sends it
    assert info["seed"] == 9 and info["all_seeds"] == [9, 10, 11, 12]
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (16, 16, 3, 4.5)
    assert info["sampler_name"] == "DDIM" and info["negative_prompt"] == "green"
    assert len(info["infotexts"]) == 4
    assert info["infotexts"][3].startswith("a red circle\nNegative prompt: green\nSteps: 3, "
                                           "Sampler: DDIM, CFG scale: 4.5, Seed: 12, "
                                           "Size: 16x16")


def test_image_i_of_a_batch_is_the_request_for_seed_plus_i_alone(client):
    batch = _txt2img(client, batch_size=3).json()["images"]
    alone = [_txt2img(client, seed=9 + i).json()["images"][0] for i in range(3)]
    assert batch == alone and len(set(batch)) == 3


def test_seed_minus_one_draws_one_and_reports_it(client):
    info = json.loads(_txt2img(client, seed=-1, batch_size=2).json()["info"])
    assert info["all_seeds"] == [info["seed"], info["seed"] + 1]
    again = _txt2img(client, seed=info["seed"]).json()["images"][0]
    assert again == _txt2img(client, seed=info["seed"]).json()["images"][0]


def test_the_fields_a1111_clients_send_for_other_features_are_ignored(client):
    reply = _txt2img(client, enable_hr=False, styles=[], subseed=-1, restore_faces=False,
                     tiling=False, override_settings={}, script_args=[], alwayson_scripts={},
                     scheduler="automatic", send_images=True, eta=1.0)
    assert reply.status_code == 200 and len(reply.json()["images"]) == 1


@pytest.mark.parametrize("name, ours", [("DPM++ 2M", "dpmpp-2m"), ("DPM++ 2M Karras", "dpmpp-2m"),
                                        ("dpm++ 2m", "dpmpp-2m"), ("DDIM", "ddim"),
                                        ("Euler a", "ddpm"), ("DDPM", "ddpm"), ("ddim", "ddim"),
                                        (None, HEADLINE.sampler), ("", HEADLINE.sampler)])
def test_a1111_sampler_names_map_to_ours(name, ours):
    assert our_sampler(name) == (ours, None)


def test_an_unknown_sampler_falls_back_to_the_headline_and_says_so(client):
    assert our_sampler("UniPC")[0] == HEADLINE.sampler
    info = json.loads(_txt2img(client, sampler_name="UniPC").json()["info"])
    assert info["ldmkit"]["sampler"] == HEADLINE.sampler
    assert "UniPC" in info["ldmkit"]["warnings"][0]


BAD = [({"width": 0}, "width"), ({"height": -1, "width": 16}, "height"),
       ({"width": 10**6}, "width"),
       ({"batch_size": 0}, "batch_size"), ({"n_iter": 0}, "n_iter"),
       ({"batch_size": 5, "n_iter": 4}, "batch_size"), ({"seed": -2}, "seed"),
       ({"seed": 2**63 - 1, "batch_size": 2}, "seed"), ({"steps": 0}, "steps"),
       ({"cfg_scale": float("nan")}, "cfg_scale"), ({"cfg_scale": 101}, "cfg_scale"),
       ({"prompt": "x" * 10_001}, "prompt"), ({"batch_size": "two"}, "batch_size")]


@pytest.mark.parametrize("fields, name", BAD, ids=[f"{n}={str(f)[:20]}" for f, n in BAD])
def test_a_bad_field_is_a_422_naming_it(client, fields, name):
    reply = client.post("/sdapi/v1/txt2img",
                        content=json.dumps({"prompt": "a red circle", "steps": 3, **fields}),
                        headers={"Content-Type": "application/json"})
    assert reply.status_code == 422
    assert [e["loc"][-1] for e in reply.json()["detail"]] == [name]


def test_the_probes_describe_the_one_model_and_our_samplers(client):
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "ldmkit"
    samplers = client.get("/sdapi/v1/samplers").json()
    assert [s["aliases"][0] for s in samplers] == list(SAMPLERS)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "ldmkit"
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get("/sdapi/v1/schedulers").status_code == 200
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "ldmkit",
                                                  "samples_format": "png"}).status_code == 200
    other = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"})
    assert other.status_code == 422
    assert other.json()["detail"][0]["loc"][-1] == "sd_model_checkpoint"


def test_another_size_gives_the_models_size_and_says_so(client):
    """A1111's clients send their own default (512x512, 1024x1024) whatever the model:
    the images are the model's size, the same as asked at it, and info says so."""
    body = _txt2img(client, width=512, height=512).json()
    info = json.loads(body["info"])
    assert (info["width"], info["height"]) == (16, 16)
    assert "512x512 asked" in info["ldmkit"]["warnings"][0]
    assert body["images"] == _txt2img(client, width=16, height=16).json()["images"]


def test_images_are_base64_pngs_of_the_model_size(client):
    from io import BytesIO

    from PIL import Image

    png = base64.b64decode(_txt2img(client).json()["images"][0])
    assert Image.open(BytesIO(png)).size == (16, 16)
