# Question: does each seed's VAE give back the held-out pairs' images?
# Answer: BENCHMARKS.md "Held-out pairs at the demo's budget"; results/vae_heldout_roundtrip.json
"""Can a demo model's VAE draw the held-out colour/shape pairs at all?

The demo's VAE trains on the training split, which never shows a held-out pair (purple
triangle, orange circle), so the U-Net's held-out fidelity is capped by how well the
autoencoder generalises to those colours on those shapes. For each model folder: 100 real
images of each held-out pair and of two seen neighbours (both sizes, every position),
through the VAE (posterior mean) and back, read by the shapes judge.

    python benchmarks/studies/vae_heldout_roundtrip.py runs/demo/model runs/demo-seed1/model ...
    -> benchmarks/results/vae_heldout_roundtrip.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
from benchlib import RESULTS_DIR, machine_info, run_study, set_threads  # noqa: E402
from ldmkit.io import write_json_atomic  # noqa: E402

PAIRS = [("purple", "triangle"), ("orange", "circle"),  # held out
         ("purple", "square"), ("blue", "triangle")]  # seen: the same colour, the same shape
IMAGES = 100


def real_images(color: str, shape: str, size: int) -> torch.Tensor:
    from ldmkit.data.shapes import POSITION_XY, SIZE_RADIUS, Scene, ShapeObject, render_scene

    rng = np.random.default_rng(0)
    sizes, positions = list(SIZE_RADIUS), list(POSITION_XY)
    out = []
    for i in range(IMAGES):
        scene = Scene((ShapeObject(color, shape, sizes[i % 2], positions[i % 5]),))
        pixels = np.asarray(render_scene(scene, size, rng), dtype=np.float32) / 127.5 - 1
        out.append(torch.from_numpy(pixels).permute(2, 0, 1))
    return torch.stack(out)


def read_back(model: Path, judge) -> dict:
    from ldmkit.evaluation.judge import judge_images
    from ldmkit.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(model, "cpu")
    rows = {}
    for color, shape in PAIRS:
        real = real_images(color, shape, pipe.image_size)
        with torch.no_grad():
            back = pipe.vae.decode_latents(pipe.vae.encode_latents(real, sample=False))
        scenes = judge_images(judge, back.float().clamp(-1, 1))
        colours = [s.objects[0].color for s in scenes]
        rows[f"{color} {shape}"] = {
            "read_right": sum(len(s.objects) == 1 and s.objects[0].color == color
                              and s.objects[0].shape == shape for s in scenes) / IMAGES,
            "colours_read": {c: colours.count(c) for c in sorted(set(colours))}}
        print(f"{model} {color} {shape}: {rows[f'{color} {shape}']}", flush=True)
    return rows


def main() -> None:
    from ldmkit.evaluation.judge import load_judge

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="model folders (ldmkit demo's model/)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "vae_heldout_roundtrip.json")
    args = ap.parse_args()
    set_threads(args.threads)
    judge = load_judge()
    results = {"machine": machine_info(), "images_per_pair": IMAGES,
               "models": {str(m): read_back(m, judge) for m in args.models}}
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_study(main)
