# Question: how much time does the text-embedding cache save per epoch?
# Answer: BENCHMARKS.md "Text-embedding cache"; printed as JSON (no results file)
"""Time to embed the shapes training captions with and without the text-embedding cache.

Without a cache (the seed) every training step re-encodes its batch of captions, so one
epoch costs one encoder pass per caption. With the cache each distinct caption is encoded
once (first build), a later run only loads the shards (warm reuse), and a training step is a
tensor gather. Prints one JSON object.

    .venv/bin/python benchmarks/studies/text_cache_speed.py [--n 20000] [--encoder NAME] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ldmkit.config import TextConfig
from ldmkit.models.text import TextEncoder
from ldmkit.training.text_cache import TextEmbeddingCache


def shapes_captions(n: int, seed: int) -> list[str]:
    from ldmkit.data.shapes import ShapesDataset

    data = ShapesDataset(num_items=n, seed=seed)
    return [data.captions(i)[0] for i in range(n)]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def no_cache_epoch(encoder: TextEncoder, captions: list[str], batch: int) -> float:
    """Encode every caption batch by batch, as a training loop without a cache does."""
    start = time.perf_counter()
    for i in range(0, len(captions), batch):
        encoder.encode(captions[i:i + batch])
    return time.perf_counter() - start


def step_lookups(cache: TextEmbeddingCache, captions: list[str], batch: int) -> dict:
    """Per-step cost once cached: get() by caption text, and the in-RAM table gather."""
    for i in range(0, min(len(captions), 8 * batch), batch):  # warm-up, untimed
        cache.get(captions[i:i + batch])
    _, get_s = timed(lambda: [cache.get(captions[i:i + batch])
                              for i in range(0, len(captions), batch)])
    table, index = cache.as_tensors(captions)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))

    def gather_epoch():
        for i in range(0, len(captions), batch):
            table.index_select(index[order[i:i + batch]]).to(torch.float32)

    _, gather_s = timed(gather_epoch)
    steps = -(-len(captions) // batch)
    return {"get_epoch_s": round(get_s, 3), "gather_epoch_s": round(gather_s, 4),
            "get_ms_per_step": round(1e3 * get_s / steps, 3),
            "gather_ms_per_step": round(1e3 * gather_s / steps, 4)}


def main() -> None:
    defaults = TextConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="training captions (one epoch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encoder", default=defaults.encoder)
    ap.add_argument("--max-length", type=int, default=defaults.max_length)
    ap.add_argument("--dtype", default=defaults.dtype, choices=("float32", "bfloat16"))
    ap.add_argument("--batch-size", type=int, default=128, help="training batch size")
    ap.add_argument("--cache-dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    ap.add_argument("--no-cache-items", type=int, default=0,
                    help="time the no-cache epoch on the first K captions and scale to --n "
                         "(0 = all): the slow path, kept short on a busy machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    captions, caption_s = timed(lambda: shapes_captions(args.n, args.seed))
    encoder, load_s = timed(lambda: TextEncoder(args.encoder, args.max_length, args.dtype))
    encoder.encode(captions[:args.batch_size])  # warm-up: first-call allocations

    load_before = os.getloadavg()[0]
    sample = captions[:args.no_cache_items or len(captions)]
    no_cache_s = no_cache_epoch(encoder, sample, args.batch_size) * len(captions) / len(sample)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "text-cache"

        def build():
            cache = TextEmbeddingCache(cache_dir, encoder, dtype=args.cache_dtype)
            cache.as_tensors(captions)
            cache.save()
            return cache

        cold, build_s = timed(build)
        encoder._hash = None  # a new run hashes the weights again to check the manifest

        def reuse():
            cache = TextEmbeddingCache(cache_dir, encoder, dtype=args.cache_dtype)
            cache.as_tensors(captions)
            return cache

        warm, reuse_s = timed(reuse)
        warm_counts = {"hits": warm.hits, "misses": warm.misses}
        disk = sum(f.stat().st_size for f in cache_dir.iterdir())
        lookups = step_lookups(warm, captions, args.batch_size)

    report = {
        "benchmark": "text_cache_speed",
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "loadavg_1min_start_end": [load_before, os.getloadavg()[0]]},
        "encoder": encoder.name, "max_length": encoder.max_length, "hidden_size":
            encoder.hidden_size, "dtype": args.dtype, "cache_dtype": args.cache_dtype,
        "captions": len(captions), "distinct_captions": cold.misses,
        "batch_size": args.batch_size, "caption_generation_s": round(caption_s, 2),
        "encoder_load_s": round(load_s, 2),
        "no_cache_timed_captions": len(sample),
        "no_cache_epoch_s": round(no_cache_s, 2),
        "no_cache_captions_per_s": round(len(captions) / no_cache_s, 1),
        "cache_first_build_s": round(build_s, 2),
        "cache_warm_reuse_s": round(reuse_s, 3),
        "cache_warm_counters": warm_counts,
        "cache_disk_mb": round(disk / 2**20, 1),
        "cached_epoch": lookups,
        "speedup_epoch_no_cache_vs_warm_gather": round(no_cache_s / lookups["gather_epoch_s"], 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
