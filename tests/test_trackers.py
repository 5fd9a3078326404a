"""Training trackers: tiny runs of both stages with train.report_to=["tensorboard"], read
back with TensorBoard's own event reader (loss, LR, grad norm and images/s scalars at
every logged step, an image per validation step), a resumed run continuing the same
series, W&B offline when its package is there, and a clear error when a tracker's package
is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _tiny_model import TINY
from _tiny_text import make_tiny_bert
from ldmkit.config import load_config
from ldmkit.errors import ConfigError
from ldmkit.models.vae import AutoencoderKL
from ldmkit.training import trackers
from ldmkit.training.diffusion_trainer import train_diffusion
from ldmkit.training.vae_trainer import train_vae

SCALARS = ["train/loss", "train/lr", "train/grad_norm", "train/images_per_s"]


def events(folder):
    """TensorBoard's own reader over every event file of a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logdir,) = [p for p in folder.iterdir() if p.is_dir()]
    reader = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return reader


def _steps(reader, tag):
    return [e.step for e in reader.Scalars(tag)]


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    text = make_tiny_bert(root)
    overrides = TINY + [f"text.encoder={json.dumps(str(text))}", "text.max_length=12",
                        "data.num_items=32", "train.batch_size=4", "train.steps=4",
                        "train.log_every=1", "train.sample_every=2",
                        "train.checkpoint_every=2", "train.validation_prompts=['a red circle']",
                        "sample.steps=2", "train.mixed_precision=no",
                        "train.report_to=['tensorboard']"]
    torch.manual_seed(0)
    cfg = load_config(None, overrides)
    AutoencoderKL(cfg.vae, cfg.data.image_size).save_pretrained(root / "vae")
    return root, overrides


def test_a_unet_run_logs_its_scalars_and_validation_grids_to_tensorboard(stage2):
    root, overrides = stage2
    train_diffusion(load_config(None, overrides), root / "vae", root / "run")
    reader = events(root / "run" / "logs")
    for tag in SCALARS:
        assert _steps(reader, tag) == [1, 2, 3, 4], tag
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").open()]
    losses = [e.value for e in reader.Scalars("train/loss")]
    np.testing.assert_allclose(losses, [m["loss"] for m in metrics], rtol=1e-6)
    assert all(m["grad_norm"] > 0 for m in metrics)  # and metrics.jsonl has it too
    images = reader.Images("validation/samples")
    assert sorted(i.step for i in images) == [2, 4]  # each once, the last one too
    grid = (root / "run" / "samples" / "step-0000004.png").read_bytes()
    from io import BytesIO

    from PIL import Image

    logged = Image.open(BytesIO(images[-1].encoded_image_string))
    assert logged.size == Image.open(BytesIO(grid)).size  # the grid written to samples/
    assert "config" in " ".join(reader.Tags()["tensors"])


def test_a_resumed_run_continues_the_same_series(stage2, monkeypatch):
    """Killed after logging step 3 but before a checkpoint there: the resumed run redoes
    step 3 from the step-2 checkpoint, and the reader sees each step once, the redone
    value (TensorBoard's purge_step drops what the killed run logged past step 2)."""
    from ldmkit.training import diffusion_trainer

    root, overrides = stage2
    real = diffusion_trainer._Run.checkpoint
    monkeypatch.setattr(diffusion_trainer._Run, "checkpoint",
                        lambda self, step: None if step == 3 else real(self, step))
    train_diffusion(load_config(None, overrides + ["train.steps=3"]), root / "vae",
                    root / "resumed")
    monkeypatch.undo()
    first = events(root / "resumed" / "logs").Scalars("train/loss")
    train_diffusion(load_config(None, overrides), root / "vae", root / "resumed", resume=True)
    reader = events(root / "resumed" / "logs")
    assert _steps(reader, "train/loss") == [1, 2, 3, 4]
    assert [e.value for e in reader.Scalars("train/loss")][:3] == [e.value for e in first]


def test_a_vae_run_logs_its_losses_and_reconstructions(tmp_path):
    cfg = load_config("configs/shapes-demo.toml", [
        "data.image_size=16", "data.num_items=24", "data.val_items=4",
        "vae.downsample_factor=4", "vae.channel_mult=[1,1,1]", "vae.base_channels=8",
        "vae.batch_size=4", "vae.warmup_steps=1", "vae.minutes=0", "vae.steps=4",
        "train.log_every=2", "train.sample_every=2", "train.report_to=['tensorboard']"])
    train_vae(cfg, tmp_path)
    reader = events(tmp_path / "logs")
    for tag in [*SCALARS, "train/recon", "train/kl"]:
        assert _steps(reader, tag) == [1, 2, 4], tag
    images = reader.Images("validation/reconstructions")
    assert sorted(i.step for i in images) == [2, 4]  # each once, the last one too


def test_no_tracker_is_the_default_and_writes_no_logs(stage2, tmp_path):
    root, overrides = stage2
    plain = [o for o in overrides if not o.startswith("train.report_to")]
    cfg = load_config(None, plain + ["train.steps=1"])
    assert cfg.train.report_to == []
    train_diffusion(cfg, root / "vae", tmp_path / "run")
    assert not (tmp_path / "run" / "logs").exists()


def test_a_tracker_whose_package_is_missing_is_refused_before_training(monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"pip install 'ldmkit\[wandb\]'"):
        trackers.check_available(["tensorboard", "wandb"])


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, ["train.report_to=['comet']"])


def test_wandb_offline_logs_into_the_run_folder(stage2, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    root, overrides = stage2
    cfg = load_config(None, [o for o in overrides if not o.startswith("train.report_to")]
                      + ["train.steps=2", "train.report_to=['wandb']"])
    train_diffusion(cfg, root / "vae", tmp_path / "run")
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb_unet"]
    (offline,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(offline.glob("*.wandb"))
