"""MS-COCO captions in the official layout:

    ROOT/annotations/captions_{split}2017.json
    ROOT/{split}2017/<file_name>

Every caption of an image is used: each visit draws one at random.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ldmkit.data.robust import CaptionedFiles, Entry
from ldmkit.errors import UserError


def annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"captions_{split}2017.json"


def read_coco_captions(root: str | Path, split: str) -> list[Entry]:
    """Entries in the file's image order; images without a non-empty caption are left out."""
    path = annotation_path(root, split)
    if not path.is_file():
        raise UserError(f"{path}: COCO captions file not found "
                        f"(expected ROOT/annotations/captions_{split}2017.json)")
    try:
        data = json.loads(path.read_text())
        images = {img["id"]: img["file_name"] for img in data["images"]}
        captions: dict = defaultdict(list)
        for ann in data["annotations"]:
            text = " ".join(str(ann.get("caption", "")).split())
            if text:
                captions[ann["image_id"]].append(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read COCO captions ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a COCO captions file (missing {exc})") from None
    folder = Path(root) / f"{split}2017"
    entries = [Entry(folder / images[i], tuple(captions[i]))
               for i in images if captions.get(i)]
    if not entries:
        raise UserError(f"{path}: no usable image/caption pairs")
    return entries


class CocoCaptions(CaptionedFiles):
    def __init__(self, root: str | Path, split: str = "train", image_size: int = 64):
        self.root = Path(root)
        self.split = split
        super().__init__(read_coco_captions(root, split), image_size,
                         str(annotation_path(root, split)))
