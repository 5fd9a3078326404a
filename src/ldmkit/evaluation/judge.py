"""The shapes judge: a small CNN that reads colour, shape, size and position off a 64x64
image of the built-in shapes data, so prompt fidelity of generated images can be measured.

It predicts a *layout* (one object, two side by side, two stacked) and, per slot, the
object's attributes: slot A is the single object or the left/top one, slot B the
right/bottom one. Judged two-object scenes therefore always come back as "A left of B" or
"A above B"; `fidelity_match` canonicalises prompts the same way so "B right of A" agrees.

Trained on real rendered images (every colour/shape pair, held-out ones included) with
blur, noise, softness and colour jitter, because what it judges are VAE decodes of
diffusion samples, which are a little soft; and on single objects anywhere in the frame,
because generated objects do not always sit on the data's five spots. Shipped weights:
judge.safetensors beside this file, written by scripts/train_judge.py.
"""

from __future__ import annotations

import importlib.resources
import itertools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.data.shapes import (
    COLORS,
    POSITION_XY,
    POSITIONS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    PromptSpec,
    Scene,
    ShapeObject,
    ShapesDataset,
    render_scene,
    spec_matches,
)
from ldmkit.data.transforms import pil_to_tensor
from ldmkit.errors import UserError
from ldmkit.io import load_state_into, read_json, save_tensors_atomic, write_json_atomic
from ldmkit.models.layers import group_norm

IMAGE_SIZE = 64
LAYOUTS = ("single", "horizontal", "vertical")
COLOR_NAMES = tuple(COLORS)
# Relation of a judged two-object scene per layout; slot A is always objects[0].
LAYOUT_RELATION = {"horizontal": "left of", "vertical": "above"}
LAYOUT_POSITIONS = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}
# "X right of Y" says the same as "Y left of X": flip to the two canonical relations.
FLIPPED = {"right of": "left of", "below": "above"}
OFF_GRID_STREAM = 13  # render_off_grid's own random stream beside the dataset's splits
IGNORE = -100  # cross_entropy's ignore_index: slot B of a single-object scene has no label

HEADS = {
    "layout": len(LAYOUTS), "position": len(POSITIONS),
    "color_a": len(COLORS), "shape_a": len(SHAPES), "size_a": len(SIZES),
    "color_b": len(COLORS), "shape_b": len(SHAPES), "size_b": len(SIZES),
}


# ----------------------------------------------------------------------------- model


