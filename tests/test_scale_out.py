"""Scale-out pieces that one process can check: gradient accumulation, per-rank seeds,
per-rank RNG in checkpoints, the run-folder lock, the sharded latent cache (built once,
damaged shards rebuilt) and the `ldmkit cache` command. The multi-process behaviour is in
test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch

from _distributed import tiny_setup
from ldmkit.cli import main
from ldmkit.config import load_config
from ldmkit.errors import UserError
from ldmkit.models.text import TextEmbeddings
from ldmkit.models.unet import UNet
from ldmkit.training import latent_cache
from ldmkit.training.checkpoint import (
    load_latest_checkpoint,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
)
from ldmkit.training.diffusion_step import DiffusionStep
from ldmkit.training.diffusion_trainer import train_diffusion
from ldmkit.training.distributed import RunLock, rank_seed, split_random_streams


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-out")
    return root, tiny_setup(root)


def _cfg(setup, *extra):
    return load_config(None, setup[1]["overrides"] + ["train.steps=2", "train.grad_clip=0",
                                                      "train.checkpoint_every=1000", *extra])


def _grads_of_one_update(cfg, latents, text):
    torch.manual_seed(0)
    unet = UNet(cfg.unet, 4, text.tokens.shape[-1])
    step = DiffusionStep(unet, cfg, TextEmbeddings(torch.zeros(1, 12, 32),
                                                   torch.ones(1, 12, dtype=torch.bool)))
    torch.manual_seed(1)
    loss = step.backward(latents, text)
    return loss, {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_grad_accumulation_of_2_micro_batches_of_B_equals_one_step_of_2B(setup):
    latents = torch.randn(8, 4, 4, 4)
    text = TextEmbeddings(torch.randn(8, 12, 32), torch.rand(8, 12) > 0.3)
    one_loss, one = _grads_of_one_update(_cfg(setup), latents, text)
    acc_loss, acc = _grads_of_one_update(_cfg(setup, "train.grad_accum_steps=2"), latents, text)
    torch.testing.assert_close(acc_loss, one_loss, rtol=0, atol=1e-5)
    assert one.keys() == acc.keys()
    for name in one:
        torch.testing.assert_close(acc[name], one[name], rtol=0, atol=1e-5)


def test_steps_and_lr_schedule_count_optimizer_updates_not_micro_batches(setup):
    cfg = _cfg(setup, "train.grad_accum_steps=4", "train.warmup_steps=10")
    unet = UNet(cfg.unet, 4, 32)
    step = DiffusionStep(unet, cfg, TextEmbeddings(torch.zeros(1, 12, 32),
                                                   torch.ones(1, 12, dtype=torch.bool)))
    step(torch.randn(8, 4, 4, 4), TextEmbeddings(torch.randn(8, 12, 32),
                                                 torch.ones(8, 12, dtype=torch.bool)))
    assert step.step == 1 and step.scheduler.last_epoch == 1
    assert step.scheduler.get_last_lr()[0] == pytest.approx(cfg.train.lr * 2 / 10)


def test_rank_0_keeps_the_seed_and_other_ranks_get_streams_of_their_own():
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8 and rank_seed(7, 1) != rank_seed(8, 1)
    torch.manual_seed(7)
    torch.rand(3)
    before = torch.get_rng_state()
    split_random_streams(7, 0)  # a single process: its stream goes on untouched
    assert torch.equal(torch.get_rng_state(), before)
    split_random_streams(7, 1)
    first = torch.rand(4)
    split_random_streams(7, 1)
    assert torch.equal(torch.rand(4), first)  # reproducible for a given seed and rank


def test_a_checkpoint_gives_every_rank_its_own_rng_and_refuses_another_world_size(tmp_path):
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng_state())
    net = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 5, {"net": net}, rng_ranks=states)
    ckpt = load_latest_checkpoint(tmp_path)
    restore_checkpoint(ckpt, {"net": net}, rank=1, world_size=2)
    expected = torch.Generator().manual_seed(2)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=expected))
    with pytest.raises(UserError, match="state.json: written by a run of 2 process"):
        restore_checkpoint(ckpt, {"net": net}, rank=0, world_size=1)


def test_a_second_run_into_a_live_run_folder_is_refused_with_exit_2(setup, capsys):
    root, s = setup
    out = root / "locked"
    lock = RunLock(out)
    lock.acquire()  # a live run holds the folder
    try:
        rc = main(["train", "--config", "configs/shapes-demo.toml", "--vae", s["vae"],
                   "--out", str(out), *s["overrides"], "train.steps=1"])
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert rc == 2 and ".lock: this run folder is in use by pid" in err
    assert not (out / "checkpoints").exists()  # refused before any work


def test_summary_counts_images_over_batch_accumulation_and_processes(setup):
    root, s = setup
    run = train_diffusion(_cfg(setup, "train.grad_accum_steps=2"), s["vae"], root / "accum")
    summary = json.loads((root / "accum" / "summary.json").read_text())
    assert summary["images_seen"] == run.images_seen == 2 * 4 * 2 * 1
    assert summary["world_size"] == 1 and summary["grad_accum_steps"] == 2
    assert summary["steps"] == 2


def test_cache_command_builds_what_train_then_reuses(setup, monkeypatch, capsys):
    root, s = setup
    calls = []
    real = latent_cache.encode_dataset
    monkeypatch.setattr(latent_cache, "encode_dataset",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = root / "cmd-cache"
    assert main(["cache", "--config", "configs/shapes-demo.toml", "--vae", s["vae"],
                 "--out", str(cache), *s["overrides"]]) == 0
    assert "cache ready: 48 items in 1 shards" in capsys.readouterr().out
    train_diffusion(_cfg(setup, f"text.cache_dir={json.dumps(str(cache))}"), s["vae"],
                    root / "after-cache")
    assert len(calls) == 1


def test_a_damaged_or_missing_latent_shard_is_rebuilt_never_used(setup, monkeypatch, caplog):
    root, s = setup
    cfg = _cfg(setup, f"text.cache_dir={json.dumps(str(root / 'damaged'))}")
    train_diffusion(cfg, s["vae"], root / "d1")
    (folder,) = (root / "damaged").glob("latents-*")
    shard = folder / "shard-00000.safetensors"
    good = shard.read_bytes()
    damaged = bytearray(good)
    damaged[-7] ^= 0xFF  # one flipped byte in the data, the header still parses
    shard.write_bytes(bytes(damaged))
    calls = []
    real = latent_cache.encode_dataset
    monkeypatch.setattr(latent_cache, "encode_dataset",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    train_diffusion(cfg, s["vae"], root / "d2")
    assert len(calls) == 1 and "does not match its sha256" in caplog.text
    assert shard.read_bytes() == good
    shard.unlink()
    train_diffusion(cfg, s["vae"], root / "d3")
    assert len(calls) == 2 and shard.read_bytes() == good
