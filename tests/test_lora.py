"""LoRA adapters: targets found by type and name on every backbone, an adapter starts as
the model, the folder loads back (in ldmkit and in PEFT itself), scale 0 and unloading
give the base model bit for bit, merging gives the same images, and adapters for
another model are refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from _tiny_model import TINY, make_tiny_pipeline
from ldmkit.config import load_config
from ldmkit.errors import UserError
from ldmkit.models import lora
from ldmkit.models.denoiser import build_denoiser
from ldmkit.sampling_args import SamplingArgumentError

PROMPT = ["a red circle"]


def latents(pipe, seed: int = 0) -> torch.Tensor:
    return pipe.generate_latents(PROMPT, num_inference_steps=3,
                                 generator=torch.Generator().manual_seed(seed))


def trained_adapter(pipe, directory, std: float = 0.3):
    """An adapter whose B is not zero (as if trained), saved to `directory`."""
    lora.add_lora(pipe.unet, 4, 8.0, ["attention"])
    torch.manual_seed(1)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=std)
    lora.save_lora(pipe.unet, directory, {"model": "tiny"})
    adapted = latents(pipe)
    lora.unload_lora(pipe.unet)
    return adapted


@pytest.fixture()
def pipe(tmp_path):
    return make_tiny_pipeline(tmp_path / "tiny")


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize("kind", ["unet", "dit", "mmdit"])
def test_attention_projections_are_found_on_every_backbone(kind):
    extra = [] if kind == "unet" else ["unet.width=32", "unet.depth=2", "unet.patch_size=2"]
    cfg = load_config(None, TINY + extra + [f"unet.kind={kind}"])
    model = build_denoiser(cfg.unet, 4, 32)
    names = lora.target_modules(model, ["attention"])
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert leaves == {"to_q", "to_k", "to_v", "to_out"}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and n.rsplit(".", 1)[-1] in leaves]
    assert sorted(names) == sorted(linears)
    assert not any(n.endswith("mod.proj") for n in names)  # adaLN's proj is no attention


def test_conv_targets_add_the_resblock_convolutions():
    cfg = load_config(None, TINY)
    model = build_denoiser(cfg.unet, 4, 32)
    convs = set(lora.target_modules(model, ["attention", "conv"])) - set(
        lora.target_modules(model, ["attention"]))
    assert convs and all(n.rsplit(".", 1)[-1] in ("conv1", "conv2") for n in convs)
    lora.add_lora(model, 2, 2.0, ["attention", "conv"])
    assert lora.adapter_parameters(model) > 0


def test_fused_qkv_token_blocks_are_attention_targets():
    cfg = load_config(None, TINY + ["unet.text_layers=1", "unet.text_width=16"])
    names = lora.target_modules(build_denoiser(cfg.unet, 4, 32), ["attention"])
    assert any(n.endswith("blocks.0.qkv") for n in names)
    assert any(n.endswith("blocks.0.proj") for n in names)


# ----------------------------------------------------------------------------- behaviour


def test_a_new_adapter_is_the_base_model_and_only_it_trains(pipe):
    base = latents(pipe)
    lora.add_lora(pipe.unet, 4, 4.0, ["attention"])
    assert torch.equal(latents(pipe), base)  # B starts at zero
    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_load_scale_merge_unmerge_and_unload(pipe, tmp_path):
    base = latents(pipe)
    adapted = trained_adapter(pipe, tmp_path / "adapter")
    assert not torch.allclose(adapted, base)
    assert torch.equal(latents(pipe), base)  # unloaded: the base model bit for bit
    pipe.load_lora(tmp_path / "adapter")
    assert torch.equal(latents(pipe), adapted)  # loaded back: the same images
    pipe.set_lora_scale(0.0)
    assert torch.equal(latents(pipe), base)
    pipe.set_lora_scale(1.0)
    pipe.merge_lora()
    assert torch.allclose(latents(pipe), adapted, atol=1e-3)
    pipe.unmerge_lora()
    assert torch.allclose(latents(pipe), adapted, atol=1e-3)
    pipe.unload_lora()
    assert torch.allclose(latents(pipe), base, atol=1e-3)  # float rounding of merge/unmerge
    assert pipe.lora is None


def test_the_adapter_folder_is_peft_s_own_format(pipe, tmp_path):
    from peft import PeftModel

    trained_adapter(pipe, tmp_path / "adapter")
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "ldmkit_adapter.json"]
    ours = make_tiny_pipeline(tmp_path / "a").load_lora(tmp_path / "adapter").unet
    theirs = PeftModel.from_pretrained(make_tiny_pipeline(tmp_path / "b").unet,
                                       str(tmp_path / "adapter")).eval()
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([5, 40])
    ctx, mask = torch.randn(2, 5, ours.context_dim), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        a, b = ours(x, t, ctx, mask), theirs(x, t, ctx, mask)
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, ours.conv_out.bias * 0)


def test_the_adapter_is_small_and_its_record_says_what_it_adapts(pipe, tmp_path):
    trained_adapter(pipe, tmp_path / "adapter")
    info = json.loads((tmp_path / "adapter" / "ldmkit_adapter.json").read_text())
    total = sum(p.numel() for p in pipe.unet.parameters())
    assert info["rank"] == 4 and info["targets"] == ["attention"]
    assert 0 < info["parameters"] < 0.1 * total
    assert info["base"]["sha256"] == lora.base_fingerprint(pipe.unet)
    assert info["base"]["denoiser"] == pipe.unet.config_dict() and info["base"]["model"] == "tiny"


# ----------------------------------------------------------------------------- refusals


def test_an_adapter_for_another_geometry_is_refused_naming_the_keys(pipe, tmp_path):
    trained_adapter(pipe, tmp_path / "adapter")
    cfg = load_config(None, TINY + ["unet.base_channels=8"])
    other = make_tiny_pipeline(tmp_path / "o").with_unet(build_denoiser(cfg.unet, 4, 32))
    with pytest.raises(UserError, match=r"for another model: .*base_channels 16 \(this "
                                        r"model: 8\)"):
        other.load_lora(tmp_path / "adapter")
    assert not lora.has_lora(other.unet)


def test_an_adapter_trained_on_other_weights_is_refused(pipe, tmp_path):
    trained_adapter(pipe, tmp_path / "adapter")
    other = make_tiny_pipeline(tmp_path / "other", seed=1)
    other.unet.load_state_dict({k: v + 0.01 for k, v in other.unet.state_dict().items()})
    with pytest.raises(UserError, match="trained on other weights .*trained from tiny"):
        other.load_lora(tmp_path / "adapter")
    before = latents(other)
    other.load_lora(tmp_path / "adapter", verify_base=False)  # asked for: allowed
    assert not torch.equal(latents(other), before)


def test_bad_adapter_folders_and_scales_are_refused(pipe, tmp_path):
    with pytest.raises(UserError, match="LoRA adapter folder not found"):
        pipe.load_lora(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing adapter_config.json"):
        pipe.load_lora(tmp_path / "empty")
    trained_adapter(pipe, tmp_path / "adapter")
    with pytest.raises(SamplingArgumentError, match="scale: must be a finite number in 0..4"):
        pipe.load_lora(tmp_path / "adapter", scale=7)
    pipe.load_lora(tmp_path / "adapter")
    with pytest.raises(UserError, match="already holds a LoRA adapter"):
        pipe.load_lora(tmp_path / "adapter")
    pipe.unload_lora()
    with pytest.raises(UserError, match="no LoRA adapter is loaded"):
        pipe.merge_lora()
