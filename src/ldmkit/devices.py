"""Which device a command runs its models on: `--device auto|cpu|cuda|cuda:N`, one rule
for every command and for the pipeline's default."""

from __future__ import annotations

import torch

from ldmkit.errors import UserError

DEVICE_HELP = "auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device = "auto", flag: str = "--device") -> torch.device:
    """`auto` -> cuda when available, else cpu; a CUDA device that is not there -> a
    UserError naming `flag` (exit 2 from the CLI), never a traceback at first use."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {spec}: no CUDA device here (torch {torch.__version__} "
                            f"sees none); use {flag} cpu or auto")
        kind, colon, index = spec.partition(":")
        if kind != "cuda" or colon and not index.isdigit():
            raise UserError(f"{flag} {spec!r}: expected {DEVICE_HELP}")
        count = torch.cuda.device_count()
        if colon and int(index) >= count:
            raise UserError(f"{flag} {spec}: no CUDA device {index} here (this machine has "
                            f"{count}: cuda:0 to cuda:{count - 1})")
        return torch.device(spec)
    raise UserError(f"{flag} {spec!r}: expected {DEVICE_HELP}")
