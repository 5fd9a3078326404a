"""The layout edit (`pipe(..., image=, source_prompt=)`): the DDPM posterior against Ho et
al.'s formulas, the edit-friendly inversion rebuilding its picture, attention maps that are
SDPA's and that steer, the mask's cell alignment and words, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _tiny_model import make_tiny_pipeline
from ldmkit.diffusion.inversion import invert, run_inverted
from ldmkit.diffusion.samplers import ddpm_posterior
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.layout_edit import aligned_upsample, blend_positions, layout_edit_latents
from ldmkit.models.attention_maps import AttentionControl, controlled_attention
from ldmkit.models.layers import Attention
from ldmkit.sampling_args import SamplingArgumentError

SIZE = 16


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def pictures(n: int = 2) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.tensor(rng.uniform(-1, 1, (n, 3, SIZE, SIZE)), dtype=torch.float32)


def test_the_ddpm_posterior_is_ho_et_al_s_equation_7():
    schedule = NoiseSchedule("cosine", 50)
    now, nxt = schedule.sampling_levels(50)[10:12]  # one step: t -> t - 1
    abar_t, abar_s = now.alpha**2, nxt.alpha**2
    beta = 1 - abar_t / abar_s
    x, x0 = torch.randn(4), torch.randn(4)
    mean, std = ddpm_posterior(x, x0, now, nxt)
    want_mean = (abar_s**0.5 * beta / (1 - abar_t)) * x0 \
        + ((1 - beta) ** 0.5 * (1 - abar_s) / (1 - abar_t)) * x
    torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-6)
    assert std == pytest.approx(((1 - abar_s) / (1 - abar_t) * beta) ** 0.5, rel=1e-6)


def test_the_inversion_retraces_its_path_to_the_picture_under_the_same_denoiser():
    schedule = NoiseSchedule("cosine", 50)
    known = torch.randn(3, 4, 4, 4)

    def denoiser(x, t):  # any x0 estimate will do: the noises are solved for it
        return 0.5 * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1), x  # (x0, eps)

    inversion = invert(denoiser, schedule, known, 10, 3, torch.Generator().manual_seed(0))
    assert inversion.steps == 7 and len(inversion.noises) == 6
    levels = schedule.sampling_levels(10)
    # the path is the picture noised independently to each level
    g = torch.Generator().manual_seed(0)
    for lv, x in zip(levels[3:10], inversion.path):
        torch.testing.assert_close(x, lv.alpha * known + lv.sigma * torch.randn(
            known.shape, generator=g))
    torch.testing.assert_close(inversion.path[-1], known)
    seen = []

    def watch(k, x, on_path):
        seen.append((x, on_path))
        return x

    last = run_inverted(denoiser, schedule, inversion, 10, blend=watch)
    for x, on_path in seen[:-1]:  # every noisy level: exactly the path
        torch.testing.assert_close(x, on_path, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, known, rtol=1e-4, atol=1e-4)  # and the picture
    other = run_inverted(lambda x, t: (0.4 * torch.tanh(x), x), schedule, inversion, 10)
    assert (other - last).abs().max() > 1e-2  # another denoiser: another result


def test_hooked_attention_is_sdpa_and_only_the_model_given_is_hooked(pipe):
    from ldmkit.models.unet import AttentionBlock

    layer = next(m.cross_attn for m in pipe.unet.modules() if isinstance(m, AttentionBlock))
    torch.manual_seed(0)
    x = torch.randn(2, layer.to_q.in_features, 4, 4)
    context = torch.randn(2, 5, layer.to_k.in_features)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    want = layer(x, context, mask)
    control = AttentionControl()
    with controlled_attention(pipe.unet, control):
        control.record()
        got = layer(x, context, mask)
        assert all(m.probs_hook is None for m in pipe.vae.modules() if isinstance(m, Attention))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (is_cross, probs), = control.recorded
    assert is_cross and probs.shape == (2, layer.num_heads, 16, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert float(probs[0, ..., 3:].abs().max()) == 0.0  # padded keys get no attention
    assert layer.probs_hook is None  # the class's fused kernel again
    with pytest.raises(RuntimeError), controlled_attention(pipe.unet, control):
        raise RuntimeError("a failed run")
    assert all(m.probs_hook is None for m in pipe.unet.modules() if isinstance(m, Attention))


def test_injected_maps_steer_the_network_and_its_own_maps_change_nothing(pipe):
    cond, _ = pipe.conditioning(["a red circle", "a blue square"])
    net = pipe.denoiser(cond, cond, 1.0)  # conditional only: one model call per use
    x, t = torch.randn(pipe.latent_shape(2)), torch.full((2,), 20)
    control = AttentionControl()
    with controlled_attention(pipe.unet, control):
        control.record()
        plain = net(x, t)[0]
        own = control.recorded
        control.record()
        net(x.flip(0), t)
        swapped = control.recorded
        control.inject(own, cross=True, self_maps=True)
        again = net(x, t)[0]
        control.inject(swapped, cross=True, self_maps=True)
        steered = net(x, t)[0]
    torch.testing.assert_close(again, plain, rtol=1e-5, atol=1e-5)
    assert (steered - plain).abs().max() > 1e-3


def test_in_a_guided_batch_only_the_conditional_rows_take_the_maps(pipe):
    cond, uncond = pipe.conditioning(["a red circle", "a blue square"])
    guided = pipe.denoiser(cond, uncond, 5.0, 0.0)
    x, t = torch.randn(pipe.latent_shape(2)), torch.full((2,), 20)
    control = AttentionControl()
    with controlled_attention(pipe.unet, control):
        plain = guided(x, t)[0]
        control.record()
        pipe.denoiser(cond, cond, 1.0)(x, t)  # the conditional pass alone
        own = control.recorded
        control.inject(own, cross=True, self_maps=False)
        again = guided(x, t)[0]
        control.cross_rows = torch.tensor([True, False])
        control.inject([(c, p.flip(0) if c else p) for c, p in own], cross=True,
                       self_maps=False)
        half = guided(x, t)[0]
    # the unconditional rows kept their own maps, the conditional ones got theirs back
    torch.testing.assert_close(again, plain, rtol=1e-4, atol=1e-4)
    # cross_rows: row 1 kept its own maps; row 0 took the other prompt's
    torch.testing.assert_close(half[1], plain[1], rtol=1e-4, atol=1e-4)
    assert (half[0] - plain[0]).abs().max() > 1e-3


def test_a_coarse_cell_lands_on_the_first_fine_cell_under_it():
    for i, j in ((0, 0), (1, 2), (3, 3)):
        coarse = torch.zeros(1, 1, 4, 4)
        coarse[0, 0, i, j] = 1.0
        fine = aligned_upsample(coarse, 8)
        assert fine.shape == (1, 1, 8, 8)
        assert divmod(int(fine.argmax()), 8) == (2 * i, 2 * j)
    # bilinear would centre it between two fine cells: half a cell off
    smooth = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(aligned_upsample(smooth, 8)[..., ::2, ::2], smooth)
    assert not torch.allclose(F.interpolate(smooth, size=(8, 8), mode="bilinear")[..., ::2, ::2],
                              smooth)


def test_strength_0_is_the_round_trip_and_a_long_source_prompt_is_cut_to_the_window(pipe):
    images = pictures()
    latents, known, mask = layout_edit_latents(pipe, ["a blue circle"] * 2, "a red circle",
                                               images, 0.0, 10, 5.0, 0.0)
    assert torch.equal(latents, known) and float(mask.abs().max()) == 0.0
    tokenizer, window = pipe.text_encoder.tokenizer, pipe.text_encoder.max_length
    long = "a red circle" + " and a blue square" * 6
    assert all(i < window for i in blend_positions(tokenizer, long, None, window))
    with pytest.raises(SamplingArgumentError, match="none of the words"):
        blend_positions(tokenizer, "a " * 20 + "red", None, window)  # red is past the window
    edited, _, _ = layout_edit_latents(pipe, ["a blue circle"] * 2, long, images, 0.6, 6,
                                       5.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.isfinite(edited).all()


def test_a_backbone_without_unet_attention_is_refused_naming_source_prompt(pipe):
    from ldmkit.config import UNetConfig
    from ldmkit.models.denoiser import build_denoiser

    dit = build_denoiser(UNetConfig(kind="dit", width=32, depth=1, num_heads=2, patch_size=2),
                         pipe.latent_shape(1)[1], pipe.text_encoder.hidden_size)
    with pytest.raises(SamplingArgumentError, match="source_prompt: .* backbone is 'dit'"):
        pipe.with_unet(dit)("a blue circle", image=Image.new("RGB", (SIZE, SIZE)),
                            source_prompt="a red circle", num_inference_steps=4)


def test_the_blend_words_default_to_the_source_prompts_content_words(pipe):
    tokenizer = pipe.text_encoder.tokenizer
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red circle")["input_ids"])
    assert [tokens[i] for i in blend_positions(tokenizer, "a red circle", None)] == [
        "red", "circle"]
    assert [tokens[i] for i in blend_positions(tokenizer, "a red circle", ["Circle"])] == [
        "circle"]
    assert [tokens[i] for i in blend_positions(tokenizer, "a red circle", "red")] == ["red"]
    with pytest.raises(SamplingArgumentError, match="source_prompt: 'a' has none of the words"):
        blend_positions(tokenizer, "a", None)


def test_the_same_prompt_at_guidance_1_gives_back_the_pictures_latents(pipe):
    images = pictures()
    latents, known, mask = layout_edit_latents(pipe, ["a red circle"] * 2, "a red circle",
                                               images, 0.8, 10, 1.0, 0.0,
                                               torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, known, rtol=1e-4, atol=1e-4)
    assert mask.shape == (2, 1, *known.shape[-2:]) and 0 <= mask.min() <= mask.max() <= 1
    edited, _, _ = layout_edit_latents(pipe, ["a blue square"] * 2, ["a red circle"] * 2,
                                       images, 0.8, 10, 5.0, 0.0,
                                       torch.Generator().manual_seed(0))
    assert (edited - known).abs().max() > 1e-3


def test_the_pipeline_runs_a_layout_edit_and_refuses_what_does_not_fit(pipe):
    picture = Image.fromarray(np.full((SIZE, SIZE, 3), 128, dtype=np.uint8))
    out = pipe("a blue circle", image=picture, strength=0.6, source_prompt="a red circle",
               num_inference_steps=6, guidance_scale=5.0, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(0))
    assert [im.size for im in out] == [(SIZE, SIZE)] * 2
    mask = Image.fromarray(np.full((SIZE, SIZE), 255, dtype=np.uint8))
    for kwargs, message in (({"mask": mask}, "source_prompt: a layout edit finds its own"),
                            ({"source_prompt": ["a", "b", "c"]}, "source_prompt: must be a "
                             "string, or one per image"),
                            ({"source_prompt": "the"}, "has none of the words")):
        kwargs = {"source_prompt": "a red circle", **kwargs}
        with pytest.raises(SamplingArgumentError, match=message):
            pipe(["a blue circle"] * 2, image=picture, num_inference_steps=4, **kwargs)


def test_sample_cli_runs_a_layout_edit_and_names_the_flag_it_refuses(tmp_path, capsys):
    from _tiny_model import make_tiny_model_dir
    from ldmkit.cli import main

    model = make_tiny_model_dir(tmp_path)
    Image.fromarray(np.full((SIZE, SIZE, 3), 90, dtype=np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.full((SIZE, SIZE), 255, dtype=np.uint8)).save(tmp_path / "mask.png")
    common = ["sample", "--model", str(model), "--prompt", "a blue circle", "--n", "2",
              "--steps", "4", "--guidance", "20"]
    picture = ["--init-image", str(tmp_path / "in.png")]
    assert main(common + picture + ["--source-prompt", "a red circle", "--progress",
                                    "--out", str(tmp_path / "edit")]) == 0
    assert main(common + picture + ["--source-prompt", "a red circle" + " and a blue square" * 6,
                                    "--out", str(tmp_path / "long")]) == 0
    assert "--source-prompt is" in capsys.readouterr().err  # cut to the window, and said
    for name in ("0000.png", "0001.png", "grid.png", "progress.png"):
        assert (tmp_path / "edit" / name).is_file(), name
    for flags, message in (
            (["--source-prompt", "a red circle"], "--source-prompt: describes --init-image"),
            (picture + ["--source-prompt", "a red circle", "--mask", str(tmp_path / "mask.png")],
             "--source-prompt: a layout edit finds its own region"),
            (picture + ["--source-prompt", "the"], "--source-prompt: 'the' has none")):
        out = tmp_path / "bad"
        assert main(common + flags + ["--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
