"""img2img and inpainting on a tiny pipeline: the strength's two ends, every sampler on both
objectives, the known region held, the mask's edge, the grid a strength runs, and the
refusals of bad pictures, masks and strengths."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_model import make_tiny_pipeline
from ldmkit.diffusion.editing import GridSlice, renoise, start_index, steps_run
from ldmkit.diffusion.flow import FlowSchedule
from ldmkit.diffusion.registry import SAMPLERS
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.edit_inputs import ImageResizedWarning, latent_mask
from ldmkit.editing import prepare_edit
from ldmkit.sampling_args import SamplingArgumentError
from ldmkit.viz import to_pil

SIZE = 16


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def picture(seed: int = 0, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def left_mask(size: int = SIZE) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, : size // 2] = 255
    return Image.fromarray(mask)


def run(pipe, seed: int = 0, **kwargs):
    kwargs.setdefault("num_inference_steps", 10)
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), **kwargs)


def roundtrip(pipe, image: Image.Image) -> Image.Image:
    edit = prepare_edit(image, None, 1, SIZE, 0.0)
    return to_pil(pipe.decode(pipe.encode_images(edit.images)))[0]


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------------------- strength


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_strength_zero_is_the_vae_round_trip(pipe, sampler):
    image = picture()
    out = run(pipe, image=image, strength=0.0, sampler=sampler)[0]
    assert np.array_equal(array(out), array(roundtrip(pipe, image)))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_strength_one_is_text_to_image_for_the_same_seed(pipe, sampler):
    plain = run(pipe, sampler=sampler)[0]
    edited = run(pipe, image=picture(), strength=1.0, sampler=sampler)[0]
    assert np.array_equal(array(plain), array(edited))


def test_a_middle_strength_keeps_more_of_the_picture_than_a_high_one(pipe):
    image = picture(3)
    target = array(roundtrip(pipe, image)).astype(float)
    errors = [np.abs(array(run(pipe, image=image, strength=s)[0]) - target).mean()
              for s in (0.2, 0.6, 1.0)]
    assert errors[0] < errors[1] < errors[2]


def test_strength_runs_the_tail_of_the_text_to_image_grid():
    schedule = NoiseSchedule("cosine", 100)
    full = schedule.sampling_levels(20)
    for strength, run_steps in ((0.6, 12), (0.7, 14), (0.29, 5), (0.0, 0), (1.0, 20)):
        assert steps_run(20, strength) == run_steps
        sliced = GridSlice(schedule, start_index(20, strength)).sampling_levels(20)
        assert sliced == full[20 - run_steps:]
        assert sliced[-1].sigma == 0.0  # every edit ends on clean data


def test_the_edit_callback_counts_only_the_steps_taken(pipe):
    seen = []
    run(pipe, image=picture(), strength=0.5, callback=lambda i, t, x, x0: seen.append(i))
    assert seen == list(range(5))


# ----------------------------------------------------------------------------- flow


def test_img2img_runs_every_sampler_on_the_flow_objective(pipe):
    flow = make_tiny_pipeline.__globals__["TextToImagePipeline"](
        pipe.vae, pipe.unet, pipe.text_encoder, FlowSchedule(50), "flow", 0.0, SIZE)
    image = picture()
    for sampler in SAMPLERS:
        zero = run(flow, image=image, strength=0.0, sampler=sampler)[0]
        assert np.array_equal(array(zero), array(roundtrip(flow, image)))
        assert np.array_equal(array(run(flow, sampler=sampler)[0]),
                              array(run(flow, image=image, strength=1.0, sampler=sampler)[0]))
        assert run(flow, image=image, strength=0.5, sampler=sampler)[0].size == (SIZE, SIZE)


def test_renoise_is_the_forward_process_between_two_levels():
    """x at level `now` with x0 = 0: back at the noisier level its std is that level's."""
    schedule = NoiseSchedule("cosine", 100)
    levels = schedule.sampling_levels(10)
    now, back = levels[6], levels[4]
    x = now.sigma * torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    out = renoise(x, now, back, torch.Generator().manual_seed(1))
    assert out.std().item() == pytest.approx(back.sigma, rel=0.01)


