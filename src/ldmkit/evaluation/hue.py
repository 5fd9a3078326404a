"""A hue test for colours the shapes judge was never taught (data.extra_colors, e.g. the
pink a fine-tune or a LoRA teaches): does the object in an image have that colour?

The judge reads only the six training colours, so a pink object comes back as red or
purple. The shapes data draws flat-coloured objects on a grey background (saturation 0),
so the object's pixels are the saturated ones; the image reads as the colour when their
median hue lies within `tolerance` degrees of the colour's own hue. Pink (hue 330) sits
30 degrees from red (about 0) and 54 from purple (276): a 15-degree window keeps them apart.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ldmkit.data.shapes import ALL_COLORS

MIN_SATURATION = 0.35  # the grey background has none; antialiased edges little
MIN_OBJECT_FRACTION = 0.01  # fewer saturated pixels than this: no object drawn at all
DEFAULT_TOLERANCE = 15.0


def colour_hue(name: str) -> float:
    """The hue in degrees [0, 360) of one of the shapes data's colours."""
    r, g, b = (v / 255.0 for v in ALL_COLORS[name])
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


def object_hue(image: Image.Image) -> float | None:
    """Median hue (degrees) of the image's saturated pixels; None when there are too few.
    The median is taken on the circle, around the pixels' circular mean, so reds on
    both sides of 0 degrees do not average to cyan."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
    hue, sat, val = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    mask = (sat >= MIN_SATURATION) & (val >= 0.25)
    if mask.mean() < MIN_OBJECT_FRACTION:
        return None
    angles = np.deg2rad(hue[mask])
    centre = np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())
    offsets = (np.rad2deg(angles - centre) + 180.0) % 360.0 - 180.0
    return float((np.rad2deg(centre) + np.median(offsets)) % 360.0)


def hue_distance(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def reads_as(images: Sequence[Image.Image], colour: str,
             tolerance: float = DEFAULT_TOLERANCE) -> list[bool]:
    """For each image: is its object `colour` by hue?"""
    target = colour_hue(colour)
    hues = [object_hue(im) for im in images]
    return [h is not None and hue_distance(h, target) <= tolerance for h in hues]
