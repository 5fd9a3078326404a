"""The one checkpoint writer and reader every trainer uses.

Layout of a checkpoints folder:

    step-00000500/<module>.safetensors   weights, one file per named module (e.g. unet, ema)
    step-00000500/state.safetensors      every tensor of the optimizer / scheduler / scaler / RNG
                                         (and of `states`: e.g. a discriminator's optimizer)
    step-00000500/state.json             the rest of that state, plus step and `extra`
                                         (under N processes also `rng_ranks`: every
                                         process's RNG, gathered to the one that writes)
    latest                               the name of the newest complete checkpoint

Nothing is pickled: state dicts are split into tensors (safetensors) and a JSON skeleton
that points at them, so loading never runs code from the folder. A checkpoint is written
into a temporary folder that is renamed into place only when complete, and `latest` is
updated after that, so an interrupted write leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldmkit.errors import UserError
from ldmkit.io import atomic_write, load_tensors, read_json, save_tensors_atomic, write_json_atomic
from ldmkit.training.distributed import gather_json

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """A loaded checkpoint, not yet applied to any object (see `restore_checkpoint`)."""

    path: Path
    step: int
    modules: dict[str, dict[str, torch.Tensor]]
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    rng: dict | None = None
    extra: dict = field(default_factory=dict)
    rng_ranks: list[dict] | None = None  # one per process, when several wrote it
    states: dict[str, dict] = field(default_factory=dict)  # more state dicts, by name


# ----------------------------------------------------------------------------- writing


def save_checkpoint(directory: str | Path, step: int, modules: dict[str, nn.Module],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    extra: dict | None = None, scaler: Any = None, keep: int = 2,
                    rng_ranks: list[dict] | None = None,
                    states: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep`.
    `modules` are unwrapped modules (not DDP wrappers); call on the main process only,
    with `rng_ranks` = `rng_states_of_every_rank(accelerator)` under several processes.
    `states` names further objects with a state_dict (a second optimizer: the VAE's
    discriminator has its own)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=directory))
    trash = None
    try:
        _write_contents(tmp, step, modules, optimizer, scheduler, scaler, extra or {},
                        rng_ranks, states or {})
        final = directory / name
        if final.exists():  # re-saving a step: move the old copy aside, drop it after
            trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=directory))
            os.replace(final, trash / name)
        os.replace(tmp, final)
        atomic_write(directory / "latest", lambda p: p.write_text(name + "\n"))
    finally:
        for leftover in (tmp, trash):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    _prune(directory, keep)
    return final


def _write_contents(folder: Path, step: int, modules: dict[str, nn.Module], optimizer: Any,
                    scheduler: Any, scaler: Any, extra: dict,
                    rng_ranks: list[dict] | None, states: dict[str, Any]) -> None:
    for module_name, module in modules.items():
        save_tensors_atomic(folder / f"{module_name}.safetensors", module.state_dict())
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "modules": sorted(modules),
        "optimizer": _encode(optimizer.state_dict(), tensors, "optimizer") if optimizer else None,
        "scheduler": _encode(scheduler.state_dict(), tensors, "scheduler") if scheduler else None,
        "scaler": _encode(scaler.state_dict(), tensors, "scaler") if scaler else None,
        "rng": _encode(rng_state(), tensors, "rng"),
        "extra": extra,
        "states": {name: _encode(obj.state_dict(), tensors, f"states.{name}")
                   for name, obj in states.items()},
    }
    if rng_ranks:
        state["rng_ranks"] = _encode(rng_ranks, tensors, "rng_ranks")
    save_tensors_atomic(folder / "state.safetensors", tensors)
    write_json_atomic(folder / "state.json", state)


def _prune(directory: Path, keep: int) -> None:
    for old in _step_dirs(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


def load_latest_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint in `directory`, or None when there is none. Follows
    `latest`; if that pointer is missing or dangling (a crash between the rename and the
    pointer update), falls back to the highest-numbered complete step folder."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    pointer = directory / "latest"
    if pointer.is_file():
        target = directory / pointer.read_text().strip()
        if STEP_DIR.match(target.name) and (target / "state.json").is_file():
            return load_checkpoint(target)
    for candidate in _step_dirs(directory):
        if (candidate / "state.json").is_file():
            return load_checkpoint(candidate)
    return None


def previous_checkpoint(directory: str | Path, resume: bool) -> Checkpoint | None:
    """A trainer's start: the checkpoint to resume from (None = start fresh). Refuses to
    train over a run that has checkpoints unless `resume` is set."""
    ckpt = load_latest_checkpoint(directory)
    if ckpt is not None and not resume:
        raise UserError(f"{directory}: this run directory already holds checkpoints; pass "
                        "--resume to continue it or choose another --out")
    if resume and ckpt is None:
        print(f"--resume: no checkpoint in {directory}, starting from scratch")
    return ckpt


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read one checkpoint folder; a corrupted file raises UserError naming it."""
    path = Path(path)
    state = read_json(path / "state.json", "checkpoint state")
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise UserError(f"{path / 'state.json'}: not an ldmkit checkpoint "
                        f"(format {FORMAT_VERSION} expected)")
    tensors = load_tensors(path / "state.safetensors")
    try:
        return Checkpoint(
            path=path, step=int(state["step"]),
            modules={m: load_tensors(path / f"{m}.safetensors") for m in state["modules"]},
            optimizer=_decode(state["optimizer"], tensors),
            scheduler=_decode(state["scheduler"], tensors),
            scaler=_decode(state["scaler"], tensors),
            rng=_decode(state["rng"], tensors),
            extra=state.get("extra") or {},
            rng_ranks=_decode(state.get("rng_ranks"), tensors),
            states={name: _decode(saved, tensors)
                    for name, saved in (state.get("states") or {}).items()})
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: checkpoint state is incomplete or corrupted ({exc!r})") from None


