"""Files that never end up half-written: every writer goes to a temp file, then renames.
And loaders that never unpickle: weights are safetensors, everything else JSON."""

from __future__ import annotations

import json
import lzma
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file

from ldmkit.errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` then rename tmp over `path`, so a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc})") from None


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage; clone detaches both.
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))


# Weights shipped inside the package may be lzma-compressed as NAME.safetensors.xz
# (lossless): it keeps every packaged file small. Loading NAME.safetensors finds it.
PACKED = ".xz"


def save_tensors_packed_atomic(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `path` + ".xz": the safetensors bytes, lzma-compressed. Returns that path."""
    packed = Path(str(path) + PACKED)
    data = save({k: v.detach().contiguous().clone() for k, v in tensors.items()})
    blob = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    atomic_write(packed, lambda tmp: tmp.write_bytes(blob))
    return packed


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (or its packed NAME.xz twin when only that exists),
    turning any corruption into a UserError naming the file."""
    path = Path(path)
    packed = Path(str(path) + PACKED)
    if not path.is_file() and packed.is_file():
        try:
            return {k: v.to(device) for k, v in load(lzma.decompress(packed.read_bytes())).items()}
        except (lzma.LZMAError, SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{packed}: corrupted or unreadable packed safetensors file "
                            f"({exc})") from None
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: corrupted or unreadable safetensors file ({exc})") from None


def load_state_into(module: torch.nn.Module, path: str | Path) -> None:
    """Load weights strictly; a shape or key mismatch names the file and the keys."""
    state = load_tensors(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not match the model config ({exc})") from None
