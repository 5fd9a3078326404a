"""`ldmkit serve`'s API through FastAPI's TestClient, and its batcher, on the tiny model:
status codes, PNGs, determinism by seed, equality with the pipeline and the CLI, 422 per
bad field, 503 on a full queue, the SSE stream, batching and dropped work."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from _batch_jobs import run_jobs as _run_jobs
from _tiny_model import make_tiny_pipeline
from ldmkit.cli import main
from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.sampling_args import SamplingArgs
from ldmkit.server.app import MAX_IMAGES_PER_REQUEST, create_app
from ldmkit.server.batcher import Batcher, Job, png_base64

DETERMINISTIC = [name for name, info in SAMPLERS.items() if not info.stochastic]
STOCHASTIC = [name for name, info in SAMPLERS.items() if info.stochastic]


# model_dir, pipe and client: tests/conftest.py


def _request(**fields):
    return {"prompt": "a red circle", "steps": 3, "seed": 7, **fields}


def _pngs(payload) -> list[bytes]:
    return [base64.b64decode(b64) for b64 in payload["images"]]


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _alone(pipe, args: SamplingArgs) -> list[bytes]:
    """The request run by the Python API alone, encoded as the server encodes PNGs."""
    images = pipe.decode(pipe.generate_latents(
        [args.prompt] * args.n, args.negative_prompt, args.steps, args.guidance, args.sampler,
        torch.Generator().manual_seed(args.seed)))
    return [base64.b64decode(b64) for b64 in png_base64(images)]


# ----------------------------------------------------------------------------- endpoints


def test_health_and_model_describe_the_server_and_the_model(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queue_size"] == 64
    model = client.get("/v1/model").json()
    assert [s["name"] for s in model["samplers"]] == list(SAMPLERS)
    assert model["image_size"] == 16 and model["limits"]["steps"] == 50
    assert model["defaults"] == {"sampler": HEADLINE.sampler, "steps": HEADLINE.steps,
                                 "guidance": HEADLINE.guidance,
                                 "guidance_rescale": HEADLINE.guidance_rescale}
    assert client.get("/docs").status_code == 200
    assert "/v1/images" in client.get("/openapi.json").json()["paths"]


def test_the_page_and_its_script_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "Generate" in page.text
    assert client.get("/static/page.js").status_code == 200


def test_images_are_pngs_of_the_model_size_with_the_settings_used(client):
    reply = client.post("/v1/images", json=_request(n=2, negative_prompt="a blue square"))
    assert reply.status_code == 200
    body = reply.json()
    pngs = _pngs(body)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert Image.open(io.BytesIO(pngs[0])).size == (16, 16)
    assert body["settings"] == {"prompt": "a red circle", "negative_prompt": "a blue square",
                                "n": 2, "steps": 3, "guidance": HEADLINE.guidance,
                                "sampler": HEADLINE.sampler,
                                "guidance_rescale": HEADLINE.guidance_rescale, "seed": 7,
                                "strength": None, "source_prompt": None}  # None: not an edit
    assert body["warnings"] == []


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_seed_gives_the_pipelines_own_images_byte_for_byte(client, pipe, sampler):
    body = _request(n=2, sampler=sampler, guidance=3.0)
    first = _pngs(client.post("/v1/images", json=body).json())
    assert first == _pngs(client.post("/v1/images", json=body).json())
    assert first != _pngs(client.post("/v1/images", json={**body, "seed": 8}).json())
    args = SamplingArgs("a red circle", None, 2, 3, 3.0, sampler, 7)
    assert first == _alone(pipe, args)


def test_a_seed_gives_the_same_files_as_ldmkit_sample(client, model_dir, tmp_path):
    served = _pngs(client.post("/v1/images", json=_request(n=2, steps=4)).json())
    assert main(["sample", "--model", str(model_dir), "--prompt", "a red circle", "--n", "2",
                 "--steps", "4", "--seed", "7", "--out", str(tmp_path)]) == 0
    assert served == [(tmp_path / f"000{i}.png").read_bytes() for i in range(2)]


def test_an_omitted_seed_is_drawn_reported_and_reproduces(client):
    body = client.post("/v1/images", json={"prompt": "a red circle", "steps": 2}).json()
    seed = body["settings"]["seed"]
    again = client.post("/v1/images", json={"prompt": "a red circle", "steps": 2, "seed": seed})
    assert _pngs(again.json()) == _pngs(body)


@pytest.mark.filterwarnings("ignore::ldmkit.models.text.PromptTruncatedWarning")
def test_an_overlong_prompt_is_truncated_with_a_warning(client):
    body = client.post("/v1/images", json=_request(prompt="a red circle " * 10)).json()
    assert len(body["images"]) == 1
    assert body["warnings"] and "prompt is" in body["warnings"][0]


def test_guidance_rescale_defaults_to_the_headline_and_plain_cfg_can_be_asked_for(client):
    default = client.post("/v1/images", json=_request()).json()
    plain = client.post("/v1/images", json=_request(guidance_rescale=0.0)).json()
    assert default["settings"]["guidance_rescale"] == HEADLINE.guidance_rescale
    assert plain["settings"]["guidance_rescale"] == 0.0
    assert np.abs(_pixels(_pngs(default)[0]) - _pixels(_pngs(plain)[0])).max() > 0


BAD = [("guidance", float("nan")), ("guidance", float("inf")), ("guidance", -1.0),
       ("n", 0), ("n", MAX_IMAGES_PER_REQUEST + 1), ("n", 10**9), ("steps", 0),
       ("steps", 51), ("steps", 10**12), ("sampler", "lms"), ("seed", -1),
       ("prompt", "x" * 10_001), ("prompt", 12), ("n", "many"), ("colour", "red"),
       ("guidance_rescale", 1.5), ("guidance_rescale", float("nan"))]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={str(v)[:12]}" for f, v in BAD])
def test_a_bad_field_is_refused_with_422_naming_it(client, field, value):
    # Python's json writes NaN and Infinity as a lenient client (or curl) would send them
    reply = client.post("/v1/images", content=json.dumps({**_request(), field: value}),
                        headers={"Content-Type": "application/json"})
    assert reply.status_code == 422
    assert [e["loc"][-1] for e in reply.json()["detail"]] == [field]


def test_a_full_queue_answers_503_with_retry_after(pipe):
    batcher = Batcher(pipe, queue_size=2)  # never started: the queue only fills
    client = TestClient(create_app(pipe, batcher=batcher))
    loop = asyncio.new_event_loop()
    for _ in range(2):
        batcher.submit(Job(SamplingArgs("a red circle"), loop))
    reply = client.post("/v1/images", json=_request())
    assert reply.status_code == 503 and int(reply.headers["Retry-After"]) >= 1
    assert client.post("/v1/images/stream", json=_request()).status_code == 503
    assert batcher.stats.rejected == 2
    loop.close()


def _events(reply) -> list[tuple[str, dict]]:
    out, name = [], None
    for line in reply.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[len("data: "):])))
    return out


def test_the_stream_sends_previews_then_the_final_image(client):
    with client.stream("POST", "/v1/images/stream",
                       json=_request(steps=6, preview_every=2)) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = _events(reply)
    names = [name for name, _ in events]
    assert names == ["queued", "preview", "preview", "preview", "done"]
    assert [data["step"] for name, data in events if name == "preview"] == [1, 3, 5]
    assert all(_pixels(base64.b64decode(data["images"][0])).shape == (16, 16, 3)
               for name, data in events if name == "preview")
    done = events[-1][1]
    assert _pngs(done) == _pngs(client.post("/v1/images", json=_request(steps=6)).json())


def test_a_bad_stream_request_is_refused_before_streaming(client):
    reply = client.post("/v1/images/stream", json=_request(guidance=-2))
    assert reply.status_code == 422 and reply.json()["detail"][0]["loc"][-1] == "guidance"


# ----------------------------------------------------------------------------- batcher


def test_jobs_sharing_steps_sampler_and_guidance_run_as_one_batch_with_their_own_inputs(
        pipe, monkeypatch):
    specs = [SamplingArgs("a red circle", None, 2, 4, 5.0, HEADLINE.sampler, 1),
             SamplingArgs("a small blue square at the top", "green", 1, 4, 5.0,
                          HEADLINE.sampler, 2),
             SamplingArgs("a big yellow cross", None, 3, 4, 5.0, HEADLINE.sampler, 3)]
    calls = []
    denoise = pipe.denoise

    def recording(x_T, cond, uncond, *args, **kwargs):
        calls.append((x_T.clone(), cond, uncond))
        return denoise(x_T, cond, uncond, *args, **kwargs)

    monkeypatch.setattr(pipe, "denoise", recording)
    results, batcher = _run_jobs(pipe, specs)
    assert batcher.stats.batches == 1 and len(calls) == 1
    assert all(kind == "done" and p["timing"]["batch_images"] == 6 for kind, p in results)
    # each job's rows carry exactly the noise and conditioning it gets alone
    x_T, cond, uncond = calls[0]
    start = 0
    for args in specs:
        rows = slice(start, start + args.n)
        alone_cond, alone_uncond = pipe.conditioning([args.prompt] * args.n,
                                                     args.negative_prompt)
        alone_noise = pipe.initial_noise(args.n, torch.Generator().manual_seed(args.seed))
        assert torch.equal(x_T[rows], alone_noise)
        assert torch.equal(cond.tokens[rows], alone_cond.tokens)
        assert torch.equal(uncond.tokens[rows], alone_uncond.expand(args.n).tokens)
        start += args.n
    monkeypatch.undo()
    # ... so the images match the request alone up to the U-Net kernels' float rounding,
    # which depends on the batch size (oneDNN / BLAS blocking): a level of 255 at most
    for args, (_, payload) in zip(specs, results):
        for got, alone in zip(_pngs(payload), _alone(pipe, args)):
            assert np.abs(_pixels(got) - _pixels(alone)).max() <= 1


def test_max_batch_1_gives_every_request_its_alone_images_byte_for_byte(pipe):
    specs = [SamplingArgs("a red circle", None, 1, 3, 5.0, HEADLINE.sampler, s)
             for s in range(3)]
    results, batcher = _run_jobs(pipe, specs, max_batch=1)
    assert batcher.stats.batches == 3
    for args, (_, payload) in zip(specs, results):
        assert _pngs(payload) == _alone(pipe, args)


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_sampler_jobs_run_alone_with_their_own_generator(pipe, sampler):
    specs = [SamplingArgs("a red circle", None, 2, 3, 5.0, sampler, s) for s in (4, 5)]
    results, batcher = _run_jobs(pipe, specs)
    assert batcher.stats.batches == 2
    for args, (_, payload) in zip(specs, results):
        assert payload["timing"]["batch_images"] == 2
        assert _pngs(payload) == _alone(pipe, args)


def test_different_settings_never_share_a_batch(pipe):
    specs = [SamplingArgs("a red circle", None, 1, 3, 5.0, DETERMINISTIC[0], 1),
             SamplingArgs("a red circle", None, 1, 4, 5.0, DETERMINISTIC[0], 1),
             SamplingArgs("a red circle", None, 1, 3, 2.0, DETERMINISTIC[0], 1)]
    results, batcher = _run_jobs(pipe, specs)
    assert batcher.stats.batches == 3
    assert all(p["timing"]["batch_images"] == 1 for _, p in results)


def test_a_cancelled_queued_job_is_dropped_without_running(pipe):
    specs = [SamplingArgs("a red circle", None, 1, 3, 5.0, HEADLINE.sampler, s)
             for s in range(2)]
    results, batcher = _run_jobs(pipe, specs, cancel=(0,))
    assert results[0] is None and results[1][0] == "done"
    assert batcher.stats.cancelled == 1 and batcher.stats.completed == 1
    assert results[1][1]["timing"]["batch_images"] == 1  # the dropped job took no rows


def test_a_running_batch_stops_once_nobody_waits(pipe, monkeypatch):
    steps_run = []
    denoise = pipe.denoise

    def counting(*args, callback, **kwargs):
        def step(i, *rest):
            steps_run.append(i)
            time.sleep(0.01)  # slow enough that the cancel lands mid-run
            callback(i, *rest)
        return denoise(*args, callback=step, **kwargs)

    monkeypatch.setattr(pipe, "denoise", counting)
    loop = asyncio.new_event_loop()
    batcher = Batcher(pipe)
    job = Job(SamplingArgs("a red circle", None, 1, 50, 5.0, HEADLINE.sampler, 0), loop,
              preview_every=1)
    batcher.submit(job)
    batcher.start()
    try:
        kind, _ = loop.run_until_complete(asyncio.wait_for(job.events.get(), 60))
        assert kind == "preview"
        job.cancel()
        deadline = time.monotonic() + 30
        while batcher.stats.batches == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.stats.cancelled == 1 and batcher.stats.completed == 0
        assert len(steps_run) < 50
    finally:
        batcher.stop()
        loop.close()


def test_non_finite_latents_give_an_error_never_an_image(tmp_path):
    bad = make_tiny_pipeline(tmp_path)
    with torch.no_grad():
        bad.unet.conv_out.weight.fill_(float("nan"))
    with TestClient(create_app(bad)) as client:
        reply = client.post("/v1/images", json=_request())
        assert reply.status_code == 500 and "not finite" in reply.json()["detail"]
        with client.stream("POST", "/v1/images/stream", json=_request()) as stream:
            events = _events(stream)
        assert events[-1][0] == "error" and "not finite" in events[-1][1]["detail"]
        assert client.get("/health").json()["status"] == "ok"  # the worker lives on
