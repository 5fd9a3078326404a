"""Which schedule a training objective runs on: the one place that turns `[diffusion]` or a
model folder's scheduler.json into a schedule object and the network's parameterisation.

    objective "eps" | "v"  -> NoiseSchedule (DDPM, cosine or linear), prediction eps | v
    objective "flow"       -> FlowSchedule (rectified flow), prediction "flow" (velocity)

Everything downstream (the training step, CFG, the samplers, the pipeline) takes the pair
(schedule, prediction) and never asks which it got.
"""

from __future__ import annotations

from ldmkit.config import DiffusionConfig
from ldmkit.diffusion.flow import FlowSchedule
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import UserError

OBJECTIVES = ("eps", "v", "flow")

Schedule = NoiseSchedule | FlowSchedule


def make_schedule(cfg: DiffusionConfig) -> Schedule:
    """The schedule `[diffusion]` trains with."""
    if cfg.objective == "flow":
        return FlowSchedule(cfg.timesteps, cfg.flow_shift, cfg.t_sampling, cfg.logit_mean,
                            cfg.logit_std)
    return NoiseSchedule(cfg.schedule, cfg.timesteps)


def scheduler_dict(schedule: Schedule, prediction: str, x0_clamp: float) -> dict:
    """What a model folder's scheduler.json holds. DDPM folders keep the keys 0.1 wrote
    (kind, timesteps, prediction), so older readers still load them."""
    return {**schedule.to_dict(), "objective": prediction, "prediction": prediction,
            "x0_clamp": x0_clamp}


def schedule_from_dict(data: dict, source: str = "scheduler.json") -> tuple[Schedule, str]:
    """(schedule, prediction) from scheduler.json. Folders written before flow matching
    have no "objective": theirs is their "prediction" (eps when absent, as 0.1 wrote)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(data).__name__}")
    objective = data.get("objective", data.get("prediction", "eps"))
    if objective not in OBJECTIVES:
        raise UserError(f"{source}: objective = {objective!r} is not one of "
                        f"{', '.join(OBJECTIVES)}")
    if objective == "flow":
        return FlowSchedule.from_dict(data, source), "flow"
    return NoiseSchedule.from_dict(data, source), objective
