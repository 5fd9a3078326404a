# Question: does training's RAM stay flat on a latent cache of a million items?
# Answer: BENCHMARKS.md "A cache of a million items"; results/shard_cache.json
"""Peak RSS of stage-2 training on a sharded latent cache of many items (issue 12).

    python benchmarks/studies/shard_cache.py [--items 20000,1000000] [--steps 20] [--threads 1]

For each size the parent writes a cache in ldmkit's own format (`latent_cache.write_shard`,
`write_manifest`) with MADE-UP latents (Gaussian noise of the demo's 4x8x8 shape: encoding a
million images with a VAE would take hours on a CPU) and made-up captions from a small
grammar (2,544 distinct, so the real MiniLM encodes them in seconds); then a fresh child
process runs the real `train_diffusion` on it (demo config, batch 128, bf16): the cache is
verified (sha256 of every shard), the captions encoded into the text cache, and the
U-Net trained for --steps steps. The child reports its VmHWM (peak RSS, including file
pages it touched through the memory maps) and its RSS split at the end.
Results: benchmarks/results/shard_cache.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
from benchlib import (
    DEMO_CONFIG,
    RESULTS_DIR,
    machine_info,
    peak_rss_mb,
    run_study,
    set_threads,
)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the center"]
RELATIONS = ["left of", "right of", "above", "below"]


def made_up_caption(i: int) -> str:
    """Item i's caption: a deterministic pick from 240 one-object and 2,304 two-object
    phrasings (hashing i, so neighbouring items differ)."""
    h = int.from_bytes(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8).digest(), "little")
    c1, s1, h = COLOURS[h % 6], SHAPES[h // 6 % 4], h // 24
    if h % 2:
        return f"a {['small', 'large'][h // 2 % 2]} {c1} {s1} {PLACES[h // 4 % 5]}"
    h //= 2
    return f"a {c1} {s1} {RELATIONS[h % 4]} a {COLOURS[h // 4 % 6]} {SHAPES[h // 24 % 4]}"


class MadeUpItems:
    """A dataset of `n` items that only has a length: every item is already in the cache,
    so training must never load one."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        raise AssertionError(f"item {i} was loaded: the cache should have served it")


def config(items: int, steps: int, batch: int, work: Path):
    from ldmkit.config import load_config

    return load_config(DEMO_CONFIG, [
        f"data.num_items={items}", f"text.cache_dir={json.dumps(str(work / 'cache'))}",
        f"train.steps={steps}", "train.minutes=0", f"train.batch_size={batch}",
        "train.validation_prompts=[]", "train.sample_every=100000",
        "train.checkpoint_every=100000", "train.log_every=5"])


def write_cache(cfg, work: Path) -> dict:
    """The VAE folder (untrained: only its bytes name the cache) and every latent shard."""
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.training import latent_cache as lc

    torch.manual_seed(0)
    AutoencoderKL(cfg.vae, cfg.data.image_size).save_pretrained(work / "vae")
    n, side = cfg.data.num_items, cfg.data.image_size // cfg.vae.downsample_factor
    key = lc.cache_key(work / "vae" / "model.safetensors", n, cfg.to_dict()["data"])
    folder, entries, start = work / "cache" / f"latents-{key}", [], time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    for i, first in enumerate(range(0, n, lc.SHARD_ITEMS)):
        count = min(lc.SHARD_ITEMS, n - first)
        shape = (count, cfg.vae.latent_channels, side, side)
        latents = {"mean": torch.randn(shape, generator=gen),
                   "std": 0.1 * torch.rand(shape, generator=gen)}
        captions = [(made_up_caption(j),) for j in range(first, first + count)]
        entries.append(lc.write_shard(folder, i, first, latents, captions))
    lc.write_manifest(folder, key, cfg.to_dict()["data"], entries)
    size = sum((folder / e["name"]).stat().st_size for e in entries)
    return {"shards": len(entries), "cache_bytes": size,
            "write_s": round(time.perf_counter() - start, 1)}


def train_child(work: Path) -> dict:
    """In the fresh child: the real trainer on the cache the parent wrote."""
    from ldmkit.config import load_config_json
    from ldmkit.training.diffusion_trainer import train_diffusion

    cfg = load_config_json(work / "config.json")
    start = time.perf_counter()
    run = train_diffusion(cfg, work / "vae", work / "run", dataset=MadeUpItems(cfg.data.num_items))
    status = dict(line.split(":", 1) for line in
                  Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"peak_rss_mb": round(peak_rss_mb()), "steps": run.steps,
            "wall_s": round(time.perf_counter() - start, 1),
            "train_s": round(run.train_seconds, 1),
            "end_rss_anon_mb": round(int(status["RssAnon"].split()[0]) / 1024),
            "end_rss_file_mb": round(int(status["RssFile"].split()[0]) / 1024)}


def measure(items: int, args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        cfg = config(items, args.steps, args.batch, work)
        cfg.save_json(work / "config.json")
        row = {"items": items, **write_cache(cfg, work)}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run([sys.executable, __file__, "--child", str(work), "--threads",
                               str(args.threads)], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(row), flush=True)
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", default="20000,1000000", help="comma-separated cache sizes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for the caches (default: $TMPDIR)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "shard_cache.json")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.child:
        print(json.dumps(train_child(args.child)))
        return
    rows = [measure(int(n), args) for n in args.items.split(",")]
    result = {"benchmark": "shard_cache", "machine": machine_info(),
              "command": "python " + " ".join(sys.argv), "threads": args.threads,
              "batch": args.batch, "steps": args.steps, "latents": "made up (Gaussian)",
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_study(main)
