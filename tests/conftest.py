"""Shared test setup: never touch the network; one torch thread (test tensors are tiny,
and on a 2-core machine two threads contending with anything else run 10x slower)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch

torch.set_num_threads(1)

import pytest  # noqa: E402  (after the environment above)

# ----------------------------------------------------------------------------- the tiny model
# One definition for every module that serves or samples the tiny model (tests/_tiny_model.py).
# Module-scoped, as each module had them: a test that changes the pipeline (an adapter, a
# VAE) changes it for its own module only. A module that needs something else defines its
# own fixture of the same name, which pytest prefers.


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model folder, as `ldmkit sample` and `ldmkit serve` read one."""
    from _tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(model_dir):
    """The tiny model folder, loaded."""
    from ldmkit.pipeline import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def client(request, pipe):
    """FastAPI's TestClient on `create_app(pipe, **APP_OPTIONS)`, where a module may set
    APP_OPTIONS (max_batch, api_key, model_id, ...); `with` runs the lifespan, i.e. the
    batcher's worker thread."""
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    with TestClient(create_app(pipe, **getattr(request.module, "APP_OPTIONS", {}))) as client:
        yield client
