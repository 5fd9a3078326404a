"""Small on-disk datasets for the data tests: real JPEGs plus deliberately broken files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

# Distinct solid-ish colours so a substituted item can be recognised by its pixels.
GOOD_COLORS = [(200, 40, 40), (40, 180, 60), (40, 60, 210), (230, 210, 30)]


def jpeg_bytes(color: tuple[int, int, int], size: tuple[int, int] = (96, 72)) -> bytes:
    """A real JPEG: a colour field with a gradient, so it is not a constant image."""
    w, h = size
    ramp = np.linspace(-20, 20, w)[None, :, None]
    arr = np.clip(np.array(color)[None, None, :] + ramp, 0, 255).astype(np.uint8)
    arr = np.broadcast_to(arr, (h, w, 3)).copy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_bad_files(folder: Path) -> dict[str, str]:
    """A not-an-image and a truncated JPEG in `folder`; returns {file name: reason}.
    The missing file is only named, never written."""
    (folder / "notimage.jpg").write_text("this is plain text, not a JPEG\n")
    data = jpeg_bytes((120, 90, 200), size=(160, 120))
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return {"missing.jpg": "missing", "notimage.jpg": "not an image",
            "truncated.jpg": "truncated"}


def write_coco(root: Path, split: str = "train", n_good: int = 4,
               with_bad: bool = True) -> dict:
    """COCO layout under root; returns {"good": [file names], "bad": {name: reason},
    "captions": {name: [captions]}}. One image has only blank captions (unusable)."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations, captions = [], [], {}
    good = [f"{i:012d}.jpg" for i in range(n_good)]
    for i, name in enumerate(good):
        (folder / name).write_bytes(jpeg_bytes(GOOD_COLORS[i % len(GOOD_COLORS)]))
    bad = write_bad_files(folder) if with_bad else {}
    # Interleave the bad files between good ones so "the next item" is exercised.
    order = [good[0], *list(bad)[:1], good[1], *list(bad)[1:], *good[2:]]
    for image_id, name in enumerate(order, start=1):
        images.append({"id": image_id, "file_name": name, "width": 96, "height": 72})
        captions[name] = [f"photo {image_id} first caption", f"photo {image_id} second caption"]
        for text in captions[name]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "caption": text})
    (folder / "blank.jpg").write_bytes(jpeg_bytes((0, 0, 0)))
    images.append({"id": 999, "file_name": "blank.jpg"})
    annotations.append({"id": 9999, "image_id": 999, "caption": "   "})
    (root / "annotations" / f"captions_{split}2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    return {"good": good, "bad": bad, "captions": captions, "order": order}
