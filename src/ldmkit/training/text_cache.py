"""Caption embeddings computed once: the text encoder is frozen in stage 2, so encoding
the same caption every epoch (as the seed did every step) is wasted work.

Layout of a cache folder:
  manifest.json          format, encoder identity (name, content hash, max_length, dtype,
                         class, revision), storage dtype, shard list, each shard's sha256
  shard-<id>.safetensors keys (n, 20) uint8 sha1 digests of the caption text,
                         tokens (n, L, D), mask (n, L) bool, pooled (n, D)

Tokens and pooled vectors are stored in float16 by default: half the RAM and disk of
float32, and a relative rounding error of ~5e-4 (far below the noise the diffusion model is
trained under). bfloat16 rounds 8x coarser, so it is not the default; pass
dtype="float32" for exact copies. Shards are append-only; save() writes the new rows as one
shard and folds everything into a single shard once there are too many. Saved shards are
memory-mapped and training reads their rows on demand (training/mapped.py), so a cache
larger than RAM still opens and trains; a shard whose bytes no longer match the
manifest's sha256 makes the cache rebuild.

Under several processes, `prefetch(captions, rank, world_size)` has each process encode
every world_size-th of the batches one process would encode (so the bytes are the same
whatever the number of processes); each then `save(manifest=False)`s its rows and the main
process `adopt`s the others' shards and writes the one manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ldmkit.errors import UserError
from ldmkit.io import read_json, save_tensors_atomic, write_json_atomic
from ldmkit.models.text import TextEmbeddings, TextEncoder, check_prompts, is_blank
from ldmkit.training.mapped import ShardedRows, file_digest, file_rows, map_tensors

log = logging.getLogger(__name__)

# /2: each caption padded in the encoder to a length fixed by the caption alone
# (TextEncoder.padded_length), never by its batch-mates; /1 caches hold bits that a
# fresh encode would not give back.
FORMAT = "ldmkit-text-cache/2"
MANIFEST = "manifest.json"
MAX_SHARDS = 8
_STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def caption_key(caption: str) -> bytes:
    """The cache key of a caption: sha1 of its exact UTF-8 text (20 bytes)."""
    return hashlib.sha1(caption.encode("utf-8")).digest()


class TextEmbeddingCache:
    """Each distinct caption encoded once, kept in RAM, persisted to `cache_dir`.

    Counters: `misses` = distinct captions that had to be encoded; `hits` = requested
    captions (every occurrence) served without encoding."""

    def __init__(self, cache_dir: str | Path, encoder: TextEncoder, dtype: str = "float16",
                 batch_size: int = 256) -> None:
        if dtype not in _STORAGE:
            raise UserError(f"text cache dtype {dtype!r} is not one of {', '.join(_STORAGE)}")
        self.dir, self.encoder, self.dtype = Path(cache_dir), encoder, dtype
        self.batch_size = batch_size
        self.hits = self.misses = 0
        self.rebuilt_reason = ""  # why an existing cache was discarded, "" if it was not
        self._blocks: list[TextEmbeddings] = []  # stored rows, CPU, storage dtype
        self._keys: list[list[bytes]] = []  # keys of each block's rows
        self._where: dict[bytes, tuple[int, int]] = {}  # key -> (block, row)
        self._shards: list[str] = []  # shard file of each saved block
        self._digests: dict[str, str] = {}  # shard file -> sha256
        self._dirty = False
        self._load()

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, caption: str | bytes) -> bool:
        """A caption, or its key (`caption_key`), is cached."""
        return (caption if isinstance(caption, bytes) else caption_key(caption)) in self._where

    def prefetch(self, captions: Iterable[str], rank: int = 0, world_size: int = 1) -> int:
        """Encode every caption not cached yet (this process's share of them, under
        several processes: see the module's docstring); returns how many it encoded."""
        before = self.misses
        if world_size == 1:
            self._ensure(check_prompts(captions))
        else:
            self._encode_share(check_prompts(captions), rank, world_size)
        return self.misses - before

    def get(self, captions: Iterable[str]) -> TextEmbeddings:
        """Float32 embeddings (CPU), one row per caption in order; misses are encoded."""
        table, index = self.as_tensors(captions)
        return table.index_select(index).to(torch.float32)

    def as_tensors(self, captions: Iterable[str]) -> tuple[TextEmbeddings, Tensor]:
        """(table, index): one row per distinct caption in storage dtype, and a long tensor
        with `table[index[i]]` = caption i. For training: keep the table in RAM (or on the
        GPU) and gather `table[index[batch_ids]].to(device, torch.float32)` per step."""
        keys = self._ensure(check_prompts(captions))
        rows: dict[bytes, int] = {}
        index = torch.tensor([rows.setdefault(k, len(rows)) for k in keys], dtype=torch.long)
        return self._gather(list(rows)), index

    def save(self, manifest: bool = True) -> list[str]:
        """Persist new rows as one shard, then the manifest; both writes are atomic, and
        stale shards are deleted only after the manifest that drops them is in place.
        Returns the new shards' names; `manifest=False` writes only those (see `adopt`)."""
        if not self._dirty:
            return []
        if manifest and len(self._blocks) > MAX_SHARDS:
            self._compact()
        new = [self._write_shard(b) for b in range(len(self._shards), len(self._blocks))]
        self._shards += new
        if manifest:
            write_json_atomic(self.dir / MANIFEST, self._manifest())
            for stale in set(self.dir.glob("shard-*.safetensors")) - {self.dir / s for s in
                                                                        self._shards}:
                stale.unlink(missing_ok=True)
            self._dirty = False
        return new

    def adopt(self, names: Iterable[str]) -> None:
        """Take in shards other processes wrote with `save(manifest=False)`; the next
        `save()` lists them in the manifest."""
        self.save(manifest=False)  # own rows first: block b is always shard b
        for name in names:
            if name not in self._shards:
                keys, block = self._read_shard(name)
                self._add(keys, block)
                self._shards.append(name)
        self._dirty = True

    def table(self, keys: Iterable[bytes]) -> tuple[CaptionTable, Tensor]:
        """For training: every cached row as one table read from the shard files (nothing
        copied into RAM), and the row of each key. Every key must be cached."""
        starts, total = [], 0
        for block in self._blocks:
            starts.append(total)
            total += len(block)
        try:
            rows = [starts[b] + r for b, r in map(self._where.__getitem__, keys)]
        except KeyError as exc:
            raise UserError(f"{self.dir}: caption {bytes(exc.args[0]).hex()} is not in the "
                            "text cache") from None
        return CaptionTable(self._row_readers()), torch.tensor(rows, dtype=torch.long)

    def _row_readers(self) -> list[dict]:
        """Per block: saved ones read row by row from their shard file, new ones in RAM."""
        readers = []
        for b, block in enumerate(self._blocks):
            if b < len(self._shards):
                readers.append(file_rows(self.dir / self._shards[b]))
            else:
                readers.append({"tokens": block.tokens, "mask": block.mask,
                                "pooled": block.pooled})
        return readers

    # ------------------------------------------------------------------ encoding

    def _missing(self, captions: list[str]) -> tuple[list[bytes], dict[bytes, str]]:
        """Keys of `captions`, and the distinct uncached ones in order of first appearance."""
        keys = [caption_key(c) for c in captions]
        missing: dict[bytes, str] = {}
        for key, caption in zip(keys, captions):
            if key not in self._where:
                missing.setdefault(key, caption)
        return keys, missing

    def _encode_share(self, captions: list[str], rank: int, world_size: int) -> None:
        _, missing = self._missing(captions)
        batches = _batches_like_encode(list(missing.values()), self.batch_size)
        mine = batches[rank::world_size]
        if mine:
            emb = TextEmbeddings.cat([self.encoder.encode(b, self.batch_size) for b in mine])
            self._add([caption_key(c) for b in mine for c in b], self._to_storage(emb))
        self.misses += sum(len(b) for b in mine)

    def _ensure(self, captions: list[str]) -> list[bytes]:
        keys, missing = self._missing(captions)
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        if missing:
            big = len(missing) > 4 * self.batch_size
            emb = self.encoder.encode(list(missing.values()), self.batch_size, progress=big)
            self._add(list(missing), self._to_storage(emb))
        return keys

    def _to_storage(self, emb: TextEmbeddings) -> TextEmbeddings:
        dtype = _STORAGE[self.dtype]
        if dtype == torch.float16:
            peak = max(emb.tokens.abs().max().item(),
                       0.0 if emb.pooled is None else emb.pooled.abs().max().item())
            if peak > torch.finfo(torch.float16).max:
                raise UserError(f"text embeddings reach {peak:.3g}, beyond float16; "
                                "build the cache with dtype='float32'")
        return emb.to("cpu", dtype)

    def _add(self, keys: list[bytes], block: TextEmbeddings) -> None:
        b = len(self._blocks)
        self._blocks.append(block)
        self._keys.append(keys)
        self._where.update((k, (b, r)) for r, k in enumerate(keys))
        self._dirty = True

    def _gather(self, keys: list[bytes]) -> TextEmbeddings:
        where = np.array([self._where[k] for k in keys], dtype=np.int64).reshape(-1, 2)
        blocks, rows = torch.from_numpy(where[:, 0]), torch.from_numpy(where[:, 1])
        if not self._blocks:  # nothing requested and nothing cached
            return self.encoder.encode([]).to(dtype=_STORAGE[self.dtype])
        if len(self._blocks) == 1:
            return self._blocks[0].index_select(rows)
        out = _empty_like(self._blocks[0], len(keys))
        for b in torch.unique(blocks).tolist():
            sel = (blocks == b).nonzero().squeeze(1)
            part = self._blocks[b].index_select(rows[sel])
            out.tokens[sel], out.mask[sel] = part.tokens, part.mask
            if out.pooled is not None:
                out.pooled[sel] = part.pooled
        return out

    def _compact(self) -> None:
        """Fold all blocks into one, so gathers index a single table."""
        keys = [k for ks in self._keys for k in ks]
        block = TextEmbeddings.cat(self._blocks)
        self._blocks, self._keys, self._where, self._shards = [], [], {}, []
        self._add(keys, block)

    # ------------------------------------------------------------------ files

    def _identity(self) -> dict:
        ident = dict(self.encoder.identity())
        ident.pop("path", None)  # the same weights in another venv are the same encoder
        return ident

    def _manifest(self) -> dict:
        return {"format": FORMAT, "encoder": self._identity(), "dtype": self.dtype,
                "length": self.encoder.max_length, "dim": self.encoder.hidden_size,
                "entries": len(self), "shards": self._shards,
                "sha256": {s: self._digests[s] for s in self._shards if s in self._digests}}

    def _write_shard(self, b: int) -> str:
        keys = b"".join(self._keys[b])
        # Named by content and encoder, so a rebuilt shard never overwrites a live one.
        salt = json.dumps([self._identity(), self.dtype], sort_keys=True).encode()
        name = f"shard-{hashlib.sha1(salt + keys).hexdigest()[:16]}.safetensors"
        block = self._blocks[b]
        tensors = {"keys": torch.frombuffer(bytearray(keys), dtype=torch.uint8).view(-1, 20),
                   "tokens": block.tokens, "mask": block.mask}
        if block.pooled is not None:
            tensors["pooled"] = block.pooled
        save_tensors_atomic(self.dir / name, tensors, metadata={"format": FORMAT})
        self._digests[name] = file_digest(self.dir / name)
        return name

    def _load(self) -> None:
        path = self.dir / MANIFEST
        if not path.is_file():
            return
        try:
            manifest = read_json(path, "text cache manifest")
            stale = self._stale_reason(manifest)
            blocks = [] if stale else [self._read_shard(s, manifest.get("sha256", {}))
                                       for s in manifest["shards"]]
        except (UserError, OSError, KeyError, TypeError, ValueError) as exc:
            stale = f"unreadable ({exc})"
        if stale:
            self.rebuilt_reason = stale
            self._dirty = True  # the next save() replaces the old manifest and shards
            log.warning("text cache %s: %s; rebuilding it", self.dir, stale)
            return
        for name, (keys, block) in zip(manifest["shards"], blocks):
            self._add(keys, block)
            self._shards.append(name)
        self._dirty = False

    def _stale_reason(self, manifest: dict) -> str:
        if manifest.get("format") != FORMAT:
            return f"format {manifest.get('format')!r} is not {FORMAT!r}"
        if manifest.get("dtype") != self.dtype:
            return f"stored as {manifest.get('dtype')}, asked for {self.dtype}"
        old, new = manifest.get("encoder") or {}, self._identity()
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]
        return "text encoder changed (" + "; ".join(changed) + ")" if changed else ""

    def _read_shard(self, name: str, digests: dict | None = None
                    ) -> tuple[list[bytes], TextEmbeddings]:
        digest = file_digest(self.dir / name)
        if (digests or {}).get(name, digest) != digest:
            raise ValueError(f"{name} does not match the manifest's sha256")
        self._digests[name] = digest
        t = map_tensors(self.dir / name)
        raw = t["keys"].contiguous().numpy().tobytes()
        keys = [raw[i:i + 20] for i in range(0, len(raw), 20)]
        block = TextEmbeddings(t["tokens"], t["mask"], t.get("pooled"))
        expected = (self.encoder.max_length, self.encoder.hidden_size)
        if tuple(block.tokens.shape[1:]) != expected or len(keys) != len(block):
            raise ValueError(f"{name} holds {tuple(block.tokens.shape)} for {len(keys)} keys")
        return keys, block


