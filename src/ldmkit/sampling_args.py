"""The checks on sampling arguments: one set, used by `ldmkit sample`, the Python API
(`TextToImagePipeline.generate_latents` / `__call__`) and the server (`ldmkit serve`).

Each check refuses a bad value with a `SamplingArgumentError` naming the field in the
caller's own words (`guidance` on the command line and in the HTTP API, `guidance_scale`
in Python), so the CLI exits 2 and the server answers 422 with that field, instead of a
traceback or an all-black image. Torch-free, like the sampler registry it reads.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
from ldmkit.errors import UserError

# Images per sampler call. More images than this are generated this many at a time, so any
# n runs in bounded memory; at least the evaluation's batch (200), so its images are
# unchanged by the chunking.
CHUNK = 256
# Guidance past this only saturates images (the demo's headline is 5; its sweep stops at
# 7.5); far larger values overflow the latents to inf.
GUIDANCE_MAX = 100.0
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes any 64-bit value; keep it signed


class SamplingArgumentError(UserError, ValueError):
    """A sampling argument out of range; `field` names it as the caller spelled it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


class NonFiniteOutputError(UserError):
    """The sampler or the decoder produced NaN or inf: refused rather than shown as a black
    image."""


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_guidance(value: object, field: str = "guidance") -> float:
    """A finite scale in [0, GUIDANCE_MAX] (0 = unconditional, 1 = conditional only)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingArgumentError(field, f"must be a number, got {value!r:.40}")
    if not math.isfinite(value) or not 0.0 <= value <= GUIDANCE_MAX:
        raise SamplingArgumentError(field, f"must be a finite number in 0..{GUIDANCE_MAX:g}, "
                                    f"got {value}")
    return float(value)


def check_guidance_rescale(value: object, field: str = "guidance_rescale") -> float:
    """Lin et al.'s phi: a finite blend weight in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise SamplingArgumentError(field, f"must be a finite number in 0..1, got {value!r:.40}")
    return float(value)


def check_eta(value: object, field: str = "eta") -> float:
    """DDIM's eta: finite and >= 0 (0 = deterministic, 1 = ancestral)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0:
        raise SamplingArgumentError(field, f"must be a finite number >= 0, got {value!r:.40}")
    return float(value)


def check_strength(value: object, field: str = "strength") -> float:
    """img2img / inpainting strength: finite, in [0, 1] (0 = the picture back through the
    VAE, 1 = from pure noise, as text-to-image)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise SamplingArgumentError(field, f"must be a finite number in 0..1, got {value!r:.40}")
    return float(value)


RESAMPLE_MAX = 20  # RePaint's own setting is 9 extra passes (U = 10); more only costs


def check_resample(value: object, field: str = "resample_steps") -> int:
    """RePaint's extra passes per inpainting step: an integer in 0..RESAMPLE_MAX."""
    if not _is_int(value) or not 0 <= value <= RESAMPLE_MAX:
        raise SamplingArgumentError(field, f"must be an integer in 0..{RESAMPLE_MAX}, "
                                    f"got {value!r:.40}")
    return int(value)


def check_steps(value: object, timesteps: int, field: str = "steps") -> int:
    """Denoising steps within the schedule: 1..T."""
    if not _is_int(value) or not 1 <= value <= timesteps:
        raise SamplingArgumentError(field, f"must be an integer in 1..{timesteps} (the "
                                    f"model's schedule has T = {timesteps}), got {value!r:.40}")
    return int(value)


def check_count(value: object, field: str = "n", limit: int | None = None) -> int:
    """How many images: >= 1, and at most `limit` where the caller sets one (the server)."""
    if not _is_int(value) or value < 1:
        raise SamplingArgumentError(field, f"must be an integer >= 1, got {value!r:.40}")
    if limit is not None and value > limit:
        raise SamplingArgumentError(field, f"must be at most {limit} per request, got {value}")
    return int(value)


def check_sampler(value: object, field: str = "sampler") -> str:
    """A name from the sampler table."""
    if value not in SAMPLERS:
        raise SamplingArgumentError(field, f"{value!r:.40} is not one of {', '.join(SAMPLERS)}")
    return str(value)


def check_seed(value: object, field: str = "seed") -> int:
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise SamplingArgumentError(field, f"must be an integer in 0..2**63-1, got {value!r:.40}")
    return int(value)


def check_prompt(value: object, field: str = "prompt", max_chars: int | None = None) -> str:
    """A string (empty = unconditional). Over-long prompts are truncated to the text
    encoder's window with a warning (`prompt_overflow`); `max_chars` only bounds the work
    of tokenizing what a client sends."""
    if not isinstance(value, str):
        raise SamplingArgumentError(field, f"must be a string, got {type(value).__name__}")
    if max_chars is not None and len(value) > max_chars:
        raise SamplingArgumentError(field, f"must be at most {max_chars} characters, "
                                    f"got {len(value)}")
    return value


def prompt_overflow(tokenizer, prompt: str, max_length: int) -> int:
    """How many tokens of `prompt` the text encoder will cut (0 if it fits)."""
    ids = tokenizer(prompt, truncation=False, verbose=False)["input_ids"]
    return max(0, len(ids) - max_length)


def check_output_dir(path: str | Path, field: str = "--out") -> Path:
    """A folder to write images into: existing, or creatable. Refuses a path naming a file,
    a path under a file, and a folder that cannot be written, before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SamplingArgumentError(field, f"{path} is an existing file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise SamplingArgumentError(field, f"cannot create {path}: {existing} is a file")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise SamplingArgumentError(field, f"cannot write into {existing} (permission denied)")
    return path


@dataclass(frozen=True)
class SamplingArgs:
    """One generation request as the CLI and the server take it."""

    prompt: str
    negative_prompt: str | None = None
    n: int = 1
    steps: int = HEADLINE.steps
    guidance: float = HEADLINE.guidance
    sampler: str = HEADLINE.sampler
    seed: int = 0
    guidance_rescale: float = HEADLINE.guidance_rescale

    def checked(self, timesteps: int, max_n: int | None = None,
                max_prompt_chars: int | None = None) -> SamplingArgs:
        """These arguments with every field checked (and normalised to plain types)."""
        negative = self.negative_prompt
        return replace(
            self,
            prompt=check_prompt(self.prompt, "prompt", max_prompt_chars),
            negative_prompt=None if negative is None else check_prompt(
                negative, "negative_prompt", max_prompt_chars),
            n=check_count(self.n, "n", max_n),
            steps=check_steps(self.steps, timesteps),
            guidance=check_guidance(self.guidance),
            sampler=check_sampler(self.sampler),
            seed=check_seed(self.seed),
            guidance_rescale=check_guidance_rescale(self.guidance_rescale))
