"""Stage-2 batches: scaled VAE latents + caption embeddings.

The VAE and the text encoder are frozen in stage 2, so ldmkit encodes every image once
(posterior mean and std, so each visit still draws a fresh latent sample) and every
distinct caption once (training/text_cache.py); a training step then reads its rows
from the shard files (training/mapped.py), so RAM does not grow with the dataset.
`LiveBatches` is the seed's way — both encoders run inside every step — kept for
like-for-like baselines (`train.use_cache = false`).

Layout of a latent cache, one folder per (VAE weights, data settings):

    latents-<key>/manifest.json           format, key, data identity, items, and per shard:
                                          file name, first item, item count, sha256
    latents-<key>/shard-00000.safetensors  SHARD_ITEMS consecutive items: mean, std (n, C,
                                          h, w) float32 (unscaled); caption_count (n,);
                                          caption_keys (m, 20) uint8, the sha1 of each caption
                                          (its row in the text cache); caption_utf8 +
                                          caption_ends, the captions' text

Shards always cover the same items and are encoded in the same batches, so a shard's bytes
do not depend on who built it: under N processes rank r builds shards r, r + N, ...; the
main process writes the manifest. A shard that is missing, or whose bytes no longer match
its sha256, is rebuilt, never used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldmkit.config import Config
from ldmkit.errors import UserError
from ldmkit.io import read_json, save_tensors_atomic, write_json_atomic
from ldmkit.models.text import TextEmbeddings, TextEncoder
from ldmkit.models.vae import AutoencoderKL
from ldmkit.training.common import infinite_loader
from ldmkit.training.distributed import gather_json
from ldmkit.training.mapped import ShardedRows, file_digest, file_rows, map_tensors
from ldmkit.training.text_cache import TextEmbeddingCache, caption_key

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, TextEmbeddings]  # scaled latents, their captions' embeddings
FORMAT = "ldmkit-latent-cache/2"
ENCODE_BATCH = 128
SHARD_ITEMS = 32 * ENCODE_BATCH  # whole encoder batches: the same batches whoever encodes
KEEP_LATENT_CACHES = 3
DEFAULT_CACHE = Path("runs/diffusion/cache")  # where `ldmkit train` looks by default


def cli_cache(args: argparse.Namespace) -> int:
    from ldmkit.data import build_dataset
    from ldmkit.training.common import make_accelerator

    cfg, acc = args.cfg, make_accelerator("no")
    vae = AutoencoderKL.from_pretrained(Path(args.vae), acc.device).eval().requires_grad_(False)
    text = TextEncoder.from_config(cfg.text, acc.device)
    cache_dir = Path(args.out or cfg.text.cache_dir or DEFAULT_CACHE)
    folder, entries, _ = build_cache(cfg, vae, Path(args.vae), text,
                                     build_dataset(cfg.data, "train"), cache_dir, acc.device, acc)
    if acc.is_main_process:
        print(f"cache ready: {sum(e['items'] for e in entries)} items in {len(entries)} shards "
              f"({folder}), captions in {cache_dir / 'text'}; `ldmkit train` reads it with "
              f"text.cache_dir={cache_dir} (or when it is <--out>/cache)")
    return 0


# ----------------------------------------------------------------------------- encoding


def item_captions(dataset, i: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The image of item i and every caption it has (COCO images have about five)."""
    if hasattr(dataset, "load_readable"):  # file datasets: a bad file is replaced, follow it
        image, j = dataset.load_readable(i)
        return image, tuple(dataset.captions(j))
    image, caption = dataset[i]
    return image, (caption,)


