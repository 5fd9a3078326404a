"""Captioned image files where a bad image never stops a run.

An image that is missing, not an image, or truncated is skipped: the item is replaced by
the next readable one (deterministic, never a blank image), the file is logged once and
counted. The bad-item flags live in shared memory so counts made inside DataLoader
workers are visible to the trainer in the main process.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ldmkit.data.transforms import BadImageError, load_image, pil_to_tensor, resize_center_crop
from ldmkit.errors import UserError

log = logging.getLogger(__name__)

_REASONS = BadImageError.REASONS  # flag value k + 1 <-> _REASONS[k]; 0 = not known bad


@dataclass(frozen=True)
class Entry:
    path: Path
    captions: tuple[str, ...]
    group: str = ""  # the value of data.balance_by for this image ("" = not balanced)


def row_group(row: dict, balance_by: str, where: str) -> str:
    """A metadata row's group: its value of data.balance_by ("" when not balancing). A row
    without a usable value is an error naming `where` (file, line) and the field."""
    if not balance_by:
        return ""
    value = row.get(balance_by)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
        raise UserError(f"{where}: no {balance_by!r} field to balance by "
                        f"(data.balance_by = {balance_by!r}), got {value!r}")
    return str(value)


def group_weights(groups: list[str]) -> torch.Tensor | None:
    """Per-item draw weights that give every group the same share of draws (each item 1 /
    its group's size: data.balance_by), or None when the items carry no groups."""
    if not any(groups):
        return None
    sizes = Counter(groups)
    return torch.tensor([1.0 / sizes[g] for g in groups], dtype=torch.float64)


def _shared_flags(n: int) -> torch.Tensor:
    flags = torch.zeros(n, dtype=torch.uint8)
    try:
        flags.share_memory_()  # workers write, the main process reads
    except (RuntimeError, OSError):  # pragma: no cover - no /dev/shm: counts stay per process
        log.debug("shared memory unavailable; bad-image counts from workers are not merged")
    return flags


class CaptionedFiles(torch.utils.data.Dataset):
    """(image tensor (3, S, S) in [-1, 1], caption) from a list of image files with captions.

    Each visit draws one of the image's captions at random (torch's generator, which
    DataLoader seeds per worker), so every caption is used over an epoch's worth of visits.
    """

    def __init__(self, entries: list[Entry], image_size: int, source: str):
        if not entries:
            raise UserError(f"{source}: no usable image/caption pairs")
        self.entries = list(entries)
        self.image_size = int(image_size)
        self.source = source
        self._bad = _shared_flags(len(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, i: int) -> Path:
        return self.entries[i].path

    def captions(self, i: int) -> tuple[str, ...]:
        return self.entries[i].captions

    def load(self, i: int) -> torch.Tensor:
        """Item i's image, or BadImageError; no substitution."""
        img = load_image(self.entries[i].path)
        return pil_to_tensor(resize_center_crop(img, self.image_size))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        image, j = self.load_readable(i)
        caps = self.entries[j].captions
        return image, caps[int(torch.randint(len(caps), ()))]

    def load_readable(self, i: int) -> tuple[torch.Tensor, int]:
        """Item i's image, or that of the next readable item; returns (image, index used)."""
        n = len(self.entries)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for {n} items")
        for step in range(n):
            j = (i + step) % n
            if self._bad[j]:
                continue
            try:
                return self.load(j), j
            except BadImageError as exc:
                self._mark_bad(j, exc)
        raise UserError(f"{self.source}: none of the {n} images could be read "
                        f"(first problem: {self.problems[0]['path']}: "
                        f"{self.problems[0]['reason']})")

    def check_item(self, i: int) -> dict | None:
        """Read item i alone; None if fine, else its problem {"path", "reason"}."""
        try:
            self.load(i)
            return None
        except BadImageError as exc:
            self._mark_bad(i, exc)
            return {"path": exc.path, "reason": exc.reason}

    def _mark_bad(self, j: int, exc: BadImageError) -> None:
        if not self._bad[j]:
            log.warning("skipping unreadable image %s", exc)  # once per file and process
        self._bad[j] = _REASONS.index(exc.reason) + 1

    @property
    def skipped(self) -> int:
        """How many distinct files have been found unreadable so far (all workers)."""
        return int((self._bad > 0).sum())

    @property
    def problems(self) -> list[dict]:
        idx = torch.nonzero(self._bad, as_tuple=False).flatten().tolist()
        return [{"path": str(self.entries[j].path), "reason": _REASONS[int(self._bad[j]) - 1]}
                for j in idx]

    def draw_weights(self) -> torch.Tensor | None:
        return group_weights([e.group for e in self.entries])

    def subset(self, start: int, stop: int | None = None) -> CaptionedFiles:
        """Items start..stop as a new dataset of the same kind (own problem counts)."""
        sub = object.__new__(type(self))
        CaptionedFiles.__init__(sub, self.entries[start:stop], self.image_size,
                                f"{self.source}[{start}:{'' if stop is None else stop}]")
        return sub
