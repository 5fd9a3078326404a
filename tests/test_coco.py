"""MS-COCO captions loader and the image transforms it uses: every caption used, bad images
skipped (replaced by the next real item, logged once, counted), never a blank image."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import GOOD_COLORS, write_coco
from ldmkit.config import load_config
from ldmkit.data import build_dataset
from ldmkit.data.coco import CocoCaptions
from ldmkit.data.transforms import (
    BadImageError,
    load_image,
    pil_to_tensor,
    resize_center_crop,
    tensor_to_pil,
)
from ldmkit.errors import UserError


@pytest.fixture
def coco(tmp_path):
    info = write_coco(tmp_path)
    return tmp_path, info


def _mean_rgb(x):
    return ((x + 1) * 127.5).mean(dim=(1, 2)).numpy()


def _which_good(x):
    """Index of the fixture colour an image shows (they are far apart), or None."""
    dist = [np.abs(_mean_rgb(x) - np.array(c)).max() for c in GOOD_COLORS]
    return int(np.argmin(dist)) if min(dist) < 25 else None


# ----------------------------------------------------------------------------- transforms


def test_resize_center_crop_keeps_the_centre_of_the_longer_side():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    out = resize_center_crop(Image.fromarray(arr), 32)
    assert out.size == (32, 32)
    px = np.asarray(out).astype(int)
    # only the middle third: the filter may blend a little across the crop edge, no more
    assert np.abs(px[:, 1:-1] - (0, 255, 0)).max() < 8
    assert px[..., 0].max() < 40 and px[..., 2].max() < 40


def test_downsampling_is_antialiased():
    stripes = np.zeros((256, 256, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: naive subsampling gives solid black or white
    out = np.asarray(resize_center_crop(Image.fromarray(stripes), 32)).astype(float)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 3


def test_pil_to_tensor_maps_uint8_to_minus_one_one_and_back():
    arr = np.array([[[0, 128, 255]]], np.uint8)
    x = pil_to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]),
                          atol=1e-6)
    assert np.array_equal(np.asarray(tensor_to_pil(x)), arr)


def test_load_image_names_path_and_reason_for_each_kind_of_bad_file(coco):
    root, info = coco
    for name, reason in info["bad"].items():
        with pytest.raises(BadImageError) as err:
            load_image(root / "train2017" / name)
        assert err.value.reason == reason and name in str(err.value)
    good = load_image(root / "train2017" / info["good"][0])
    assert good.mode == "RGB" and good.size == (96, 72)


def test_transparent_pixels_load_as_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png")).min() == 255


# ----------------------------------------------------------------------------- loader


def test_coco_items_are_resized_tensors_with_their_own_captions(coco):
    root, info = coco
    ds = CocoCaptions(root, "train", image_size=32)
    assert len(ds) == len(info["order"])  # the blank-caption image is left out
    for i, name in enumerate(info["order"]):
        if name in info["good"]:
            image, caption = ds[i]
            assert image.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1
            assert caption in info["captions"][name]
            assert _which_good(image) == info["good"].index(name)


def test_every_caption_of_an_image_is_used(coco):
    root, info = coco
    ds = CocoCaptions(root, "train", image_size=16)
    torch.manual_seed(0)
    seen = {ds[0][1] for _ in range(40)}
    assert seen == set(info["captions"][info["order"][0]])


def test_bad_images_are_replaced_by_the_next_real_item_logged_once_and_counted(coco, caplog):
    root, info = coco
    ds = CocoCaptions(root, "train", image_size=16)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two epochs: each bad file is still logged and counted once
            images = [ds[i][0] for i in range(len(ds))]
    order = info["order"]
    for i, name in enumerate(order):
        good = _which_good(images[i])
        assert good is not None, f"item {i} ({name}) is not a real image"
        if name in info["bad"]:  # replaced by the next good item in file order
            nxt = next(n for n in order[i:] + order[:i] if n in info["good"])
            assert good == info["good"].index(nxt)
    assert ds.skipped == 3
    assert sorted((p["path"].split("/")[-1], p["reason"]) for p in ds.problems) == \
        sorted(info["bad"].items())
    warned = [r for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == 3
    assert all(any(n in r.getMessage() for n in info["bad"]) for r in warned)


def test_skips_made_in_dataloader_workers_are_counted_in_the_main_process(coco):
    root, _ = coco
    ds = CocoCaptions(root, "train", image_size=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    batches = [x for x, _ in loader]
    assert sum(len(b) for b in batches) == len(ds)
    assert ds.skipped == 3


def test_missing_or_unusable_annotations_are_errors_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="captions_train2017.json"):
        CocoCaptions(tmp_path, "train")
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 2, "caption": "orphan"}]}))
    with pytest.raises(UserError, match="captions_train2017.json: no usable"):
        CocoCaptions(tmp_path, "train")
    path.write_text("{not json")
    with pytest.raises(UserError, match="captions_train2017.json"):
        CocoCaptions(tmp_path, "train")


def _coco_cfg(root, *extra):
    return load_config(None, ["data.dataset=coco", f"data.root={json.dumps(str(root))}",
                              "data.image_size=16", "vae.downsample_factor=4",
                              "vae.channel_mult=[1,2,4]", *extra]).data


def test_val_split_uses_val2017_when_present(coco):
    root, _ = coco
    val_info = write_coco(root, split="val", n_good=2, with_bad=False)
    cfg = _coco_cfg(root, "data.val_items=1")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 7  # nothing carved out of train
    assert len(val) == 1 and val.image_path(0).name == val_info["order"][0]
    assert "val2017" in str(val.image_path(0))


def test_without_val2017_the_last_items_are_held_out_of_training(coco):
    root, info = coco
    cfg = _coco_cfg(root, "data.val_items=256")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(val) == 1 and len(train) == len(info["order"]) - 1  # at most a tenth, >= 1
    train_paths = {train.image_path(i) for i in range(len(train))}
    assert val.image_path(0) not in train_paths
