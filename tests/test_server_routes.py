"""Every API on the one batcher: for the same prompt, seed and settings, ldmkit's own
route, OpenAI's and A1111's answer the same PNG bytes as `ldmkit sample`; a full queue
refuses on all of them (each in its own words), and a non-finite output is an error on
all of them, never an image."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
import torch
from fastapi.testclient import TestClient

from _tiny_model import make_tiny_pipeline
from ldmkit.cli import main
from ldmkit.sampling_args import SamplingArgs
from ldmkit.server.app import create_app
from ldmkit.server.batcher import Batcher, Job

PROMPT, SEED, STEPS, GUIDANCE = "a small blue square at the top", 21, 4, 3.0


# model_dir, pipe and client: tests/conftest.py


def _native(client, sampler, seed=SEED):
    body = {"prompt": PROMPT, "steps": STEPS, "guidance": GUIDANCE, "sampler": sampler,
            "seed": seed}
    return [base64.b64decode(b) for b in client.post("/v1/images", json=body).json()["images"]]


def _openai(client, sampler, seed=SEED):
    body = {"prompt": PROMPT, "steps": STEPS, "guidance_scale": GUIDANCE,
            "sampler": sampler, "seed": seed, "model": "ldmkit", "size": "16x16"}
    reply = client.post("/v1/images/generations", json=body).json()
    return [base64.b64decode(d["b64_json"]) for d in reply["data"]]


def _a1111(client, sampler, seed=SEED):
    names = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp-2m": "DPM++ 2M Karras"}
    body = {"prompt": PROMPT, "steps": STEPS, "cfg_scale": GUIDANCE, "seed": seed,
            "sampler_name": names.get(sampler, sampler), "width": 16, "height": 16}
    reply = client.post("/sdapi/v1/txt2img", json=body).json()
    assert json.loads(reply["info"])["ldmkit"]["sampler"] == sampler
    return [base64.b64decode(b) for b in reply["images"]]


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "ddim", "ddpm"])
def test_every_route_answers_ldmkit_samples_bytes(client, model_dir, tmp_path, sampler):
    assert main(["sample", "--model", str(model_dir), "--prompt", PROMPT, "--n", "1",
                 "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--sampler", sampler,
                 "--seed", str(SEED), "--out", str(tmp_path)]) == 0
    expected = [(tmp_path / "0000.png").read_bytes()]
    assert _native(client, sampler) == expected
    assert _openai(client, sampler) == expected
    assert _a1111(client, sampler) == expected
    assert _native(client, sampler, SEED + 1) != expected  # the seed matters


class _Parked(Batcher):
    def start(self) -> None:  # the worker never runs: the queue only fills
        pass


def test_a_full_queue_refuses_on_every_route_each_in_its_words(pipe):
    batcher = _Parked(pipe, queue_size=1)
    loop = asyncio.new_event_loop()
    batcher.submit(Job(SamplingArgs("a red circle"), loop))
    with TestClient(create_app(pipe, batcher=batcher)) as client:
        native = client.post("/v1/images", json={"prompt": "x"})
        oai = client.post("/v1/images/generations", json={"prompt": "x"})
        a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "x"})
    loop.close()
    assert native.status_code == 503 and "queue is full" in native.json()["detail"]
    assert oai.status_code == 429 and oai.json()["error"]["code"] is None
    assert oai.json()["error"]["type"] == "requests"
    assert a1111.status_code == 503
    assert all(int(r.headers["Retry-After"]) >= 1 for r in (native, oai, a1111))
    assert batcher.stats.rejected == 3


def test_an_a1111_batch_is_queued_whole_or_not_at_all(pipe):
    batcher = _Parked(pipe, queue_size=3)
    with TestClient(create_app(pipe, batcher=batcher)) as client:
        reply = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 4})
    assert reply.status_code == 503 and batcher.snapshot()["queued"] == 0


def test_a_non_finite_output_is_an_error_on_every_route(tmp_path):
    bad = make_tiny_pipeline(tmp_path)
    with torch.no_grad():
        bad.unet.conv_out.weight.fill_(float("nan"))
    with TestClient(create_app(bad)) as client:
        oai = client.post("/v1/images/generations", json={"prompt": "x", "steps": 2})
        a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})
        with client.stream("POST", "/v1/images/generations",
                           json={"prompt": "x", "steps": 2, "stream": True}) as stream:
            lines = list(stream.iter_lines())
    assert oai.status_code == 500 and oai.json()["error"]["code"] == "non_finite_output"
    assert "not finite" in oai.json()["error"]["message"]
    assert a1111.status_code == 500 and "not finite" in a1111.json()["detail"]
    assert lines[0] == "event: error"
    assert json.loads(lines[1][len("data: "):])["error"]["code"] == "non_finite_output"
