"""Stage 2 end to end on tiny models: artifacts, the caches, caption dropout, resume."""

import json

import pytest
import torch

from _tiny_model import TINY
from _tiny_text import make_tiny_bert
from ldmkit.config import load_config
from ldmkit.models.text import TextEmbeddings
from ldmkit.models.vae import AutoencoderKL
from ldmkit.training import latent_cache
from ldmkit.training.checkpoint import load_latest_checkpoint
from ldmkit.training.common import Budget
from ldmkit.training.diffusion_step import drop_captions
from ldmkit.training.diffusion_trainer import train_diffusion


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    text = make_tiny_bert(root)
    overrides = TINY + [f"text.encoder={json.dumps(str(text))}", "text.max_length=12",
                        "data.num_items=32", "train.batch_size=4", "train.steps=4",
                        "train.log_every=1", "train.sample_every=4", "train.checkpoint_every=2",
                        "train.validation_prompts=['a red circle']", "sample.steps=2",
                        "train.mixed_precision=no"]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    vae_dir = root / "vae"
    AutoencoderKL(cfg.vae, cfg.data.image_size).save_pretrained(vae_dir)
    return root, cfg, vae_dir, overrides


def test_training_writes_every_artifact_and_a_loadable_model(setup):
    from ldmkit.pipeline import TextToImagePipeline

    root, cfg, vae_dir, _ = setup
    model = train_diffusion(cfg, vae_dir, root / "run").model_dir
    run = root / "run"
    for name in ("config.json", "metrics.jsonl", "loss.png", "summary.json",
                 "samples/step-0000004.png", "checkpoints/latest", "model/model_index.json"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert TextToImagePipeline.from_pretrained(model)("a red circle", num_inference_steps=2)


def test_validation_grids_draw_with_every_sample_setting(setup, tmp_path, monkeypatch):
    """[sample] n, eta and guidance_rescale reach the sampler, not just steps and guidance."""
    from ldmkit.pipeline import TextToImagePipeline

    root, _, vae_dir, overrides = setup
    seen = []
    real = TextToImagePipeline.generate_latents

    def spy(self, prompts, *args, **kwargs):
        seen.append((list(prompts), args, kwargs))
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(TextToImagePipeline, "generate_latents", spy)
    cfg = load_config(None, overrides + ["train.steps=2", "train.sample_every=2", "sample.n=3",
                                         "sample.sampler=ddim", "sample.eta=0.5",
                                         "sample.guidance_rescale=0.2", "sample.seed=7"])
    train_diffusion(cfg, vae_dir, tmp_path / "run")
    assert len(seen) == 1  # the last step's grid once, not again when the run finishes
    prompts, args, kwargs = seen[0]
    assert prompts == ["a red circle"] * 3
    assert args[:3] == (None, 2, cfg.sample.guidance) and args[3] == "ddim"
    assert args[4].initial_seed() == 7
    assert kwargs == {"eta": 0.5, "guidance_rescale": 0.2}


def test_latent_cache_is_built_once_and_reused(setup, monkeypatch):
    root, cfg, vae_dir, _ = setup
    calls = []
    real = latent_cache.encode_dataset
    monkeypatch.setattr(latent_cache, "encode_dataset",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg.text.cache_dir = str(root / "shared-cache")
    train_diffusion(cfg, vae_dir, root / "first")
    train_diffusion(cfg, vae_dir, root / "second")
    cfg.text.cache_dir = ""
    assert len(calls) == 1


def test_caption_dropout_replaces_caption_and_mask_by_the_null_prompt():
    tokens, mask = torch.randn(4000, 6, 8), torch.ones(4000, 6, dtype=torch.bool)
    text = TextEmbeddings(tokens, mask)
    null = TextEmbeddings(torch.randn(1, 6, 8),
                          torch.tensor([[True, True, False, False, False, False]]))
    dropped = drop_captions(text, null, p_uncond=1.0)
    assert torch.equal(dropped.tokens, null.tokens.expand_as(tokens))
    assert torch.equal(dropped.mask, null.mask.expand_as(mask))  # its own mask, not ones
    kept = drop_captions(text, null, p_uncond=0.0)
    assert torch.equal(kept.tokens, tokens) and torch.equal(kept.mask, mask)
    some = drop_captions(text, null, p_uncond=0.2).mask
    assert abs((~some[:, 2]).float().mean().item() - 0.2) < 0.03


def test_resume_continues_at_the_right_step_with_identical_weights(setup, monkeypatch):
    root, cfg, vae_dir, _ = setup
    cfg.text.cache_dir = str(root / "shared-cache")
    train_diffusion(cfg, vae_dir, root / "straight")
    real_done = Budget.done
    monkeypatch.setattr(Budget, "done", lambda self, step: step >= 2 or real_done(self, step))
    train_diffusion(cfg, vae_dir, root / "resumed")  # "interrupted" after step 2
    monkeypatch.setattr(Budget, "done", real_done)
    assert load_latest_checkpoint(root / "resumed" / "checkpoints").step == 2
    train_diffusion(cfg, vae_dir, root / "resumed", resume=True)
    cfg.text.cache_dir = ""
    a = load_latest_checkpoint(root / "straight" / "checkpoints")
    b = load_latest_checkpoint(root / "resumed" / "checkpoints")
    assert a.step == b.step == 4
    for name in ("unet", "ema"):
        for key, value in a.modules[name].items():
            assert torch.equal(value, b.modules[name][key]), (name, key)


def test_existing_run_without_resume_is_refused(setup):
    from ldmkit.errors import UserError

    root, cfg, vae_dir, _ = setup
    with pytest.raises(UserError, match="--resume"):
        train_diffusion(cfg, vae_dir, root / "run")


def test_old_latent_caches_are_pruned_to_the_newest_few(tmp_path):
    import os

    for i in range(5):
        for suffix in (".safetensors", ".json"):
            path = tmp_path / f"latents-{i}{suffix}"
            path.write_text("x")
            os.utime(path, (i, i))
    latent_cache._prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"latents-{i}{s}" for i in (2, 3, 4) for s in (".json", ".safetensors")]


# ----------------------------------------------------------------------------- train.compile


def _step_cfg(*extra):
    return load_config(None, TINY + ["train.mixed_precision=no", "train.warmup_steps=0",
                                     *extra])


def _compiled_and_eager_steps(backend, *extra):
    from ldmkit.models.unet import UNet
    from ldmkit.training.diffusion_step import DiffusionStep

    null = TextEmbeddings(torch.zeros(1, 6, 16), torch.ones(1, 6, dtype=torch.bool))
    torch.manual_seed(0)
    init = UNet(_step_cfg().unet, 4, 16).state_dict()
    steps = {}
    for mode in ("off", "default"):
        cfg = _step_cfg(f"train.compile={mode}", *extra)
        unet = UNet(cfg.unet, 4, 16)
        unet.load_state_dict(init)
        steps[mode] = DiffusionStep(unet, cfg, null, compile_backend=backend)
    return steps


def test_train_compile_is_off_by_default_and_only_takes_torch_compile_modes():
    from ldmkit.errors import ConfigError

    assert load_config(None).train.compile == "off"
    assert _step_cfg("train.compile=reduce-overhead").train.compile == "reduce-overhead"
    with pytest.raises(ConfigError, match="train.compile = 'cudagraphs' is not one of"):
        _step_cfg("train.compile=cudagraphs")


def test_compiled_step_traces_the_unet_once_without_breaks_and_matches_eager():
    """Three updates through torch.compile (TorchDynamo with a counting backend that runs
    the captured graph as is): one graph, never recompiled, and the same losses and weights
    as the eager step from the same draws."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    steps = _compiled_and_eager_steps(counter)
    assert steps["off"].model is steps["off"].unet  # off: nothing wraps the U-Net
    assert steps["default"].model is not steps["default"].unet
    for _ in range(3):
        latents = torch.randn(4, 4, 4, 4)
        text = TextEmbeddings(torch.randn(4, 6, 16), torch.rand(4, 6) > 0.3)
        draws = steps["off"].draw(latents)
        losses = {mode: step(latents, text, draws) for mode, step in steps.items()}
        torch.testing.assert_close(losses["default"], losses["off"], rtol=0, atol=1e-6)
    assert counter.frame_count == 1  # one graph: no graph breaks, no recompiles
    for a, b in zip(steps["off"].ema.parameters(), steps["default"].ema.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_reduce_overhead_marks_a_new_cuda_graph_step_before_every_forward(monkeypatch):
    from ldmkit.models.unet import UNet
    from ldmkit.training.diffusion_step import DiffusionStep

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cfg = _step_cfg("train.compile=reduce-overhead", "train.grad_accum_steps=2")
    null = TextEmbeddings(torch.zeros(1, 6, 16), torch.ones(1, 6, dtype=torch.bool))
    step = DiffusionStep(UNet(cfg.unet, 4, 16), cfg, null, compile_backend="eager")
    step(torch.randn(4, 4, 4, 4), TextEmbeddings(torch.randn(4, 6, 16),
                                                 torch.ones(4, 6, dtype=torch.bool)))
    assert len(marks) == 2  # one per micro-batch


def _grouped_folder(root):
    """Six images, each with its own caption: one of "b", then five variants of "a" (the
    last is the validation image the training split leaves out)."""
    from data_fixtures import GOOD_COLORS, jpeg_bytes

    root.mkdir()
    rows = []
    captions = ["a red circle", "a blue square", "a green cross", "a yellow triangle",
                "a purple circle", "an orange square"]  # words the tiny encoder knows
    for i, (base, caption) in enumerate(zip("baaaaa", captions)):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes(GOOD_COLORS[i % len(GOOD_COLORS)]))
        rows.append({"file_name": f"{i}.jpg", "text": caption, "base": base})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("use_cache", [True, False])
def test_balance_by_draws_each_group_equally_often(setup, tmp_path, use_cache):
    """Caption "a red circle" is group b's only image: half the draws when balanced by base, a
    fifth when not. Read back from the batches' caption embeddings."""
    from ldmkit.data import build_dataset
    from ldmkit.models.text import TextEncoder

    root, _, vae_dir, overrides = setup
    folder = _grouped_folder(tmp_path / "data")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    shares = {}
    for balance_by in ("base", ""):
        cfg = load_config(None, overrides + [
            "data.dataset=folder", f"data.root={str(folder)!r}", f"data.balance_by={balance_by!r}",
            "data.val_items=1", f"train.use_cache={str(use_cache).lower()}"])
        text = TextEncoder.from_config(cfg.text)
        dataset = build_dataset(cfg.data, "train")  # b and four a's
        known = text.encode([dataset.captions(i)[0] for i in range(len(dataset))]).tokens
        torch.manual_seed(0)
        batches = latent_cache.training_batches(cfg, vae, vae_dir, text, dataset,
                                                tmp_path / f"run-{balance_by}", "cpu", 0)
        hits = draws = 0
        for _ in range(60):
            _, captions = batches.next()
            # the nearest training caption (the cache may store embeddings in bf16)
            nearest = torch.cdist(captions.tokens.flatten(1), known.flatten(1)).argmin(1)
            hits += int((nearest == 0).sum())
            draws += len(captions)
        shares[balance_by] = hits / draws
    assert 0.4 < shares["base"] < 0.6 and 0.1 < shares[""] < 0.3, shares


def test_cached_batches_reach_the_device_without_blocking_copies(setup, tmp_path, monkeypatch):
    """A blocking host-to-device copy drains a GPU's queue every step, so the host cannot
    prepare the next step while the last one runs: every copy of a batch is non_blocking.
    The device is `meta` here (not the CPU, where `.to` copies nothing)."""
    from ldmkit.data import build_dataset
    from ldmkit.models.text import TextEncoder

    _, _, vae_dir, overrides = setup
    cfg = load_config(None, overrides)
    batches = latent_cache.training_batches(cfg, AutoencoderKL.from_pretrained(vae_dir), vae_dir,
                                            TextEncoder.from_config(cfg.text),
                                            build_dataset(cfg.data, "train"), tmp_path, "cpu", 0)
    assert isinstance(batches, latent_cache.CachedBatches)
    batches.device = torch.device("meta")
    copies, to = [], torch.Tensor.to

    def recording_to(tensor, *args, **kwargs):
        target = next((a for a in (*args, kwargs.get("device")) if isinstance(a, torch.device)),
                      None)
        if target is not None and target.type != tensor.device.type:
            copies.append(kwargs.get("non_blocking", False))
        return to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    latents, text = batches.next()
    assert latents.device.type == "meta" and text.tokens.device.type == "meta"
    assert text.mask.device.type == "meta"
    assert len(copies) >= 4 and all(copies), copies  # mean, std, tokens, mask (and pooled)
