"""The pipeline folder format and the `ldmkit sample` command."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_model import make_tiny_model_dir, make_tiny_pipeline
from ldmkit.cli import main
from ldmkit.errors import UserError
from ldmkit.pipeline import TextToImagePipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _images(pipe, seed=3, **kwargs):
    out = pipe(["a red circle", "a blue square"], num_inference_steps=4,
               generator=torch.Generator().manual_seed(seed), **kwargs)
    return [torch.from_numpy(np.asarray(img).copy()) for img in out]


def test_save_load_gives_identical_images_for_same_seed(tmp_path):
    pipe = make_tiny_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "saved")
    for a, b in zip(_images(pipe), _images(loaded)):
        assert torch.equal(a, b)


def test_the_folder_keeps_the_text_encoders_hidden_layers(tmp_path):
    pipe = make_tiny_pipeline(tmp_path, hidden_layers=[0, -1])
    pipe.save_pretrained(tmp_path / "saved")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "saved")
    assert loaded.text_encoder.hidden_layers == (0, -1)
    for a, b in zip(_images(pipe), _images(loaded)):
        assert torch.equal(a, b)
    spec_path = tmp_path / "saved" / "text_encoder.json"
    spec = json.loads(spec_path.read_text())
    spec["hidden_layers"] = "last"
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="hidden_layers"):
        TextToImagePipeline.from_pretrained(tmp_path / "saved")


def test_a_folder_written_before_hidden_layers_existed_uses_the_last_layer(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "old")
    spec = json.loads((copy / "text_encoder.json").read_text())
    del spec["hidden_layers"]
    (copy / "text_encoder.json").write_text(json.dumps(spec))
    assert TextToImagePipeline.from_pretrained(copy).text_encoder.hidden_layers == (-1,)


def test_same_generator_seed_is_deterministic_and_seeds_differ(model_dir):
    pipe = TextToImagePipeline.from_pretrained(model_dir)
    first, again, other = _images(pipe, 1), _images(pipe, 1), _images(pipe, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m"])
def test_every_sampler_returns_pil_images_of_the_model_size(model_dir, sampler):
    pipe = TextToImagePipeline.from_pretrained(model_dir)
    images = pipe("a red circle", sampler=sampler, num_inference_steps=3,
                  num_images_per_prompt=2, negative_prompt="a blue square")
    assert len(images) == 2 and all(isinstance(i, Image.Image) for i in images)
    assert images[0].size == (16, 16)


def test_callback_sees_every_step(model_dir):
    pipe = TextToImagePipeline.from_pretrained(model_dir)
    seen = []
    pipe("a red circle", num_inference_steps=5, callback=lambda i, t, x, x0: seen.append(i))
    assert seen == list(range(5))


def _copy(model_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(model_dir, target)
    return target


def test_folder_with_a_pickle_is_refused(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="pickle"):
        TextToImagePipeline.from_pretrained(folder)


def test_folder_with_a_missing_file_is_refused(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path)
    (folder / "vae" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="vae/model.safetensors"):
        TextToImagePipeline.from_pretrained(folder)


@pytest.mark.parametrize("key, value", [("base_channels", 32),  # weights no longer fit
                                        ("in_channels", 3)])  # the VAE has 4 latent channels
def test_mismatched_unet_config_is_refused(model_dir, tmp_path, key, value):
    folder = _copy(model_dir, tmp_path)
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="unet"):
        TextToImagePipeline.from_pretrained(folder)


# ----------------------------------------------------------------------------- CLI


def _sample(model_dir, out, *extra):
    return main(["sample", "--model", str(model_dir), "--prompt", "a red circle", "--n", "3",
                 "--steps", "4", "--seed", "5", "--out", str(out), *extra])


def test_sample_cli_writes_exactly_n_images_and_a_grid(model_dir, tmp_path):
    assert _sample(model_dir, tmp_path / "s") == 0
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["0000.png", "0001.png", "0002.png", "grid.png"]


def test_sample_cli_same_seed_gives_byte_identical_files(model_dir, tmp_path):
    _sample(model_dir, tmp_path / "a")
    _sample(model_dir, tmp_path / "b")
    for name in ("0000.png", "0001.png", "0002.png", "grid.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_sample_cli_progress_writes_strip_and_gif(model_dir, tmp_path):
    assert _sample(model_dir, tmp_path / "p", "--progress") == 0
    gif = Image.open(tmp_path / "p" / "progress.gif")
    assert gif.n_frames >= 4
    strip = Image.open(tmp_path / "p" / "progress_0.png")
    assert strip.width > strip.height


def test_sample_cli_missing_model_folder_exits_2(tmp_path, capsys):
    assert _sample(tmp_path / "nope", tmp_path / "out") == 2
    assert "nope" in capsys.readouterr().err


def test_sample_cli_malformed_model_folder_exits_2(model_dir, tmp_path, capsys):
    folder = _copy(model_dir, tmp_path)
    (folder / "scheduler.json").write_text("{not json")
    assert _sample(folder, tmp_path / "out") == 2
    assert "scheduler.json" in capsys.readouterr().err
