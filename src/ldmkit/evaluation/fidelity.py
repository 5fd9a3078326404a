"""Prompt fidelity of a trained model on the shapes data: generate from fresh prompts,
let the judge read the attributes back, count the images that match everything the
prompt states. One entry per (prompt set, sampler, steps, guidance, guidance rescale)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldmkit.diffusion.registry import HEADLINE, SAMPLERS, reference_sampler
from ldmkit.io import write_json_atomic

PROMPT_SETS = ("single", "two", "heldout")
GUIDANCE_SWEEP = (1.0, 3.0, HEADLINE.guidance, 7.5)
PROMPT_POOL = 400
SAMPLER_STEPS = (10, 20, 50)
PROMPT_SEED = 20261125  # fresh prompts: not the training validation prompts
NOISE_SEED = 7


@dataclass(frozen=True)
class Entry:
    """One setting to evaluate: n images of a prompt set, one sampler, steps, guidance
    and guidance rescale (the headline's unless a row compares against plain CFG)."""

    prompt_set: str
    sampler: str
    steps: int
    guidance: float
    n: int
    guidance_rescale: float = HEADLINE.guidance_rescale

    def at(self, sampler: str, steps: int, guidance: float,
           guidance_rescale: float = HEADLINE.guidance_rescale) -> bool:
        return ((self.sampler, self.steps, self.guidance, self.guidance_rescale)
                == (sampler, steps, guidance, guidance_rescale))

    @classmethod
    def from_json(cls, row: dict) -> Entry:
        """The setting of an evaluation.json row (a row written before the guidance
        rescale existed has none: it ran without, at 0)."""
        return cls(**{"guidance_rescale": 0.0,
                      **{f.name: row[f.name] for f in fields(cls) if f.name in row}})

    @property
    def is_headline(self) -> bool:
        return self.at(HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance)

    @property
    def in_guidance_sweep(self) -> bool:
        """The headline sampler and steps, at any guidance."""
        return self.at(HEADLINE.sampler, HEADLINE.steps, self.guidance)

    @property
    def at_headline_guidance(self) -> bool:
        """Any sampler and steps, at the headline guidance and guidance rescale."""
        return self.at(self.sampler, self.steps, HEADLINE.guidance)

    @property
    def is_plain_cfg_headline(self) -> bool:
        """The headline sampler, steps and guidance without guidance rescale."""
        return self.at(HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, 0.0)


@dataclass(frozen=True, kw_only=True)
class FidelityRow(Entry):
    """An evaluated entry: the fraction of its images the judge found faithful."""

    fidelity: float
    seconds: float


@dataclass
class SnapshotFidelity:
    """The guidance sweep of a U-Net snapshot taken part-way through training."""

    step: int
    elapsed_s: float
    fidelity: list[FidelityRow]


@dataclass
class Evaluation:
    """What evaluation.json holds."""

    judge_accuracy: dict[str, float]
    fidelity: list[FidelityRow]
    early_checkpoint: SnapshotFidelity | None = None
    extra: dict = field(default_factory=dict)

    def headline(self) -> dict[str, float]:
        """Fidelity per prompt set at the headline setting."""
        return {r.prompt_set: r.fidelity for r in self.fidelity if r.is_headline}

    def to_json(self) -> dict:
        result = {"judge_accuracy": self.judge_accuracy,
                  "fidelity": [without_wall_times(r) for r in self.fidelity]}
        if self.early_checkpoint is not None:
            early = self.early_checkpoint
            result["early_checkpoint"] = {"step": early.step, "fidelity": [
                without_wall_times(r) for r in early.fidelity]}
        return {**result, **self.extra}

    def wall_times(self) -> dict:
        """What evaluation.json leaves out: seconds per row, for timings.json."""
        times = {"final": row_seconds(self.fidelity)}
        if self.early_checkpoint is not None:
            times["early_checkpoint"] = row_seconds(self.early_checkpoint.fidelity)
            times["early_checkpoint_elapsed_s"] = self.early_checkpoint.elapsed_s
        return times


# Wall times depend on the machine and its load; evaluation.json keeps only what the step
# budgets fix, so the same command writes the same file on any machine (same torch build)
# and the times go to timings.json.
WALL_TIME_KEYS = frozenset({"seconds", "elapsed_s"})


def without_wall_times(row) -> dict:
    return {k: v for k, v in asdict(row).items() if k not in WALL_TIME_KEYS}


def row_seconds(rows) -> list[list]:
    """[what the row measured, its wall time] per row, in evaluation.json's order."""
    return [[" ".join(f"{k}={v}" for k, v in without_wall_times(r).items()
                      if k in ("prompt_set", "sampler", "steps", "guidance",
                               "guidance_rescale")), r.seconds]
            for r in rows]


def guidance_entries(n: int, n_other: int | None = None) -> list[Entry]:
    """The CFG sweep: every prompt set at w = 1 (no guidance), 3, 5, 7.5 with the headline
    sampler and steps; n images for the headline w, n_other (default n) for the others."""
    return [Entry(s, HEADLINE.sampler, HEADLINE.steps, w,
                  n if w == HEADLINE.guidance else (n_other or n))
            for s in PROMPT_SETS for w in GUIDANCE_SWEEP]


def sampler_entries(n: int, timesteps: int, prompt_set: str = "single") -> list[Entry]:
    """Each sampler at 10, 20, 50 steps, and the reference sampler at the full T (the
    seed's sampler), at the headline guidance. A sampler that is another one under a
    second name (Euler = deterministic DDIM) is not run twice."""
    w = HEADLINE.guidance
    rows = [Entry(prompt_set, s, k, w, n) for s, info in SAMPLERS.items()
            for k in SAMPLER_STEPS if k <= timesteps and not info.same_as]
    return rows + [Entry(prompt_set, reference_sampler(), timesteps, w, n)]


def plain_cfg_entries(n: int) -> list[Entry]:
    """Every prompt set at the headline setting without guidance rescale: what the rescale
    buys, on the same prompts and noise."""
    return [Entry(s, HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, n, 0.0)
            for s in PROMPT_SETS]


def standard_entries(n_head: int, n_other: int, timesteps: int) -> list[Entry]:
    """The CFG sweep (n_head images each), the sampler rows that the sweep does not
    already hold (its headline row): n_head images for the headline sampler's other step
    counts, so "10 steps against 20" compares equally many paired images; n_other for the
    other samplers; then the headline without guidance rescale (n_head)."""
    sweep = guidance_entries(n_head, n_other)
    rows = [e for e in sampler_entries(n_other, timesteps) if not e.is_headline]
    return (sweep + [replace(e, n=n_head) if e.sampler == HEADLINE.sampler else e for e in rows]
            + plain_cfg_entries(n_head))


class FidelityEvaluator:
    """Holds the judge and the prompt sets; evaluates any pipeline on any entries."""

    def __init__(self, batch_size: int = 200, bf16: bool = True):
        from ldmkit.evaluation.judge import load_judge

        self.judge = load_judge()
        # bf16 autocast for the U-Net: ~1.3x faster sampling on this CPU (BENCHMARKS.md)
        self.batch_size, self.bf16 = batch_size, bf16
        self._prompts: dict[str, list[str]] = {}

    def prompts(self, prompt_set: str, n: int) -> list[str]:
        from ldmkit.evaluation.prompts import prompt_set as make_prompts

        # One pool per set, sliced: an entry with fewer images uses the first prompts of
        # a bigger one, so entries stay paired (same prompts, same initial noise).
        pool = self._prompts.get(prompt_set, [])
        if len(pool) < n:
            pool = self._prompts[prompt_set] = make_prompts(prompt_set, max(n, PROMPT_POOL),
                                                            PROMPT_SEED)
        return pool[:n]

    @torch.no_grad()
    def images(self, pipe, entry: Entry) -> torch.Tensor:
        """The entry's images in [-1, 1]; the same prompts and initial noise for every
        entry of a prompt set, so rows differ only by sampler, steps or guidance."""
        prompts = self.prompts(entry.prompt_set, entry.n)
        generator = torch.Generator().manual_seed(NOISE_SEED)
        out = []
        for start in range(0, len(prompts), self.batch_size):
            latents = pipe.generate_latents(prompts[start:start + self.batch_size],
                                            num_inference_steps=entry.steps,
                                            guidance_scale=entry.guidance,
                                            guidance_rescale=entry.guidance_rescale,
                                            sampler=entry.sampler, generator=generator,
                                            bf16=self.bf16)
            out.append(pipe.decode(latents))
        return torch.cat(out)

    def score(self, images: torch.Tensor, prompt_set: str) -> float:
        from ldmkit.evaluation.judge import judge_images
        from ldmkit.evaluation.prompts import fidelity

        prompts = self.prompts(prompt_set, images.shape[0])
        return float(fidelity(judge_images(self.judge, images), prompts))

    def evaluate(self, pipe, entries: list[Entry], keep_images: int = 0,
                 desc: str = "fidelity") -> tuple[list[FidelityRow], dict[Entry, torch.Tensor]]:
        """One result row per entry and, if asked, the first `keep_images` images of each
        entry for figures."""
        rows, kept = [], {}
        for entry in tqdm(entries, desc=desc, dynamic_ncols=True):
            start = time.monotonic()
            images = self.images(pipe, entry)
            rows.append(FidelityRow(**asdict(entry),
                                    fidelity=self.score(images, entry.prompt_set),
                                    seconds=round(time.monotonic() - start, 2)))
            if keep_images:
                kept[entry] = images[:keep_images]
        return rows, kept

    def judge_accuracy(self, n: int = 1000, image_size: int = 64) -> dict[str, float]:
        """On fresh real images at the size the model generates (the judge resizes)."""
        from ldmkit.evaluation.judge import judge_accuracy

        return {k: float(v) for k, v in judge_accuracy(self.judge, n=n,
                                                        image_size=image_size).items()}


def cli_evaluate(args: argparse.Namespace) -> int:
    from ldmkit.devices import resolve_device
    from ldmkit.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.model, resolve_device(args.device))
    n = 50 if args.quick else args.n
    entries = guidance_entries(n) if args.quick else \
        standard_entries(n, n, pipe.schedule.timesteps)
    evaluator = FidelityEvaluator()
    rows, _ = evaluator.evaluate(pipe, entries)
    result = Evaluation(evaluator.judge_accuracy(image_size=pipe.image_size), rows)
    out = Path(args.out) if args.out else Path(args.model) / "evaluation.json"
    write_json_atomic(out, result.to_json())
    for row in rows:
        print(f"{row.prompt_set:8s} {row.sampler:9s} steps={row.steps:4d} "
              f"w={row.guidance:<4g} fidelity={row.fidelity:.3f} (n={row.n})")
    print(f"wrote {out}")
    return 0


def with_n(entries: list[Entry], n: int, when_steps_over: int) -> list[Entry]:
    """Fewer images for entries with many steps (full-T DDPM costs 25x a 20-step run)."""
    return [replace(e, n=n) if e.steps > when_steps_over else e for e in entries]
