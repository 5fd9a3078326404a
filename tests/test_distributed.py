"""Several processes (gloo on this CPU, one thread each, as `torchrun` starts them): each
rank draws its own batches, the all-reduced gradient is the gradient of the concatenated
batch, `torchrun ... ldmkit.cli train` is one run, a SIGKILLed run resumes bit-identically,
and a cache built by two processes equals one built by one. `pytest -k distributed`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _distributed import ROOT, free_port, launch, tiny_setup, wait
from ldmkit.config import load_config
from ldmkit.errors import UserError
from ldmkit.io import load_tensors
from ldmkit.training.checkpoint import load_latest_checkpoint

STEPS = 40
RUN = ["train.steps=40", "train.checkpoint_every=4", "train.sample_every=1000"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    setup = tiny_setup(root)
    (root / "empty.toml").write_text("")
    return root, setup


def _train_args(root, setup, out, *extra):
    return ["-m", "ldmkit.cli", "train", "--config", str(root / "empty.toml"), "--vae",
            setup["vae"], "--out", str(out), *setup["overrides"], *RUN, *extra]


@pytest.fixture(scope="module")
def grads(world):
    root, _ = world
    out = root / "grads"
    out.mkdir()
    wait(launch(["tests/_distributed.py", "grads", str(out), str(root / "setup.json")], 2, out),
         out)
    return [load_tensors(out / f"rank{r}.safetensors") for r in range(2)]


@pytest.fixture(scope="module")
def torchrun_run(world):
    """`torchrun --nproc_per_node 2 -m ldmkit.cli train ...`, uninterrupted."""
    root, setup = world
    out = root / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), *_train_args(root, setup, out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout + done.stderr


def test_distributed_ranks_draw_different_batches(grads):
    assert not torch.equal(grads[0]["seen"], grads[1]["seen"])
    for step in range(3):
        assert not torch.equal(grads[0]["seen"][step], grads[1]["seen"][step])
    assert not torch.equal(grads[0]["noise"], grads[1]["noise"])


def test_distributed_ema_stays_identical_on_every_rank(grads):
    assert torch.equal(grads[0]["ema"], grads[1]["ema"])


def test_distributed_allreduced_gradient_is_the_gradient_of_the_concatenated_batch(world,
                                                                                   grads):
    from ldmkit.models.text import TextEmbeddings, TextEncoder
    from ldmkit.models.unet import UNet
    from ldmkit.training.diffusion_step import DiffusionStep, Draws

    _, setup = world
    cfg = load_config(None, setup["overrides"])
    text = TextEncoder.from_config(cfg.text)
    unet = UNet(cfg.unet, cfg.vae.latent_channels, text.hidden_size)
    unet.load_state_dict({k[5:]: v for k, v in grads[0].items() if k.startswith("init.")})

    def cat(key):
        return torch.cat([g[key] for g in grads])

    step = DiffusionStep(unet, cfg, text.null())  # one process, no Accelerator
    step.backward(cat("latents"), TextEmbeddings(cat("tokens"), cat("mask"), cat("pooled")),
                  Draws(cat("drop"), cat("t"), cat("noise")))
    checked = 0
    for name, p in unet.named_parameters():
        if p.grad is not None:
            assert torch.equal(grads[0][f"grad.{name}"], grads[1][f"grad.{name}"]), name
            torch.testing.assert_close(grads[0][f"grad.{name}"], p.grad, rtol=0, atol=1e-5)
            checked += 1
    assert checked > 10


def test_distributed_torchrun_train_is_one_run_of_world_size_2(torchrun_run):
    out, log = torchrun_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["images_seen"] == STEPS * 4 * 1 * 2  # steps x batch x accumulation x world
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one writer, no repeats
    assert log.count("trained 40 steps") == 1  # only the main process reports and saves
    ckpt = load_latest_checkpoint(out / "checkpoints")
    assert len(ckpt.rng_ranks) == 2 and not torch.equal(ckpt.rng_ranks[0]["torch"],
                                                        ckpt.rng_ranks[1]["torch"])


def test_distributed_run_killed_by_sigkill_resumes_bit_identically(world, torchrun_run):
    root, setup = world
    out = root / "killed"
    logs = root / "killed-logs"
    logs.mkdir()
    procs = launch(_train_args(root, setup, out), 2, logs)
    latest, deadline = out / "checkpoints" / "latest", time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() >= "step-00000012"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert not (out / "summary.json").exists(), "the run ended before it was killed"
    wait(launch(_train_args(root, setup, out, "--resume"), 2, logs), logs)
    a = load_latest_checkpoint(torchrun_run[0] / "checkpoints")
    b = load_latest_checkpoint(out / "checkpoints")
    assert a.step == b.step == STEPS
    for name in ("unet", "ema"):
        for key, value in a.modules[name].items():
            assert torch.equal(value, b.modules[name][key]), (name, key)


def test_distributed_checkpoint_refuses_another_number_of_processes(world, torchrun_run):
    from ldmkit.training.diffusion_trainer import train_diffusion

    _, setup = world
    cfg = load_config(None, setup["overrides"] + RUN)
    with pytest.raises(UserError, match="written by a run of 2 process"):
        train_diffusion(cfg, setup["vae"], torchrun_run[0], resume=True)


def test_distributed_cache_built_by_two_processes_equals_one(world):
    from ldmkit.models.text import TextEncoder
    from ldmkit.training.latent_cache import CachedBatches
    from ldmkit.training.text_cache import TextEmbeddingCache

    root, setup = world
    big = [*setup["overrides"], "data.num_items=4200"]  # two shards of latents
    tables = []
    for processes in (1, 2):
        out = root / f"cache-{processes}"
        out.mkdir()
        wait(launch(["-m", "ldmkit.cli", "cache", "--config", str(root / "empty.toml"),
                     "--vae", setup["vae"], "--out", str(out), *big], processes, out), out)
        (folder,) = out.glob("latents-*")
        manifest = json.loads((folder / "manifest.json").read_text())
        text = TextEncoder.from_config(load_config(None, big).text)
        batches = CachedBatches(folder, manifest["shards"], TextEmbeddingCache(out / "text", text),
                                1.0, 4, torch.device("cpu"))
        rows = torch.arange(len(batches))
        tables.append((manifest, batches.mean.gather(rows), batches.std.gather(rows),
                       batches.captions.gather(batches.caption_row)))
    (one, *a), (two, *b) = tables
    assert len(one["shards"]) == 2
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    for x, y in zip(a[:2], b[:2]):
        assert torch.equal(x, y)
    assert torch.equal(a[2].tokens, b[2].tokens) and torch.equal(a[2].mask, b[2].mask)
    assert torch.equal(a[2].pooled, b[2].pooled)
