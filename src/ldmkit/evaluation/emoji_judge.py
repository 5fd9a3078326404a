"""The emoji judge: a small CNN that reads an emoji's identity, category and subcategory
off a 64x64 image, so generated emoji can be scored (evaluation/emoji_fidelity.py).

Trained on the real images of every emoji (both vendors, every skin tone, the held-out
emoji too: the judge measures, it is not the model under test) with the shapes judge's
augmentation (shifts, softening, blur, colour jitter, noise), because what it reads are
VAE decodes of samples. Its penultimate features also give `fd_judge`, a Fréchet distance
between generated and real images in a space that knows emoji. How far to trust it is
measured across vendors (trained on one vendor's artwork, tested on the other's):
scripts/train_emoji_judge.py writes that into emoji_judge.json beside the weights.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.errors import UserError
from ldmkit.evaluation.judge import fit_heads
from ldmkit.io import load_state_into, read_json, save_tensors_packed_atomic, write_json_atomic
from ldmkit.models.layers import group_norm

IMAGE_SIZE = 64
HEADS = ("identity", "category", "subcategory")


@dataclass(frozen=True)
class Classes:
    """The judge's label tables: identity i is emoji `base[i]` named `names[i]`, of
    category `categories[category_of[i]]` and subcategory `subcategories[...]`."""

    base: list[str]
    names: list[str]
    categories: list[str]
    subcategories: list[str]
    category_of: list[int]
    subcategory_of: list[int]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Classes:
        """From metadata.jsonl rows (data/emoji.py): one identity per base emoji."""
        first = {}
        for r in rows:
            first.setdefault(r["base"], r)
        bases = sorted(first)
        cats = sorted({first[b]["category"] for b in bases})
        subs = sorted({first[b]["subcategory"] for b in bases})
        return cls(bases, [_base_name(first[b]) for b in bases], cats, subs,
                   [cats.index(first[b]["category"]) for b in bases],
                   [subs.index(first[b]["subcategory"]) for b in bases])

    def sizes(self) -> dict[str, int]:
        return {"identity": len(self.base), "category": len(self.categories),
                "subcategory": len(self.subcategories)}

    def labels(self, bases: list[str]) -> dict[str, torch.Tensor]:
        """Targets of every head for images of these base emoji."""
        index = {b: i for i, b in enumerate(self.base)}
        ids = torch.tensor([index[b] for b in bases])
        return {"identity": ids, "category": torch.tensor(self.category_of)[ids],
                "subcategory": torch.tensor(self.subcategory_of)[ids]}

    def to_json(self) -> dict:
        return {"base": self.base, "names": self.names, "categories": self.categories,
                "subcategories": self.subcategories, "category_of": self.category_of,
                "subcategory_of": self.subcategory_of}


def _base_name(row: dict) -> str:
    """The base emoji's name from any of its rows (a tone variant's name minus its tone)."""
    name, tone = row["name"], row.get("skin_tone", "")
    for sep in (": ", ", "):
        if tone and name.endswith(sep + tone):
            return name[: -len(sep + tone)]
    return name


# ----------------------------------------------------------------------------- model


class EmojiJudge(nn.Module):
    """Two 3x3 convs per resolution, 64 -> 32 -> 16 -> 8 -> 4 px, then a linear layer over
    the flattened 4x4 map (where a part sits tells emoji apart) to `hidden` features, and
    one linear head per label table over those features."""

    def __init__(self, sizes: dict[str, int], width: int = 32, hidden: int = 256):
        super().__init__()
        self.config = {"sizes": dict(sizes), "width": width, "hidden": hidden}
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), group_norm(cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), group_norm(cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(0.2),
                                nn.Linear(chans[-1] * 16, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in sizes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def judge_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] (or uint8) at the judge's 64x64."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"judge expects images (N, 3, H, W), got {tuple(images.shape)}")
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    x = x.clamp(-1, 1)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    return x


@dataclass
class Reading:
    """What the judge read off a batch of images."""

    logits: dict[str, torch.Tensor]
    features: torch.Tensor

    def top(self, head: str, k: int = 1) -> torch.Tensor:
        return self.logits[head].topk(k, dim=1).indices


@torch.no_grad()
def read(judge: EmojiJudge, images: torch.Tensor, batch_size: int = 256) -> Reading:
    judge.eval()
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in judge.heads}
    feats = []
    for chunk in judge_input(images).split(batch_size):
        h = judge.features(chunk)
        feats.append(h)
        for k, head in judge.heads.items():
            logits[k].append(head(h))
    return Reading({k: torch.cat(v) for k, v in logits.items()}, torch.cat(feats))


# ----------------------------------------------------------------------------- training


def train_emoji_judge(images: torch.Tensor, labels: dict[str, torch.Tensor],
                      sizes: dict[str, int], steps: int = 600, batch_size: int = 128,
                      lr: float = 3e-3, seed: int = 0, width: int = 32, hidden: int = 256,
                      log: Callable[[str], None] | None = None) -> EmojiJudge:
    """From scratch on uint8 images (N, 3, 64, 64) with augmentation, bf16 autocast."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    judge = EmojiJudge(sizes, width, hidden)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    # the identity head carries the task; category heads are its coarse views
    return fit_heads(judge, lambda idx: judge_input(images[idx]), labels, HEADS,
                     lambda out, target: F.cross_entropy(out, target, label_smoothing=0.1),
                     opt, sched, steps, batch_size, gen, log=log)


