"""The hue test that judges a colour the shapes judge never learned (pink after a fine-tune)."""

import itertools

import numpy as np
import pytest
from PIL import Image

from ldmkit.data.shapes import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    render_scene,
)
from ldmkit.evaluation.hue import colour_hue, hue_distance, object_hue, reads_as


def renders(colour: str, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [render_scene(Scene((ShapeObject(colour, shape, s, pos),)), size, rng)
            for shape, s, pos in itertools.product(SHAPES, SIZES, POSITIONS)]


@pytest.mark.parametrize("colour", ["pink", "cyan", *COLORS])
def test_every_render_reads_as_its_own_colour(colour):
    assert all(reads_as(renders(colour), colour))


@pytest.mark.parametrize("taught", ["pink", "cyan"])
def test_a_taught_colour_is_never_read_from_a_training_colour(taught):
    for colour in COLORS:
        assert not any(reads_as(renders(colour), taught)), colour
        assert not any(reads_as(renders(taught), colour)), colour


def test_an_empty_canvas_has_no_hue_and_reads_as_nothing():
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    assert object_hue(blank) is None
    assert reads_as([blank], "pink") == [False]


def test_reds_either_side_of_zero_average_to_red_not_cyan():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = (255, 0, 20)    # hue ~355
    image[:, 4:] = (255, 20, 0)    # hue ~5
    assert hue_distance(object_hue(Image.fromarray(image)), 0.0) < 6
    assert hue_distance(colour_hue("pink"), 330.0) < 1
