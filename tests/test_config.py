"""Configs are validated once, at load: every error names the file and the key, exit 2."""

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmkit.cli import build_parser, main
from ldmkit.config import SampleConfig, load_config, load_config_json
from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.errors import ConfigError
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.sample import sample_with_frames

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.image_size % cfg.vae.downsample_factor == 0


def test_overrides_parse_toml_values_and_bare_words():
    cfg = load_config(None, ["train.batch_size=64", "data.dataset=coco", "data.root=/d",
                             "vae.channel_mult=[1, 2, 4]", "vae.downsample_factor=4",
                             "train.use_cache=false", "train.lr=3e-4"])
    assert cfg.train.batch_size == 64 and cfg.data.dataset == "coco"
    assert cfg.vae.channel_mult == [1, 2, 4] and cfg.train.use_cache is False
    assert cfg.train.lr == pytest.approx(3e-4)


def test_int_is_accepted_for_float():
    assert load_config(None, ["diffusion.p_uncond=0"]).diffusion.p_uncond == 0.0


@pytest.mark.parametrize("text, culprit", [
    ("[train]\nbatch_size = -4\n", "train.batch_size"),
    ("[train]\nbatch_size = 'big'\n", "train.batch_size"),
    ("[train]\nbatchsize = 4\n", "train.batchsize"),
    ("[trian]\nbatch_size = 4\n", "[trian]"),
    ("[sample]\nsampler = 'lms'\n", "sample.sampler"),
    ("[vae]\ndownsample_factor = 4\n", "vae.channel_mult"),
    ("[data]\nimage_size = 60\n", "data.image_size"),
    ("[train]\nuse_cache = 1\n", "train.use_cache"),
    ("[data]\ndataset = 'folder'\nroot = 'x'\n[vae]\ninclude_heldout = true\n",
     "vae.include_heldout"),
    ("[train\nbatch_size = 4\n", "not valid TOML"),
    ("[train]\nlr = nan\n", "train.lr"),  # NaN passes every range comparison
    ("[sample]\nguidance_rescale = nan\n", "sample.guidance_rescale"),
    ("[sample]\nguidance = inf\n", "sample.guidance"),
])
def test_bad_config_is_refused_naming_file_and_key(tmp_path, text, culprit):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and culprit in str(err.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")


def test_cli_config_show_exit_codes(tmp_path, capsys):
    bad = tmp_path / "x.toml"
    bad.write_text("[train]\nbatch_size = -4\n")
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "x.toml" in err and "train.batch_size" in err
    assert main(["config", "show", "--config", str(CONFIGS[0]), "train.steps=7"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["steps"] == 7


def test_resolved_config_json_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=9", "text.max_length=16"])
    cfg.save_json(tmp_path / "config.json")
    assert load_config_json(tmp_path / "config.json") == cfg


def test_console_command_reports_version():
    out = subprocess.run([sys.executable, "-m", "ldmkit.cli", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("ldmkit ")


# ----------------------------------------------------------------------------- sampler table


def _sample_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return commands.choices["sample"]


def test_config_cli_and_pipeline_sample_with_the_headline_setting_by_default():
    headline = (HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, HEADLINE.guidance_rescale)
    cfg = SampleConfig()
    assert (cfg.sampler, cfg.steps, cfg.guidance, cfg.guidance_rescale) == headline
    args = _sample_parser().parse_args(["--model", "m", "--prompt", "p", "--out", "o"])
    assert (args.sampler, args.steps, args.guidance, args.guidance_rescale) == headline
    for method in (TextToImagePipeline.__call__, TextToImagePipeline.generate_latents):
        params = inspect.signature(method).parameters
        assert (params["sampler"].default, params["num_inference_steps"].default,
                params["guidance_scale"].default,
                params["guidance_rescale"].default) == headline, method.__name__


def test_sample_frames_follow_the_pipelines_default_step_count():
    class Pipe:  # records what sample_with_frames asks of a pipeline
        def generate_latents(self, prompts, callback):
            for i in range(HEADLINE.steps):
                callback(i, 0, None, torch.zeros(1))
            return torch.zeros(1)

        def decode(self, latents):
            return latents

    _, frames = sample_with_frames(Pipe(), ["p"], frames=HEADLINE.steps)
    assert len(frames) == HEADLINE.steps  # the recorder expected as many steps as were run


def test_sample_parser_offers_the_registered_samplers_and_shows_the_defaults():
    parser = _sample_parser()
    sampler = next(a for a in parser._actions if a.dest == "sampler")
    assert list(sampler.choices) == list(SAMPLERS)
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert all(name in text for name in SAMPLERS)
    assert f"(default {HEADLINE.steps})" in text and f"(default {HEADLINE.sampler})" in text


def test_building_the_cli_parser_does_not_import_torch():
    code = "import sys, ldmkit.cli; ldmkit.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
