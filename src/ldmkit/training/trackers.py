"""Experiment trackers through Accelerate: `train.report_to = ["tensorboard"]`, `["wandb"]`
(offline unless WANDB_MODE says otherwise), both, or none (the default). metrics.jsonl and
the PNG plots are written either way; a tracker gets the same numbers, live:

    train/loss (and a VAE's recon, kl, ... terms), train/lr, train/grad_norm,
    train/images_per_s                           every train.log_every updates
    validation/samples          the U-Net's validation-prompt grid   every train.sample_every
    validation/reconstructions  a VAE's held-out originals over their reconstructions

Only the main process logs (Accelerate creates the trackers there alone). A resumed run
continues the same run: TensorBoard purges the events an interrupted run logged after its
last checkpoint (they are about to be redone), W&B resumes the run id kept in the run
folder's trackers.json. The packages are optional extras: `pip install 'ldmkit[tensorboard]'`
or `'ldmkit[wandb]'`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldmkit.errors import ConfigError
from ldmkit.io import read_json, write_json_atomic

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
STATE_FILE = "trackers.json"  # the W&B run id, so a resumed run continues it


def check_available(report_to: list[str]) -> None:
    """Refuse a tracker whose package is missing before any training starts."""
    for name in report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"train.report_to = {report_to}: {name!r} needs the "
                              f"{PACKAGES[name]} package: pip install 'ldmkit[{name}]'")


def accelerator_kwargs(report_to: list[str], out_dir: Path) -> dict:
    """What `make_accelerator` needs to carry the trackers (nothing when there are none).
    TensorBoard writes under OUT/logs/<stage>/."""
    if not report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    check_available(report_to)
    return {"log_with": list(report_to),
            "project_config": ProjectConfiguration(project_dir=str(out_dir),
                                                   logging_dir=str(Path(out_dir) / "logs"))}


def flat_config(cfg: Any) -> dict[str, Any]:
    """section.key -> value, lists as JSON text: what every tracker's config view takes."""
    return {f"{section}.{key}": json.dumps(value) if isinstance(value, list) else value
            for section, values in cfg.to_dict().items() for key, value in values.items()}


class Trackers:
    """The run's trackers, or a no-op when train.report_to is empty."""

    def __init__(self, accelerator, cfg: Any, out_dir: Path, stage: str, resume_step: int):
        self.acc, self.names = accelerator, list(cfg.train.report_to)
        if not self.names:
            return
        kwargs = {}
        if "tensorboard" in self.names and resume_step:
            kwargs["tensorboard"] = {"purge_step": resume_step + 1}
        if "wandb" in self.names:
            kwargs["wandb"] = self._wandb_kwargs(out_dir, stage, resume_step)
        accelerator.init_trackers(stage, init_kwargs=kwargs)
        if accelerator.is_main_process and not resume_step:
            self._store_config(flat_config(cfg))

    def _wandb_kwargs(self, out_dir: Path, stage: str, resume_step: int) -> dict:
        state_path = Path(out_dir) / STATE_FILE
        state = read_json(state_path, "tracker state") if state_path.exists() else {}
        run_id = state.get(f"wandb_{stage}") if resume_step else None
        if run_id is None and self.acc.is_main_process:
            run_id = secrets.token_hex(4)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_json_atomic(state_path, {**state, f"wandb_{stage}": run_id})
        return {"mode": os.environ.get("WANDB_MODE", "offline"), "dir": str(out_dir),
                "id": run_id, "resume": "allow", "name": f"{Path(out_dir).name}-{stage}"}

    def _store_config(self, config: dict) -> None:
        for name in self.names:
            tracker = self.acc.get_tracker(name, unwrap=True)
            if name == "tensorboard":  # as text: add_hparams would add a run per start
                tracker.add_text("config", "\n".join(f"    {k} = {v}"
                                                     for k, v in config.items()), 0)
            else:
                tracker.config.update(config, allow_val_change=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.names:
            self.acc.log({f"train/{k}": float(v) for k, v in values.items()}, step=step)

    def image(self, step: int, name: str, image) -> None:
        """One picture (a PIL image or an HWC uint8 array) under validation/<name>."""
        if not self.names or not self.acc.is_main_process:
            return
        pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        for tracker_name in self.names:
            tracker = self.acc.get_tracker(tracker_name)
            if tracker_name == "tensorboard":
                tracker.log_images({f"validation/{name}": pixels[None]}, step=step,
                                   dataformats="NHWC")
            else:
                tracker.log_images({f"validation/{name}": [pixels]}, step=step)

    def close(self) -> None:
        if self.names:
            self.acc.end_training()


def grad_norm_value(norm: torch.Tensor | float | None) -> dict[str, float]:
    """{"grad_norm": value} when the step measured one (train.grad_clip > 0), else {}."""
    return {} if norm is None else {"grad_norm": float(norm)}
