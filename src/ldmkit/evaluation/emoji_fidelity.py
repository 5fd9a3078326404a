"""How well a model trained on the emoji data draws what it is asked for, read back by the
emoji judge (evaluation/emoji_judge.py). One row per guidance scale, at the headline
sampler and steps:

- identity_top1 / top5: prompts are names of emoji the model trained on; does the judge
  read the prompted emoji back (first, or among its five best guesses)?
- heldout_category / subcategory: prompts are names of held-out emoji, never trained on
  ("peach"); does the image come out in the right category (food & drink) and
  subcategory (food-fruit)?
- fd_judge: Fréchet distance between the judge's features of the identity images and of
  the real images of the same emoji (both vendors); lower is closer to real.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ldmkit.diffusion.registry import HEADLINE
from ldmkit.evaluation.emoji_judge import Classes, EmojiJudge, frechet_distance, read
from ldmkit.evaluation.fidelity import row_seconds, without_wall_times

GUIDANCE_SWEEP = (1.0, 3.0, HEADLINE.guidance)
NOISE_SEED = 7
# the headline identity is read again from these initial noises too (the same 200 prompts):
# evaluation.json's identity_top1_by_noise_seed, the spread a single run's number hides
EXTRA_NOISE_SEEDS = (8, 9)
PROMPT_SEED = 20261126
# Images per held-out emoji, each from its own noise. There are only 186 held-out emoji: one
# image each leaves a 95 % interval of about +-7 points around a 60 % category rate, wider
# than the differences runs are compared by (one image each, two runs read 62.9 and 59.1 %;
# four each, 61.8 and 61.4 %). Three: about +-4, for ~50 s more of generation on 2 cores.
HELDOUT_IMAGES = 3


@dataclass(frozen=True)
class EmojiRow:
    """One guidance scale's scores."""

    sampler: str
    steps: int
    guidance: float
    identity_top1: float
    identity_top5: float
    heldout_category: float
    heldout_subcategory: float
    fd_judge: float
    n_identity: int
    n_heldout: int
    seconds: float


@dataclass
class EmojiEvaluation:
    """What evaluation.json holds: the headline row's numbers at the top level, every row
    under "guidance_sweep", and what the numbers rest on (VAE, judge, real-image FD)."""

    vae_psnr: float
    rows: list[EmojiRow]
    judge: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def headline(self) -> EmojiRow:
        return next(r for r in self.rows if r.guidance == HEADLINE.guidance)

    def to_json(self) -> dict:
        head = self.headline()
        top = {k: getattr(head, k) for k in ("identity_top1", "identity_top5",
                                              "heldout_category", "heldout_subcategory",
                                              "fd_judge")}
        return {"vae_psnr": self.vae_psnr, **top,
                "setting": {"sampler": head.sampler, "steps": head.steps,
                            "guidance": head.guidance,
                            "guidance_rescale": HEADLINE.guidance_rescale},
                "guidance_sweep": [without_wall_times(r) for r in self.rows],
                "judge": self.judge, **self.extra}

    def wall_times(self) -> dict:
        """What evaluation.json leaves out: seconds per row, for timings.json."""
        return {"final": row_seconds(self.rows)}


@dataclass
class PromptSets:
    """The prompts and their truths: trained emoji for identity, held-out for category."""

    identity: list[str]
    identity_labels: dict[str, torch.Tensor]
    heldout: list[str]
    heldout_labels: dict[str, torch.Tensor]
    real: torch.Tensor  # uint8 real images of the identity prompts' emoji (both vendors)


