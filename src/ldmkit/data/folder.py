"""A folder of images with captions, in either of two common conventions:

1. `metadata.jsonl` (the Hugging Face imagefolder convention), one JSON object a line:
   {"file_name": "0001.jpg", "text": "a caption"}, file names relative to the jsonl's folder;
   "text" may also be a list of captions, and "caption" is accepted for "text".
   Every metadata.jsonl under the root is read (e.g. one per subfolder).
2. Otherwise, sidecar files: `photo.jpg` captioned by `photo.txt` beside it; each
   non-empty line of the .txt is one caption. Images without a .txt are left out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ldmkit.data.robust import CaptionedFiles, Entry, row_group
from ldmkit.data.transforms import IMAGE_EXTENSIONS
from ldmkit.errors import UserError

log = logging.getLogger(__name__)


def _captions_of(row: dict) -> tuple[str, ...]:
    value = row.get("text", row.get("caption"))
    values = value if isinstance(value, list) else [value]
    return tuple(" ".join(v.split()) for v in values if isinstance(v, str) and v.strip())


def read_metadata_jsonl(path: Path, balance_by: str = "") -> list[Entry]:
    """Usable rows of one metadata.jsonl; bad rows are counted and reported in one warning.
    With `balance_by`, each row's value of that field is its group (see draw_weights); a
    row without it is an error naming the file, line and field."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read metadata ({exc})") from None
    entries, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        captions = _captions_of(row) if isinstance(row, dict) else ()
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name or not captions:
            bad.append(number)
            continue
        entries.append(Entry(path.parent / name, captions,
                             row_group(row, balance_by, f"{path} line {number}")))
    if bad:
        log.warning("%s: %d unusable line(s) skipped (first: line %d); each needs "
                    "\"file_name\" and a non-empty \"text\"", path, len(bad), bad[0])
    if not entries:
        raise UserError(f"{path}: no usable image/caption pairs "
                        f"(each line needs {{\"file_name\": ..., \"text\": ...}})")
    return entries


def read_sidecars(root: Path) -> list[Entry]:
    images = sorted(p for p in root.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    entries = []
    for image in images:
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            continue
        try:
            lines = txt.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("%s: unreadable caption file skipped (%s)", txt, exc)
            continue
        captions = tuple(" ".join(t.split()) for t in lines if t.strip())
        if captions:
            entries.append(Entry(image, captions))
    if len(entries) < len(images):
        log.warning("%s: %d image(s) without a non-empty .txt caption left out", root,
                    len(images) - len(entries))
    if not entries:
        raise UserError(f"{root}: no usable image/caption pairs (no metadata.jsonl, and no "
                        f"image with a non-empty .txt caption beside it)")
    return entries


def read_folder(root: str | Path, balance_by: str = "") -> list[Entry]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    metadata = sorted(root.rglob("metadata.jsonl"))
    if metadata:
        return [e for path in metadata for e in read_metadata_jsonl(path, balance_by)]
    if balance_by:
        raise UserError(f"{root}: data.balance_by = {balance_by!r} needs metadata.jsonl "
                        f"rows with that field; this folder has sidecar .txt captions")
    return read_sidecars(root)


class ImageFolderCaptions(CaptionedFiles):
    def __init__(self, root: str | Path, image_size: int = 64, balance_by: str = ""):
        self.root = Path(root)
        super().__init__(read_folder(root, balance_by), image_size, str(root))
