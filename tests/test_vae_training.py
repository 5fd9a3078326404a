"""Stage-1 training end to end (tiny configs), resuming, and the shared training helpers."""

import json
import math
import shutil

import pytest
import torch

from ldmkit.cli import main
from ldmkit.config import load_config
from ldmkit.errors import UserError
from ldmkit.io import load_tensors
from ldmkit.training.checkpoint import load_checkpoint
from ldmkit.training.common import (
    Budget,
    MetricsLogger,
    StreamSampler,
    make_lr_schedule,
    resolve_mixed_precision,
)
from ldmkit.training.vae_trainer import train_vae
from ldmkit.viz import read_metrics

TINY = ["data.image_size=16", "data.num_items=24", "data.val_items=4",
        "vae.downsample_factor=4", "vae.channel_mult=[1,1,1]", "vae.base_channels=8",
        "vae.batch_size=4", "vae.warmup_steps=1", "vae.minutes=0", "train.log_every=1"]


def tiny_config(*extra: str):
    return load_config("configs/shapes-demo.toml", TINY + list(extra))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae-run")
    rc = main(["train-vae", "--config", "configs/shapes-demo.toml", "--out", str(out), *TINY,
               "vae.steps=3", "train.checkpoint_every=2"])
    return rc, out


def test_train_vae_cli_writes_every_artifact(cli_run, capsys):
    rc, out = cli_run
    assert rc == 0
    for name in ("config.json", "metrics.jsonl", "recon.png", "kl.png", "reconstructions.png",
                 "samples.png", "summary.json", "model/config.json", "model/model.safetensors",
                 "checkpoints/latest", "checkpoints/step-00000003/vae.safetensors"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "recon", "kl", "lr", "images_per_s"} <= rows[0].keys()
    model_cfg = json.loads((out / "model/config.json").read_text())
    assert model_cfg["scale_factor"] > 0 and model_cfg["image_size"] == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_items"] == 0 and summary["steps"] == 3
    assert json.loads((out / "config.json").read_text())["vae"]["steps"] == 3


def test_evaluate_vae_cli_writes_psnr_ssim_and_colour_error(cli_run, tmp_path):
    _, out = cli_run
    target = tmp_path / "eval.json"
    assert main(["evaluate-vae", "--vae", str(out / "model"), "--out", str(target),
                 "data.val_items=4"]) == 0
    result = json.loads(target.read_text())
    assert result["n"] == 4 and result["image_size"] == 16
    assert 0 < result["psnr"] < 60 and -1 <= result["ssim"] <= 1
    assert 0 < result["color_error"] <= result["color_error_max"] < 100


def test_evaluate_vae_cli_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["evaluate-vae", "--vae", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_rerunning_into_a_run_with_checkpoints_needs_resume(cli_run):
    _, out = cli_run
    with pytest.raises(UserError, match="--resume"):
        train_vae(tiny_config("vae.steps=3"), out)


def test_resume_continues_at_the_right_step_with_the_same_losses(tmp_path):
    cfg = tiny_config("vae.steps=4", "train.checkpoint_every=2", "train.mixed_precision=\"no\"")
    full = tmp_path / "full"
    train_vae(cfg, full)
    # An interruption after step 2: the run directory as it stood then.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "latest").write_text("step-00000002\n")
    train_vae(cfg, cut, resume=True)

    expected, resumed = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # steps 3-4 redone, not appended twice
    keys = ("loss", "recon", "kl", "lr")
    for a, b in zip(expected[2:], resumed[2:]):
        assert [a[k] for k in keys] == [b[k] for k in keys]
    final = "checkpoints/step-00000004/vae.safetensors"
    assert (full / final).read_bytes() == (cut / final).read_bytes()


def test_discriminator_ema_and_both_optimisers_resume_bit_identically(tmp_path):
    cfg = tiny_config("vae.steps=4", "train.checkpoint_every=2", "train.mixed_precision=\"no\"",
                      "vae.gan_weight=0.5", "vae.gan_start=1", "vae.disc_channels=8",
                      "vae.ema_decay=0.9", "vae.ssim_weight=0.5", "vae.ffl_weight=1",
                      "vae.blur_weight=1", 'vae.recon_loss="charbonnier"')
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_vae(cfg, full)
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "latest").write_text("step-00000002\n")
    train_vae(cfg, cut, resume=True)

    step = "checkpoints/step-00000004"
    for module in ("vae", "ema", "disc"):  # disc: BatchNorm running statistics too
        assert (full / step / f"{module}.safetensors").read_bytes() == \
            (cut / step / f"{module}.safetensors").read_bytes(), module
    a, b = load_checkpoint(full / step), load_checkpoint(cut / step)
    saved = a.states["disc_optimizer"]["state"]
    assert saved and saved.keys() == b.states["disc_optimizer"]["state"].keys()
    for k, state in saved.items():
        for name, value in state.items():
            assert torch.equal(value, b.states["disc_optimizer"]["state"][k][name]), name
    # the saved model is the EMA copy
    assert (full / "model" / "model.safetensors").exists()
    ema = a.modules["ema"]
    model = load_tensors(full / "model" / "model.safetensors")
    assert all(torch.equal(model[k], ema[k]) for k in model)
    rows = read_metrics(full / "metrics.jsonl")
    assert "d_loss" not in rows[0] and {"d_loss", "g_loss", "d_weight"} <= set(rows[1])


