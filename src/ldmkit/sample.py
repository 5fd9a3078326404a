"""`ldmkit sample`: prompt -> DIR/0000.png ... + grid.png, optionally the denoising frames."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

from ldmkit.devices import resolve_device
from ldmkit.diffusion.registry import HEADLINE
from ldmkit.models.text import PromptTruncatedWarning
from ldmkit.pipeline import TextToImagePipeline
from ldmkit.sampling_args import (
    CHUNK,
    SamplingArgs,
    SamplingArgumentError,
    check_output_dir,
    prompt_overflow,
)
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


GRID_MAX = 64  # grid.png shows at most the first 64 images


def cli_sample(args: argparse.Namespace) -> int:
    """Check every argument before any work, then generate `n` images a chunk at a time,
    writing each chunk's files as it finishes (any n runs in bounded memory)."""
    device = resolve_device(args.device)
    out = check_output_dir(args.out)
    pipe = TextToImagePipeline.from_pretrained(args.model, device)
    try:
        request = SamplingArgs(args.prompt, args.negative_prompt, args.n, args.steps,
                               args.guidance, args.sampler, args.seed,
                               args.guidance_rescale).checked(pipe.schedule.timesteps)
    except SamplingArgumentError as exc:  # name the flag as typed: --guidance, --n
        raise SamplingArgumentError(f"--{exc.field.replace('_', '-')}", exc.reason) from None
    cut = prompt_overflow(pipe.text_encoder.tokenizer, request.prompt,
                          pipe.text_encoder.max_length)
    if cut:
        print(f"ldmkit: warning: --prompt is {cut} tokens longer than the text encoder's "
              f"{pipe.text_encoder.max_length}; its tail is ignored", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(request.seed)
    kwargs = {"negative_prompt": request.negative_prompt,
              "num_inference_steps": request.steps, "guidance_scale": request.guidance,
              "sampler": request.sampler, "generator": generator,
              "guidance_rescale": request.guidance_rescale}
    grid: list = []
    with warnings.catch_warnings():  # said once above, not again for every chunk
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        for start in range(0, request.n, CHUNK):
            prompts = [request.prompt] * min(CHUNK, request.n - start)
            if args.progress and start == 0:  # the frames of the first chunk's images
                images, frames = sample_with_frames(pipe, prompts, **kwargs)
                write_progress(frames, images, out)
            else:
                images = pipe.decode(pipe.generate_latents(prompts, **kwargs))
            pil = to_pil(images)
            for i, image in enumerate(pil, start):
                save_image(image, out / f"{i:04d}.png")
            grid += pil[:GRID_MAX - len(grid)]
    save_image_grid(grid, out / "grid.png", nrow=math.ceil(math.sqrt(len(grid))))
    shown = "" if len(grid) == request.n else f" (the first {len(grid)})"
    print(f"wrote {request.n} images and grid.png{shown} to {out}")
    return 0