# ----------------------------------------------------------------------------- accuracy


def accuracy(judge: EmojiJudge, images: torch.Tensor, labels: dict[str, torch.Tensor]
             ) -> dict[str, float]:
    """identity top-1 / top-5, category and subcategory accuracy on labelled images."""
    r = read(judge, images)
    ids = labels["identity"][:, None]
    return {"identity_top1": _mean(r.top("identity") == ids),
            "identity_top5": _mean((r.top("identity", 5) == ids).any(1)),
            "category": _mean(r.top("category")[:, 0] == labels["category"]),
            "subcategory": _mean(r.top("subcategory")[:, 0] == labels["subcategory"])}


def _mean(x: torch.Tensor) -> float:
    return round(float(x.float().mean()), 4)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), as FID does
    with Inception features; here the judge's. Square roots by symmetric eigensolves."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm(cov_a)
    cross = _sqrtm(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross.trace()
    return round(float(value.clamp_min(0)), 3)


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


# ----------------------------------------------------------------------------- files


def default_weights_path() -> Path:
    return Path(str(importlib.resources.files("ldmkit.evaluation") / "emoji_judge.safetensors"))


def save_emoji_judge(judge: EmojiJudge, classes: Classes, path: str | Path, meta: dict) -> None:
    """Weights as float16 safetensors (half the size; the judge reads the same), packed
    as `path`.xz (lossless; keeps the shipped file under 5 MB), and beside them a JSON
    file with the architecture, the label tables and `meta`."""
    path = Path(path)
    save_tensors_packed_atomic(path, {k: v.half() for k, v in judge.state_dict().items()})
    write_json_atomic(path.with_suffix(".json"), {"architecture": judge.config, **meta,
                                                  "classes": classes.to_json()})


def load_emoji_judge(path: str | Path | None = None) -> tuple[EmojiJudge, Classes]:
    """The shipped judge (or one at `path`) and its label tables; never unpickles."""
    path = Path(path) if path else default_weights_path()
    meta = read_json(path.with_suffix(".json"), "emoji judge metadata")
    if not isinstance(meta.get("architecture"), dict) or "classes" not in meta:
        raise UserError(f"{path.with_suffix('.json')}: missing 'architecture' or 'classes'")
    judge = EmojiJudge(**meta["architecture"])
    load_state_into(judge, path)
    return judge.eval(), Classes(**meta["classes"])


def judge_parameters(judge: EmojiJudge) -> int:
    return sum(math.prod(p.shape) for p in judge.parameters())