def test_resuming_a_gan_run_without_its_discriminator_state_is_refused(tmp_path):
    cfg = tiny_config("vae.steps=2", "train.mixed_precision=\"no\"")
    train_vae(cfg, tmp_path / "run")
    gan = tiny_config("vae.steps=4", "vae.gan_weight=0.5", "vae.disc_channels=8")
    with pytest.raises(UserError, match="disc"):
        train_vae(gan, tmp_path / "run", resume=True)


def test_the_loop_reads_its_losses_back_only_on_logged_steps(tmp_path, monkeypatch):
    """Reading a loss waits for the device (on a GPU: the whole queue drains). The loop
    reads only on logged steps, so 3 more steps between two logs read nothing more."""
    reads = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, _f=original, _n=name: (
            reads.append(_n), _f(t))[1])
    counts = {}
    for steps in (3, 6):
        reads.clear()
        train_vae(tiny_config(f"vae.steps={steps}", "train.log_every=100"), tmp_path / str(steps))
        counts[steps] = len(reads)
    assert counts[6] == counts[3], counts  # only step 1 is logged in either run
    rows = read_metrics(tmp_path / "6" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1] and {"loss", "recon", "kl"} <= rows[0].keys()


# ----------------------------------------------------------------------------- helpers


def test_auto_precision_is_bf16_on_cpu():
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("no") == "no"


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_schedule(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:9] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(5)])
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_a_time_budget_drives_the_cosine_and_the_stop():
    budget = Budget(steps=1000, minutes=1.0, elapsed=45.0)  # 3/4 of the minute already spent
    assert budget.progress(10) == pytest.approx(0.75, abs=0.01)
    assert not budget.done(10)
    assert Budget(steps=1000, minutes=1.0, elapsed=61.0).done(10)
    assert Budget(steps=5).done(5) and not Budget(steps=5).done(4)


def test_stream_sampler_resumes_with_the_same_batches_and_covers_each_epoch():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    stream = take(StreamSampler(10, batch_size=4, seed=3), 40)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a fresh permutation each epoch
    assert take(StreamSampler(10, batch_size=4, seed=3, start_step=3), 28) == stream[12:]
    ranks = [take(StreamSampler(10, 2, seed=3, rank=r, world_size=2), 2) for r in (0, 1)]
    assert ranks[0] + ranks[1] == stream[:4]


def test_a_weighted_stream_draws_in_proportion_and_resumes_with_the_same_batches():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0], dtype=torch.float64)  # item 4: half
    stream = take(StreamSampler(5, batch_size=4, seed=3, weights=weights), 4000)
    assert stream.count(4) / len(stream) == pytest.approx(0.5, abs=0.03)
    assert take(StreamSampler(5, 4, seed=3, start_step=7, weights=weights), 100) == \
        stream[28:128]


def test_metrics_logger_drops_rows_past_the_resumed_step(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLogger(path)
    for step in (1, 2, 3):
        log.log(step, loss=torch.tensor(0.5))
    with path.open("a") as fh:
        fh.write('{"step": 4, "lo')  # torn by a crash
    MetricsLogger(path, resume_step=2).log(3, loss=0.25)
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5},
                                  {"step": 3, "loss": 0.25}]
