"""Evaluation prompts for the shapes data, and prompt fidelity.

Prompts are phrased with the dataset's own caption templates (so `parse_prompt` reads
every one), drawn from a generator of their own (so they are fresh draws, not the
training captions' sequence) and never equal to a training validation prompt.

- "single":  one object, non-held-out colour/shape; most prompts state colour and shape,
             many also size and/or position.
- "heldout": one object with a held-out colour/shape pair (never seen in training), in
             various sizes and positions; colour and shape always stated.
- "two":     two objects and a relation, colours and shapes of both (sometimes sizes),
             never a held-out pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ldmkit.config import DataConfig, TrainConfig
from ldmkit.data.shapes import (
    POSITIONS,
    SIZES,
    Scene,
    ShapeObject,
    caption_scene,
    parse_heldout,
    parse_prompt,
    sample_scene,
)
from ldmkit.errors import UserError
from ldmkit.evaluation.judge import fidelity_match

PROMPT_SETS = ("single", "two", "heldout")
_SET_CODES = {name: i for i, name in enumerate(PROMPT_SETS)}
_STREAM = 0x6576616C  # keeps these draws apart from the dataset's [seed, split, i] streams

# Caption template index -> weight (indices into shapes.ONE/TWO_OBJECT_TEMPLATES).
# One-object templates: 0 size+colour+shape+where, 1 colour+shape, 2 "a picture of" all,
# 3 tag form of all, 4 colour+shape+where, 5 size+colour+shape, 6 size+shape+where.
_SINGLE_TEMPLATES = {0: 3, 1: 2, 2: 1, 3: 1, 4: 2, 5: 2, 6: 1}
_HELDOUT_TEMPLATES = {0: 3, 1: 2, 2: 1, 3: 1, 4: 2, 5: 2}  # colour + shape always stated
# Two-object templates: 0 colours+shapes, 1 with sizes, 2 "a picture of", 3 bare, 4 inverse.
_TWO_TEMPLATES = {0: 3, 1: 2, 2: 1, 3: 1, 4: 2}


def prompt_set(name: str, n: int, seed: int = 0, heldout: Sequence[str] | None = None,
               exclude: Sequence[str] | None = None) -> list[str]:
    """`n` evaluation prompts of set `name`, the same for the same seed.

    `heldout`: the 'colour shape' pairs kept out of training (default: the data config's).
    `exclude`: prompts never to use (default: the training validation prompts)."""
    if name not in _SET_CODES:
        raise UserError(f"unknown prompt set {name!r} (known: {', '.join(PROMPT_SETS)})")
    if n < 0:
        raise UserError(f"prompt set size must be >= 0, got {n}")
    pairs = parse_heldout(DataConfig().heldout if heldout is None else heldout)
    banned = {p.lower() for p in (TrainConfig().validation_prompts if exclude is None
                                  else exclude)}
    rng = np.random.default_rng([int(seed), _SET_CODES[name], _STREAM])
    prompts: list[str] = []
    for _ in range(1000 * max(n, 1)):  # bounded: a silly `exclude` cannot hang us
        if len(prompts) == n:
            return prompts
        scene, templates = _draw(name, rng, pairs)
        text = caption_scene(scene, rng, template=_pick(templates, rng))
        if text.lower() not in banned:
            prompts.append(text)
    raise UserError(f"could not draw {n} {name!r} prompts outside the excluded ones")


def _draw(name: str, rng: np.random.Generator, pairs: frozenset[tuple[str, str]]
          ) -> tuple[Scene, dict[int, int]]:
    if name == "single":
        return sample_scene(rng, 0.0, exclude=pairs), _SINGLE_TEMPLATES
    if name == "two":
        return sample_scene(rng, 1.0, exclude=pairs), _TWO_TEMPLATES
    if not pairs:
        raise UserError("the 'heldout' prompt set needs at least one held-out pair")
    color, shape = sorted(pairs)[rng.integers(len(pairs))]
    obj = ShapeObject(color, shape, SIZES[rng.integers(len(SIZES))],
                      POSITIONS[rng.integers(len(POSITIONS))])
    return Scene((obj,), None), _HELDOUT_TEMPLATES


def _pick(weights: dict[int, int], rng: np.random.Generator) -> int:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def prompt_matches(judged: Sequence[Scene], prompts: Sequence[str]) -> list[bool]:
    """Per image: does its judged scene show everything its prompt states?"""
    if len(judged) != len(prompts):
        raise ValueError(f"{len(judged)} judged scenes for {len(prompts)} prompts")
    return [fidelity_match(parse_prompt(p), s) for s, p in zip(judged, prompts)]


def fidelity(judged: Sequence[Scene], prompts: Sequence[str]) -> float:
    """Prompt fidelity: the fraction of images whose judged attributes match everything
    the prompt states (every attribute of every object, and the relation)."""
    matches = prompt_matches(judged, prompts)
    return sum(matches) / len(matches) if matches else 0.0
