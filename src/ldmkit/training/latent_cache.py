"""Stage-2 batches: scaled VAE latents + caption embeddings.

The VAE and the text encoder are frozen in stage 2, so ldmkit encodes every image once
(posterior mean and std, so each visit still draws a fresh latent sample) and every
distinct caption once (training/text_cache.py), and a training step is then only a gather
from RAM. `LiveBatches` is the seed's way — both encoders run inside every step — kept
for like-for-like baselines (`train.use_cache = false`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldmkit.config import Config
from ldmkit.io import load_tensors, read_json, save_tensors_atomic, write_json_atomic
from ldmkit.models.text import TextEmbeddings, TextEncoder
from ldmkit.models.vae import AutoencoderKL
from ldmkit.training.common import infinite_loader
from ldmkit.training.text_cache import TextEmbeddingCache

Batch = tuple[torch.Tensor, TextEmbeddings]  # scaled latents, their captions' embeddings
KEEP_LATENT_CACHES = 3


def item_captions(dataset, i: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The image of item i and every caption it has (COCO images have about five)."""
    if hasattr(dataset, "load_readable"):  # file datasets: a bad file is replaced, follow it
        image, j = dataset.load_readable(i)
        return image, tuple(dataset.captions(j))
    image, caption = dataset[i]
    return image, (caption,)


def _cache_key(vae_weights: Path, dataset, data_identity: dict) -> str:
    digest = hashlib.sha1()
    with open(vae_weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps({**data_identity, "len": len(dataset)}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, dataset, batch_size: int = 128,
                   device: str | torch.device = "cpu") -> tuple[dict, list[tuple[str, ...]]]:
    """Posterior mean and std of every item (unscaled), plus each item's captions."""
    means, stds, captions = [], [], []
    bar = tqdm(range(0, len(dataset), batch_size), desc="encoding latents", dynamic_ncols=True)
    for start in bar:
        items = [item_captions(dataset, i) for i in range(start, min(start + batch_size,
                                                                      len(dataset)))]
        images = torch.stack([img for img, _ in items]).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            posterior = vae.encode(images)
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        captions += [caps for _, caps in items]
    return {"mean": torch.cat(means), "std": torch.cat(stds)}, captions


def cached_latents(vae: AutoencoderKL, vae_dir: Path, dataset, cache_dir: Path,
                   data_identity: dict, device: str | torch.device = "cpu"
                   ) -> tuple[dict, list[tuple[str, ...]]]:
    """`encode_dataset`, read from `cache_dir` when this VAE and data were seen before."""
    key = _cache_key(Path(vae_dir) / "model.safetensors", dataset, data_identity)
    weights, meta = cache_dir / f"latents-{key}.safetensors", cache_dir / f"latents-{key}.json"
    if weights.is_file() and meta.is_file():
        return load_tensors(weights), [tuple(c) for c in read_json(meta)["captions"]]
    tensors, captions = encode_dataset(vae, dataset, device=device)
    save_tensors_atomic(weights, tensors)
    write_json_atomic(meta, {"data": data_identity, "captions": captions})
    _prune(cache_dir, KEEP_LATENT_CACHES)
    return tensors, captions


def _prune(cache_dir: Path, keep: int) -> None:
    """Every retrained VAE adds a latent cache; keep only the newest few."""
    caches = sorted(cache_dir.glob("latents-*.safetensors"), key=lambda p: p.stat().st_mtime,
                    reverse=True)
    for old in caches[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)


class CachedBatches:
    """Random batches gathered from RAM: a fresh posterior sample per visit, one of the
    item's captions drawn per visit, everything indexed on the training device."""

    def __init__(self, latents: dict, captions: list[tuple[str, ...]], text_cache:
                 TextEmbeddingCache, scale_factor: float, batch_size: int,
                 device: torch.device):
        flat = [c for caps in captions for c in caps]
        table, index = text_cache.as_tensors(flat)
        counts = torch.tensor([len(caps) for caps in captions])
        self.first = (torch.cumsum(counts, 0) - counts).to(device)
        self.counts = counts.to(device)
        self.caption_row = index.to(device)
        self.captions = table.to(device)
        self.mean = latents["mean"].to(device)
        self.std = latents["std"].to(device)
        self.scale, self.batch_size, self.device = scale_factor, batch_size, device

    def __len__(self) -> int:
        return self.mean.shape[0]

    def next(self) -> Batch:
        """Draws from the global torch RNG, which checkpoints save and restore."""
        n, b = len(self), self.batch_size
        items = torch.randint(0, n, (b,)).to(self.device)
        pick = (torch.rand(b).to(self.device) * self.counts[items]).long()
        rows = self.caption_row[self.first[items] + pick]
        mean, std = self.mean[items], self.std[items]
        latents = (mean + std * torch.randn_like(mean)) * self.scale
        return latents, self.captions[rows].to(torch.float32)


class LiveBatches:
    """The seed's way: load images, run the VAE encoder and the text encoder every step."""

    def __init__(self, dataset, vae: AutoencoderKL, text: TextEncoder, batch_size: int,
                 seed: int, start_step: int, device: torch.device, num_workers: int = 0):
        self.loader = infinite_loader(dataset, batch_size, seed=seed, start_step=start_step,
                                      num_workers=num_workers)
        self.vae, self.text, self.device = vae, text, device

    @torch.no_grad()
    def next(self) -> Batch:
        images, captions = next(self.loader)
        latents = self.vae.encode_latents(images.to(self.device), sample=True)
        return latents.float(), self.text.encode(list(captions)).to(self.device)


def training_batches(cfg: Config, vae: AutoencoderKL, vae_dir: Path, text: TextEncoder,
                     dataset, out_dir: Path, device: torch.device, step: int
                     ) -> CachedBatches | LiveBatches:
    """The batch stream `train_diffusion` reads (and benchmarks/bench_train.py times): from
    the latent + caption caches (built on first use, in cfg.text.cache_dir or
    out_dir/cache), or, with train.use_cache = false, encoded live like the seed."""
    if not cfg.train.use_cache:
        return LiveBatches(dataset, vae, text, cfg.train.batch_size, cfg.train.seed, step,
                           device, cfg.data.num_workers)
    cache_dir = Path(cfg.text.cache_dir) if cfg.text.cache_dir else out_dir / "cache"
    latents, captions = cached_latents(vae, vae_dir, dataset, cache_dir,
                                       cfg.to_dict()["data"], device)
    text_cache = TextEmbeddingCache(cache_dir / "text", text)
    batches = CachedBatches(latents, captions, text_cache, vae.scale_factor,
                            cfg.train.batch_size, device)
    text_cache.save()
    return batches
