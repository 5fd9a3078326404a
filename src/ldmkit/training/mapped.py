"""Safetensors files read without loading them: memory-mapped (`map_tensors`), or row by
row with positional reads (`file_rows`), and several files read as one table.

Training on a cache larger than RAM gathers a batch's rows straight from the files, so
resident memory follows the batches, not the dataset. The gathers use `pread` of exactly
the rows asked for rather than the memory map: on a read fault Linux maps up to 64 KB of
neighbouring, already cached file pages into the process ("fault-around"), which all count
as its RSS — a 2 GB cache of a million items, hashed (so cached) and then sampled at
random, showed 2.7 GB peak RSS through maps and stays at the 20,000-item figure with
reads (BENCHMARKS.md). safetensors' own `load_file` copies every tensor into RAM.
The format is an 8-byte header length, a JSON header (dtype, shape, byte offsets per
tensor), then the raw little-endian data; nothing in it is executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ldmkit.errors import UserError

# safetensors dtype -> (numpy dtype to map with, torch dtype to view it as, or None)
_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.int16, torch.bfloat16),
           "F64": (np.float64, None), "I64": (np.int64, None), "I32": (np.int32, None),
           "I16": (np.int16, None), "U8": (np.uint8, None), "I8": (np.int8, None),
           "BOOL": (np.bool_, None)}
MAX_HEADER = 100 << 20  # safetensors' own limit
MAX_OPEN_FILES = 128  # shard files kept open for row reads (far below the usual 1024)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def map_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as a CPU tensor over a private (copy-on-write)
    memory map of the file: nothing is read until it is indexed. A file that is not a
    complete safetensors file raises UserError naming it."""
    path = Path(path)
    try:
        header, base = _read_header(path)
        return {name: _map_one(path, base, info) for name, info in header.items()
                if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: corrupted or unreadable safetensors file ({exc})") from None


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= MAX_HEADER:
            raise ValueError(f"header length {size}")
        header = json.loads(fh.read(size))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + size


def _map_one(path: Path, base: int, info: dict) -> Tensor:
    np_dtype, view = _DTYPES[info["dtype"]]
    shape = tuple(int(n) for n in info["shape"])
    start, stop = (int(x) for x in info["data_offsets"])
    if stop - start != math.prod(shape) * np.dtype(np_dtype).itemsize:
        raise ValueError(f"byte range {start}..{stop} does not fit shape {shape}")
    if math.prod(shape) == 0:
        tensor = torch.from_numpy(np.empty(shape, dtype=np_dtype))
    else:  # np.memmap checks the range against the file's size
        tensor = torch.from_numpy(np.memmap(path, dtype=np_dtype, mode="c",
                                            offset=base + start, shape=shape))
    return tensor.view(view) if view is not None else tensor


def file_rows(path: str | Path) -> dict[str, FileRows]:
    """Every tensor of a safetensors file as a `FileRows` reader (header checked now)."""
    path = Path(path)
    try:
        header, base = _read_header(path)
        size = path.stat().st_size
        rows = {name: FileRows(path, base, info) for name, info in header.items()
                if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: corrupted or unreadable safetensors file ({exc})") from None
    if any(r.offset + r.nbytes > size for r in rows.values()):
        raise UserError(f"{path}: corrupted or unreadable safetensors file (truncated)")
    return rows


class FileRows:
    """Rows of one tensor of a safetensors file, read on demand with positional reads."""

    def __init__(self, path: Path, base: int, info: dict):
        np_dtype, self.view = _DTYPES[info["dtype"]]
        self.np_dtype = np.dtype(np_dtype)
        self.shape = tuple(int(n) for n in info["shape"])
        self.path, self.offset = path, base + int(info["data_offsets"][0])
        self.row_bytes = math.prod(self.shape[1:]) * self.np_dtype.itemsize
        self.nbytes = self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Tensor) -> Tensor:
        """Rows `index` (a long tensor) as a new CPU tensor."""
        rows = index.tolist()
        if any(not 0 <= i < self.shape[0] for i in rows):
            raise IndexError(f"row out of range for {self.shape[0]} rows of {self.path}")
        buf = bytearray(len(rows) * self.row_bytes)
        view, fd = memoryview(buf), _open(self.path)
        for j, i in enumerate(rows):
            part = view[j * self.row_bytes:(j + 1) * self.row_bytes]
            if os.preadv(fd, [part], self.offset + i * self.row_bytes) != self.row_bytes:
                raise UserError(f"{self.path}: shorter than its header says (truncated)")
        array = np.frombuffer(buf, dtype=self.np_dtype).reshape(len(rows), *self.shape[1:])
        tensor = torch.from_numpy(array)
        return tensor.view(self.view) if self.view is not None else tensor


_FILES: OrderedDict[Path, int] = OrderedDict()  # path -> open descriptor, least recent first


def _open(path: Path) -> int:
    if path in _FILES:
        _FILES.move_to_end(path)
        return _FILES[path]
    if len(_FILES) >= MAX_OPEN_FILES:
        os.close(_FILES.popitem(last=False)[1])
    _FILES[path] = os.open(path, os.O_RDONLY)
    return _FILES[path]


class ShardedRows:
    """Several tensors (or `FileRows`) with the same trailing shape, read as one table
    along dim 0 (nothing is concatenated: a gather reads only the rows it asks for)."""

    def __init__(self, parts: list[Tensor | FileRows]):
        if not parts:
            raise ValueError("ShardedRows needs at least one part")
        self.parts = parts
        sizes = torch.tensor([p.shape[0] for p in parts])
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.rows = int(sizes.sum())

    def __len__(self) -> int:
        return self.rows

    def gather(self, index: Tensor) -> Tensor:
        """Rows `index` (a long tensor), in that order, as one new tensor."""
        index = index.cpu()
        if len(self.parts) == 1:
            return self.parts[0][index]
        part = torch.searchsorted(self.starts, index, right=True) - 1
        out = None
        for p in torch.unique(part).tolist():
            sel = (part == p).nonzero().squeeze(1)
            rows = self.parts[p][index[sel] - self.starts[p]]
            if out is None:
                out = rows.new_empty((index.shape[0], *rows.shape[1:]))
            out[sel] = rows
        return out if out is not None else self.parts[0][index]
