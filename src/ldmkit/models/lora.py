"""LoRA adapters (Hu et al. 2021) on any denoiser, through PEFT, the library the field
standardised on: W x + (alpha / r) B A x with A (r, in), B (out, r), B starting at zero so
an adapter starts as the model itself. Only A and B train; the base stays frozen.

Targets are found by module type and name, so the U-Net and the transformer backbones
alike get them: "attention" = the nn.Linear projections to_q / to_k / to_v / to_out of
every attention (and qkv / proj of a fused one, models/layers.py TokenBlock); "conv" = the
ResBlocks' 3x3 convolutions (conv1 / conv2).

An adapter folder, as PEFT's `PeftModel.save_pretrained` writes one (PEFT loads it too):

    adapter_config.json        PEFT's LoraConfig (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors  the A and B matrices (keys base_model.model.<module>.lora_A...)
    ldmkit_adapter.json        what it adapts: the denoiser's config and a fingerprint of
                               its weights, the text encoder, the targets, the parameters
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import UserError
from ldmkit.io import load_tensors, read_json, save_tensors_atomic, write_json_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_INFO = "ldmkit_adapter.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in a saved adapter
TARGETS = ("attention", "conv")
SEPARATE_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
FUSED_PROJECTIONS = ("qkv", "proj")  # only beside a `qkv`: a Modulation's proj is no attention
RESBLOCK_CONVS = ("conv1", "conv2")
FORMAT = 1


# ----------------------------------------------------------------------------- finding targets


def target_modules(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Full names of the modules an adapter with these `targets` wraps."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise UserError(f"lora.targets: {unknown} not in {', '.join(TARGETS)}")
    names = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if _is_target(parent, name, child, targets):
                names.append(full)
    if not names:
        raise UserError(f"lora.targets = {list(targets)}: no such layer in this "
                        f"{type(model).__name__}")
    return names


def _is_target(parent: nn.Module, name: str, child: nn.Module, targets) -> bool:
    if "attention" in targets and isinstance(child, nn.Linear):
        if name in SEPARATE_PROJECTIONS:
            return True
        if name in FUSED_PROJECTIONS and isinstance(getattr(parent, "qkv", None), nn.Linear):
            return True
    return ("conv" in targets and isinstance(child, nn.Conv2d) and name in RESBLOCK_CONVS
            and child.kernel_size == (3, 3))


# ----------------------------------------------------------------------------- adding


def add_lora(model: nn.Module, rank: int, alpha: float, targets, dropout: float = 0.0
             ) -> nn.Module:
    """Wrap `model`'s targets with LoRA layers (in place); everything else is frozen.
    Draws A's initial values from torch's global generator."""
    from peft import LoraConfig, inject_adapter_in_model

    if any(_lora_layers(model)):
        raise UserError("this denoiser already holds a LoRA adapter (unload it first)")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules(model, targets))
    inject_adapter_in_model(config, model)
    model._ldmkit_lora = {"config": config, "targets": list(targets), "merged": False}
    return model


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "_ldmkit_lora", None) is not None


def adapter_parameters(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _lora_names(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the base weights (names, shapes, dtypes, bytes), LoRA left out: which
    model an adapter belongs to, whether or not one is in it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_base_state(model).items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    if has_lora(model) and model._ldmkit_lora["merged"]:
        raise UserError("the LoRA adapter is merged into the weights; unmerge it first")
    return {n.replace(".base_layer", ""): t for n, t in model.state_dict().items()
            if "lora_" not in n}


# ----------------------------------------------------------------------------- saving


def save_lora(model: nn.Module, directory: str | Path, base: dict | None = None) -> Path:
    """Write the adapter folder (weights, then PEFT's config, then ldmkit's, last: a folder
    without it was interrupted and is refused). `base` adds to the record of what it
    adapts (e.g. the model folder it was trained from)."""
    from peft import get_peft_model_state_dict

    if not has_lora(model):
        raise UserError("this denoiser holds no LoRA adapter to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model)
    save_tensors_atomic(directory / ADAPTER_WEIGHTS,
                        {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()})
    info = model._ldmkit_lora
    info["config"].save_pretrained(str(directory))
    write_json_atomic(directory / BASE_INFO, {
        "format": FORMAT, "targets": info["targets"], "rank": info["config"].r,
        "alpha": info["config"].lora_alpha, "parameters": adapter_parameters(model),
        "modules": sorted(_lora_names(model)),
        "base": {"denoiser": model.config_dict(), "sha256": base_fingerprint(model),
                 **(base or {})}})
    return directory


def _unwrapped(model: nn.Module) -> nn.Module:
    """Each LoRA layer replaced by its base layer (whatever weights that holds)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


