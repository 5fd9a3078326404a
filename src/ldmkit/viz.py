"""Pictures for people: captioned image grids, denoising strips and GIFs, loss curves.

Everything here takes PIL images or tensors in [-1, 1] (the models' range) and writes files
atomically, so a crash never leaves a half-written PNG behind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldmkit.errors import UserError
from ldmkit.io import atomic_write

Images = torch.Tensor | Sequence[Image.Image] | Image.Image

_PAD = 2  # pixels between tiles
_MIN_CAPTION_WIDTH = 120  # tiny tiles get a wider cell so captions stay readable
_BG = (255, 255, 255)
_TEXT = (20, 20, 20)


# ----------------------------------------------------------------------------- conversion


def to_pil(images: Images) -> list[Image.Image]:
    """A tensor (N,3,H,W) or (3,H,W) in [-1, 1], or PIL image(s), as a list of RGB images."""
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (N,3,H,W), got {tuple(images.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arr]
    return [im.convert("RGB") for im in images]


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than a line is cut by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ayg|")[1::2]
    return bottom - top + 3


# ----------------------------------------------------------------------------- grids


DISPLAY_PX = 128  # small images are upscaled (NEAREST) to at least this for viewing


def display_scale(size: int) -> int:
    """The integer upscale that shows a `size`-pixel image at >= DISPLAY_PX (64 -> 2, 32 -> 4)."""
    return max(1, -(-DISPLAY_PX // max(1, size)))


def _upscaled(tiles: list[Image.Image], scale: int | None) -> list[Image.Image]:
    """Every tile `scale`x larger (NEAREST: pixels stay crisp); None = display_scale."""
    scale = display_scale(max(t.width for t in tiles)) if scale is None else max(1, int(scale))
    if scale == 1:
        return tiles
    return [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]


def image_grid(images: Images, nrow: int, captions: Sequence[str] | None = None,
               scale: int | None = None) -> Image.Image:
    """Tiles `nrow` images per row, each upsampled `scale`x (NEAREST; None = display_scale)
    with its caption below."""
    tiles = to_pil(images)
    if not tiles:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"{len(captions)} captions for {len(tiles)} images")
    tiles = _upscaled(tiles, scale)
    nrow = max(1, min(int(nrow), len(tiles)))
    tile_w = max(t.width for t in tiles)
    tile_h = max(t.height for t in tiles)
    font = _font()
    cell_w = max(tile_w, _MIN_CAPTION_WIDTH) if captions is not None else tile_w
    wrapped = [_wrap(c, font, cell_w - 2) for c in captions] if captions is not None else None
    text_h = max(len(w) for w in wrapped) * _line_height(font) + 2 if wrapped else 0
    cell_h = tile_h + text_h
    rows = math.ceil(len(tiles) / nrow)
    grid = Image.new("RGB", (nrow * (cell_w + _PAD) + _PAD, rows * (cell_h + _PAD) + _PAD), _BG)
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x0 = _PAD + (i % nrow) * (cell_w + _PAD)
        y0 = _PAD + (i // nrow) * (cell_h + _PAD)
        grid.paste(tile, (x0 + (cell_w - tile.width) // 2, y0))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x0 + 1, y0 + tile_h + 1 + j * _line_height(font)), line, fill=_TEXT,
                      font=font)
    return grid


def _save_pil(image: Image.Image, path: str | Path, **params) -> None:
    """Atomic save; the format comes from the real suffix since the temp file has none."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown image file extension {path.suffix!r}")
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **params))


def save_image(image: Image.Image, path: str | Path) -> None:
    """Save one PIL image atomically (format from the suffix)."""
    _save_pil(image, path)


def save_image_grid(images: Images, path: str | Path, nrow: int,
                    captions: Sequence[str] | None = None, scale: int | None = None) -> None:
    _save_pil(image_grid(images, nrow, captions, scale), path)


def save_strip(frames: Images, path: str | Path, labels: Sequence[str] | None = None,
               scale: int | None = None) -> None:
    """Progressive denoising frames side by side in one row, each with its label."""
    frames = to_pil(frames)
    _save_pil(image_grid(frames, nrow=len(frames), captions=labels, scale=scale), path)


