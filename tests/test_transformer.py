"""The transformer denoisers (DiT, MMDiT): the U-Net's call signature and shapes, the patch
layout, adaLN-Zero's identity start, masking of padded caption tokens, the text reaching
the image, persistence beside the U-Net's folders, and learning one latent."""

import pytest
import torch

from ldmkit.config import UNetConfig, load_config
from ldmkit.errors import ConfigError
from ldmkit.models.denoiser import build_denoiser, load_denoiser
from ldmkit.models.transformer import DiT, DiTBlock, MMDiT
from ldmkit.models.unet import UNet

CTX = 8
KINDS = ("dit", "mmdit")


def tiny(kind: str, **kw) -> UNetConfig:
    return UNetConfig(**{"kind": kind, "width": 32, "depth": 2, "num_heads": 2,
                         "patch_size": 2, "pooled_text": True, **kw})


def inputs(batch=2, size=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, tokens, CTX, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 3:] = False  # the first caption is shorter
    return x, t, ctx, mask


def randomized(model):
    """Undo every zero-init (modulations, final layer, cross-attention output) so outputs
    depend on all inputs."""
    torch.manual_seed(1)
    for p in model.parameters():
        if p.dim() > 1 and float(p.abs().sum()) == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_float_timesteps_any_patch_grid(kind):
    model = randomized(build_denoiser(tiny(kind), 4, CTX))
    for size in (8, 4):
        x, t, ctx, mask = inputs(size=size)
        assert model(x, t, ctx, mask).shape == x.shape
    x, t, ctx, _ = inputs()
    assert model(x, t.long(), ctx).shape == x.shape  # integer DDPM steps, no mask
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 4, 5, 5), t[:1], ctx[:1])


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_model_predicts_zero(kind):
    model = build_denoiser(tiny(kind), 4, CTX)
    x, t, ctx, mask = inputs()
    assert torch.equal(model(x, t, ctx, mask), torch.zeros_like(x))


def test_dit_blocks_start_as_the_identity():
    model = build_denoiser(tiny("dit"), 4, CTX)
    block = model.blocks[0]
    assert isinstance(block, DiTBlock)
    tokens, cond = torch.randn(2, 16, 32), torch.randn(2, 32)
    ctx, mask = torch.randn(2, 5, CTX), torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(block(tokens, cond, ctx, mask), tokens)


def test_patches_come_back_in_their_place():
    """final = identity on p*p*C-wide tokens laid out as (row, col, py, px, C) rebuilds x."""
    model = build_denoiser(tiny("dit", width=16), 4, CTX)
    model.final_norm = torch.nn.Identity()
    with torch.no_grad():
        model.final.weight.copy_(torch.eye(16))
    x = torch.randn(2, 4, 8, 6)
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, 16)
    out = model._output(tokens, torch.zeros(b, 16), (h // 2, w // 2))
    torch.testing.assert_close(out, x)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_caption_tokens_change_nothing(kind):
    model = randomized(build_denoiser(tiny(kind), 4, CTX)).eval()
    x, t, ctx, mask = inputs()
    other = ctx.clone()
    other[0, 3:] = 100.0  # the first caption's padding
    torch.testing.assert_close(model(x, t, ctx, mask), model(x, t, other, mask))
    changed = ctx.clone()
    changed[0, 1] += 1.0  # a real token
    assert not torch.allclose(model(x, t, ctx, mask)[0], model(x, t, changed, mask)[0])
    # a caption with no real token attends to all of its tokens instead of NaN
    assert torch.isfinite(model(x, t, ctx, torch.zeros_like(mask))).all()


def test_mmdit_text_stream_has_its_own_weights_and_depends_on_the_image():
    model = randomized(build_denoiser(tiny("mmdit", pooled_text=False), 4, CTX)).eval()
    block = model.blocks[0]
    assert block.text.to_q is not block.image.to_q
    x, t, ctx, mask = inputs()
    txt = model.context_proj(ctx)
    tokens, _ = model._tokens(x)
    cond = model._condition(t, ctx, mask, tokens.dtype)
    _, txt_a = block(tokens, txt, cond, None)
    _, txt_b = block(tokens + torch.randn_like(tokens), txt, cond, None)
    assert not torch.allclose(txt_a, txt_b)  # joint attention: text tokens see the image


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip_and_old_unet_folders(kind, tmp_path):
    model = randomized(build_denoiser(tiny(kind), 4, CTX)).eval()
    model.save_pretrained(tmp_path / kind)
    loaded = load_denoiser(tmp_path / kind).eval()
    assert type(loaded) is type(model) and isinstance(loaded, (DiT, MMDiT))
    x, t, ctx, mask = inputs()
    assert torch.equal(model(x, t, ctx, mask), loaded(x, t, ctx, mask))
    # a U-Net folder from before `kind` existed still loads as a U-Net
    import json
    unet_cfg = UNetConfig(base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                          cross_attn_levels=[1], num_heads=2)
    UNet(unet_cfg, 4, CTX).save_pretrained(tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("kind", "width", "depth", "patch_size", "mlp_ratio", "pooled_text",
                "text_layers", "text_width"):
        raw.pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    assert type(load_denoiser(tmp_path / "old")) is UNet


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_acts_in_training_only_and_keeps_the_weights_names(kind):
    plain = randomized(build_denoiser(tiny(kind), 4, CTX))
    dropped = build_denoiser(tiny(kind, dropout=0.5), 4, CTX)
    assert dropped.state_dict().keys() == plain.state_dict().keys()  # old folders load
    dropped.load_state_dict(plain.state_dict())
    x, t, ctx, mask = inputs()
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(x, t, ctx, mask), plain(x, t, ctx, mask))  # eval: none
    dropped.train()
    torch.manual_seed(0)
    first = dropped(x, t, ctx, mask)
    assert not torch.allclose(first, dropped(x, t, ctx, mask))  # a fresh mask each call
    assert not torch.allclose(first, plain(x, t, ctx, mask))
    plain.train()  # dropout 0: training mode changes nothing
    assert torch.equal(plain(x, t, ctx, mask), plain.eval()(x, t, ctx, mask))


def test_config_refuses_a_patch_that_does_not_divide_the_latents():
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(None, ["unet.kind=dit", "unet.patch_size=3"])
    with pytest.raises(ConfigError, match="num_heads"):
        load_config(None, ["unet.kind=mmdit", "unet.width=30", "unet.num_heads=4"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_transformer_learns_one_latent(kind):
    """Regress the flow velocity of one fixed latent for a fixed caption: the loss falls."""
    torch.manual_seed(0)
    model = build_denoiser(tiny(kind), 4, CTX)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.randn(1, 4, 8, 8).expand(16, -1, -1, -1)
    ctx, mask = torch.randn(1, 5, CTX).expand(16, -1, -1), torch.ones(16, 5, dtype=torch.bool)
    losses = []
    for _ in range(60):
        noise, t = torch.randn_like(x0), torch.rand(16)
        x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        loss = (model(x_t, t * 1000, ctx, mask) - (noise - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5
