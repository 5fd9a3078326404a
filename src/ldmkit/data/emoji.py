"""The emoji dataset: real captioned 64x64 artwork from two npm packages of emoji-data
(Cal Henderson's emoji.json + one vendor's images each), written as an image folder in the
`folder` format (data/folder.py) so every ldmkit command trains on it as it is.

    ldmkit data emoji --out DIR [--vendors google,twitter] [--archive FILE.tgz ...]

    DIR/train/metadata.jsonl     one row per image: file_name, text (captions) and the
    DIR/train/<vendor>/*.png     attributes: emoji, unified, base, name, vendor, category,
    DIR/heldout/...              subcategory, skin_tone; heldout/ = about 10 % of the emoji
    DIR/ATTRIBUTION.md           (every vendor and tone of them), never for training
    DIR/source.json              packages, versions, sha512, counts, the split rule

Archives come from `npm pack` of the pinned versions (the npm registry, by package name)
or from the user (--archive); either way their sha512 must equal the pinned one, so the
same command always writes the same folder. Nothing here runs at training time.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldmkit.data.emoji_sources import IMAGE_SIZE, VENDORS, Archive, npm_pack, read_archive
from ldmkit.data.robust import group_weights, row_group
from ldmkit.errors import UserError
from ldmkit.io import atomic_write, write_json_atomic

FORMAT = "ldmkit-emoji/1"


STYLE = {vendor: f"{vendor} style" for vendor in VENDORS}  # the optional caption phrase
TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone",
         "1F3FD": "medium skin tone", "1F3FE": "medium-dark skin tone",
         "1F3FF": "dark skin tone"}
SKIPPED_CATEGORIES = ("Component",)  # the five bare skin-tone swatches: no picture to learn
HELDOUT_PER_MILLE = 100  # about 10 % of the emoji


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class EmojiImage:
    """One image of the dataset and everything known about it."""

    file: str  # the package's file name, e.g. "1f44d-1f3fd.png"
    emoji: str  # the characters
    unified: str  # this image's code points, "1F44D-1F3FD"
    base: str  # the emoji it is a rendering of (its identity): "1F44D"
    name: str  # the caption: "thumbs up sign: medium skin tone"
    category: str
    subcategory: str
    skin_tone: str  # "" for the base emoji


def caption_name(raw: str) -> str:
    """emoji.json's name as a caption: "RED APPLE" -> "red apple", and the title-case
    country flags "Japan Flag" -> "flag: japan" (Unicode's CLDR style)."""
    if raw.endswith(" Flag") and not raw.isupper():
        return "flag: " + raw[: -len(" Flag")].lower()
    return " ".join(raw.lower().split())


def tone_name(key: str) -> str:
    """A skin_variations key ("1F3FD" or "1F3FB-1F3FE") as words."""
    tones = list(dict.fromkeys(TONES[part] for part in key.split("-")))
    return ", ".join(tones)


def _characters(unified: str) -> str:
    return "".join(chr(int(part, 16)) for part in unified.split("-"))


def emoji_table(emoji_json: list[dict], vendor: str) -> list[EmojiImage]:
    """Every image `vendor` has in emoji.json (base emoji and skin-tone variants),
    in emoji.json's sort order; names made unique (two entries may share one)."""
    flag = f"has_img_{vendor}"
    entries = sorted((e for e in emoji_json if e.get("category") not in SKIPPED_CATEGORIES),
                     key=lambda e: e.get("sort_order", 0))
    names = _unique_names(entries)
    images = []
    for e in entries:
        name = names[e["unified"]]
        common = {"base": e["unified"], "category": e["category"],
                  "subcategory": e["subcategory"]}
        if e.get(flag):
            images.append(EmojiImage(file=e["image"], emoji=_characters(e["unified"]),
                                     unified=e["unified"], name=name, skin_tone="", **common))
        for key, variant in sorted((e.get("skin_variations") or {}).items()):
            if variant.get(flag):
                tone = tone_name(key)
                sep = ", " if ":" in name else ": "
                images.append(EmojiImage(file=variant["image"],
                                         emoji=_characters(variant["unified"]),
                                         unified=variant["unified"], name=f"{name}{sep}{tone}",
                                         skin_tone=tone, **common))
    return images


def _unique_names(entries: list[dict]) -> dict[str, str]:
    """unified -> caption name; where two entries share a name ("MAN IN TUXEDO" is both
    1F935 and its man-ZWJ form) each takes its short name instead."""
    names = {e["unified"]: caption_name(e["name"]) for e in entries}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    for e in entries:
        if counts[names[e["unified"]]] > 1:
            names[e["unified"]] = e["short_name"].replace("_", " ").replace("-", " ")
    return names


def is_heldout(base: str) -> bool:
    """The split: a hash of the base emoji's code points, so an emoji keeps its side when
    new emoji are added, and every vendor and tone of it goes with it."""
    digest = hashlib.sha256(f"ldmkit-emoji/{base}".encode()).hexdigest()
    return int(digest, 16) % 1000 < HELDOUT_PER_MILLE


def classes(emoji_json: list[dict]) -> list[dict]:
    """The identities a judge tells apart: every base emoji, in sort order."""
    entries = sorted((e for e in emoji_json if e.get("category") not in SKIPPED_CATEGORIES),
                     key=lambda e: e.get("sort_order", 0))
    names = _unique_names(entries)
    return [{"base": e["unified"], "name": names[e["unified"]], "category": e["category"],
             "subcategory": e["subcategory"], "heldout": is_heldout(e["unified"])}
            for e in entries]


# ----------------------------------------------------------------------------- the folder


@dataclass
class EmojiFolder:
    """What `build_emoji_folder` wrote."""

    root: Path
    train: Path  # the folder dataset's root for training (data.root)
    heldout: Path
    counts: dict  # images and emoji per split


def build_emoji_folder(out: str | Path, vendors: list[str] | None = None,
                       archives: list[str | Path] = (), allow_unpinned: bool = False,
                       log=print) -> EmojiFolder:
    """Write the dataset into `out` from the given archives, or else from `npm pack` of the
    pinned packages. A folder already written from the same packages is kept as it is."""
    out = Path(out)
    if archives:  # the vendors are the archives' unless --vendors picks among them
        read = [read_archive(p, allow_unpinned) for p in archives]
        vendors = _check_vendors(vendors or [a.vendor for a in read])
    else:
        vendors = _check_vendors(vendors)
        existing = _up_to_date(out, vendors)
        if existing:
            log(f"{out}: emoji data already written from the pinned packages; kept")
            return existing
        with tempfile.TemporaryDirectory(prefix="ldmkit-npm-") as tmp:
            log(f"npm pack {', '.join(VENDORS[v].package for v in vendors)} ...")
            read = [read_archive(npm_pack(v, Path(tmp))) for v in vendors]
    read = sorted({a.vendor: a for a in read if a.vendor in vendors}.values(),
                  key=lambda a: vendors.index(a.vendor))
    missing = sorted(set(vendors) - {a.vendor for a in read})
    if missing:
        raise UserError(f"no archive for vendor(s) {', '.join(missing)} among "
                        f"{', '.join(map(str, archives))}")
    return _write_folder(out, read, log)


def _check_vendors(vendors: list[str] | None) -> list[str]:
    vendors = list(dict.fromkeys(vendors or VENDORS))
    bad = [v for v in vendors if v not in VENDORS]
    if bad or not vendors:
        raise UserError(f"--vendors {','.join(bad)}: each must be one of {', '.join(VENDORS)}")
    return vendors


def open_emoji_folder(root: str | Path) -> EmojiFolder | None:
    """The emoji folder written into `root` earlier, or None if there is none."""
    root = Path(root)
    try:
        source = json.loads((root / "source.json").read_text())
    except (OSError, ValueError):
        return None
    ok = source.get("format") == FORMAT and all(
        (root / split / "metadata.jsonl").is_file() for split in ("train", "heldout"))
    return EmojiFolder(root, root / "train", root / "heldout", source["counts"]) if ok else None


def _up_to_date(out: Path, vendors: list[str]) -> EmojiFolder | None:
    folder = open_emoji_folder(out)
    if folder is None:
        return None
    source = json.loads((out / "source.json").read_text())
    want = [{"vendor": v, "package": VENDORS[v].package, "version": VENDORS[v].version,
             "integrity": VENDORS[v].integrity} for v in vendors]
    have = [{k: p.get(k) for k in ("vendor", "package", "version", "integrity")}
            for p in source.get("packages", [])]
    return folder if have == want else None


def _write_folder(out: Path, archives: list[Archive], log) -> EmojiFolder:
    for split in ("train", "heldout"):
        target = out / split
        if target.exists() and not (out / "source.json").is_file():
            raise UserError(f"{target} exists and was not written by `ldmkit data emoji`; "
                            f"choose another --out")
        shutil.rmtree(target, ignore_errors=True)
    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    skipped = 0
    for archive in archives:
        for image in emoji_table(archive.emoji_json, archive.vendor):
            data = archive.images.get(image.file)
            if data is None or not _is_64px_image(data):
                skipped += 1
                continue
            split = "heldout" if is_heldout(image.base) else "train"
            file_name = f"{archive.vendor}/{image.file}"
            atomic_write(out / split / file_name, lambda tmp, d=data: tmp.write_bytes(d))
            rows[split].append(_row(file_name, image, archive.vendor))
    # Shuffled once, deterministically: the folder dataset's validation items are its last
    # ones, which should be a sample of the emoji, not the flags at the end of the sort.
    random.Random(0).shuffle(rows["train"])
    for split, split_rows in rows.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows)
        atomic_write(out / split / "metadata.jsonl", lambda tmp, t=text: tmp.write_text(t))
    counts = {split: {"images": len(r), "emoji": len({x["base"] for x in r})}
              for split, r in rows.items()}
    counts["skipped_images"] = skipped
    (out / "ATTRIBUTION.md").write_text(attribution(archives))
    write_json_atomic(out / "source.json", {
        "format": FORMAT, "counts": counts,
        "packages": [{"vendor": a.vendor, "package": a.package, "version": a.version,
                      "integrity": a.integrity,
                      "pinned": a.integrity == VENDORS[a.vendor].integrity} for a in archives],
        "split": f"held out: sha256('ldmkit-emoji/' + base code points) % 1000 < "
                 f"{HELDOUT_PER_MILLE}",
        "captions": "emoji.json's name (flags as 'flag: <country>', ': <skin tone>' for "
                    "variants), alone and with ', <vendor> style'"})
    log(f"{out}: {counts['train']['images']} training images of {counts['train']['emoji']} "
        f"emoji, {counts['heldout']['images']} held-out images of "
        f"{counts['heldout']['emoji']} emoji"
        + (f"; {skipped} image(s) missing or unreadable, left out" if skipped else ""))
    return EmojiFolder(out, out / "train", out / "heldout", counts)