def save_gif(frames: Images, path: str | Path, duration_ms: int = 120,
             scale: int | None = None) -> None:
    """An animated GIF of the frames, looping, holding the last frame a little longer."""
    frames = to_pil(frames)
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    frames = _upscaled(frames, scale)
    durations = [duration_ms] * (len(frames) - 1) + [max(duration_ms, 1000)]
    _save_pil(frames[0], path, save_all=True, append_images=frames[1:], duration=durations,
              loop=0)


# ----------------------------------------------------------------------------- loss curves


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """One JSON object per line; a torn last line (a run killed mid-write) is skipped."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise UserError(f"{path}: metrics file not found")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[key]) for r in rows
             if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))
             and math.isfinite(r[key])]
    if not pairs:
        return np.empty(0), np.empty(0)
    steps, values = map(np.asarray, zip(*pairs))
    return steps.astype(float), values.astype(float)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over `window` points (truncated at the ends), so the curve does not lag."""
    if window <= 1 or len(values) == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(len(values))
    lo = np.maximum(0, idx - window // 2)
    hi = np.minimum(len(values), idx - window // 2 + window)
    return (csum[hi] - csum[lo]) / (hi - lo)


def plot_metrics(metrics_jsonl: str | Path, keys: Sequence[str], out_png: str | Path,
                 title: str, log_y: bool = True, smooth: int = 0) -> None:
    """One panel per key against "step": the raw curve faint, a moving average on top.

    smooth: moving-average window in logged points; 0 picks about 1/25 of the run, 1 = raw only.
    A log axis is used only where every value is positive.
    """
    plt = _pyplot()
    rows = read_metrics(metrics_jsonl)
    series = {k: _series(rows, k) for k in keys}
    series = {k: v for k, v in series.items() if len(v[0])}
    if not series:
        raise UserError(f"{metrics_jsonl}: no values for {', '.join(keys)} to plot")
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), sharex=True,
                             squeeze=False)
    for ax, (key, (steps, values)) in zip(axes[:, 0], series.items()):
        window = smooth if smooth > 0 else max(1, len(values) // 25)
        ax.plot(steps, values, color="tab:blue", alpha=0.3 if window > 1 else 1.0,
                linewidth=0.8, label=key)
        if window > 1:
            ax.plot(steps, moving_average(values, window), color="tab:blue", linewidth=1.6,
                    label=f"{key} (mean of {window})")
        if log_y and np.all(values > 0):
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    _save_figure(fig, out_png)


def _pyplot():
    """matplotlib's pyplot on the file-only backend (imported late: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        out = Path(path)
        atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix.lstrip(".") or "png",
                                                  dpi=110))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- fidelity plots
# Rows are evaluation rows (ldmkit.evaluation.fidelity.FidelityRow): anything with
# prompt_set, sampler, steps, guidance and fidelity attributes.


def plot_fidelity_vs_steps(rows: Sequence, out_png: str | Path, samplers: Sequence[str],
                           full_steps: int, reference: str, title: str) -> None:
    """One line per sampler over its step counts; the reference sampler at the full T
    (`full_steps`) as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in samplers:
        pts = sorted((r.steps, r.fidelity) for r in rows
                     if r.sampler == sampler and r.steps < full_steps)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sampler)
    full = [r for r in rows if r.sampler == reference and r.steps == full_steps]
    if full:
        ax.axhline(full[0].fidelity, color="grey", ls="--",
                   label=f"{reference}, full T={full_steps}")
    ax.set(xscale="log", xlabel="sampling steps", ylabel="prompt fidelity (single objects)",
           title=title, ylim=(0, 1.02))
    ax.legend()
    _save_figure(fig, out_png)


def plot_fidelity_vs_guidance(sweeps: Sequence[tuple[str, Sequence]], out_png: str | Path,
                              title: str) -> None:
    """Fidelity against the guidance scale, a line per prompt set; one line style per
    (label, rows) sweep, e.g. the final model solid and an early snapshot dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, rows), style in zip(sweeps, ("-", ":", "--", "-.")):
        for i, prompt_set in enumerate(dict.fromkeys(r.prompt_set for r in rows)):
            pts = sorted((r.guidance, r.fidelity) for r in rows if r.prompt_set == prompt_set)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                    color=f"C{i}", label=f"{prompt_set}, {label}")
    ax.set(xlabel="guidance scale w", ylabel="prompt fidelity", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=7)
    _save_figure(fig, out_png)
