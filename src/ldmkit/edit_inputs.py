"""The picture and mask an edit starts from, checked at the edge (Python API, `ldmkit
sample`, the server) with errors naming the field, and the latent mask made from them.

- An image of another size than the model's is resized when it has the same (square)
  aspect, with an `ImageResizedWarning`, and refused when its aspect differs: stretching
  would distort what it shows, and cropping would drop part of it silently.
- A mask must have the image's size and be black and white (white = repaint), with at
  most MAX_GREY of its pixels grey (antialiased edges pass, a blurred mask does not: its
  soft edge would be read as a hard one at 0.5). The edge is softened here, in latent
  space, where the blend happens.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ldmkit.data.transforms import BadImageError, _to_rgb, pil_to_tensor
from ldmkit.sampling_args import SamplingArgumentError

MAX_GREY = 0.25  # share of mask pixels allowed strictly between 10 % and 90 % grey
ASPECT_TOLERANCE = 0.01  # 1 % off square still counts as square (odd sizes, rounding)

ImageInput = Image.Image | str | Path | bytes


class ImageResizedWarning(UserWarning):
    """The init image was resized to the model's size."""


def open_image(value: ImageInput, field: str) -> Image.Image:
    """A PIL image from an image, a file path or encoded bytes (an upload)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        try:
            return _load_any(Path(value))
        except BadImageError as exc:
            raise SamplingArgumentError(field, str(exc)) from None
    if isinstance(value, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(value)) as im:
                im.load()
                return im.copy()
        except UnidentifiedImageError:  # its message names a BytesIO object, not the bytes
            raise SamplingArgumentError(field, f"not a readable image ({len(value)} bytes "
                                        "that are no PNG, JPEG, WebP, ... file)") from None
        except Exception as exc:  # PIL raises many kinds for bad bytes
            raise SamplingArgumentError(field, f"not a readable image ({exc})") from None
    raise SamplingArgumentError(field, f"must be a PIL image, a file path or image bytes, "
                                f"got {type(value).__name__}")


def _load_any(path: Path) -> Image.Image:
    """An image file in its own mode (a mask's alpha channel may be what matters),
    turned upright by its EXIF orientation as a viewer shows it."""
    if not path.is_file():
        raise BadImageError(path, BadImageError.MISSING)
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except Exception as exc:
        raise BadImageError(path, BadImageError.UNREADABLE, str(exc)) from None


def fit_image(image: Image.Image, size: int, field: str = "image") -> torch.Tensor:
    """(3, size, size) in [-1, 1]: the image, resized (with a warning) if it is square but
    of another size; another aspect ratio is refused, naming both sizes."""
    w, h = image.size
    if (w, h) != (size, size):
        if abs(w / h - 1.0) > ASPECT_TOLERANCE:
            raise SamplingArgumentError(field, f"is {w}x{h}, another aspect ratio than the "
                                        f"model's {size}x{size} images; crop it to a square "
                                        "first (refused rather than stretched)")
        warnings.warn(f"{field}: resized from {w}x{h} to the model's {size}x{size}",
                      ImageResizedWarning, stacklevel=3)
        image = _to_rgb(image).resize((size, size), Image.LANCZOS)
    return pil_to_tensor(_to_rgb(image))


def fit_mask(mask: Image.Image, image_size: tuple[int, int], size: int,
             field: str = "mask", from_alpha: bool = False) -> torch.Tensor:
    """(1, size, size) of 0/1, 1 = repaint: white pixels, or with `from_alpha` (OpenAI's
    edits API) the transparent ones. It must be the image's size and black and white."""
    if mask.size != tuple(image_size):
        raise SamplingArgumentError(field, f"is {mask.size[0]}x{mask.size[1]}, not the "
                                    f"image's {image_size[0]}x{image_size[1]}")
    if from_alpha:
        if "A" not in mask.getbands():
            raise SamplingArgumentError(field, "has no alpha channel; its transparent "
                                        "pixels say where to edit")
        values = 1.0 - np.asarray(mask.getchannel("A"), dtype=np.float32) / 255.0
    else:
        values = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    grey = float(((values > 0.1) & (values < 0.9)).mean())
    if grey > MAX_GREY:
        raise SamplingArgumentError(field, f"is not black and white: {grey:.0%} of its "
                                    f"pixels are grey (at most {MAX_GREY:.0%}); white = "
                                    "repaint, black = keep")
    hard = torch.from_numpy((values >= 0.5).astype(np.float32))[None, None]
    if not bool(hard.any()):
        raise SamplingArgumentError(field, "has no white pixel: nothing to repaint")
    if hard.shape[-1] != size or hard.shape[-2] != size:
        hard = (F.interpolate(hard, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False) >= 0.5).float()
    return hard[0]


def per_image(values, n: int, field: str) -> list:
    """One entry per image: a single value repeated, or a sequence of exactly n."""
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes, bytearray)):
        if len(values) != n:
            raise SamplingArgumentError(field, f"got {len(values)} for {n} images (give one, "
                                        "or one per image)")
        return list(values)
    return [values] * n


def latent_mask(mask: torch.Tensor, factor: int, feather: int = 1) -> torch.Tensor:
    """Pixel masks (B, 1, H, W) of 0/1 -> latent masks (B, 1, H/f, W/f) in [0, 1].
    A latent cell any repaint pixel falls in is repainted (1): a cell half kept would
    bring back half of what the mask removes. Then `feather` rings of cells around it
    fall off linearly, 1 - k / (feather + 1) at ring k, so generated and kept latents
    blend over a few cells instead of meeting at a seam; beyond that the mask is 0 and
    the latents are the picture's own."""
    hard = F.max_pool2d(mask.float(), factor)
    out, grown = hard, hard
    for k in range(1, feather + 1):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        out = torch.maximum(out, grown * (1.0 - k / (feather + 1)))
    return out


def pixel_weights(latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The latent mask at image resolution (bilinear), for laying the decoded edit over the
    picture's VAE round trip: 0 (the round trip exactly) half a cell past the feather."""
    return F.interpolate(latent, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