def prompt_sets(classes: Classes, trained: list[dict], heldout: list[dict],
                real_images: dict[str, torch.Tensor], n_identity: int) -> PromptSets:
    """`trained` / `heldout`: metadata rows of the images the model did / did not train
    on; prompts are base emoji (no skin tone), named as in the captions. `real_images`
    maps a row's file_name to its image (uint8)."""
    trained_bases = sorted({r["base"] for r in trained if r["unified"] == r["base"]})
    rng = random.Random(PROMPT_SEED)
    picked = rng.sample(trained_bases, min(n_identity, len(trained_bases)))
    # HELDOUT_IMAGES rounds of all held-out emoji: the first round draws the noise that one
    # image per emoji would
    held = sorted({r["base"] for r in heldout if r["unified"] == r["base"]}) * HELDOUT_IMAGES
    name = dict(zip(classes.base, classes.names))
    picked_set = set(picked)
    real = [real_images[r["file_name"]] for r in trained
            if r["base"] in picked_set and r["unified"] == r["base"]]
    return PromptSets([name[b] for b in picked], classes.labels(picked),
                      [name[b] for b in held], classes.labels(held), torch.stack(real))


@torch.no_grad()
def generate(pipe, prompts: list[str], guidance: float, batch_size: int = 200,
             bf16: bool = True, noise_seed: int = NOISE_SEED) -> torch.Tensor:
    """Images in [-1, 1] at the headline sampler and steps, from the same initial noise
    for every call (bf16 autocast for the U-Net: faster on CPUs, BENCHMARKS.md)."""
    generator = torch.Generator().manual_seed(noise_seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        latents = pipe.generate_latents(prompts[start:start + batch_size],
                                        num_inference_steps=HEADLINE.steps,
                                        guidance_scale=guidance, sampler=HEADLINE.sampler,
                                        guidance_rescale=HEADLINE.guidance_rescale,
                                        generator=generator, bf16=bf16)
        out.append(pipe.decode(latents))
    return torch.cat(out)


class EmojiEvaluator:
    """Generates each prompt set at each guidance scale (the same noise every time) and
    lets the judge score it."""

    def __init__(self, judge: EmojiJudge, sets: PromptSets, batch_size: int = 200,
                 bf16: bool = True):
        self.judge, self.sets = judge, sets
        self.batch_size, self.bf16 = batch_size, bf16
        self.real_features = read(judge, sets.real).features

    def evaluate(self, pipe, guidances=GUIDANCE_SWEEP, keep: int = 0
                 ) -> tuple[list[EmojiRow], dict[float, torch.Tensor]]:
        """A row per guidance scale and, if asked, the first `keep` identity images of
        each (for figures)."""
        s, rows, kept = self.sets, [], {}
        for w in tqdm(guidances, desc="emoji evaluation", dynamic_ncols=True):
            start = time.monotonic()
            ident = generate(pipe, s.identity, w, self.batch_size, self.bf16)
            held = generate(pipe, s.heldout, w, self.batch_size, self.bf16)
            r_id, r_held = read(self.judge, ident), read(self.judge, held)
            truth = s.identity_labels["identity"][:, None]
            rows.append(EmojiRow(
                HEADLINE.sampler, HEADLINE.steps, w,
                identity_top1=_mean(r_id.top("identity") == truth),
                identity_top5=_mean((r_id.top("identity", 5) == truth).any(1)),
                heldout_category=_mean(r_held.top("category")[:, 0]
                                       == s.heldout_labels["category"]),
                heldout_subcategory=_mean(r_held.top("subcategory")[:, 0]
                                          == s.heldout_labels["subcategory"]),
                fd_judge=frechet_distance(r_id.features, self.real_features),
                n_identity=len(s.identity), n_heldout=len(s.heldout),
                seconds=round(time.monotonic() - start, 1)))
            if keep:
                kept[w] = ident[:keep]
        return rows, kept


    def identity_by_noise_seed(self, pipe, rows: list[EmojiRow],
                               seeds: tuple[int, ...] = EXTRA_NOISE_SEEDS) -> list[float]:
        """Headline identity top-1 from NOISE_SEED (the headline row's) and each of `seeds`."""
        truth = self.sets.identity_labels["identity"][:, None]
        found = [next(r for r in rows if r.guidance == HEADLINE.guidance).identity_top1]
        for seed in seeds:
            images = generate(pipe, self.sets.identity, HEADLINE.guidance, self.batch_size,
                              self.bf16, noise_seed=seed)
            found.append(_mean(read(self.judge, images).top("identity") == truth))
        return found


def _mean(x: torch.Tensor) -> float:
    return round(float(x.float().mean()), 4)
