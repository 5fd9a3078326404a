"""The sampler table: the one place that names the samplers and the headline setting.

The samplers' dispatch, the config, the CLI, the pipeline, the evaluation and the report
all read these names from here. Torch-free on purpose: the CLI builds its parser (the
`--sampler` choices and help) from this table, and `ldmkit --help` must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerInfo:
    """What the rest of ldmkit needs to know about one sampler."""

    function: str  # the function's name in ldmkit.diffusion.samplers
    title: str  # human name for reports and plots
    paper: str  # the algorithm it implements
    stochastic: bool  # draws fresh noise at every step whatever eta (DDIM does for eta > 0)
    # True for the ground truth: run at steps = T it is the seed's full ancestral sampler,
    # which the few-step samplers are compared against
    reference: bool = False
    default: bool = False  # the sampler used unless one is asked for (HEADLINE)
    # another sampler this one equals update for update (reports and evaluations skip it)
    same_as: str = ""


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo("sample_ddpm", "DDPM (ancestral)", "Ho et al. 2020, Algorithm 2",
                        stochastic=True, reference=True),
    "ddim": SamplerInfo("sample_ddim", "DDIM", "Song, Meng & Ermon 2021, eq. 12",
                        stochastic=False),
    "euler": SamplerInfo("sample_euler", "Euler (flow ODE)",
                         "Euler's method on dx/dt = v (rectified flow; = DDIM, eta 0)",
                         stochastic=False, same_as="ddim"),
    "dpmpp-2m": SamplerInfo("sample_dpmpp_2m", "DPM-Solver++ 2M", "Lu et al. 2022, Algorithm 2",
                            stochastic=False, default=True),
}


def _only(names: list[str], flag: str) -> str:
    """The single sampler carrying `flag`; a table marking none or several is a bug."""
    if len(names) != 1:
        raise RuntimeError(f"the sampler table must mark exactly one sampler {flag}, "
                           f"it marks {names}")
    return names[0]


def reference_sampler() -> str:
    """The ground-truth sampler's name (run it at steps = T)."""
    return _only([name for name, info in SAMPLERS.items() if info.reference], "reference")


@dataclass(frozen=True)
class SamplingSettings:
    """A sampler with its step count, guidance scale and guidance rescale."""

    sampler: str
    steps: int
    guidance: float
    guidance_rescale: float = 0.0


# The setting ldmkit samples and reports with by default: in the shapes demo, 20 steps of
# the second-order solver come within 2 points of the reference sampler's prompt fidelity
# at 1/25 of its U-Net calls.
#
# Guidance rescale (Lin et al. 2024, eq. 16, phi = 0.7 as there): the guided prediction's
# spread is pulled back towards the conditional one's, which undoes CFG's over-saturation
# (orange drawn yellow at w = 5). On the three shapes demo models (the same 400 prompts and
# noise per set, benchmarks/studies/guidance_rescale.py) it left 20 steps where they were (mean
# single 99.33 % either way, held-out +0.4, two objects -0.2) and lifted DPM-Solver++ at
# 10 steps: single +0.9, two objects +0.6, held-out pairs +3.25 points (BENCHMARKS.md,
# "Guidance rescale"). At w = 1 it changes nothing (the guided prediction is the
# conditional one).
HEADLINE = SamplingSettings(
    sampler=_only([name for name, info in SAMPLERS.items() if info.default], "default"),
    steps=20, guidance=5.0, guidance_rescale=0.7)
