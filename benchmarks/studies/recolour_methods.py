# Question: can a published editing method that is not plain SDEdit recolour a picture on the
# shapes demo model while keeping its shape and place (issue 28's img2img bar, 90 %)?
# Answer: BENCHMARKS.md "Editing pictures"; results/recolour_methods.json
"""Two editing methods beyond SDEdit on editing.py's 200 img2img cases (a render of one
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

DDPM posterior on the 20-step grid, w as given, guidance rescale 0.7, fixed seeds.

    .venv/bin/python benchmarks/studies/recolour_methods.py runs/demo/model
    -> benchmarks/results/recolour_methods.json, recolour_methods.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # editing.py: the same cases
import torch  # noqa: E402
from editing import N, img2img_cases, recolour_counts  # noqa: E402

from benchlib import DEMO_MODEL, RESULTS_DIR, machine_info  # noqa: E402
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
        ("prompt-to-prompt", None, 0.8, 10.0)]
FIGURE_RUNS = ("inversion, mask > 0.25, strength 0.7, w 10",
               "prompt-to-prompt, mask none, strength 0.8, w 5")  # the best of each kind
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


@torch.no_grad()
def inversion_edit(pipe, known, prompts, sources, strength, w, mask=None,
                   maps: CrossAttentionMaps | None = None) -> torch.Tensor:
    levels = pipe.schedule.sampling_levels(STEPS)
    first = start_index(STEPS, strength)
    g = torch.Generator().manual_seed(0)
    xs = [lv.alpha * known + lv.sigma * torch.randn(known.shape, generator=g)
          for lv in levels[first:STEPS]] + [known]
    source, s_null = pipe.conditioning(sources)
    target, t_null = pipe.conditioning(prompts)
    d_source = pipe.denoiser(source, s_null, 1.0)
    d_target = pipe.denoiser(target, t_null, w, HEADLINE.guidance_rescale)
    if mask is not None:
        d_target = KnownRegion(d_target, pipe.schedule, known, mask)
    x = xs[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for k, i in enumerate(range(first, STEPS)):
            t = torch.full((len(known),), levels[i].t)
            if maps is not None:
                maps.start("record")
            mean, std = posterior(xs[k], d_source(xs[k], t)[0].float(), levels[i], levels[i + 1])
            z = (xs[k + 1] - mean) / std if std else 0.0
            if maps is not None:
                maps.start("inject" if k < P2P_FRACTION * (STEPS - first) else None)
            mean, std = posterior(x, d_target(x, t)[0].float(), levels[i], levels[i + 1])
            x = mean + std * z
    return x


def prompt_to_prompt(pipe, known, prompts, sources, strength, w) -> torch.Tensor:
    from ldmkit.models import layers

    maps, original = CrossAttentionMaps(), layers.Attention.forward
    layers.Attention.forward = exposing_attention(maps)
    try:
        return inversion_edit(pipe, known, prompts, sources, strength, w, maps=maps)
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
    rows, figure_rows = {}, {}
    for method, threshold, strength, w in RUNS:
        mask = None if threshold is None else diffedit_mask(pipe, known, prompts, sources,
                                                            threshold)
        if method == "diffedit":
            latents = diffedit_edit(pipe, known, prompts, strength, w, mask)
        elif method == "inversion":
            latents = inversion_edit(pipe, known, prompts, sources, strength, w, mask)
        else:
            latents = prompt_to_prompt(pipe, known, prompts, sources, strength, w)
        key = (f"{method}, mask {'none' if threshold is None else f'> {threshold:g}'}, "
               f"strength {strength:g}, w {w:g}")
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
    main()
