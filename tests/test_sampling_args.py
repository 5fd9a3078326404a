"""One validation of sampling arguments for `ldmkit sample` and the Python API (the server's
422s are in test_server.py): a clear error naming the field, never a traceback, never a
black image; any n runs a chunk at a time."""

from __future__ import annotations

import math

import pytest
import torch

import ldmkit.pipeline
import ldmkit.sample
from _tiny_model import make_tiny_model_dir, make_tiny_pipeline
from ldmkit.cli import main
from ldmkit.diffusion.registry import HEADLINE
from ldmkit.errors import UserError
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.sampling_args import (
    NonFiniteOutputError,
    SamplingArgs,
    SamplingArgumentError,
    check_output_dir,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe"))


def _sample(model_dir, out, *extra):
    return main(["sample", "--model", str(model_dir), "--prompt", "a red circle",
                 "--steps", "2", "--out", str(out), *extra])


@pytest.mark.parametrize("flag, value", [
    ("--guidance", "nan"), ("--guidance", "inf"), ("--guidance", "-3"), ("--n", "0"),
    ("--steps", "0"), ("--steps", "51"), ("--seed", "-1"), ("--guidance-rescale", "2")])
def test_sample_refuses_a_bad_value_with_exit_2_naming_the_flag_and_writes_nothing(
        model_dir, tmp_path, capsys, flag, value):
    assert _sample(model_dir, tmp_path / "out", flag, value) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ldmkit: error: {flag}:") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_sample_refuses_an_out_naming_a_file_or_a_path_under_a_file(model_dir, tmp_path,
                                                                     capsys):
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"keep me")
    assert _sample(model_dir, existing) == 2
    assert "--out" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert _sample(model_dir, existing / "sub") == 2
    assert "is a file" in capsys.readouterr().err


def test_output_dir_check_accepts_an_existing_or_creatable_folder(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"


def test_sample_runs_n_a_chunk_at_a_time_and_writes_every_file(model_dir, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(ldmkit.sample, "CHUNK", 2)
    monkeypatch.setattr(ldmkit.pipeline, "CHUNK", 2)
    monkeypatch.setattr(ldmkit.sample, "GRID_MAX", 4)
    rows = []
    denoise = TextToImagePipeline.denoise

    def recording(self, x_T, *args, **kwargs):
        rows.append(x_T.shape[0])
        return denoise(self, x_T, *args, **kwargs)

    monkeypatch.setattr(TextToImagePipeline, "denoise", recording)
    assert _sample(model_dir, tmp_path / "s", "--n", "5") == 0
    assert rows == [2, 2, 1]  # the U-Net never saw more than a chunk
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [f"{i:04d}.png" for i in range(5)] + ["grid.png"]


def test_sample_warns_once_when_the_prompt_is_cut(model_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(model_dir), "--prompt", "a red circle " * 10,
                 "--steps", "2", "--n", "1", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "tokens longer" in err


# ----------------------------------------------------------------------------- Python API


@pytest.mark.parametrize("kwargs, field", [
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 51}, "num_inference_steps"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"sampler": "lms"}, "sampler"),
    ({"eta": -0.5}, "eta"),
    ({"guidance_rescale": math.inf}, "guidance_rescale")])
def test_the_pipeline_refuses_bad_arguments_naming_the_parameter(pipe, kwargs, field):
    with pytest.raises(SamplingArgumentError, match=f"^{field}:") as info:
        pipe("a red circle", **kwargs)
    assert info.value.field == field and isinstance(info.value, UserError)


def test_the_pipeline_refuses_an_empty_prompt_list(pipe):
    with pytest.raises(SamplingArgumentError, match="prompts"):
        pipe.generate_latents([])


def test_the_pipeline_chunks_large_n_drawing_each_chunks_noise_in_turn(pipe, monkeypatch):
    """Chunks draw their noise one after another from the one generator, so a seed and n
    still decide the images (torch's CPU normal sampler fills in vector blocks, so the
    chunks' draws need not equal one big draw: n up to CHUNK is one draw, as before)."""
    noise = []
    initial_noise = TextToImagePipeline.initial_noise

    def recording(self, n, generator=None):
        noise.append(initial_noise(self, n, generator))
        return noise[-1]

    monkeypatch.setattr(TextToImagePipeline, "initial_noise", recording)
    monkeypatch.setattr(ldmkit.pipeline, "CHUNK", 2)
    images = pipe("a red circle", num_inference_steps=2, num_images_per_prompt=5,
                  generator=torch.Generator().manual_seed(3))
    assert len(images) == 5 and [x.shape[0] for x in noise] == [2, 2, 1]
    assert torch.equal(noise[0], pipe.initial_noise(2, torch.Generator().manual_seed(3)))
    again = pipe("a red circle", num_inference_steps=2, num_images_per_prompt=5,
                 generator=torch.Generator().manual_seed(3))
    assert [a.tobytes() for a in images] == [b.tobytes() for b in again]


def test_non_finite_latents_are_refused_not_returned_as_black_images(tmp_path):
    bad = make_tiny_pipeline(tmp_path)
    with torch.no_grad():
        bad.unet.conv_out.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="not finite"):
        bad("a red circle", num_inference_steps=2)


def test_sample_with_a_diverging_model_exits_2_and_writes_no_image(tmp_path, capsys):
    bad = make_tiny_pipeline(tmp_path)
    with torch.no_grad():
        bad.unet.conv_out.weight.fill_(float("nan"))
    bad.save_pretrained(tmp_path / "model")
    assert _sample(tmp_path / "model", tmp_path / "out") == 2
    assert "not finite" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png"))


def test_sampling_args_defaults_are_the_headline_setting():
    args = SamplingArgs("p")
    assert (args.sampler, args.steps, args.guidance) == (HEADLINE.sampler, HEADLINE.steps,
                                                         HEADLINE.guidance)
    assert args.checked(500) == args