def cache_key(vae_weights: Path, num_items: int, data_identity: dict) -> str:
    """Names a latent cache: the VAE's weights (bytes) and the data settings."""
    digest = hashlib.sha1()
    with open(vae_weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps({**data_identity, "len": num_items}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, dataset, batch_size: int = ENCODE_BATCH,
                   device: str | torch.device = "cpu", items: range | None = None
                   ) -> tuple[dict, list[tuple[str, ...]]]:
    """Posterior mean and std of every item (or of `items`), unscaled, plus its captions."""
    items = items if items is not None else range(len(dataset))
    means, stds, captions = [], [], []
    bar = tqdm(range(items.start, items.stop, batch_size), desc="encoding latents",
               dynamic_ncols=True)
    for start in bar:
        batch = [item_captions(dataset, i) for i in range(start, min(start + batch_size,
                                                                     items.stop))]
        images = torch.stack([img for img, _ in batch]).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            posterior = vae.encode(images)
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        captions += [caps for _, caps in batch]
    return {"mean": torch.cat(means), "std": torch.cat(stds)}, captions


def write_shard(folder: Path, index: int, first: int, latents: dict,
                captions: list[tuple[str, ...]]) -> dict:
    """Write shard `index` (items first, first + 1, ...) atomically; returns its manifest
    entry. Public so that a benchmark can write made-up latents in the real format."""
    flat = [c for caps in captions for c in caps]
    text = [c.encode("utf-8") for c in flat]
    tensors = {"mean": latents["mean"], "std": latents["std"],
               "caption_count": torch.tensor([len(c) for c in captions], dtype=torch.long),
               "caption_keys": _bytes_tensor(b"".join(map(caption_key, flat))).view(-1, 20),
               "caption_utf8": _bytes_tensor(b"".join(text)),
               "caption_ends": torch.tensor([len(t) for t in text], dtype=torch.long).cumsum(0)}
    name = f"shard-{index:05d}.safetensors"
    save_tensors_atomic(folder / name, tensors, metadata={"format": FORMAT})
    return {"name": name, "first": first, "items": len(captions),
            "sha256": file_digest(folder / name)}


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.zeros(0, dtype=torch.uint8)


def write_manifest(folder: Path, key: str, data_identity: dict, entries: list[dict]) -> None:
    write_json_atomic(folder / "manifest.json", {
        "format": FORMAT, "key": key, "data": data_identity,
        "items": sum(e["items"] for e in entries), "shard_items": SHARD_ITEMS,
        "shards": entries})


# ----------------------------------------------------------------------------- building


def build_cache(cfg: Config, vae: AutoencoderKL, vae_dir: Path, text: TextEncoder, dataset,
                cache_dir: Path, device: torch.device, accelerator=None
                ) -> tuple[Path, list[dict], TextEmbeddingCache]:
    """Encode what is missing or damaged (each process its own shards and its share of
    the captions), keep what is intact; returns the latent folder, its shard entries and
    the text cache that holds every caption."""
    identity = cfg.to_dict()["data"]
    key = cache_key(Path(vae_dir) / "model.safetensors", len(dataset), identity)
    folder = Path(cache_dir) / f"latents-{key}"
    rank, world = _ranks(accelerator)
    known = _manifest_entries(folder, key)
    mine = {}
    for i, first in enumerate(range(0, len(dataset), SHARD_ITEMS)):
        if i % world == rank:
            items = range(first, min(first + SHARD_ITEMS, len(dataset)))
            mine[str(i)] = _intact_or_rebuilt(vae, dataset, folder, i, items, known, device)
    entries = [e for part in gather_json(accelerator, mine) for e in part.values()]
    entries.sort(key=lambda e: e["first"])
    if rank == 0 and entries != known:
        write_manifest(folder, key, identity, entries)
        _prune(Path(cache_dir), KEEP_LATENT_CACHES)
    texts = _cache_captions(folder, entries, Path(cache_dir) / "text", text, accelerator)
    return folder, entries, texts


def _ranks(accelerator) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def _manifest_entries(folder: Path, key: str) -> list[dict]:
    path = folder / "manifest.json"
    if not path.is_file():
        return []
    try:
        manifest = read_json(path, "latent cache manifest")
        fits = manifest.get("format") == FORMAT and manifest.get("key") == key
        return [dict(e) for e in manifest["shards"]] if fits else []
    except (UserError, AttributeError, KeyError, TypeError, ValueError) as exc:
        log.warning("latent cache %s: unreadable manifest (%s); rebuilding", path, exc)
        return []


def _intact_or_rebuilt(vae: AutoencoderKL, dataset, folder: Path, index: int, items: range,
                       known: list[dict], device) -> dict:
    entry = next((e for e in known if e.get("first") == items.start), None)
    problem = _shard_problem(folder, entry, items)
    if not problem:
        return entry
    if entry is not None:
        log.warning("latent cache %s: shard %d %s; rebuilding it", folder, index, problem)
    latents, captions = encode_dataset(vae, dataset, device=device, items=items)
    return write_shard(folder, index, items.start, latents, captions)


def _shard_problem(folder: Path, entry: dict | None, items: range) -> str:
    if entry is None:
        return "is not built"
    if entry.get("items") != len(items):
        return f"holds {entry.get('items')} items, not {len(items)}"
    path = folder / str(entry.get("name"))
    if not path.is_file():
        return "is missing"
    if file_digest(path) != entry.get("sha256"):
        return "does not match its sha256 (corrupted or changed on disk)"
    return ""


def _cache_captions(folder: Path, entries: list[dict], text_dir: Path, text: TextEncoder,
                    accelerator) -> TextEmbeddingCache:
    """Every distinct caption of the shards into the text cache, encoded once."""
    rank, world = _ranks(accelerator)
    cache = TextEmbeddingCache(text_dir, text)
    cache.prefetch(_uncached_captions(folder, entries, cache), rank, world)
    if world == 1:
        cache.save()
        return cache
    names = gather_json(accelerator, cache.save(manifest=False))
    if rank == 0:
        cache.adopt(n for part in names[1:] for n in part)
        cache.save()
    accelerator.wait_for_everyone()
    return TextEmbeddingCache(text_dir, text)  # every rank sees every process's rows


def _uncached_captions(folder: Path, entries: list[dict], cache: TextEmbeddingCache
                       ) -> list[str]:
    """The shards' captions missing from `cache`, distinct, in order of first appearance."""
    out: list[str] = []
    seen: set[bytes] = set()
    for entry in entries:
        shard = map_tensors(folder / entry["name"])
        ends = shard["caption_ends"].tolist()
        raw = bytes(shard["caption_utf8"].numpy())
        for j, key in enumerate(_keys(shard["caption_keys"])):
            if key not in seen and key not in cache:
                seen.add(key)
                out.append(raw[ends[j - 1] if j else 0:ends[j]].decode("utf-8"))
    return out


def _keys(table: torch.Tensor) -> list[bytes]:
    raw = table.contiguous().numpy().tobytes()
    return [raw[i:i + 20] for i in range(0, len(raw), 20)]


def _prune(cache_dir: Path, keep: int) -> None:
    """Every retrained VAE adds a latent cache; keep only the newest few (folders, and the
    single files of ldmkit 0.1's caches)."""
    caches = [p for p in cache_dir.glob("latents-*") if p.is_dir() or p.suffix == ".safetensors"]
    caches.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in caches[keep:]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- batches


class CachedBatches:
    """Random batches read from the shard files: items drawn with replacement (uniformly,
    or in proportion to `weights`: data.balance_by), a fresh posterior sample per visit,
    one of the item's captions drawn per visit. Every draw comes from the process's global
    torch RNG (checkpoints save each process's), so each process draws its own items:
    together one global batch."""

    def __init__(self, folder: Path, entries: list[dict], text_cache: TextEmbeddingCache,
                 scale_factor: float, batch_size: int, device: torch.device,
                 weights: torch.Tensor | None = None):
        paths = [Path(folder) / e["name"] for e in entries]
        rows = [file_rows(p) for p in paths]  # read per batch
        self.mean = ShardedRows([r["mean"] for r in rows])
        self.std = ShardedRows([r["std"] for r in rows])
        shards = [map_tensors(p) for p in paths]  # read once here: the caption index
        self.counts = torch.cat([s["caption_count"] for s in shards])
        self.first = torch.cumsum(self.counts, 0) - self.counts
        keys = (k for s in shards for k in _keys(s["caption_keys"]))
        self.captions, self.caption_row = text_cache.table(keys)
        self.scale, self.batch_size, self.device = scale_factor, batch_size, device
        if weights is not None and len(weights) != len(self.mean):
            raise ValueError(f"{len(weights)} draw weights for {len(self.mean)} cached items")
        self.weights = weights

    def __len__(self) -> int:
        return len(self.mean)

    def next(self) -> Batch:
        n, b = len(self), self.batch_size
        items = (torch.randint(0, n, (b,)) if self.weights is None else
                 torch.multinomial(self.weights, b, replacement=True))
        pick = (torch.rand(b) * self.counts[items]).long()
        rows = self.caption_row[self.first[items] + pick]
        # Copies that do not wait for the device: a blocking one would drain the GPU's
        # queue every step, so the host could never prepare a step while the last one runs
        # (the bytes are staged at once; the gathered rows are not touched again).
        mean = self.mean.gather(items).to(self.device, non_blocking=True)
        std = self.std.gather(items).to(self.device, non_blocking=True)
        latents = (mean + std * torch.randn_like(mean)) * self.scale
        return latents, self.captions.gather(rows).to(self.device, non_blocking=True)


class LiveBatches:
    """The seed's way: load images, run the VAE encoder and the text encoder every step.
    Process `rank` reads its own slice of the shared shuffled stream (`StreamSampler`)."""

    def __init__(self, dataset, vae: AutoencoderKL, text: TextEncoder, batch_size: int,
                 seed: int, start_step: int, device: torch.device, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, weights: torch.Tensor | None = None):
        self.loader = infinite_loader(dataset, batch_size, seed=seed, start_step=start_step,
                                      num_workers=num_workers, rank=rank,
                                      world_size=world_size, weights=weights)
        self.vae, self.text, self.device = vae, text, device

    @torch.no_grad()
    def next(self) -> Batch:
        images, captions = next(self.loader)
        # non_blocking: as in CachedBatches.next
        latents = self.vae.encode_latents(images.to(self.device, non_blocking=True), sample=True)
        return latents.float(), self.text.encode(list(captions)).to(self.device, non_blocking=True)


def training_batches(cfg: Config, vae: AutoencoderKL, vae_dir: Path, text: TextEncoder,
                     dataset, out_dir: Path, device: torch.device, step: int,
                     accelerator=None) -> CachedBatches | LiveBatches:
    """The batch stream `train_diffusion` reads (and benchmarks/bench_train.py times), one
    update's rows per `next()` (batch_size x grad_accum_steps): from the latent + caption
    caches (built on first use, in cfg.text.cache_dir or out_dir/cache), or, with
    train.use_cache = false, encoded live like the seed."""
    per_update = cfg.train.batch_size * cfg.train.grad_accum_steps
    weights = draw_weights(dataset)
    if not cfg.train.use_cache:
        rank, world = _ranks(accelerator)
        return LiveBatches(dataset, vae, text, per_update, cfg.train.seed, step, device,
                           cfg.data.num_workers, rank, world, weights)
    cache_dir = Path(cfg.text.cache_dir) if cfg.text.cache_dir else out_dir / "cache"
    folder, entries, text_cache = build_cache(cfg, vae, vae_dir, text, dataset, cache_dir,
                                              device, accelerator)
    return CachedBatches(folder, entries, text_cache, vae.scale_factor, per_update, device,
                         weights)


def draw_weights(dataset) -> torch.Tensor | None:
    """The dataset's per-item draw weights (folder data with data.balance_by), else None:
    every item equally often."""
    weights = getattr(dataset, "draw_weights", None)
    return weights() if callable(weights) else None
