"""Grids, strips, GIFs and loss plots."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.errors import UserError
from ldmkit.viz import (
    display_scale,
    image_grid,
    moving_average,
    plot_metrics,
    save_gif,
    save_image,
    save_image_grid,
    save_strip,
    to_pil,
)


def _solid(n, size=8):
    colors = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0],
                           [1.0, 1.0, -1.0]])[:n]
    return colors[:, :, None, None].expand(n, 3, size, size).clone()


def test_to_pil_maps_minus_one_one_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    (img,) = to_pil(x)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255, 255]
    assert len(to_pil(x[0])) == 1 and to_pil([img])[0].mode == "RGB"


def test_grid_places_tiles_row_by_row_and_scales_with_nearest():
    grid = np.asarray(image_grid(_solid(4), nrow=2, scale=3))
    assert grid.shape == (2 + 2 * (24 + 2), 2 + 2 * (24 + 2), 3)
    tiles = [grid[2:26, 2:26], grid[2:26, 28:52], grid[28:52, 2:26], grid[28:52, 28:52]]
    for tile, rgb in zip(tiles, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        assert (tile == rgb).all()  # NEAREST: no blurred edges


@pytest.mark.parametrize("size, scale", [(32, 4), (64, 2), (48, 3), (128, 1), (300, 1)])
def test_small_images_are_upscaled_for_viewing_unless_a_scale_is_given(size, scale):
    assert display_scale(size) == scale
    assert image_grid(_solid(2, size), nrow=2).height == 2 + size * scale + 2
    assert image_grid(_solid(2, size), nrow=2, scale=1).height == 2 + size + 2


def test_captions_are_written_under_their_tiles_and_wrapped():
    plain = image_grid(_solid(2), nrow=2)
    captioned = np.asarray(image_grid(_solid(2), nrow=2,
                                      captions=["short", "a much longer caption " * 4]))
    assert captioned.shape[0] > plain.height + 20  # several wrapped lines
    below = captioned[plain.height:]
    assert (below.max(axis=-1) < 100).sum() > 20  # dark text pixels under the tiles
    with pytest.raises(ValueError):
        image_grid(_solid(2), nrow=2, captions=["one"])


def test_save_image_grid_writes_png_and_leaves_no_temp_files(tmp_path):
    save_image_grid(_solid(3), tmp_path / "g.png", nrow=3, captions=["a", "b", "c"], scale=2)
    assert Image.open(tmp_path / "g.png").format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]
    save_image(to_pil(_solid(1))[0], tmp_path / "one.png")
    assert np.asarray(Image.open(tmp_path / "one.png"))[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(UserError, match="extension"):
        save_image(to_pil(_solid(1))[0], tmp_path / "x.nope")


def test_strip_and_gif_hold_every_frame(tmp_path):
    frames = to_pil(_solid(4))
    save_strip(frames, tmp_path / "s.png", labels=["t=3", "t=2", "t=1", "t=0"])
    assert Image.open(tmp_path / "s.png").width >= 4 * 8
    save_gif(frames, tmp_path / "a.gif", duration_ms=50)
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 4


def test_moving_average_is_a_centred_mean():
    v = np.array([0.0, 3.0, 6.0, 9.0])
    assert np.allclose(moving_average(v, 3), [1.5, 3.0, 6.0, 7.5])
    assert np.array_equal(moving_average(v, 1), v)


def test_plot_metrics_reads_jsonl_skipping_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1 / (s + 1), "kl": -s} for s in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 50, "lo')
    plot_metrics(path, ["loss", "kl", "absent"], tmp_path / "loss.png", "losses", smooth=5)
    img = Image.open(tmp_path / "loss.png")
    assert img.format == "PNG" and img.height > img.width / 2  # two stacked panels
    with pytest.raises(UserError, match="absent"):
        plot_metrics(path, ["absent"], tmp_path / "none.png", "nothing")
