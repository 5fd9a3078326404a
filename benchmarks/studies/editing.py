# Question: does img2img keep a picture's shape and place while the prompt changes its colour,
# and does inpainting repaint the masked object while keeping the rest? Answer: BENCHMARKS.md
# "Editing pictures"; results/editing.json, editing_img2img.png, editing_inpaint.png
"""img2img and inpainting on the trained shapes demo model, read by the shipped judge.

img2img: 200 real renders of one object (random colour, shape, size, place, with the data's
jitter), each prompted only "a <other colour> <its shape>" (the place and size are not in
the prompt: they must come from the picture), at strength 0.6, 0.7, 0.75 and 0.8, and 1.0 (text
to image, where the place is kept by chance) as the control. Counted right when the judge
reads the new colour, the old shape and the old place.

inpainting: 200 two-object scenes side by side, the left half masked (white = repaint),
prompted with the whole scene with a new left object (another colour and shape). Counted:
the new left object right (colour and shape), the untouched right object still right, and
the PSNR outside the mask against the picture's VAE round trip (what an edit gives back).

Headline sampler (DPM-Solver++ 20 steps, w = 5, rescale 0.7; img2img at w = 10 too); fixed
seeds; nothing depends on the machine's speed.

    .venv/bin/python benchmarks/studies/editing.py runs/demo/model
    -> benchmarks/results/editing.json, editing_img2img.png, editing_inpaint.png
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchlib import DEMO_MODEL, RESULTS_DIR, machine_info, run_study  # noqa: E402
from ldmkit.data.shapes import (  # noqa: E402
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    render_scene,
    sample_scene,
    with_articles,
)
from ldmkit.diffusion.registry import HEADLINE  # noqa: E402

STRENGTHS = (0.6, 0.7, 0.75, 0.8, 1.0)
N = int(os.environ.get("EDITING_N", 200))
PSNR_BAR = 35.0
IMG2IMG_GUIDANCE = (HEADLINE.guidance, 10.0)  # a colour change needs a firmer push


def other(rng: np.random.Generator, choices, old: str) -> str:
    pool = [c for c in choices if c != old]
    return pool[rng.integers(len(pool))]


def img2img_cases(n: int, size: int, seed: int = 11):
    """(pictures, scenes, new colours, prompts)"""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, 0.0) for _ in range(n)]
    pictures = [render_scene(s, size, rng) for s in scenes]
    colours = [other(rng, COLORS, s.objects[0].color) for s in scenes]
    prompts = [with_articles(f"a {c} {s.objects[0].shape}") for c, s in zip(colours, scenes)]
    return pictures, scenes, colours, prompts


def inpaint_cases(n: int, size: int, seed: int = 12):
    """(pictures, scenes, new left objects, prompts); the mask is the left half."""
    rng = np.random.default_rng(seed)

    def obj(position: str) -> ShapeObject:
        return ShapeObject(list(COLORS)[rng.integers(len(COLORS))],
                           SHAPES[rng.integers(len(SHAPES))], SIZES[rng.integers(2)], position)

    scenes, news = [], []
    for _ in range(n):
        left, right = obj("left"), obj("right")
        while (right.color, right.shape) == (left.color, left.shape):
            right = obj("right")
        new = ShapeObject(other(rng, COLORS, left.color), other(rng, SHAPES, left.shape),
                          left.size, "left")
        while (new.color, new.shape) == (right.color, right.shape):
            new = ShapeObject(other(rng, COLORS, left.color), other(rng, SHAPES, left.shape),
                              left.size, "left")
        scenes.append(Scene((left, right), "left of"))
        news.append(new)
    pictures = [render_scene(s, size, rng) for s in scenes]
    prompts = [with_articles(f"a {a.color} {a.shape} left of a {s.objects[1].color} "
                         f"{s.objects[1].shape}") for a, s in zip(news, scenes)]
    return pictures, scenes, news, prompts


def left_half_mask(size: int) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 255
    return Image.fromarray(mask)


def edit(pipe, prompts, pictures, strength: float, mask=None,
         guidance: float = HEADLINE.guidance) -> torch.Tensor:
    from ldmkit.editing import prepare_edit

    checked = prepare_edit(pictures, mask, len(prompts), pipe.image_size, strength)
    return pipe.edit_images(prompts, checked, None, HEADLINE.steps, guidance,
                            HEADLINE.sampler, torch.Generator().manual_seed(0),
                            guidance_rescale=HEADLINE.guidance_rescale, bf16=True)


def recolour_counts(judge, images, scenes, colours) -> dict[str, float]:
    """Fractions of the recoloured pictures the judge reads with the new colour, the old
    shape, place and size, and the first three together."""
    from ldmkit.evaluation.judge import judge_images

    tally = {"colour": 0, "shape": 0, "place": 0, "size": 0, "all_three": 0}
    for seen, truth, colour in zip(judge_images(judge, images), scenes, colours):
        if len(seen.objects) != 1:
            continue
        got, old = seen.objects[0], truth.objects[0]
        ok = {"colour": got.color == colour, "shape": got.shape == old.shape,
              "place": got.position == old.position, "size": got.size == old.size}
        ok["all_three"] = ok["colour"] and ok["shape"] and ok["place"]
        for k, v in ok.items():
            tally[k] += v
    return {k: v / len(scenes) for k, v in tally.items()}


def measure_img2img(pipe, judge) -> tuple[dict, dict[str, torch.Tensor], list]:
    pictures, scenes, colours, prompts = img2img_cases(N, pipe.image_size)
    rows, images = {}, {}
    for guidance, strength in itertools.product(IMG2IMG_GUIDANCE, STRENGTHS):
        key = f"w {guidance:g}, strength {strength:g}"
        images[key] = edit(pipe, prompts, pictures, strength, guidance=guidance)
        rows[key] = recolour_counts(judge, images[key], scenes, colours)
        print(f"img2img {key}: {rows[key]}", flush=True)
    return rows, images, pictures


def measure_inpaint(pipe, judge) -> tuple[dict, torch.Tensor, list]:
    from ldmkit.edit_inputs import fit_image
    from ldmkit.evaluation.judge import judge_images
    from ldmkit.evaluation.vae_metrics import psnr

    pictures, scenes, news, prompts = inpaint_cases(N, pipe.image_size)
    mask = left_half_mask(pipe.image_size)
    images = edit(pipe, prompts, pictures, 1.0, mask)
    originals = torch.stack([fit_image(p, pipe.image_size, "image") for p in pictures])
    with torch.no_grad():
        round_trip = pipe.decode(pipe.encode_images(originals))
    keep = slice(pipe.image_size // 2, None)  # the columns outside the mask
    outside = psnr((images[..., keep] + 1) / 2, (round_trip[..., keep] + 1) / 2).tolist()
    new_left = sum(_reads(seen, 0, new) for seen, new in zip(judge_images(judge, images), news))
    right_kept = sum(_reads(seen, 1, truth.objects[1])
                     for seen, truth in zip(judge_images(judge, images), scenes))
    # ceilings: the judge on the round trips of the pictures and of renders of the asked-for
    # scenes (the judge reads the whole picture: a new left object can sway its right slot)
    right_in_round_trip = sum(_reads(seen, 1, truth.objects[1]) for seen, truth
                              in zip(judge_images(judge, round_trip), scenes))
    targets = torch.stack([fit_image(render_scene(Scene((new, s.objects[1]), "left of"),
                                                  pipe.image_size), pipe.image_size)
                           for new, s in zip(news, scenes)])
    with torch.no_grad():
        targets = pipe.decode(pipe.encode_images(targets))
    right_in_target = sum(_reads(seen, 1, truth.objects[1]) for seen, truth
                          in zip(judge_images(judge, targets), scenes))
    finite = [p for p in outside if p != float("inf")]
    row = {"new_left_right": new_left / N, "right_kept": right_kept / N,
           "right_read_in_the_unedited_round_trip": right_in_round_trip / N,
           "right_read_in_the_asked_for_scene_round_trip": right_in_target / N,
           "psnr_outside_median_db": round(statistics.median(outside), 2),
           "psnr_outside_min_db": round(min(outside), 2),
           "psnr_outside_at_least_35": sum(p >= PSNR_BAR for p in outside) / N,
           "identical_outside": (N - len(finite)) / N}
    print(f"inpainting: {row}", flush=True)
    return row, images, pictures


def _reads(seen: Scene, slot: int, want: ShapeObject) -> bool:
    """Does the judged two-object side-by-side scene have `want`'s colour and shape in the
    slot (0 = left, 1 = right)?"""
    if len(seen.objects) != 2 or seen.relation != "left of":
        return False
    got = seen.objects[slot]
    return (got.color, got.shape) == (want.color, want.shape)


def figures(img2img: dict[str, torch.Tensor], img2img_pictures, inpainted, inpaint_pictures,
            out: Path, columns: int = 8) -> list[Path]:
    from ldmkit.edit_inputs import fit_image
    from ldmkit.viz import save_image_grid

    columns = min(columns, len(img2img_pictures))

    def first(pictures):
        return torch.stack([fit_image(p, p.size[0], "image") for p in pictures[:columns]])

    _, _, _, prompts = img2img_cases(N, img2img_pictures[0].size[0])
    keys = [k for k in img2img if k.startswith(f"w {IMG2IMG_GUIDANCE[-1]:g},")]
    rows = [first(img2img_pictures)] + [img2img[k][:columns] for k in keys]
    captions = list(prompts[:columns])  # the picture row: what each is prompted with
    for k in keys:
        captions += [k] + [""] * (columns - 1)
    paths = [out.parent / "editing_img2img.png", out.parent / "editing_inpaint.png"]
    save_image_grid(torch.cat(rows), paths[0], nrow=columns, captions=captions, scale=4)
    _, _, _, inpaint_prompts = inpaint_cases(N, inpaint_pictures[0].size[0])
    captions = ["picture, left half masked"] + [""] * (columns - 1) + inpaint_prompts[:columns]
    save_image_grid(torch.cat([first(inpaint_pictures), inpainted[:columns]]), paths[1],
                    nrow=columns, captions=captions, scale=4)
    return paths


def main() -> None:
    from ldmkit.evaluation.judge import load_judge
    from ldmkit.io import write_json_atomic
    from ldmkit.pipeline import TextToImagePipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, nargs="?", default=DEMO_MODEL)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "editing.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.model, "cpu")
    judge = load_judge()
    img2img_rows, img2img_images, img2img_pictures = measure_img2img(pipe, judge)
    inpaint_row, inpainted, inpaint_pictures = measure_inpaint(pipe, judge)
    paths = figures(img2img_images, img2img_pictures, inpainted, inpaint_pictures, args.out)
    write_json_atomic(args.out, {
        "machine": machine_info(), "model": str(args.model), "n": N,
        "sampler": {"name": HEADLINE.sampler, "steps": HEADLINE.steps,
                    "guidance": {"img2img": list(IMG2IMG_GUIDANCE),
                                 "inpainting": HEADLINE.guidance},
                    "guidance_rescale": HEADLINE.guidance_rescale},
        "img2img": img2img_rows, "inpainting": inpaint_row})
    print(f"wrote {args.out} and {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    run_study(main)