class ShapesJudge(nn.Module):
    """Four stride-2 convs down to 4x4, then a linear layer over the *flattened* map:
    position is an answer here, so the features keep where things are instead of pooling
    it away. Half a million parameters; the first conv already halves the resolution,
    which keeps training to minutes on a 2-core CPU (a small object is still 6 px wide)."""

    def __init__(self, width: int = 32, hidden: int = 96):
        super().__init__()
        self.config = {"width": width, "hidden": hidden}
        chans = [3, width, 2 * width, 4 * width, 4 * width]  # 64 -> 32 -> 16 -> 8 -> 4 px
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), group_norm(cout),
                       nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 16, hidden), nn.SiLU())
        self.heads = nn.Linear(hidden, sum(HEADS.values()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.heads(self.fc(self.features(x)))
        return dict(zip(HEADS, logits.split(list(HEADS.values()), dim=1)))


def _to_judge_input(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"judge expects images (N, 3, H, W), got {tuple(images.shape)}")
    images = images.float().clamp(-1, 1)
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                               antialias=True, align_corners=False)
    return images


@torch.no_grad()
def predict(judge: ShapesJudge, images: torch.Tensor, batch_size: int = 256
            ) -> dict[str, torch.Tensor]:
    """Class index per head for each image (N, 3, H, W) in [-1, 1]."""
    judge.eval()
    device = next(judge.parameters()).device
    images = _to_judge_input(images)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
    for chunk in images.split(batch_size):
        logits = judge(chunk.to(device))
        for k, v in logits.items():
            out[k].append(v.argmax(1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def judge_images(judge: ShapesJudge, images: torch.Tensor) -> list[Scene]:
    """The scene the judge sees in each image, as a Scene (two-object scenes canonical:
    objects[0] is the left/top one, relation "left of" or "above")."""
    pred = predict(judge, images)
    return [_scene_from_prediction({k: int(v[i]) for k, v in pred.items()})
            for i in range(len(images))]


def _scene_from_prediction(p: dict[str, int]) -> Scene:
    def obj(slot: str, position: str) -> ShapeObject:
        return ShapeObject(COLOR_NAMES[p[f"color_{slot}"]], SHAPES[p[f"shape_{slot}"]],
                           SIZES[p[f"size_{slot}"]], position)

    layout = LAYOUTS[p["layout"]]
    if layout == "single":
        return Scene((obj("a", POSITIONS[p["position"]]),), None)
    pos_a, pos_b = LAYOUT_POSITIONS[layout]
    return Scene((obj("a", pos_a), obj("b", pos_b)), LAYOUT_RELATION[layout])


# ----------------------------------------------------------------------------- matching


def canonical_scene(scene: Scene) -> Scene:
    """Two-object scenes rewritten as "left of" / "above", objects reordered to match:
    the judge's slot A is then always objects[0]."""
    if scene.relation in FLIPPED:
        return Scene((scene.objects[1], scene.objects[0]), FLIPPED[scene.relation])
    return scene


def fidelity_match(spec: PromptSpec, scene: Scene) -> bool:
    """Does the (judged) scene show everything the prompt states? `spec_matches` reads a
    relation either way round, so "B right of A" matches a judged "A left of B"."""
    return spec_matches(spec, scene)


# ----------------------------------------------------------------------------- labels


def scene_labels(scene: Scene) -> dict[str, int]:
    """Targets for every head; slot B of a single object is IGNORE. The position head is
    trained on single objects only: for two objects the layout carries the position."""
    scene = canonical_scene(scene)
    a = scene.objects[0]
    labels = {"layout": 0, "position": POSITIONS.index(a.position)}
    if len(scene.objects) == 2:
        labels["layout"] = 1 if scene.relation == "left of" else 2
        labels["position"] = IGNORE
    labels.update(_object_labels(a, "a"))
    if len(scene.objects) == 2:
        labels.update(_object_labels(scene.objects[1], "b"))
    else:
        labels.update({f"{k}_b": IGNORE for k in ("color", "shape", "size")})
    return labels


def _object_labels(obj: ShapeObject, slot: str) -> dict[str, int]:
    return {f"color_{slot}": COLOR_NAMES.index(obj.color),
            f"shape_{slot}": SHAPES.index(obj.shape), f"size_{slot}": SIZES.index(obj.size)}


Labelled = tuple[torch.Tensor, dict[str, torch.Tensor], list[Scene]]


def render_labelled(num_items: int, seed: int, split: str = "train",
                    image_size: int = IMAGE_SIZE) -> Labelled:
    """Real images of every colour/shape pair (held-out ones included), with head targets."""
    data = ShapesDataset(image_size=image_size, num_items=num_items, seed=seed,
                         include_heldout=True, split=split)
    images, scenes = [], []
    for i in range(num_items):
        image, _, scene = data.item(i)
        images.append(image)
        scenes.append(scene)
    return _labelled(images, scenes)


def render_off_grid(num_items: int, seed: int, image_size: int = IMAGE_SIZE) -> Labelled:
    """Single objects centred anywhere, up to 40 % of their radius past an edge. The data
    puts objects on five spots only, but generated ones land between them too (a cross at
    the top right, half out of the frame); the judge must read colour, shape and size
    there as well. Their position label is the nearest of the five spots."""
    rng = np.random.default_rng([seed, OFF_GRID_STREAM])
    images, scenes = [], []
    for _ in range(num_items):
        size = SIZES[rng.integers(len(SIZES))]
        margin = 0.6 * SIZE_RADIUS[size]
        fx, fy = rng.uniform(margin, 1 - margin, size=2)
        obj = ShapeObject(COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
                          SHAPES[rng.integers(len(SHAPES))], size, nearest_position(fx, fy))
        scene = Scene((obj,), None)
        images.append(pil_to_tensor(render_scene(scene, image_size, rng, centres=[(fx, fy)])))
        scenes.append(scene)
    return _labelled(images, scenes)


def nearest_position(fx: float, fy: float) -> str:
    """The position word of the nearest of the five spots (fractions of the image)."""
    return min(POSITIONS, key=lambda p: math.dist(POSITION_XY[p], (fx, fy)))


def _labelled(images: list[torch.Tensor], scenes: list[Scene]) -> Labelled:
    rows = [scene_labels(s) for s in scenes]
    labels = {k: torch.tensor([r[k] for r in rows]) for k in HEADS}
    return torch.stack(images), labels, scenes


# ----------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Make real renders look like VAE decodes of samples: soft, slightly noisy, a little
    off in colour. Strengths stay well below what would change a label."""
    n = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    x = _shift(x, gen)
    x = _soften(x, gen)
    x = _blur(x, u(0.0, 1.0))
    gain, offset = u(0.93, 1.07, 3, 1, 1), u(-0.06, 0.06, 3, 1, 1)
    x = x * gain + offset + u(-0.05, 0.05, 1, 1, 1)
    x = x + u(0.0, 0.05, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def _shift(x: torch.Tensor, gen: torch.Generator, max_px: int = 3) -> torch.Tensor:
    """Translate each image by up to max_px: generated objects sit a little off their
    nominal spots. Positions are 16 px apart, so 3 px (+ the renderer's 2.6 px jitter)
    stays clear of the boundary halfway between two positions."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_px,) * 4, mode="replicate")  # background is flat grey
    dx, dy = (torch.randint(0, 2 * max_px + 1, (n,), generator=gen) for _ in range(2))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _soften(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Down- then up-sample a random half of the batch (JPEG / decoder-like softness)."""
    pick = torch.rand(x.shape[0], generator=gen) < 0.5
    if not pick.any():
        return x
    size = int(torch.randint(24, 48, (1,), generator=gen))
    small = F.interpolate(x[pick], size=(size, size), mode="bilinear", antialias=True)
    x = x.clone()
    x[pick] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (sigma 0 leaves it unchanged)."""
    n, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


# ----------------------------------------------------------------------------- training


def train_judge(steps: int = 1200, seed: int = 0, batch_size: int = 128,
                num_items: int = 9000, lr: float = 3e-3, width: int = 32, hidden: int = 96,
                bf16: bool = True, log: Callable[[str], None] | None = None,
                off_grid_items: int = 6000) -> ShapesJudge:
    """Train a judge from scratch on real renders with augmentation (CPU, a few minutes):
    `num_items` scenes as the data draws them, and `off_grid_items` single objects
    anywhere (`render_off_grid`)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels, _ = render_labelled(num_items, seed, "train")
    if off_grid_items:
        free, free_labels, _ = render_off_grid(off_grid_items, seed)
        images = torch.cat([images, free])
        labels = {k: torch.cat([labels[k], free_labels[k]]) for k in HEADS}
    judge = ShapesJudge(width=width, hidden=hidden)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    # One-cycle: a short warm-up, then cosine decay to zero, so a fixed step count is enough.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    return fit_heads(judge, lambda idx: images[idx], labels, HEADS,
                     lambda out, target: F.cross_entropy(out, target, ignore_index=IGNORE),
                     opt, sched, steps, batch_size, gen, bf16, log)


def fit_heads(judge: nn.Module, inputs: Callable[[torch.Tensor], torch.Tensor],
              labels: dict[str, torch.Tensor], heads: Sequence[str],
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], opt, sched,
              steps: int, batch_size: int, gen: torch.Generator, bf16: bool = True,
              log: Callable[[str], None] | None = None) -> nn.Module:
    """The judges' training loop: random batches of `inputs(idx)` with augmentation, the
    sum of `loss_fn` over the heads, one optimizer and schedule step each; eval mode after."""
    judge.train()
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(next(iter(labels.values()))), (batch_size,), generator=gen)
        x = augment(inputs(idx), gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = judge(x)
        loss = sum(loss_fn(logits[k].float(), labels[k][idx]) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s")
    return judge.eval()


# ----------------------------------------------------------------------------- accuracy


def judge_accuracy(judge: ShapesJudge, n: int = 1000, seed: int = 1234,
                   augmented: bool = False, image_size: int = IMAGE_SIZE,
                   off_grid: bool = False) -> dict[str, float]:
    """Per-attribute accuracy on fresh real images (a seed the judge never trained on).

    colour / shape / size: per object, slot by slot (so objects judged on the wrong side
    count as wrong). position: per scene; a single object's position class, or for two
    objects the layout (side by side vs stacked). `augmented` judges degraded copies;
    `image_size` renders at another size (the judge resizes to its own); `off_grid`
    judges single objects anywhere instead (`render_off_grid`; position = nearest spot)."""
    images, labels, _ = (render_off_grid(n, seed, image_size) if off_grid
                         else render_labelled(n, seed, "val", image_size))
    if augmented:
        images = augment(images, torch.Generator().manual_seed(seed))
    return attribute_accuracy(judge, images, labels)


def attribute_accuracy(judge: ShapesJudge, images: torch.Tensor,
                       labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """judge_accuracy's scoring for any images with known labels (e.g. VAE round trips
    of real renders: how faithfully a VAE keeps what the prompts talk about)."""
    n = images.shape[0]
    pred = predict(judge, images)
    single = labels["layout"] == 0
    layout_ok = pred["layout"] == labels["layout"]
    acc = {}
    for attr in ("color", "shape", "size"):
        ok_a = layout_ok & (pred[f"{attr}_a"] == labels[f"{attr}_a"])
        ok_b = layout_ok & (pred[f"{attr}_b"] == labels[f"{attr}_b"])
        correct = ok_a.sum() + ok_b[~single].sum()
        acc[attr] = float(correct) / float(n + (~single).sum())
    pos_ok = torch.where(single, layout_ok & (pred["position"] == labels["position"]), layout_ok)
    acc["position"] = float(pos_ok.float().mean())
    return acc


def scene_accuracy(judge: ShapesJudge, n: int = 1000, seed: int = 1234) -> float:
    """Fraction of fresh real images whose whole judged scene is right."""
    images, _, scenes = render_labelled(n, seed, "val")
    judged = judge_images(judge, images)
    return sum(_same_scene(j, s) for j, s in zip(judged, scenes)) / n


def _same_scene(judged: Scene, truth: Scene) -> bool:
    judged, truth = canonical_scene(judged), canonical_scene(truth)
    if len(truth.objects) == 2:  # judged two-object positions follow from the layout
        return judged.relation == truth.relation and all(
            (a.color, a.shape, a.size) == (b.color, b.shape, b.size)
            for a, b in zip(judged.objects, truth.objects)) and len(judged.objects) == 2
    return judged == truth


# ----------------------------------------------------------------------------- files


def default_weights_path() -> Path:
    return Path(str(importlib.resources.files("ldmkit.evaluation") / "judge.safetensors"))


def save_judge(judge: ShapesJudge, path: str | Path, meta: dict) -> None:
    """Weights as safetensors, and beside them a JSON file with the architecture + meta."""
    path = Path(path)
    save_tensors_atomic(path, judge.state_dict())
    write_json_atomic(path.with_suffix(".json"), {"architecture": judge.config, **meta})


def load_judge(path: str | Path | None = None) -> ShapesJudge:
    """The shipped judge (or one at `path`), ready to judge; never unpickles anything."""
    path = Path(path) if path else default_weights_path()
    meta = read_json(path.with_suffix(".json"), "judge metadata")
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise UserError(f"{path.with_suffix('.json')}: missing 'architecture'")
    judge = ShapesJudge(**arch)
    load_state_into(judge, path)
    return judge.eval()


def judge_parameters(judge: ShapesJudge) -> int:
    return sum(math.prod(p.shape) for p in judge.parameters())
