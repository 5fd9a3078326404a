"""The model the sampling row (row 2) samples from: trained here, with a fixed step budget,
at the seed's geometry (64x64 -> 8x8x4, f = 8) and widths a 2-core CPU trains in minutes
(benchlib "seed-small": VAE base 16 x (1, 2, 4, 8); the bench U-Net with the demo's text
conditioning: MiniLM's embedding and last layers, pooled text), so a fresh clone writes the
row and every machine trains the same model.

It is kept in runs/bench/sample-model[-quick]/ beside the recipe that made it, and reused
while the recipe and the code that trains it are unchanged; a later `make bench` then skips
the training. The row
records which it was ("trained now in N s" or "reused, trained <date>").

    python benchmarks/bench_model.py [--quick]      # train (or find) it alone
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from benchlib import ROOT, Sizes, bench_config, describe, display_path

MODEL_ROOT = ROOT / "runs" / "bench"


def recipe(sz: Sizes) -> list[str]:
    """The overrides (on top of the "seed-small" bench config) that make the model."""
    return ["text.hidden_layers=[0, -1]", "unet.pooled_text=true",  # what makes it bind
            f"data.num_items={sz.model_items}", "data.val_items=64", "data.seed=0",
            f"vae.steps={sz.model_vae_steps}", "vae.batch_size=8", "vae.lr=1e-3",
            "vae.warmup_steps=50", "vae.kl_weight=1e-6", "vae.minutes=0.0",
            f"train.steps={sz.model_unet_steps}", f"train.warmup_steps="
            f"{min(100, sz.model_unet_steps // 3)}", "train.seed=0",
            f"train.log_every={max(1, sz.model_unet_steps // 10)}",
            f"train.checkpoint_every={sz.model_unet_steps}",
            f"train.sample_every={10 * sz.model_unet_steps}"]


def model_config(sz: Sizes, folder: Path):
    # the caption embeddings are kept beside the runs, as the demo keeps its own
    cache = json.dumps(str(folder.parent / ".ldmkit-cache"))
    return bench_config("seed-small", sz.model_unet_batch,
                        (*recipe(sz), f"text.cache_dir={cache}"))


def folder_for(sz: Sizes) -> Path:
    return MODEL_ROOT / ("sample-model-quick" if sz.quick else "sample-model")


def sample_model(sz: Sizes) -> tuple[Path, dict]:
    """(the model folder, how it came to be). Reuses a finished folder of the same recipe;
    otherwise trains the VAE, then the U-Net, and writes recipe.json last."""
    from ldmkit import __version__

    folder = folder_for(sz)
    cfg = model_config(sz, folder)
    wanted = {"recipe": cfg.to_dict(), "ldmkit": __version__, "code": code_hash()}
    saved = folder / "recipe.json"
    if saved.is_file() and (folder / "model" / "model_index.json").is_file():
        done = json.loads(saved.read_text())
        if {k: done.get(k) for k in wanted} == wanted:
            return folder / "model", {**_about(cfg, folder, done), "how": "reused: trained "
                                      f"{done['date']} in {done['train_seconds']:.0f} s"}
    done = train(cfg, folder)
    done.update(wanted)
    saved.write_text(json.dumps(done, indent=1) + "\n")
    return folder / "model", {**_about(cfg, folder, done),
                              "how": f"trained now in {done['train_seconds']:.0f} s"}


def code_hash() -> str:
    """sha256 of the library code that makes and trains the model (data, models, diffusion,
    training): a change there trains it again."""
    import hashlib

    src = ROOT / "src" / "ldmkit"
    h = hashlib.sha256()
    for path in sorted(p for d in ("data", "models", "diffusion", "training")
                       for p in (src / d).glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def train(cfg, folder: Path) -> dict:
    """Both stages with ldmkit's own trainers, from nothing, into `folder`."""
    import datetime

    from ldmkit.data import build_dataset
    from ldmkit.data.memory import materialize
    from ldmkit.models.text import TextEncoder
    from ldmkit.training.diffusion_trainer import train_diffusion
    from ldmkit.training.vae_trainer import train_vae

    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    data = materialize(build_dataset(cfg.data, "train"))
    vae = train_vae(cfg, folder / "vae", dataset=data)
    text = TextEncoder.from_config(cfg.text)
    unet = train_diffusion(cfg, vae.model_dir, folder / "diffusion", dataset=data, text=text)
    shutil.copytree(unet.model_dir, folder / "model")
    shutil.rmtree(folder / "diffusion" / "checkpoints", ignore_errors=True)  # not needed again
    return {"date": datetime.date.today().isoformat(),
            "train_seconds": round(time.perf_counter() - start, 1),
            "vae_steps": vae.steps, "vae_psnr_db": round(vae.psnr, 2),
            "unet_steps": unet.steps, "unet_seconds": round(unet.train_seconds, 1)}


def _about(cfg, folder: Path, done: dict) -> dict:
    return {"model": f"{display_path(folder / 'model')} (trained by the suite)",
            **describe(cfg),
            "training": f"VAE {done['vae_steps']} steps (batch {cfg.vae.batch_size}, "
                        f"held-out PSNR {done['vae_psnr_db']} dB), U-Net {done['unet_steps']}"
                        f" steps (batch {cfg.train.batch_size}), on {cfg.data.num_items} "
                        "shapes images"}


if __name__ == "__main__":
    import argparse

    from benchlib import set_threads, sizes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads)
    path, how = sample_model(sizes(args.quick))
    print(json.dumps({"model": str(path), **how}, indent=1))
