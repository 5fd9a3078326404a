"""Image folders with captions: metadata.jsonl (Hugging Face imagefolder) or .txt sidecars."""

import json

import pytest
import torch

from data_fixtures import GOOD_COLORS, jpeg_bytes, write_bad_files
from ldmkit.config import load_config
from ldmkit.data import build_dataset
from ldmkit.data.folder import ImageFolderCaptions
from ldmkit.errors import UserError


def _write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(jpeg_bytes(GOOD_COLORS[i % len(GOOD_COLORS)]))


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_metadata_jsonl_pairs_each_file_with_its_text(tmp_path):
    _write_images(tmp_path, ["a.jpg", "b.jpg"])
    _write_images(tmp_path / "sub", ["c.jpg"])
    _jsonl(tmp_path / "metadata.jsonl", [
        {"file_name": "a.jpg", "text": "first image"},
        {"file_name": "b.jpg", "text": ["two", "captions"]},
        "not json at all",                    # skipped with a warning, not fatal
        {"file_name": "a.jpg", "text": "  "},  # blank caption: unusable
    ])
    _jsonl(tmp_path / "sub" / "metadata.jsonl", [{"file_name": "c.jpg", "caption": "third"}])
    ds = ImageFolderCaptions(tmp_path, image_size=16)
    assert len(ds) == 3
    assert [ds.captions(i) for i in range(3)] == [("first image",), ("two", "captions"),
                                                  ("third",)]
    assert ds.image_path(2) == tmp_path / "sub" / "c.jpg"
    image, caption = ds[0]
    assert image.shape == (3, 16, 16) and caption == "first image"


def test_txt_sidecars_caption_the_image_beside_them(tmp_path):
    _write_images(tmp_path, ["x.jpg", "y.png", "nocaption.jpg"])
    (tmp_path / "x.txt").write_text("a red thing\n")
    (tmp_path / "y.txt").write_text("line one\n\nline two\n")
    ds = ImageFolderCaptions(tmp_path, image_size=16)
    assert [p.name for p in (ds.image_path(0), ds.image_path(1))] == ["x.jpg", "y.png"]
    assert ds.captions(0) == ("a red thing",) and ds.captions(1) == ("line one", "line two")
    torch.manual_seed(0)
    assert {ds[1][1] for _ in range(30)} == {"line one", "line two"}


def test_bad_images_in_a_folder_are_skipped_and_counted(tmp_path):
    _write_images(tmp_path, ["good.jpg"])
    bad = write_bad_files(tmp_path)
    _jsonl(tmp_path / "metadata.jsonl",
           [{"file_name": n, "text": n} for n in ["good.jpg", *bad]])
    ds = ImageFolderCaptions(tmp_path, image_size=16)
    items = [ds[i] for i in range(len(ds))]
    assert all(caption == "good.jpg" for _, caption in items)  # image and caption stay paired
    assert all(torch.equal(x, items[0][0]) for x, _ in items)
    assert ds.skipped == 3 and {p["reason"] for p in ds.problems} == set(bad.values())


@pytest.mark.parametrize("rows", [[], ["{broken"], [{"file_name": "a.jpg"}],
                                  [{"text": "no file name"}]])
def test_metadata_with_no_usable_pairs_is_an_error_naming_the_file(tmp_path, rows):
    _write_images(tmp_path, ["a.jpg"])
    _jsonl(tmp_path / "metadata.jsonl", rows)
    with pytest.raises(UserError, match=r"metadata\.jsonl: no usable image/caption pairs"):
        ImageFolderCaptions(tmp_path)


def test_folder_without_captions_or_folder_missing_is_an_error(tmp_path):
    _write_images(tmp_path, ["a.jpg"])
    with pytest.raises(UserError, match="no usable image/caption pairs"):
        ImageFolderCaptions(tmp_path)
    with pytest.raises(UserError, match="not found"):
        ImageFolderCaptions(tmp_path / "nope")


def test_validation_items_are_the_last_ones_and_left_out_of_training(tmp_path):
    names = [f"{i:03d}.jpg" for i in range(30)]
    _write_images(tmp_path, names)
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": n, "text": n} for n in names])
    cfg = load_config(None, ["data.dataset=folder", f"data.root={json.dumps(str(tmp_path))}",
                             "data.val_items=2", "data.image_size=16",
                             "vae.downsample_factor=4", "vae.channel_mult=[1,2,4]"]).data
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert [val.image_path(i).name for i in range(len(val))] == names[-2:]
    assert [train.image_path(i).name for i in range(len(train))] == names[:-2]


def test_balance_by_weights_every_value_of_the_field_alike_and_names_a_row_without_it(tmp_path):
    _write_images(tmp_path, ["a1.jpg", "a2.jpg", "a3.jpg", "b.jpg"])
    rows = [{"file_name": f"{n}.jpg", "text": n, "base": n[0]} for n in ("a1", "a2", "a3", "b")]
    _jsonl(tmp_path / "metadata.jsonl", rows)
    assert ImageFolderCaptions(tmp_path, image_size=16).draw_weights() is None
    weights = ImageFolderCaptions(tmp_path, image_size=16, balance_by="base").draw_weights()
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    _jsonl(tmp_path / "metadata.jsonl", rows[:3] + [{"file_name": "b.jpg", "text": "b"}])
    with pytest.raises(UserError, match=r"metadata.jsonl line 4: no 'base' field"):
        ImageFolderCaptions(tmp_path, image_size=16, balance_by="base")


def test_balance_by_needs_metadata_rows_and_folder_data(tmp_path):
    _write_images(tmp_path, ["x.jpg"])
    (tmp_path / "x.txt").write_text("a caption\n")
    with pytest.raises(UserError, match="needs metadata.jsonl"):
        ImageFolderCaptions(tmp_path, image_size=16, balance_by="base")
    with pytest.raises(UserError, match="data.balance_by = 'base' balances folder data"):
        load_config(None, ["data.dataset=shapes", "data.balance_by=base"])
