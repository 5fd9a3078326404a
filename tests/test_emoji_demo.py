"""The emoji demo, seconds long on made-up archives with a judge trained for them: every
stage runs, every picture the report links exists, evaluation.json has its promised keys.
(The quality numbers come from the full `make demo-emoji`, not from here.)"""

import json

import pytest
import torch

from _emoji_archive import make_archive
from _report import assert_report_pictures_open
from ldmkit.cli import main
from ldmkit.data.emoji import build_emoji_folder, load_split
from ldmkit.evaluation.emoji_judge import Classes, save_emoji_judge, train_emoji_judge


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emoji-demo")
    archives = [make_archive(tmp, "google"), make_archive(tmp, "twitter")]
    folder = build_emoji_folder(tmp / "data", archives=archives, allow_unpinned=True,
                                log=lambda m: None)
    splits = [load_split(folder.train), load_split(folder.heldout)]
    rows = splits[0].rows + splits[1].rows
    classes = Classes.from_rows(rows)
    judge = train_emoji_judge(torch.cat([s.images for s in splits]),
                              classes.labels([r["base"] for r in rows]), classes.sizes(),
                              steps=2, batch_size=8, width=8, hidden=16)
    save_emoji_judge(judge, classes, tmp / "judge.safetensors", {})
    out = tmp / "run"
    assert main(["demo-emoji", "--tiny", "--out", str(out), "--data", str(tmp / "data"),
                 "--judge", str(tmp / "judge.safetensors")]) == 0
    return out


def test_tiny_emoji_demo_report_links_pictures_that_exist_and_open(demo_dir):
    report = assert_report_pictures_open(demo_dir)
    assert "Apache License 2.0" in report and "CC-BY 4.0" in report


def test_tiny_emoji_demo_evaluation_json_has_the_promised_keys(demo_dir):
    result = json.loads((demo_dir / "evaluation.json").read_text())
    for key in ("vae_psnr", "identity_top1", "identity_top5", "heldout_category",
                "heldout_subcategory", "fd_judge"):
        assert isinstance(result[key], float), key
    assert [r["guidance"] for r in result["guidance_sweep"]] == [1.0, 3.0, 5.0]
    assert result["setting"] == {"sampler": "dpmpp-2m", "steps": 20, "guidance": 5.0,
                                 "guidance_rescale": 0.7}
    assert {"judge_on_heldout_real", "judge_on_heldout_vae_roundtrip"} <= set(result)


def test_tiny_emoji_demo_reads_the_vae_and_three_noise_seeds(demo_dir):
    result = json.loads((demo_dir / "evaluation.json").read_text())
    assert result["vae_color_error"] > 0 and 0 <= result["vae_ssim"] <= 1
    assert result["vae_roundtrip_identity_top1"] == \
        result["judge_on_heldout_vae_roundtrip"]["identity_top1"]
    by_seed = result["identity_top1_by_noise_seed"]
    assert len(by_seed) == 3 and all(0 <= v <= 1 for v in by_seed)
    assert by_seed[0] == result["identity_top1"]  # the first seed is the headline's


def test_every_held_out_emoji_is_judged_on_several_images_of_its_own_noise(demo_dir):
    from ldmkit.evaluation.emoji_fidelity import HELDOUT_IMAGES

    result = json.loads((demo_dir / "evaluation.json").read_text())
    rows = load_split(demo_dir.parent / "data" / "heldout").rows
    emoji = {r["base"] for r in rows if r["unified"] == r["base"]}
    assert HELDOUT_IMAGES > 1
    assert {r["n_heldout"] for r in result["guidance_sweep"]} == {HELDOUT_IMAGES * len(emoji)}


def test_an_unknown_judge_for_the_data_is_refused_before_training(tmp_path, capsys):
    folder = build_emoji_folder(tmp_path / "data", archives=[make_archive(tmp_path)],
                                allow_unpinned=True, log=lambda m: None)
    rows = load_split(folder.train).rows[:3]  # a judge that knows only a few emoji
    classes = Classes.from_rows(rows)
    judge = train_emoji_judge(load_split(folder.train).images[:3],
                              classes.labels([r["base"] for r in rows]), classes.sizes(),
                              steps=1, batch_size=2, width=8, hidden=8)
    save_emoji_judge(judge, classes, tmp_path / "j.safetensors", {})
    assert main(["demo-emoji", "--tiny", "--out", str(tmp_path / "run"), "--data",
                 str(tmp_path / "data"), "--judge", str(tmp_path / "j.safetensors")]) == 2
    assert "does not know" in capsys.readouterr().err


def test_the_demo_trains_on_draws_balanced_by_emoji_not_by_image(tmp_path):
    """The shipped config balances by base emoji: an emoji with five skin tones (six
    images per vendor) is drawn as often as one with a single image."""
    import argparse
    from collections import defaultdict

    from ldmkit.data import train_subset
    from ldmkit.emoji_demo import emoji_config

    folder = build_emoji_folder(tmp_path / "data", archives=[make_archive(tmp_path)],
                                allow_unpinned=True, log=lambda m: None)
    cfg = emoji_config(argparse.Namespace(tiny=False, overrides=[], config=None, seed=0,
                                          data=str(tmp_path / "data"), out=str(tmp_path / "r")))
    assert cfg.data.balance_by == "base"
    train = train_subset(load_split(folder.train, cfg.data.balance_by), cfg.data.val_items)
    share = defaultdict(float)
    for row, w in zip(train.rows, train.draw_weights().tolist()):
        share[row["base"]] += w
    counts = defaultdict(int)
    for row in train.rows:
        counts[row["base"]] += 1
    assert max(counts.values()) > 1  # the toned emoji is on the training side
    assert list(share.values()) == pytest.approx([1.0] * len(share))
    with pytest.raises(Exception, match="no 'category_x' field"):
        load_split(folder.train, "category_x")
