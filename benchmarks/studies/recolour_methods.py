# Question: can a published editing method that is not plain SDEdit recolour a picture on the
# shapes demo model while keeping its shape and place (issue 28's img2img bar, 90 %)?
# Answer: BENCHMARKS.md "Editing pictures"; results/recolour_methods.json
"""Three editing methods beyond SDEdit on editing.py's 200 img2img cases (a render of one
object, prompted "a <other colour> <its shape>"), read by the shipped judge. Prototypes for a
question, not library features: they reuse the pipeline's denoiser, schedule and inpainting.

- **DiffEdit** (Couairon et al. 2023): a mask from where the noise predictions under the
  target prompt and the source prompt ("a <old colour> <shape>") differ, at strength 0.5
  over 10 noise draws, normalised per picture and thresholded; then inpainting under that
  mask (the kept latents held, one feathered cell) at the run's strength.
- **Edit-friendly DDPM inversion** (Huberman-Spiegelglas et al. 2024): the picture noised
  independently to every level of the run, the DDPM noise that would carry each level to
  the next under the source prompt solved for, then the target prompt's ancestral sampler
  run with exactly that noise. Optionally under a DiffEdit mask too.
- **Prompt-to-prompt** (Hertz et al. 2023) on that inversion: for the first half of the
  run's steps the target pass uses the source pass's cross-attention maps (the new words
  go where the old ones went); `Attention.forward` is swapped for one that exposes them.
  Optionally with its **local blend**: the source pass's attention to the object's words
  (colour and shape), averaged over its steps, thresholded into a mask; after each step the
  state outside it is put back on the source's path. A tight mask for the first part of
  the run (where the place is decided) and a looser one after (so the object's rim can
  take the new colour) did better than one mask.

DDPM posterior on the 20-step grid, w as given, guidance rescale 0.7, fixed seeds.

    .venv/bin/python benchmarks/studies/recolour_methods.py runs/demo/model
    -> benchmarks/results/recolour_methods.json, recolour_methods.png
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # editing.py: the same cases
import torch  # noqa: E402
from editing import N, img2img_cases, recolour_counts  # noqa: E402

from benchlib import DEMO_MODEL, RESULTS_DIR, machine_info, run_study  # noqa: E402
from ldmkit.data.shapes import with_articles  # noqa: E402
from ldmkit.diffusion.editing import KnownRegion, start_index  # noqa: E402
from ldmkit.diffusion.registry import HEADLINE  # noqa: E402

STEPS = 20
MASK_STRENGTH, MASK_DRAWS = 0.5, 10
# (method, mask threshold or None, strength, w)
RUNS = [("diffedit", 0.5, 0.8, 10.0), ("diffedit", 0.25, 0.8, 10.0),
        ("diffedit", 0.25, 0.7, 10.0), ("diffedit", 0.1, 0.8, 10.0),
        ("inversion", None, 0.6, 10.0), ("inversion", None, 0.7, 10.0),
        ("inversion", None, 0.8, 5.0), ("inversion", None, 0.8, 10.0),
        ("inversion", 0.5, 0.8, 10.0), ("inversion", 0.25, 0.8, 10.0),
        ("inversion", 0.25, 0.7, 10.0),
        ("prompt-to-prompt", None, 0.7, 10.0), ("prompt-to-prompt", None, 0.8, 5.0),
        ("prompt-to-prompt", None, 0.8, 10.0),
        # local blend: (tight threshold, loose threshold, switch) on word_attention
        ("prompt-to-prompt", (0.4, 0.4, 0.0), 0.8, 10.0),
        ("prompt-to-prompt", (0.6, 0.3, 0.75), 0.8, 10.0),
        ("prompt-to-prompt", (0.6, 0.3, 0.75), 0.8, 20.0),
        ("prompt-to-prompt", (0.7, 0.3, 0.5), 0.7, 20.0)]
FIGURE_RUNS = ("inversion, mask > 0.25, strength 0.7, w 10",
               "prompt-to-prompt, mask none, strength 0.8, w 5",
               "prompt-to-prompt, blend > 0.6 then > 0.3 from 0.75, strength 0.8, w 20")
P2P_FRACTION = 0.5  # of the run's steps that take the source's cross-attention maps


class CrossAttentionMaps:
    """While `mode` is "record", every cross-attention call keeps its maps (in call order);
    while "inject", the conditional rows take the recorded maps instead (the
    unconditional rows of a [uncond; cond] guided batch keep their own)."""

    def __init__(self):
        self.mode, self.maps, self.calls = None, [], 0

    def start(self, mode: str | None) -> None:
        self.mode, self.calls = mode, 0
        if mode == "record":
            self.maps = []

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        if self.mode == "record":
            self.maps.append(probs)
        elif self.mode == "inject":
            source = self.maps[self.calls]
            self.calls += 1
            n = len(source)
            probs = torch.cat([probs[:n], source]) if len(probs) == 2 * n else source
        return probs


def exposing_attention(maps: CrossAttentionMaps):
    """A replacement for layers.Attention.forward: the same maths with the softmax spelled
    out, its cross-attention probabilities passed through `maps`."""
    def forward(self, x, context=None, context_mask=None):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        source = tokens if context is None else context
        q, k, v = (self._heads(p(s)) for p, s in
                   ((self.to_q, tokens), (self.to_k, source), (self.to_v, source)))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if context is not None and context_mask is not None:
            logits = logits.masked_fill(~context_mask.bool()[:, None, None, :], float("-inf"))
        probs = logits.float().softmax(-1).to(v.dtype)
        if context is not None:
            probs = maps(probs)
        out = (probs @ v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.to_out(out).transpose(1, 2).reshape(b, c, h, w)
    return forward


@torch.no_grad()
def diffedit_mask(pipe, known, prompts, sources, threshold: float) -> torch.Tensor:
    """Latent masks (n, 1, h, w): 1 where the target and source predictions differ most,
    one feathered ring of cells around it (as the library's masks)."""
    target, _ = pipe.conditioning(prompts)
    source, _ = pipe.conditioning(sources)
    d_target, d_source = pipe.denoiser(target, target, 1.0), pipe.denoiser(source, source, 1.0)
    level = pipe.schedule.sampling_levels(STEPS)[start_index(STEPS, MASK_STRENGTH)]
    t = torch.full((len(known),), level.t)
    g = torch.Generator().manual_seed(1)
    diff = 0.0
    for _ in range(MASK_DRAWS):
        x = level.alpha * known + level.sigma * torch.randn(known.shape, generator=g)
        diff = diff + (d_target(x, t)[1] - d_source(x, t)[1]).abs().mean(1, keepdim=True)
    hard = (diff / diff.amax(dim=(2, 3), keepdim=True) > threshold).float()
    return torch.maximum(hard, 0.5 * torch.nn.functional.max_pool2d(hard, 3, 1, 1))


def posterior(x, x0, hi, lo) -> tuple[torch.Tensor, float]:
    """DDPM's q(x_lo | x_hi, x0): (mean, std) for the path x = alpha x0 + sigma eps."""
    if lo.sigma == 0:
        return x0, 0.0
    ratio = hi.alpha / lo.alpha
    var = hi.sigma**2 - ratio**2 * lo.sigma**2
    mean = (ratio * lo.sigma**2 / hi.sigma**2) * x + (lo.alpha * var / hi.sigma**2) * x0
    return mean, math.sqrt(var * lo.sigma**2 / hi.sigma**2)


@dataclass
class Inversion:
    """An edit-friendly inversion: the picture noised independently to each level of the
    run (then the picture itself), the DDPM noise that carries each level to the next under
    the source prompt, and the source pass's cross-attention maps of each step (if kept)."""

    first: int
    xs: list[torch.Tensor]
    zs: list
    maps: list


@torch.no_grad()
def invert(pipe, known, sources, strength, maps: CrossAttentionMaps | None = None) -> Inversion:
    levels = pipe.schedule.sampling_levels(STEPS)
    first = start_index(STEPS, strength)
    g = torch.Generator().manual_seed(0)
    xs = [lv.alpha * known + lv.sigma * torch.randn(known.shape, generator=g)
          for lv in levels[first:STEPS]] + [known]
    source, s_null = pipe.conditioning(sources)
    d_source = pipe.denoiser(source, s_null, 1.0)
    zs, kept = [], []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for k, i in enumerate(range(first, STEPS)):
            if maps is not None:
                maps.start("record")
            t = torch.full((len(known),), levels[i].t)
            mean, std = posterior(xs[k], d_source(xs[k], t)[0].float(), levels[i], levels[i + 1])
            zs.append((xs[k + 1] - mean) / std if std else 0.0)
            kept.append(None if maps is None else maps.maps)
    return Inversion(first, xs, zs, kept)


@dataclass
class LocalBlend:
    """Prompt-to-prompt's local blend: after each step, outside a mask the state is put back
    on the source's path (the picture noised to that level). A `tight` mask for the first
    `switch` of the steps, where the place is decided; a `loose` one after."""

    tight: torch.Tensor
    loose: torch.Tensor
    switch: float

    def mask(self, progress: float) -> torch.Tensor:
        return self.tight if progress < self.switch else self.loose


def word_attention(pipe, sources, words, inversion: Inversion, size: int) -> torch.Tensor:
    """(n, 1, size, size): how much the source pass attended to each picture's object words,
    summed over the words, averaged over heads, steps and the finest cross-attention layers
    (4x4 cells on the demo model), upsampled, each picture's maximum 1."""
    tokenizer = pipe.text_encoder.tokenizer
    positions = [[j for j, token in enumerate(tokenizer.convert_ids_to_tokens(
        tokenizer(text)["input_ids"])) if token in said] for text, said in zip(sources, words)]
    finest = max(probs.shape[2] for step in inversion.maps for probs in step)
    side = math.isqrt(finest)
    total = 0.0
    for probs in (p for step in inversion.maps for p in step if p.shape[2] == finest):
        words_map = torch.stack([probs[b, :, :, where].sum(-1).mean(0)
                                 for b, where in enumerate(positions)]).float()
        total = total + torch.nn.functional.interpolate(
            words_map.view(-1, 1, side, side), size=(size, size), mode="bilinear",
            align_corners=False)
    return total / total.amax(dim=(2, 3), keepdim=True)


@torch.no_grad()
def edit_inverted(pipe, inversion: Inversion, prompts, w, known, mask=None,
                  maps: CrossAttentionMaps | None = None,
                  blend: LocalBlend | None = None) -> torch.Tensor:
    """The target prompt's ancestral sampler run with the inversion's noise; with `maps`,
    the source's cross-attention maps for the first P2P_FRACTION of the steps."""
    levels = pipe.schedule.sampling_levels(STEPS)
    target, t_null = pipe.conditioning(prompts)
    d_target = pipe.denoiser(target, t_null, w, HEADLINE.guidance_rescale)
    if mask is not None:
        d_target = KnownRegion(d_target, pipe.schedule, known, mask)
    xs, steps = inversion.xs, STEPS - inversion.first
    x = xs[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for k, i in enumerate(range(inversion.first, STEPS)):
            if maps is not None:
                maps.maps = inversion.maps[k]
                maps.start("inject" if k < P2P_FRACTION * steps else None)
            t = torch.full((len(known),), levels[i].t)
            mean, std = posterior(x, d_target(x, t)[0].float(), levels[i], levels[i + 1])
            x = mean + std * inversion.zs[k]
            if blend is not None:
                x = xs[k + 1] + blend.mask(k / steps) * (x - xs[k + 1])
    return x


def inversion_edit(pipe, known, prompts, sources, strength, w, mask=None) -> torch.Tensor:
    return edit_inverted(pipe, invert(pipe, known, sources, strength), prompts, w, known, mask)


def prompt_to_prompt(pipe, known, prompts, sources, words, strength, w,
                     blend: tuple[float, float, float] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents, the local blend's last mask or None); `blend` = (tight threshold, loose
    threshold, switch) on word_attention."""
    from ldmkit.models import layers

    maps, original = CrossAttentionMaps(), layers.Attention.forward
    layers.Attention.forward = exposing_attention(maps)
    try:
        inversion = invert(pipe, known, sources, strength, maps)
        local = None
        if blend is not None:
            attention = word_attention(pipe, sources, words, inversion, known.shape[-1])
            tight, loose, switch = blend
            local = LocalBlend((attention > tight).float(), (attention > loose).float(), switch)
        latents = edit_inverted(pipe, inversion, prompts, w, known, maps=maps, blend=local)
        return latents, None if local is None else local.loose
    finally:
        layers.Attention.forward = original


@torch.no_grad()
def diffedit_edit(pipe, known, prompts, strength, w, mask) -> torch.Tensor:
    first = start_index(STEPS, strength)
    level = pipe.schedule.sampling_levels(STEPS)[first]
    noise = pipe.initial_noise(len(known), torch.Generator().manual_seed(0))
    cond, uncond = pipe.conditioning(prompts)
    return pipe.denoise(level.alpha * known + level.sigma * noise, cond, uncond, STEPS, w,
                        HEADLINE.sampler, guidance_rescale=HEADLINE.guidance_rescale,
                        bf16=True, start=first, known=(known, mask))


def mask_name(threshold) -> str:
    if threshold is None:
        return "mask none"
    if isinstance(threshold, tuple):
        tight, loose, switch = threshold
        return (f"blend > {loose:g}" if switch == 0 else
                f"blend > {tight:g} then > {loose:g} from {switch:g}")
    return f"mask > {threshold:g}"


FIGURE_COLUMNS = 8


def figure_of(pictures, prompts, figure_rows, path: Path) -> Path:
    """The first pictures with their prompts, then the best run of each method below."""
    from ldmkit.edit_inputs import fit_image
    from ldmkit.viz import save_image_grid

    first = torch.stack([fit_image(p, p.size[0]) for p in pictures[:FIGURE_COLUMNS]])
    rows, captions = [first], list(prompts[:FIGURE_COLUMNS])
    for key in FIGURE_RUNS:
        rows.append(figure_rows[key])
        captions += [key] + [""] * (FIGURE_COLUMNS - 1)
    save_image_grid(torch.cat(rows), path, nrow=FIGURE_COLUMNS, captions=captions, scale=4)
    return path


def main() -> None:
    from ldmkit.edit_inputs import fit_image
    from ldmkit.editing import edited_images
    from ldmkit.evaluation.judge import load_judge
    from ldmkit.io import write_json_atomic
    from ldmkit.pipeline import TextToImagePipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, nargs="?", default=DEMO_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "recolour_methods.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.model, "cpu")
    judge = load_judge()
    pictures, scenes, colours, prompts = img2img_cases(N, pipe.image_size)
    sources = [with_articles(f"a {s.objects[0].color} {s.objects[0].shape}") for s in scenes]
    known = pipe.encode_images(torch.stack([fit_image(p, pipe.image_size) for p in pictures]))
    words = [{s.objects[0].color, s.objects[0].shape} for s in scenes]
    rows, figure_rows = {}, {}
    for method, threshold, strength, w in RUNS:
        if method == "prompt-to-prompt":  # its threshold is the local blend's, or None
            latents, mask = prompt_to_prompt(pipe, known, prompts, sources, words, strength,
                                             w, threshold)
        else:
            mask = None if threshold is None else diffedit_mask(pipe, known, prompts,
                                                                sources, threshold)
            if method == "diffedit":
                latents = diffedit_edit(pipe, known, prompts, strength, w, mask)
            else:
                latents = inversion_edit(pipe, known, prompts, sources, strength, w, mask)
        key = f"{method}, {mask_name(threshold)}, strength {strength:g}, w {w:g}"
        images = edited_images(pipe, latents, known, mask)
        rows[key] = recolour_counts(judge, images, scenes, colours)
        figure_rows[key] = images[:FIGURE_COLUMNS]
        if mask is not None:
            rows[key]["mask_cells"] = round(float((mask == 1).float().mean()), 3)
        print(f"{key}: {rows[key]}", flush=True)
    figure = figure_of(pictures, prompts, figure_rows, args.out.with_suffix(".png"))
    write_json_atomic(args.out, {"machine": machine_info(), "model": str(args.model), "n": N,
                                 "steps": STEPS, "guidance_rescale": HEADLINE.guidance_rescale,
                                 "runs": rows})
    print(f"wrote {args.out} and {figure}")


if __name__ == "__main__":
    run_study(main)