class CaptionTable:
    """Cached caption embeddings gathered row by row from their blocks (shard files or
    RAM), as float32 `TextEmbeddings`."""

    def __init__(self, blocks: list[dict]):
        self.tokens = ShardedRows([b["tokens"] for b in blocks])
        self.mask = ShardedRows([b["mask"] for b in blocks])
        pooled = [b.get("pooled") for b in blocks]
        self.pooled = None if pooled[0] is None else ShardedRows(pooled)

    def gather(self, rows: Tensor) -> TextEmbeddings:
        pooled = None if self.pooled is None else self.pooled.gather(rows).float()
        return TextEmbeddings(self.tokens.gather(rows).float(), self.mask.gather(rows), pooled)


def _batches_like_encode(captions: list[str], batch_size: int) -> list[list[str]]:
    """The batches `TextEncoder.encode(captions, batch_size)` runs: non-blank captions by
    length (stable), batch_size at a time; blank ones are the null prompt, no batch.
    Encoding these one by one gives the bytes one call over all of them gives."""
    real = sorted((c for c in captions if not is_blank(c)), key=len)
    batches = [real[i:i + batch_size] for i in range(0, len(real), batch_size)]
    blank = [c for c in captions if is_blank(c)]
    return batches + ([blank] if blank else [])


def _empty_like(block: TextEmbeddings, n: int) -> TextEmbeddings:
    pooled = None if block.pooled is None else block.pooled.new_empty(n, *block.pooled.shape[1:])
    return TextEmbeddings(block.tokens.new_empty(n, *block.tokens.shape[1:]),
                          block.mask.new_empty(n, *block.mask.shape[1:]), pooled)
