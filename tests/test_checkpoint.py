"""The one checkpoint writer/reader: exact round trips, atomicity, clear errors."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from ldmkit.errors import UserError
from ldmkit.training import checkpoint as ckpt_mod
from ldmkit.training.checkpoint import (
    load_checkpoint,
    load_latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from ldmkit.training.common import make_lr_schedule, make_optimizer


def trained_objects(seed: int = 0, steps: int = 3):
    """A small model + EMA copy, AdamW and a warmup/cosine schedule after a few real steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 6, 6))  # materialise the lazy layer
    ema = nn.Linear(3, 3)
    opt = make_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = make_lr_schedule(opt, warmup_steps=2, total_steps=10)
    for _ in range(steps):
        model(torch.randn(2, 3, 6, 6)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return {"unet": model, "ema": ema}, opt, sched


def assert_same_state(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_round_trip_restores_weights_optimizer_scheduler_and_rng_bit_exactly(tmp_path):
    modules, opt, sched = trained_objects()
    random.seed(5)
    np.random.seed(5)
    save_checkpoint(tmp_path, 3, modules, opt, sched, extra={"elapsed": 1.5, "note": "x"})
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))

    fresh_modules, fresh_opt, fresh_sched = trained_objects(seed=1, steps=1)
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.step == 3 and ckpt.extra == {"elapsed": 1.5, "note": "x"}
    assert restore_checkpoint(ckpt, fresh_modules, fresh_opt, fresh_sched) == 3
    for name in modules:
        assert_same_state(modules[name].state_dict(), fresh_modules[name].state_dict(), name)
    assert_same_state(opt.state_dict(), fresh_opt.state_dict(), "optimizer")
    assert_same_state(sched.state_dict(), fresh_sched.state_dict(), "scheduler")
    assert (random.random(), np.random.rand()) == expected_draws[:2]
    assert torch.equal(torch.rand(3), expected_draws[2])


def test_restored_training_takes_the_same_next_step(tmp_path):
    modules, opt, sched = trained_objects()
    save_checkpoint(tmp_path, 3, modules, opt, sched)
    other, other_opt, other_sched = trained_objects(seed=1, steps=1)
    restore_checkpoint(load_latest_checkpoint(tmp_path), other, other_opt, other_sched)
    for mods, o, s in ((modules, opt, sched), (other, other_opt, other_sched)):
        torch.manual_seed(9)
        mods["unet"](torch.randn(2, 3, 6, 6)).pow(2).mean().backward()
        o.step()
        s.step()
    assert_same_state(modules["unet"].state_dict(), other["unet"].state_dict())


def test_nothing_is_pickled(tmp_path):
    modules, opt, sched = trained_objects()
    folder = save_checkpoint(tmp_path, 3, modules, opt, sched)
    assert sorted(p.name for p in folder.iterdir()) == [
        "ema.safetensors", "state.json", "state.safetensors", "unet.safetensors"]


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    assert load_latest_checkpoint(tmp_path / "absent") is None


def test_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    modules, opt, sched = trained_objects()
    save_checkpoint(tmp_path, 3, modules, opt, sched)
    before = {k: v.clone() for k, v in modules["unet"].state_dict().items()}
    with torch.no_grad():
        for p in modules["unet"].parameters():
            p.add_(1.0)

    calls = []

    def crash_midway(path, data):  # weights already written, state JSON not yet
        calls.append(path)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt_mod, "write_json_atomic", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 6, modules, opt, sched)
    assert calls, "the simulated crash never happened"
    monkeypatch.undo()

    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.step == 3
    assert_same_state(ckpt.modules["unet"], before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003"]


def test_leftovers_of_a_killed_writer_are_ignored(tmp_path):
    modules, opt, sched = trained_objects()
    save_checkpoint(tmp_path, 3, modules, opt, sched)
    (tmp_path / ".tmp-step-00000006-abc").mkdir()  # kill -9 during the write
    (tmp_path / ".tmp-step-00000006-abc" / "unet.safetensors").write_bytes(b"half")
    (tmp_path / "step-00000009").mkdir()  # a folder without its state
    assert load_latest_checkpoint(tmp_path).step == 3
    (tmp_path / "latest").unlink()  # crash between the rename and the pointer update
    assert load_latest_checkpoint(tmp_path).step == 3


def test_corrupted_weights_file_gives_a_clear_error_naming_it(tmp_path):
    modules, opt, sched = trained_objects()
    folder = save_checkpoint(tmp_path, 3, modules, opt, sched)
    weights = folder / "unet.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(UserError, match=f"{weights}.*corrupted"):
        load_latest_checkpoint(tmp_path)


def test_corrupted_state_json_gives_a_clear_error_naming_it(tmp_path):
    modules, opt, sched = trained_objects()
    folder = save_checkpoint(tmp_path, 3, modules, opt, sched)
    (folder / "state.json").write_text("{not json")
    with pytest.raises(UserError, match=str(folder / "state.json")):
        load_checkpoint(folder)


def test_weights_of_another_architecture_are_refused_naming_the_file(tmp_path):
    modules, opt, sched = trained_objects()
    save_checkpoint(tmp_path, 3, modules, opt, sched)
    wrong = {"unet": nn.Linear(2, 2), "ema": modules["ema"]}
    with pytest.raises(UserError, match="unet.safetensors: weights do not match"):
        restore_checkpoint(load_latest_checkpoint(tmp_path), wrong)
    with pytest.raises(UserError, match="no weights for \\['vae'\\]"):
        restore_checkpoint(load_latest_checkpoint(tmp_path), {"vae": nn.Linear(2, 2)})


def test_only_the_newest_checkpoints_are_kept_and_latest_points_at_the_last(tmp_path):
    modules, opt, sched = trained_objects()
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, modules, opt, sched, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003",
                                                           "step-00000010"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000010"
    save_checkpoint(tmp_path, 10, modules, opt, sched, extra={"again": True})  # re-save a step
    assert load_latest_checkpoint(tmp_path).extra == {"again": True}


def test_packed_weights_load_exactly_through_the_plain_name_and_corruption_is_named(tmp_path):
    from ldmkit.io import load_tensors, save_tensors_packed_atomic

    tensors = {"w": torch.randn(64, 64).half(), "b": torch.arange(5)}
    packed = save_tensors_packed_atomic(tmp_path / "m.safetensors", tensors)
    assert packed.name == "m.safetensors.xz" and not (tmp_path / "m.safetensors").exists()
    loaded = load_tensors(tmp_path / "m.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    packed.write_bytes(packed.read_bytes()[:100])
    with pytest.raises(UserError, match="m.safetensors.xz: corrupted"):
        load_tensors(tmp_path / "m.safetensors")
