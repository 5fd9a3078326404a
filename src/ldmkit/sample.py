"""`ldmkit sample`: prompt -> DIR/0000.png ... + grid.png, optionally the denoising frames."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ldmkit.diffusion.registry import HEADLINE
from ldmkit.errors import UserError
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.viz import save_gif, save_image, save_image_grid, save_strip, to_pil


class FrameRecorder:
    """A sampler callback keeping the x0 estimate at `count` evenly spaced steps, so the
    progressive denoising can be shown (decoded later, off the sampling loop)."""

    def __init__(self, total_steps: int, count: int = 8):
        count = max(1, min(count, total_steps))
        self.keep = {round(i * (total_steps - 1) / max(count - 1, 1)) for i in range(count)}
        self.frames: list[tuple[int, torch.Tensor]] = []

    def __call__(self, step: int, t: int, x_t: torch.Tensor, x0_hat: torch.Tensor) -> None:
        if step in self.keep:
            self.frames.append((int(t), x0_hat.detach().cpu().clone()))


def sample_with_frames(pipe: TextToImagePipeline, prompts: list[str], frames: int = 8,
                       **kwargs) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Images in [-1, 1] plus decoded (t, images) frames of the x0 estimate along the way."""
    recorder = FrameRecorder(kwargs.get("num_inference_steps", HEADLINE.steps), frames)
    latents = pipe.generate_latents(prompts, callback=recorder, **kwargs)
    decoded = [(t, pipe.decode(x0)) for t, x0 in recorder.frames]
    return pipe.decode(latents), decoded


def write_progress(frames: list[tuple[int, torch.Tensor]], final: torch.Tensor,
                   out: Path, stem: str = "progress", scale: int | None = None) -> None:
    """One strip PNG (rows = images, columns = steps) and one GIF of the first image."""
    columns = [imgs for _, imgs in frames] + [final]
    labels = [f"t={t}" for t, _ in frames] + ["final"]
    n = final.shape[0]
    tiles = [columns[c][i] for i in range(n) for c in range(len(columns))]
    save_image_grid(torch.stack(tiles), out / f"{stem}.png", nrow=len(columns),
                    captions=labels * n, scale=scale)
    save_strip(torch.stack([col[0] for col in columns]), out / f"{stem}_0.png", labels, scale)
    save_gif(torch.stack([col[0] for col in columns]), out / f"{stem}.gif")


def cli_sample(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    pipe = TextToImagePipeline.from_pretrained(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    kwargs = {"negative_prompt": args.negative_prompt, "num_inference_steps": args.steps,
              "guidance_scale": args.guidance, "sampler": args.sampler,
              "generator": generator, "guidance_rescale": args.guidance_rescale}
    prompts = [args.prompt] * args.n
    if args.progress:
        images, frames = sample_with_frames(pipe, prompts, **kwargs)
        write_progress(frames, images, out)
    else:
        images = pipe.decode(pipe.generate_latents(prompts, **kwargs))
    pil = to_pil(images)
    for i, image in enumerate(pil):
        save_image(image, out / f"{i:04d}.png")
    save_image_grid(pil, out / "grid.png", nrow=math.ceil(math.sqrt(args.n)))
    print(f"wrote {args.n} images and grid.png to {out}")
    return 0