def _is_64px_image(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.size == (IMAGE_SIZE, IMAGE_SIZE)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _row(file_name: str, image: EmojiImage, vendor: str) -> dict:
    """A metadata.jsonl line: the folder format's file_name and text, then attributes."""
    attributes = {k: v for k, v in asdict(image).items() if k != "file"}
    return {"file_name": file_name,
            "text": [image.name, f"{image.name}, {STYLE[vendor]}"],
            **attributes, "vendor": vendor}


def attribution(archives: list[Archive]) -> str:
    """ATTRIBUTION.md: what the images and the metadata are, and under which licences."""
    parts = ["# Emoji data: sources and licences\n",
             "Written by `ldmkit data emoji`. The images are the packages' 64x64 PNGs, "
             "unchanged (ldmkit composites their transparency onto white when it reads "
             "them); the captions are made from emoji.json's names.\n"]
    for a in archives:
        v = VENDORS[a.vendor]
        parts.append(f"## {a.vendor}: {a.package}@{a.version}\n\n"
                     f"- Images: {v.artwork}, licensed under the {v.licence} ({v.licence_url}).\n"
                     f"- emoji.json and packaging: emoji-data by Cal Henderson "
                     f"(https://github.com/iamcal/emoji-data), under the licence below.\n"
                     f"- Archive sha512: `{a.integrity}`\n\n```\n{a.licence_text.strip()}\n```\n")
    return "\n".join(parts)


def read_rows(folder: str | Path) -> list[dict]:
    """The metadata.jsonl rows (with attributes) of a split folder, in file order."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: write the data with `ldmkit data emoji --out DIR`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cli_emoji(args: argparse.Namespace) -> int:
    vendors = [v.strip() for v in args.vendors.split(",") if v.strip()] if args.vendors else None
    build_emoji_folder(args.out, vendors, args.archive or [], args.allow_unpinned)
    return 0



class EmojiImages(Dataset):
    """A split folder held in RAM: uint8 images and their metadata rows. As a dataset it
    yields what the folder dataset yields, (image in [-1, 1], one of the row's captions,
    drawn per visit); `captions(i)` gives them all (the latent cache encodes each)."""

    skipped = 0  # the images were checked when the folder was written

    def __init__(self, images: torch.Tensor, rows: list[dict], balance_by: str = ""):
        if images.dtype != torch.uint8 or images.shape[0] != len(rows):
            raise ValueError("images must be uint8 (N, 3, H, W), one metadata row each")
        self.images, self.rows, self.balance_by = images, rows, balance_by
        self.groups = [row_group(r, balance_by, str(r.get("file_name"))) for r in rows]

    def draw_weights(self) -> torch.Tensor | None:
        """As the folder dataset's: every value of data.balance_by drawn equally often."""
        return group_weights(self.groups)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        caps = self.captions(i)
        return self.images[i].float() / 127.5 - 1.0, caps[int(torch.randint(len(caps), ()))]

    def captions(self, i: int) -> tuple[str, ...]:
        text = self.rows[i]["text"]
        return tuple(text) if isinstance(text, list) else (text,)

    def load_readable(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float() / 127.5 - 1.0, i

    def subset(self, start: int, stop: int | None = None) -> EmojiImages:
        return EmojiImages(self.images[start:stop], self.rows[start:stop], self.balance_by)


def load_split(folder: str | Path, balance_by: str = "") -> EmojiImages:
    """Every image of a split folder (transparency on white, as the folder dataset shows
    it) with its metadata row; `balance_by` as data.balance_by."""
    from ldmkit.data.transforms import load_image

    rows = read_rows(folder)
    arrays = [np.asarray(load_image(Path(folder) / r["file_name"]), dtype=np.uint8)
              for r in rows]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return EmojiImages(images, rows, balance_by)
