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
    pipe = _adapted(TextToImagePipeline.from_pretrained(args.model, device), args)
    try:
        request = SamplingArgs(args.prompt, args.negative_prompt, args.n, args.steps,
                               args.guidance, args.sampler, args.seed,
                               args.guidance_rescale).checked(pipe.schedule.timesteps)
    except SamplingArgumentError as exc:  # name the flag as typed: --guidance, --n
        raise SamplingArgumentError(f"--{exc.field.replace('_', '-')}", exc.reason) from None
    warn_if_cut(pipe, "--prompt", request.prompt)
    edit = _edit_inputs(args, pipe)  # checked, like everything, before anything is written
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
            if edit is not None:
                images = _edited(pipe, prompts, edit, kwargs, out if args.progress and
                                 start == 0 else None)
            elif args.progress and start == 0:  # the frames of the first chunk's images
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


def warn_if_cut(pipe: TextToImagePipeline, flag: str, text: str) -> None:
    """Say on stderr when the text encoder will cut `text` (the flag's value)."""
    encoder = pipe.text_encoder
    cut = prompt_overflow(encoder.tokenizer, text, encoder.max_length)
    if cut:
        print(f"ldmkit: warning: {flag} is {cut} tokens longer than the text encoder's "
              f"{encoder.max_length}; its tail is ignored", file=sys.stderr)


# ----------------------------------------------------------------------------- edits, adapters

EDIT_FLAGS = {"image": "--init-image", "mask": "--mask", "strength": "--strength",
              "resample_steps": "--resample-steps", "mask_feather": "--mask-feather",
              "source_prompt": "--source-prompt"}


def _adapted(pipe: TextToImagePipeline, args: argparse.Namespace) -> TextToImagePipeline:
    """--vae (another decoder of the same latents) and --lora / --lora-scale / --merge."""
    pipe = with_decoder(pipe, getattr(args, "vae", None))
    if getattr(args, "lora", None):
        load_adapter(pipe, args.lora, args.lora_scale, args.merge)
    elif getattr(args, "merge", False):
        raise SamplingArgumentError("--merge", "merges a LoRA adapter: give --lora DIR")
    return pipe


def with_decoder(pipe: TextToImagePipeline, vae_dir: str | None) -> TextToImagePipeline:
    """The pipeline with the VAE folder's model (`--vae`; ldmkit sample and ldmkit serve),
    or as it is for None."""
    if not vae_dir:
        return pipe
    from ldmkit.models.vae import AutoencoderKL

    return pipe.with_vae(AutoencoderKL.from_pretrained(vae_dir, pipe.device))


def load_adapter(pipe: TextToImagePipeline, directory: str, scale: float, merge: bool) -> None:
    """The adapter at `scale` (flag names in errors), merged into the weights if asked
    (ldmkit sample and ldmkit serve)."""
    try:
        pipe.load_lora(directory, scale)
    except SamplingArgumentError as exc:
        raise SamplingArgumentError("--lora-scale", exc.reason) from None
    if merge:
        pipe.merge_lora()


def _edit_inputs(args: argparse.Namespace, pipe: TextToImagePipeline):
    """The checked --init-image / --mask / --strength, or None for text-to-image."""
    from ldmkit.edit_inputs import ImageResizedWarning
    from ldmkit.editing import prepare_edit

    if args.init_image is None and args.mask is None and args.strength is None:
        for flag in ("resample_steps", "mask_feather"):  # no edit: nothing they apply to
            if getattr(args, flag) != {"resample_steps": 0, "mask_feather": 1}[flag]:
                raise SamplingArgumentError(EDIT_FLAGS[flag], "applies to --init-image")
        if args.source_prompt is not None:
            raise SamplingArgumentError("--source-prompt", "describes --init-image: give it")
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ImageResizedWarning)
        edit = prepare_edit(args.init_image, args.mask, 1, pipe.image_size, args.strength,
                            args.resample_steps, args.mask_feather, fields=EDIT_FLAGS,
                            source_prompt=args.source_prompt)
    for warning in caught:
        print(f"ldmkit: warning: {warning.message}", file=sys.stderr)
    if edit.source_prompt is not None:  # what the run would refuse, refused first
        from ldmkit.layout_edit import blend_positions, check_layout_model

        encoder = pipe.text_encoder
        try:
            check_layout_model(pipe)
            blend_positions(encoder.tokenizer, edit.source_prompt, None, encoder.max_length)
        except SamplingArgumentError as exc:
            raise SamplingArgumentError("--source-prompt", exc.reason) from None
        warn_if_cut(pipe, "--source-prompt", edit.source_prompt)
    return edit


def _edited(pipe: TextToImagePipeline, prompts: list[str], edit, kwargs: dict,
            progress_dir: Path | None) -> torch.Tensor:
    """The chunk's edited images; with `progress_dir`, also its frames."""
    from ldmkit.diffusion.editing import steps_run

    rows = edit.repeat(len(prompts))
    recorder = None
    if progress_dir is not None:
        recorder = FrameRecorder(max(1, steps_run(kwargs["num_inference_steps"],
                                                  edit.strength)))
    images = pipe.edit_images(prompts, rows, callback=recorder, **kwargs)
    if recorder is not None:
        write_progress([(t, pipe.decode(x0)) for t, x0 in recorder.frames], images,
                       progress_dir)
    return images