# ----------------------------------------------------------------------------- inpainting


def test_inpainting_keeps_the_unmasked_latents_and_pixels(pipe):
    image = picture(1)
    edit = prepare_edit(image, left_mask(), 1, SIZE, 1.0, mask_feather=0)
    from ldmkit.editing import edit_latents

    latents, known, lmask = edit_latents(pipe, ["a blue square"], edit, None, 10, 5.0,
                                         "dpmpp-2m", torch.Generator().manual_seed(0))
    kept = lmask == 0
    assert bool(kept.any()) and bool((lmask == 1).any())
    # the known region is the picture's latent exactly; the masked one is generated
    assert torch.equal(latents[kept.expand_as(latents)], known[kept.expand_as(known)])
    assert not torch.allclose(latents[~kept.expand_as(latents)], known[~kept.expand_as(known)])
    out = array(run(pipe, image=image, mask=left_mask(), mask_feather=0)[0])
    ref = array(roundtrip(pipe, image))
    # beyond half a latent cell (2 px at f = 4) right of the mask: the round trip exactly
    assert np.array_equal(out[:, SIZE // 2 + 2:], ref[:, SIZE // 2 + 2:])
    assert not np.array_equal(out[:, : SIZE // 2], ref[:, : SIZE // 2])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_inpaints(pipe, sampler):
    image = picture(2)
    out = array(run(pipe, image=image, mask=left_mask(), sampler=sampler, mask_feather=0)[0])
    ref = array(roundtrip(pipe, image))
    assert np.array_equal(out[:, SIZE // 2 + 2:], ref[:, SIZE // 2 + 2:])


def test_resampling_changes_the_result_and_keeps_the_known_region(pipe):
    image = picture(4)
    plain = array(run(pipe, image=image, mask=left_mask(), mask_feather=0)[0])
    resampled = array(run(pipe, image=image, mask=left_mask(), mask_feather=0,
                          resample_steps=2)[0])
    assert not np.array_equal(plain, resampled)
    assert np.array_equal(plain[:, SIZE // 2 + 2:], resampled[:, SIZE // 2 + 2:])


def test_the_latent_mask_covers_every_touched_cell_and_feathers_outwards():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 9:14, 9:14] = 1  # pixels of latent cells 2 and 3 (f = 4)
    hard = latent_mask(mask, 4, feather=0)[0, 0]
    assert hard[2:4, 2:4].eq(1).all() and hard.sum() == 4
    soft = latent_mask(mask, 4, feather=2)[0, 0]
    assert soft[2:4, 2:4].eq(1).all()
    assert soft[1, 2] == pytest.approx(2 / 3) and soft[0, 2] == pytest.approx(1 / 3)
    assert soft[4, 4] == pytest.approx(2 / 3)  # diagonal neighbours too (max-pool rings)
    assert soft[6:, :].eq(0).all()


def test_a_feathered_edge_has_no_seam(pipe):
    """Across the mask's edge the step between neighbouring pixel columns stays near the
    picture's own: a hard mask may jump there, a feathered one blends."""
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    out = array(run(pipe, image=image, mask=left_mask(), mask_feather=2)[0]).astype(float)
    steps = np.abs(np.diff(out.mean(axis=(0, 2))))
    edge = SIZE // 2
    assert steps[edge - 2: edge + 2].max() <= steps[: edge - 3].max() + 1


# ----------------------------------------------------------------------------- bad inputs


def test_a_square_picture_of_another_size_is_resized_with_a_warning(pipe):
    with pytest.warns(ImageResizedWarning, match="resized from 40x40 to the model's 16x16"):
        out = run(pipe, image=picture(size=40), strength=0.5)
    assert out[0].size == (SIZE, SIZE)


@pytest.mark.parametrize("kwargs, message", [
    ({"image": Image.new("RGB", (32, 16))}, "image: is 32x16, another aspect ratio"),
    ({"strength": 1.5}, "strength: must be a finite number in 0..1"),
    ({"strength": float("nan")}, "strength: must be a finite number in 0..1"),
    ({"mask": Image.new("L", (8, 8), 255)}, "mask: is 8x8, not the image's 16x16"),
    ({"mask": Image.new("L", (SIZE, SIZE), 128)}, "mask: is not black and white: 100%"),
    ({"mask": Image.new("L", (SIZE, SIZE), 0)}, "mask: has no white pixel"),
    ({"resample_steps": 2}, "resample_steps: resamples an inpainting run"),
    ({"mask_feather": 9}, "mask_feather: must be an integer in 0..4"),
    ({"image": "/nonexistent.png"}, "image: /nonexistent.png: missing"),
    ({"image": b"not an image"}, "image: not a readable image"),
])
def test_bad_edit_inputs_are_refused_naming_the_field(pipe, kwargs, message):
    kwargs = {"image": picture(), **kwargs}
    with pytest.raises(SamplingArgumentError, match=message.replace("(", r"\(")):
        run(pipe, **kwargs)


def test_a_mask_without_a_picture_is_refused(pipe):
    with pytest.raises(SamplingArgumentError, match="image: is needed for an edit"):
        run(pipe, mask=left_mask())


def test_an_antialiased_mask_passes_and_a_mask_from_alpha_reads_transparency():
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, :8] = 255
    mask[:, 8] = 128  # one grey column: an antialiased edge
    edit = prepare_edit(picture(), Image.fromarray(mask), 1, SIZE)
    assert edit.masks[0, 0, :, :8].eq(1).all() and edit.masks[0, 0, :, 9:].eq(0).all()
    rgba = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    rgba[:, :4, 3] = 0  # transparent = edit (OpenAI's edits API)
    edit = prepare_edit(picture(), Image.fromarray(rgba, "RGBA"), 1, SIZE,
                        mask_from_alpha=True)
    assert edit.masks[0, 0, :, :4].eq(1).all() and edit.masks[0, 0, :, 4:].eq(0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SamplingArgumentError, match="mask: has no alpha channel"):
            prepare_edit(picture(), left_mask(), 1, SIZE, mask_from_alpha=True)


# ----------------------------------------------------------------------------- ldmkit sample


def test_sample_cli_img2img_and_inpainting(tmp_path, capsys):
    from _tiny_model import make_tiny_model_dir
    from ldmkit.cli import main

    model = make_tiny_model_dir(tmp_path)
    picture(5, size=32).save(tmp_path / "in.png")  # square, twice the size: resized
    Image.fromarray(np.kron(array(left_mask()), np.ones((2, 2))).astype(np.uint8)).save(
        tmp_path / "mask.png")
    left_mask(24).save(tmp_path / "small_mask.png")
    common = ["sample", "--model", str(model), "--prompt", "a red circle", "--n", "2",
              "--steps", "4", "--init-image", str(tmp_path / "in.png")]
    assert main(common + ["--strength", "0", "--out", str(tmp_path / "zero")]) == 0
    assert "--init-image: resized from 32x32 to the model's 16x16" in capsys.readouterr().err
    assert main(common + ["--mask", str(tmp_path / "mask.png"), "--progress",
                          "--out", str(tmp_path / "inpaint")]) == 0
    for name in ("zero/0000.png", "zero/0001.png", "zero/grid.png", "inpaint/0001.png",
                 "inpaint/progress.png"):
        assert (tmp_path / name).is_file(), name
    for flags, message in ((["--strength", "2"], "--strength: must be a finite number"),
                           (["--mask", str(tmp_path / "in.png")], "--mask: is not black and white"),
                           (["--mask", str(tmp_path / "small_mask.png")],
                            "--mask: is 24x24, not the image's 32x32"),
                           (["--resample-steps", "3"], "--resample-steps: resamples")):
        out = tmp_path / "bad"
        assert main(common + flags + ["--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