def restore_checkpoint(ckpt: Checkpoint, modules: dict[str, nn.Module],
                       optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                       scaler: Any = None, restore_rng: bool = True, rank: int = 0,
                       world_size: int = 1, states: dict[str, Any] | None = None) -> int:
    """Load a checkpoint's state into live objects; returns the step to continue from.
    `states` are the objects `save_checkpoint` was given under that name.
    Process `rank` of `world_size` gets back its own RNG state; a checkpoint written by
    another number of processes is refused (its random streams cannot be continued)."""
    missing = sorted(set(modules) - set(ckpt.modules))
    if missing:
        raise UserError(f"{ckpt.path}: checkpoint has no weights for {missing}")
    for name, module in modules.items():
        try:
            module.load_state_dict(ckpt.modules[name], strict=True)
        except RuntimeError as exc:
            raise UserError(f"{ckpt.path / (name + '.safetensors')}: weights do not match "
                            f"the model config ({exc})") from None
    absent = sorted(set(states or {}) - set(ckpt.states))
    if absent:
        raise UserError(f"{ckpt.path}: checkpoint has no saved state for {absent} (written "
                        f"by a run with other settings?)")
    named = [(name, obj, ckpt.states[name]) for name, obj in (states or {}).items()]
    for what, obj, saved in [("optimizer", optimizer, ckpt.optimizer),
                             ("scheduler", scheduler, ckpt.scheduler),
                             ("scaler", scaler, ckpt.scaler), *named]:
        if obj is not None and saved is not None:
            try:
                obj.load_state_dict(saved)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise UserError(f"{ckpt.path}: saved {what} state does not fit ({exc})") from None
    if restore_rng and ckpt.rng is not None:
        set_rng_state(_rng_of_rank(ckpt, rank, world_size))
    return ckpt.step


def _rng_of_rank(ckpt: Checkpoint, rank: int, world_size: int) -> dict:
    saved = ckpt.rng_ranks or [ckpt.rng]
    if len(saved) != world_size:
        raise UserError(f"{ckpt.path / 'state.json'}: written by a run of {len(saved)} "
                        f"process(es); resume it with {len(saved)} (this run has "
                        f"{world_size}), or start a new run with another --out")
    return saved[rank]


def _step_dirs(directory: Path) -> list[Path]:
    """Step folders, newest first."""
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_states_of_every_rank(accelerator: Any) -> list[dict] | None:
    """Every process's `rng_state()`, in rank order, for the process that writes the
    checkpoint; None for a single process (its own state is saved as before). Call on
    every process: it is a collective."""
    if accelerator is None or accelerator.num_processes == 1:
        return None
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(rng_state(), tensors, "rng")
    mine = {"state": skeleton, "tensors": {k: [str(v.dtype).removeprefix("torch."),
                                               v.cpu().tolist()] for k, v in tensors.items()}}
    return [_decode(theirs["state"], {k: torch.tensor(values, dtype=getattr(torch, dtype))
                                      for k, (dtype, values) in theirs["tensors"].items()})
            for theirs in gather_json(accelerator, mine)]


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- codec
# JSON has no tensors, tuples, arrays or integer keys; these markers carry them. Floats
# survive JSON exactly (Python writes the shortest repr that reads back to the same bits).


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"),
                               _encode(v, tensors, f"{path}.{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}

