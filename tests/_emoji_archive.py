"""Small emoji-datasource-<vendor> archives the emoji tests build themselves (never the
network): a dozen made-up emoji as coloured shapes, laid out as the npm packages are."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from ldmkit.data.emoji import is_heldout

CATEGORIES = [("Food & Drink", "food-fruit"), ("Food & Drink", "drink"),
              ("Animals & Nature", "animal-mammal"), ("Symbols", "geometric")]


def codes(n_trained: int = 10, n_heldout: int = 3) -> list[str]:
    """Code points of made-up emoji: n_trained on the training side, n_heldout held out."""
    trained, held = [], []
    for value in range(0x1F300, 0x1F5FF):
        code = f"{value:X}"
        side = held if is_heldout(code) else trained
        side.append(code)
        if len(trained) >= n_trained and len(held) >= n_heldout:
            break
    return trained[:n_trained] + held[:n_heldout]


def emoji_json(vendor: str = "google") -> list[dict]:
    entries = []
    for i, code in enumerate(codes()):
        category, sub = CATEGORIES[i % len(CATEGORIES)]
        entries.append(_entry(code, f"TEST EMOJI {i}", category, sub, i, vendor))
    first = entries[0]
    first["name"], first["short_name"] = "THUMBS UP SIGN", "thumbsup"
    first["skin_variations"] = {tone: {"unified": f"{first['unified']}-{tone}",
                                       "image": f"{first['unified'].lower()}-{tone.lower()}.png",
                                       f"has_img_{vendor}": True}
                                for tone in ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")}
    entries[1]["name"], entries[1]["category"] = "Japan Flag", "Flags"
    entries[2]["name"] = entries[3]["name"] = "MAN IN TUXEDO"  # emoji.json has such a pair
    entries[2]["short_name"], entries[3]["short_name"] = "person_in_tuxedo", "man_in_tuxedo"
    entries.append(_entry("1F3FB", "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "Component",
                          "skin-tone", 99, vendor))
    return entries


def _entry(code: str, name: str, category: str, sub: str, order: int, vendor: str) -> dict:
    return {"name": name, "unified": code, "image": f"{code.lower()}.png",
            "short_name": name.lower().replace(" ", "_"), "category": category,
            "subcategory": sub, "sort_order": order, f"has_img_{vendor}": True}


def _png(index: int, vendor: str) -> bytes:
    """A coloured shape on transparency: circles for google, squares for twitter."""
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    colour = ((index * 67) % 256, (index * 131) % 256, (index * 29 + 80) % 256, 255)
    box = (10 + index % 5, 12, 50, 52 - index % 7)
    (draw.ellipse if vendor == "google" else draw.rectangle)(box, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_archive(folder: Path, vendor: str = "google", version: str = "0.0.0-test",
                 extra: dict[str, bytes] | None = None) -> Path:
    """An emoji-datasource-<vendor>-<version>.tgz with package.json, emoji.json, LICENSE
    and img/<vendor>/64/*.png; `extra` adds members (name -> bytes)."""
    entries = emoji_json(vendor)
    files = {"package/package.json": json.dumps({"name": f"emoji-datasource-{vendor}",
                                                 "version": version}).encode(),
             "package/emoji.json": json.dumps(entries).encode(),
             "package/LICENSE": b"The MIT License (MIT)\nCopyright (c) test\n"}
    images = [e["image"] for e in entries] + [
        v["image"] for e in entries for v in (e.get("skin_variations") or {}).values()]
    for i, name in enumerate(images):
        files[f"package/img/{vendor}/64/{name}"] = _png(i, vendor)
    files.update(extra or {})
    path = Path(folder) / f"emoji-datasource-{vendor}-{version}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
