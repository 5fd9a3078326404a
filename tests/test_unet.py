"""The conditional U-Net: shapes (incl. the seed's geometry), masking, gradients,
persistence, and that a tiny one can learn one latent well enough for sampling to return it."""

import json

import pytest
import torch

from ldmkit.config import UNetConfig, load_config
from ldmkit.diffusion.guidance import CFGDenoiser
from ldmkit.diffusion.samplers import run_sampler
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import UserError
from ldmkit.models.text import TextEmbeddings
from ldmkit.models.unet import AttentionBlock, UNet

CTX = 8


def tiny_cfg(**kw) -> UNetConfig:
    base = {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
            "cross_attn_levels": [1], "self_attn": True, "num_heads": 2}
    return UNetConfig(**{**base, **kw})


# How the text reaches the U-Net: cross-attention only; plus its pooled vector; plus
# trainable token blocks before both.
TEXT_PATHS = {"cross-attention": {}, "pooled": {"pooled_text": True},
              "token-blocks": {"pooled_text": True, "text_layers": 2, "text_width": 16}}


def inputs(batch=2, size=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, tokens, CTX, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 3:] = False  # the first caption is shorter
    return x, t, ctx, mask


def randomize_output(model: UNet) -> UNet:
    """Undo the zero-inits (the last conv, the token blocks' up-projection) so outputs and
    upstream gradients are nonzero."""
    torch.manual_seed(1)
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)
    if model.text_blocks is not None:
        torch.nn.init.normal_(model.text_blocks.up.weight, std=0.05)
    return model


# ----------------------------------------------------------------------------- shapes


def test_output_has_the_input_shape_and_accepts_float_timesteps():
    model = randomize_output(UNet(tiny_cfg(), 4, CTX))
    x, t, ctx, mask = inputs()
    assert model(x, t, ctx, mask).shape == x.shape
    assert model(x, t.float() + 0.5, ctx, mask).shape == x.shape
    assert model(x, t, ctx).shape == x.shape  # no mask = every token real


def test_seed_geometry_8x8_latents_through_four_levels_down_to_1x1():
    cfg = tiny_cfg(channel_mult=[1, 2, 4, 8], cross_attn_levels=[1, 2, 3], num_res_blocks=2)
    model = randomize_output(UNet(cfg, 4, CTX))
    x, t, ctx, mask = inputs()
    out = model(x, t, ctx, mask)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_the_seed_config_unet_builds_and_runs_at_its_full_size():
    cfg = load_config("configs/seed-coco64.toml")
    with torch.device("meta"):  # shapes only: the real model has ~392M parameters
        model = UNet(cfg.unet, 4, 512)
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 77, 512),
                    torch.ones(2, 77, dtype=torch.bool))
    assert out.shape == (2, 4, 8, 8)
    blocks = [b for b in model.modules() if isinstance(b, AttentionBlock)]
    # cross-attention at levels 1-3 (2 down + 3 up blocks each) and in the middle
    assert len(blocks) == 3 * 5 + 1
    assert all(b.cross_attn.to_k.in_features == 512 for b in blocks)


def test_latent_size_not_divisible_by_the_level_factor_is_rejected():
    model = UNet(tiny_cfg(channel_mult=[1, 2, 2]), 4, CTX)
    x, t, ctx, mask = inputs(size=6)
    with pytest.raises(ValueError, match="not divisible by 4"):
        model(x, t, ctx, mask)


def test_num_heads_must_divide_every_width():
    with pytest.raises(UserError, match="num_heads"):
        UNet(tiny_cfg(num_heads=3), 4, CTX)


def test_final_conv_is_zero_initialised_so_the_fresh_net_predicts_zero():
    model = UNet(tiny_cfg(), 4, CTX)
    assert torch.count_nonzero(model(*inputs())) == 0


