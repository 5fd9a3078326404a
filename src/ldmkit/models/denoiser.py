"""The denoiser backbones behind one call signature and one folder format.

    model = build_denoiser(cfg.unet, in_channels, context_dim)   # [unet] kind picks it
    model(x, t, context, context_mask) -> same shape as x
    model.save_pretrained(dir); load_denoiser(dir, device)        # config.json + safetensors

`kind` = "unet" (models/unet.py), "dit" or "mmdit" (models/transformer.py). The trainer,
caches, pipeline, server and evaluation hold "the denoiser" and never ask which; a folder
written before the transformers existed has no `kind` and loads as the U-Net it is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ldmkit.config import UNetConfig, config_from_dict
from ldmkit.errors import UserError
from ldmkit.io import load_state_into, read_json, save_tensors_atomic, write_json_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Keys a 0.1 U-Net folder holds; every later key has a default that rebuilds what it was.
ORIGINAL_KEYS = ("base_channels", "channel_mult", "num_res_blocks", "cross_attn_levels",
                 "self_attn", "num_heads", "dropout")


class FolderModel(nn.Module):
    """What every backbone shares: its config as a dict and the model folder it saves."""

    cfg: UNetConfig
    in_channels: int
    context_dim: int

    def config_dict(self) -> dict:
        """Everything needed to rebuild the module: UNetConfig fields + the two dims."""
        return {**dataclasses.asdict(self.cfg), "in_channels": self.in_channels,
                "context_dim": self.context_dim}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (each atomically) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / CONFIG_NAME, self.config_dict())
        save_tensors_atomic(directory / WEIGHTS_NAME, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        return load_denoiser(directory, device)


def _classes() -> dict[str, type]:
    from ldmkit.models.transformer import DiT, MMDiT
    from ldmkit.models.unet import UNet

    return {"unet": UNet, "dit": DiT, "mmdit": MMDiT}


def build_denoiser(cfg: UNetConfig, in_channels: int, context_dim: int) -> FolderModel:
    """The backbone `cfg.kind` names, freshly initialised."""
    return _classes()[cfg.kind](cfg, in_channels, context_dim)


def load_denoiser(directory: str | Path, device: str | torch.device = "cpu") -> FolderModel:
    """Rebuild from `save_pretrained` output; a missing, malformed or mismatched file
    raises UserError naming it."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    raw = read_json(path, "denoiser config")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    raw = dict(raw)
    dims = {key: raw.pop(key, None) for key in ("in_channels", "context_dim")}
    for key, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{path}: {key} = {value!r} must be a positive integer")
    missing = [name for name in ORIGINAL_KEYS if name not in raw]
    if missing:
        raise UserError(f"{path}: missing U-Net keys {', '.join(missing)}")
    if raw.get("kind", "unet") != "unet" and "width" not in raw:
        raise UserError(f"{path}: a {raw['kind']} folder needs its 'width'")
    # keys added after 0.1 take the defaults that rebuild the network they described
    cfg = config_from_dict({"unet": raw}, str(path)).unet
    model = build_denoiser(cfg, dims["in_channels"], dims["context_dim"])
    load_state_into(model, directory / WEIGHTS_NAME)
    return model.to(device)
