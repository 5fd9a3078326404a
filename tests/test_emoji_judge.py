"""The emoji judge: label tables from the data's rows, files that round-trip, a Fréchet
distance that behaves, and shipped weights that say how far they can be trusted."""

import json

import pytest
import torch

from _emoji_archive import make_archive
from ldmkit.data.emoji import build_emoji_folder, load_split
from ldmkit.evaluation.emoji_judge import (
    Classes,
    EmojiJudge,
    accuracy,
    default_weights_path,
    frechet_distance,
    load_emoji_judge,
    read,
    save_emoji_judge,
    train_emoji_judge,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emoji")
    folder = build_emoji_folder(tmp / "d", archives=[make_archive(tmp, "google")],
                                allow_unpinned=True, log=lambda m: None)
    train, held = load_split(folder.train), load_split(folder.heldout)
    return torch.cat([train.images, held.images]), train.rows + held.rows


def test_classes_give_one_identity_per_base_emoji_with_its_categories(data):
    _, rows = data
    classes = Classes.from_rows(rows)
    assert len(classes.base) == len({r["base"] for r in rows})
    assert "thumbs up sign" in classes.names  # a tone variant's row names its base
    labels = classes.labels([r["base"] for r in rows])
    for i, r in enumerate(rows):
        assert classes.base[labels["identity"][i]] == r["base"]
        assert classes.categories[labels["category"][i]] == r["category"]
        assert classes.subcategories[labels["subcategory"][i]] == r["subcategory"]


def test_a_judge_learns_the_made_up_emoji_and_its_files_round_trip(data, tmp_path):
    images, rows = data
    classes = Classes.from_rows(rows)
    labels = classes.labels([r["base"] for r in rows])
    judge = train_emoji_judge(images, labels, classes.sizes(), steps=60, batch_size=32,
                              width=8, hidden=32)
    scores = accuracy(judge, images, labels)
    assert scores["identity_top5"] >= 0.9 and scores["category"] >= 0.6
    save_emoji_judge(judge, classes, tmp_path / "j.safetensors", {"note": "test"})
    loaded, loaded_classes = load_emoji_judge(tmp_path / "j.safetensors")
    assert loaded_classes == classes
    assert torch.equal(read(loaded, images).top("identity"), read(judge, images).top("identity"))


def test_the_judge_reads_any_size_and_uint8_or_float(data):
    images, rows = data
    judge = EmojiJudge(Classes.from_rows(rows).sizes(), width=8, hidden=16)
    small = torch.nn.functional.interpolate(images[:4].float() / 127.5 - 1, size=(32, 32))
    assert read(judge, small).features.shape == (4, 16)
    assert read(judge, images[:4]).logits["identity"].shape[0] == 4


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) against N(1, I) in 8 dimensions: |mu|^2 = 8
    assert frechet_distance(x, x + 1) == pytest.approx(8.0, abs=1e-3)
    # against 2x: |mu|^2 + tr S + 4 tr S - 2 * 2 tr S
    expected = float(x.mean(0).square().sum() + torch.cov(x.T).trace())
    assert frechet_distance(x, 2 * x) == pytest.approx(expected, abs=1e-3)


def test_the_shipped_judge_loads_and_reports_how_far_to_trust_it():
    judge, classes = load_emoji_judge()
    meta = json.loads(default_weights_path().with_suffix(".json").read_text())
    assert len(classes.base) > 1800 and len(classes.categories) == 9
    assert {"google->twitter", "twitter->google"} <= set(meta["cross_vendor"])
    assert "command" in meta and meta["train"]["steps"] > 0
    out = read(judge, torch.full((2, 3, 64, 64), 255, dtype=torch.uint8))
    assert out.logits["identity"].shape == (2, len(classes.base))