# ----------------------------------------------------------------------------- loading


def read_adapter(directory: str | Path) -> dict:
    """The adapter folder's ldmkit record; a missing or foreign folder -> UserError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: LoRA adapter folder not found")
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_INFO)
               if not (directory / n).is_file()]
    if missing:
        raise UserError(f"{directory}: not an ldmkit LoRA adapter, missing {', '.join(missing)}")
    info = read_json(directory / BASE_INFO, "LoRA adapter record")
    if not isinstance(info, dict) or info.get("format") != FORMAT or "base" not in info:
        raise UserError(f"{directory / BASE_INFO}: not an ldmkit adapter record "
                        f"(format {FORMAT} expected)")
    return info


def check_base(model: nn.Module, info: dict, directory: Path) -> None:
    """Refuse an adapter made for another denoiser: other geometry (naming the keys that
    differ) or other base weights (their fingerprints)."""
    theirs, ours = info["base"].get("denoiser", {}), model.config_dict()
    differ = [f"{k} {theirs.get(k)!r} (this model: {ours.get(k)!r})"
              for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if differ:
        raise UserError(f"{directory}: this LoRA adapter is for another model: its "
                        f"denoiser has {'; '.join(differ)}")
    if info["base"].get("sha256") != base_fingerprint(model):
        where = info["base"].get("model")
        raise UserError(f"{directory}: this LoRA adapter was trained on other weights of "
                        f"this architecture (base sha256 {str(info['base'].get('sha256'))[:12]}, "
                        f"this model's {base_fingerprint(model)[:12]})"
                        + (f"; it was trained from {where}" if where else ""))


def load_lora(model: nn.Module, directory: str | Path, scale: float = 1.0,
              verify_base: bool = True) -> dict:
    """Add the adapter in `directory` to `model` (in place) at `scale`; returns its record.
    The model is left untouched when anything does not fit."""
    from peft import LoraConfig, set_peft_model_state_dict

    directory = Path(directory)
    info = read_adapter(directory)
    if verify_base:
        check_base(model, info, directory)
    config = LoraConfig.from_pretrained(str(directory))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in
             load_tensors(directory / ADAPTER_WEIGHTS).items()}
    add_lora(model, config.r, config.lora_alpha, info.get("targets", ["attention"]))
    try:
        result = set_peft_model_state_dict(model, state)
        absent = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if result.unexpected_keys or absent:
            raise UserError(f"{directory / ADAPTER_WEIGHTS}: weights do not fit this model "
                            f"(unexpected {list(result.unexpected_keys)[:3]}, missing "
                            f"{absent[:3]})")
    except (RuntimeError, UserError) as exc:
        unload_lora(model)
        raise UserError(f"{directory}: {exc}") from None
    set_lora_scale(model, scale)
    return info


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """The adapter's weight: 0 = the base model, 1 = as trained (PEFT's scale_layer)."""
    merged = model._ldmkit_lora["merged"]
    if merged:
        unmerge_lora(model)
    for layer in _lora_layers(model):
        layer.set_scale("default", scale)
    model._ldmkit_lora["scale"] = float(scale)
    if merged:
        merge_lora(model)


def merge_lora(model: nn.Module) -> None:
    """W <- W + scale (alpha / r) B A in every wrapped layer: sampling then costs what the
    base model costs. `unmerge_lora` undoes it (to float rounding)."""
    for layer in _lora_layers(model):
        if not layer.merged:
            layer.merge()
    model._ldmkit_lora["merged"] = True


def unmerge_lora(model: nn.Module) -> None:
    for layer in _lora_layers(model):
        if layer.merged:
            layer.unmerge()
    model._ldmkit_lora["merged"] = False


def unload_lora(model: nn.Module) -> None:
    """Put the base layers back in place of the LoRA ones (unmerging first): the model is
    then the one the adapter was added to."""
    if not has_lora(model):
        return
    unmerge_lora(model)
    _unwrapped(model)
    model._ldmkit_lora = None
    if hasattr(model, "peft_config"):  # PEFT's record of the injected adapter
        del model.peft_config


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of the denoiser with the adapter merged in (for a full model folder)."""
    import copy

    plain = copy.deepcopy(model)
    merge_lora(plain)
    _unwrapped(plain)  # the base layers keep the merged weights
    plain._ldmkit_lora = None
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    return plain
