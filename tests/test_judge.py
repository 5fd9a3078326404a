"""The shapes judge: trusted accuracy of the shipped weights, real sensitivity to the
pixels, canonical two-object scenes, relation symmetry, and safe weight files."""

import json

import numpy as np
import pytest
import torch

from ldmkit.data.shapes import POSITIONS, Scene, ShapeObject, parse_prompt, render_scene
from ldmkit.data.transforms import pil_to_tensor
from ldmkit.errors import UserError
from ldmkit.evaluation.judge import (
    HEADS,
    IGNORE,
    ShapesJudge,
    augment,
    default_weights_path,
    fidelity_match,
    judge_accuracy,
    judge_images,
    load_judge,
    nearest_position,
    render_off_grid,
    save_judge,
    scene_labels,
)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def render(scenes, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return torch.stack([pil_to_tensor(render_scene(s, size, rng)) for s in scenes])


def obj(color, shape, size="large", position="center"):
    return ShapeObject(color, shape, size, position)


@pytest.mark.parametrize("image_size", [64, 32])  # 32: the demo's images, resized up
def test_shipped_judge_is_at_least_98_percent_accurate_per_attribute_on_fresh_images(
        judge, image_size):
    # Seed 777 is neither the training seed (0) nor the seed judge.json reports (1234).
    acc = judge_accuracy(judge, n=300, seed=777, image_size=image_size)
    assert set(acc) == {"shape", "color", "size", "position"}
    assert min(acc.values()) >= 0.98, acc


def test_shipped_judge_reads_colour_shape_and_size_of_objects_off_the_five_spots(judge):
    """Generated objects land between the data's spots; a judge that keeps where things
    are (a flattened map) must still read them (the first shipped one read shape right
    half the time there). Position off the grid is the nearest spot, ambiguous near the
    midlines: looser."""
    acc = judge_accuracy(judge, n=300, seed=777, image_size=32, off_grid=True)
    assert min(acc["color"], acc["shape"], acc["size"]) >= 0.98, acc
    assert acc["position"] >= 0.9, acc


def test_off_grid_renders_are_single_objects_labelled_with_the_nearest_spot():
    images, labels, scenes = render_off_grid(200, seed=5, image_size=32)
    assert images.shape == (200, 3, 32, 32) and (labels["layout"] == 0).all()
    assert (labels["color_b"] == IGNORE).all()
    agree = 0
    for image, scene in zip(images, scenes):
        ink = (image - image[:, :1, :1]).abs().sum(0) > 0.3  # not the grey background
        ys, xs = torch.nonzero(ink, as_tuple=True)
        # the pixel centroid is the centre unless the object is cut by an edge
        agree += nearest_position((xs.float().mean() + 0.5) / 32,
                                  (ys.float().mean() + 0.5) / 32) == scene.objects[0].position
    assert agree >= 180, agree
    assert {s.objects[0].position for s in scenes} == set(POSITIONS)


def test_nearest_position_and_explicit_centres():
    assert nearest_position(0.74, 0.2) == "top" and nearest_position(0.8, 0.45) == "right"
    assert nearest_position(0.5, 0.5) == "center"
    square = Scene((obj("red", "square"),), None)
    image = pil_to_tensor(render_scene(square, 32, centres=[(0.25, 0.75)]))
    ys, xs = torch.nonzero((image - image[:, :1, :1]).abs().sum(0) > 0.3, as_tuple=True)
    assert abs((xs.float().mean() + 0.5) / 32 - 0.25) < 0.03
    assert abs((ys.float().mean() + 0.5) / 32 - 0.75) < 0.03


def test_shipped_metadata_records_architecture_and_trusted_accuracy():
    meta = json.loads(default_weights_path().with_suffix(".json").read_text())
    assert meta["architecture"] == load_judge().config
    assert min(meta["accuracy"].values()) >= 0.98
    assert min(meta["accuracy_32"].values()) >= 0.98
    off_grid = meta["accuracy_off_grid_32"]
    assert min(off_grid["color"], off_grid["shape"], off_grid["size"]) >= 0.98
    assert {"seed", "steps"} <= set(meta["train"]) and "date" in meta
    assert default_weights_path().stat().st_size < 2_000_000


def test_swapping_colours_in_the_image_swaps_the_judged_colours(judge):
    scenes = [Scene((obj("red", "circle", "large", "left"),
                     obj("blue", "square", "small", "right")), "left of"),
              Scene((obj("blue", "circle", "large", "left"),
                     obj("red", "square", "small", "right")), "left of")]
    a, b = judge_images(judge, render(scenes))
    assert [o.color for o in a.objects] == ["red", "blue"]
    assert [o.color for o in b.objects] == ["blue", "red"]


def test_every_colour_shape_size_and_position_of_a_single_object_is_read(judge):
    scenes = [Scene((obj(c, s, z, p),)) for c, s, z, p in [
        ("green", "triangle", "small", "top"), ("yellow", "cross", "large", "bottom"),
        ("purple", "triangle", "large", "left"), ("orange", "circle", "small", "right"),
        ("blue", "square", "small", "center")]]
    assert judge_images(judge, render(scenes)) == scenes


def test_two_object_scenes_come_back_left_or_top_first_whatever_the_relation(judge):
    red, blue = obj("red", "circle", "large", "right"), obj("blue", "cross", "small", "left")
    up, down = obj("green", "square", "small", "bottom"), obj("yellow", "triangle", "large", "top")
    judged = judge_images(judge, render([Scene((red, blue), "right of"),
                                         Scene((up, down), "below")]))
    assert judged[0].relation == "left of"
    assert [(o.color, o.position) for o in judged[0].objects] == [("blue", "left"),
                                                                  ("red", "right")]
    assert judged[1].relation == "above"
    assert [(o.shape, o.position) for o in judged[1].objects] == [("triangle", "top"),
                                                                  ("square", "bottom")]


def test_images_of_other_sizes_are_resized_before_judging(judge):
    scenes = [Scene((obj("purple", "cross", "large", "top"),)),
              Scene((obj("orange", "square", "small", "left"),
                     obj("green", "circle", "large", "right")), "left of")]
    assert judge_images(judge, render(scenes, size=32)) == judge_images(judge, render(scenes))
    assert judge_images(judge, render(scenes, size=128)) == judge_images(judge, render(scenes))


def test_judge_refuses_images_that_are_not_n_3_h_w(judge):
    with pytest.raises(UserError, match="N, 3, H, W"):
        judge_images(judge, torch.zeros(3, 64, 64))


def test_relation_reads_either_way_round():
    judged = Scene((obj("blue", "square", "small", "left"),
                    obj("red", "circle", "large", "right")), "left of")
    assert fidelity_match(parse_prompt("a red circle right of a blue square"), judged)
    assert fidelity_match(parse_prompt("a blue square left of a red circle"), judged)
    assert not fidelity_match(parse_prompt("a red circle left of a blue square"), judged)
    assert not fidelity_match(parse_prompt("a blue circle right of a red square"), judged)
    stacked = Scene((judged.objects[0], judged.objects[1]), "above")
    assert fidelity_match(parse_prompt("a red circle below a blue square"), stacked)
    assert not fidelity_match(parse_prompt("a red circle right of a blue square"), stacked)


def test_stated_attributes_must_all_match_and_unstated_ones_are_free():
    judged = Scene((obj("green", "triangle", "small", "top"),))
    assert fidelity_match(parse_prompt("a green triangle"), judged)
    assert fidelity_match(parse_prompt("a small green triangle at the top"), judged)
    assert not fidelity_match(parse_prompt("a large green triangle"), judged)
    assert not fidelity_match(parse_prompt("a green triangle on the left"), judged)
    assert not fidelity_match(parse_prompt("a green triangle above a red cross"), judged)


def test_labels_are_canonical_and_ignore_the_missing_second_slot():
    single = scene_labels(Scene((obj("red", "circle", "small", "left"),)))
    assert single["layout"] == 0 and single["color_b"] == IGNORE
    flipped = scene_labels(Scene((obj("red", "circle", "small", "bottom"),
                                  obj("blue", "cross", "large", "top")), "below"))
    assert flipped["layout"] == 2 and flipped["position"] == IGNORE
    assert (flipped["color_a"], flipped["color_b"]) == (2, 0)  # blue on top is slot A
    assert set(single) == set(HEADS)


def test_augmentation_degrades_but_keeps_shape_and_range():
    x = render([Scene((obj("red", "circle"),))] * 8)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert 0.0 < (y - x).abs().mean() < 0.2


def test_weights_round_trip_and_corrupt_files_are_user_errors(tmp_path):
    torch.manual_seed(0)
    judge = ShapesJudge(width=8, hidden=16)
    save_judge(judge, tmp_path / "j.safetensors", {"note": "test"})
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    again = load_judge(tmp_path / "j.safetensors")
    assert torch.equal(judge.eval()(x)["layout"], again(x)["layout"])
    (tmp_path / "j.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="j.safetensors"):
        load_judge(tmp_path / "j.safetensors")
