"""Image I/O and preprocessing with PIL and numpy (torchvision is not available here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldmkit.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadImageError(UserError):
    """An image file that cannot be used. `reason` is one of REASONS; `path` names the file."""

    MISSING = "missing"
    NOT_AN_IMAGE = "not an image"
    TRUNCATED = "truncated"
    UNREADABLE = "unreadable"
    REASONS = (MISSING, NOT_AN_IMAGE, TRUNCATED, UNREADABLE)

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def load_image(path: str | Path) -> Image.Image:
    """Fully decode an image as RGB, so truncation is found here and not mid-training."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, BadImageError.MISSING)
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: a truncated file raises OSError here
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except UnidentifiedImageError:
        raise BadImageError(path, BadImageError.NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = BadImageError.TRUNCATED if "truncated" in str(exc).lower() else \
            BadImageError.UNREADABLE
        raise BadImageError(path, reason, str(exc)) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Transparent pixels go on white, as a viewer would show them, not on black."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (antialiased LANCZOS), then the centred size x size square.

    Cropping and resizing in one `resize(box=...)` call keeps sub-pixel accuracy and lets
    PIL use `reducing_gap` (a fast box reduction before the filter) on large photos.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    if (w, h) == (size, size):
        return img.copy()
    return img.resize((size, size), Image.LANCZOS, box=box, reducing_gap=3.0)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB uint8 image -> float32 tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Inverse of pil_to_tensor for one image (3, H, W) in [-1, 1]."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())