# ----------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("text_path", list(TEXT_PATHS))
def test_masked_padding_tokens_do_not_change_the_output(text_path):
    model = randomize_output(UNet(tiny_cfg(**TEXT_PATHS[text_path]), 4, CTX)).eval()
    x, t, ctx, mask = inputs()
    garbage = 100 * torch.randn(2, 4, CTX)
    padded_ctx = torch.cat([ctx, garbage], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    # also scribble over the masked-out tail of the first caption
    padded_ctx[0, 3:5] = -50.0
    torch.testing.assert_close(model(x, t, padded_ctx, padded_mask), model(x, t, ctx, mask),
                               rtol=1e-5, atol=1e-5)


def test_pooled_text_conditions_a_unet_without_cross_attention_at_its_levels():
    # the middle always cross-attends; with pooled_text the text also reaches every
    # ResBlock, so the outputs differ from the same weights without that path
    cfg = tiny_cfg(pooled_text=True, cross_attn_levels=[])
    model = randomize_output(UNet(cfg, 4, CTX)).eval()
    x, t, ctx, mask = inputs()
    with_pooled = model(x, t, ctx, mask)
    model.text_embed.weight.data.zero_()
    model.text_embed.bias.data.zero_()
    assert not torch.allclose(with_pooled, model(x, t, ctx, mask))


def test_the_text_changes_the_output():
    model = randomize_output(UNet(tiny_cfg(), 4, CTX)).eval()
    x, t, ctx, mask = inputs()
    assert not torch.allclose(model(x, t, ctx, mask), model(x, t, ctx + 1.0, mask))


@pytest.mark.parametrize("text_path", list(TEXT_PATHS))
def test_a_caption_with_no_real_token_gives_a_finite_output(text_path):
    model = randomize_output(UNet(tiny_cfg(**TEXT_PATHS[text_path]), 4, CTX))
    x, t, ctx, _ = inputs()
    assert torch.isfinite(model(x, t, ctx, torch.zeros(2, 5, dtype=torch.bool))).all()


@pytest.mark.parametrize("text_path", list(TEXT_PATHS))
def test_every_parameter_gets_a_nonzero_gradient(text_path):
    model = randomize_output(UNet(tiny_cfg(**TEXT_PATHS[text_path]), 4, CTX))
    x, t, ctx, mask = inputs()
    model(x, t, ctx, mask).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_channels_last_model_gives_the_same_output():
    model = randomize_output(UNet(tiny_cfg(), 4, CTX)).eval()
    x, t, ctx, mask = inputs()
    expected = model(x, t, ctx, mask)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.contiguous(memory_format=torch.channels_last), t, ctx, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("text_path", list(TEXT_PATHS))
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, text_path):
    model = randomize_output(UNet(tiny_cfg(dropout=0.1, **TEXT_PATHS[text_path]), 4,
                                  CTX)).eval()
    model.save_pretrained(tmp_path / "unet")
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json",
                                                                     "model.safetensors"]
    loaded = UNet.from_pretrained(tmp_path / "unet").eval()
    assert loaded.config_dict() == model.config_dict()
    x, t, ctx, mask = inputs()
    assert torch.equal(loaded(x, t, ctx, mask), model(x, t, ctx, mask))


def test_a_folder_saved_before_pooled_text_and_token_blocks_existed_still_loads(tmp_path):
    UNet(tiny_cfg(), 4, CTX).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("pooled_text", "text_layers", "text_width"):
        del cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.text_embed is None and loaded.text_blocks is None


def test_token_blocks_let_each_token_see_the_others_but_never_the_padding():
    from ldmkit.models.unet import TextBlocks

    blocks = TextBlocks(CTX, tiny_cfg(text_layers=1, text_width=16)).eval()
    _, _, ctx, mask = inputs()
    assert torch.equal(blocks(ctx, mask), ctx)  # zero-initialised: starts as the identity
    torch.nn.init.normal_(blocks.up.weight, std=0.1)
    out = blocks(ctx, mask)
    other = ctx.clone()
    other[0, 3:] += 5.0  # padding of the first caption
    assert torch.allclose(blocks(other, mask)[0, :3], out[0, :3], atol=1e-6)
    changed = ctx.clone()
    changed[1, 4] += 1.0  # a real token of the second caption: the others see it
    assert not torch.allclose(blocks(changed, mask)[1, 0], out[1, 0])


def test_weights_that_do_not_match_the_config_are_refused_naming_the_file(tmp_path):
    UNet(tiny_cfg(), 4, CTX).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["base_channels"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model.safetensors"):
        UNet.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit", [lambda c: c.pop("num_heads"), lambda c: c.pop("context_dim"),
                                  lambda c: c.update(channel_mult="wide"),
                                  lambda c: c.update(mystery=1)])
def test_a_malformed_config_is_refused_naming_config_json(tmp_path, edit):
    UNet(tiny_cfg(), 4, CTX).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="config.json"):
        UNet.from_pretrained(tmp_path)


def test_missing_or_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        UNet.from_pretrained(tmp_path)
    UNet(tiny_cfg(), 4, CTX).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="model.safetensors"):
        UNet.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- learning


@pytest.fixture
def one_thread():
    """Ops this small gain nothing from intra-op threads, and on a busy 2-core machine a
    second spinning thread made this test 12x slower (8 s -> 100 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_tiny_unet_overfits_one_pair_and_guided_sampling_returns_its_latent(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = UNet(tiny_cfg(self_attn=False), 4, CTX)
    sched = NoiseSchedule("cosine", 100)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    cond = TextEmbeddings(torch.randn(1, 5, CTX, generator=g), torch.ones(1, 5, dtype=torch.bool))
    null_mask = torch.zeros(1, 5, dtype=torch.bool)
    null_mask[:, 0] = True
    uncond = TextEmbeddings(torch.zeros(1, 5, CTX), null_mask)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    batch = 32
    data = x0.expand(batch, -1, -1, -1)
    for _ in range(150):
        t = torch.randint(0, 100, (batch,), generator=g)
        noise = torch.randn(data.shape, generator=g)
        drop = torch.rand(batch, generator=g) < 0.2  # CFG caption dropout
        text = cond.where(~drop, uncond)
        pred = model(sched.q_sample(data, t, noise), t, text.tokens, text.mask)
        loss = (pred - sched.training_target(data, noise, t, "v")).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    denoiser = CFGDenoiser(model, sched, "v", cond, uncond, guidance_scale=3.0)
    for name in ("ddim", "dpmpp-2m"):
        out = run_sampler(name, denoiser, torch.randn(2, 4, 8, 8, generator=g), sched, 20)
        mse = (out - x0).square().mean().item()
        assert mse < 0.1 * x0.square().mean().item(), (name, mse)
