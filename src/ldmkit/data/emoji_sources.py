"""Where the emoji data comes from: the pinned npm packages emoji-datasource-google and
emoji-datasource-twitter, fetched by name with `npm pack` or passed by the user as .tgz,
checked against their pinned sha512 and read member by member (never extracted)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ldmkit.errors import UserError

IMAGE_SIZE = 64  # the packages' img/<vendor>/64/ folder


@dataclass(frozen=True)
class Vendor:
    package: str
    version: str
    integrity: str  # npm's "sha512-<base64>" of the .tgz, as `npm view NAME@V dist.integrity`
    artwork: str
    licence: str
    licence_url: str


# Pinned: `npm view emoji-datasource-<vendor>@16.0.0 dist.integrity` (2026-11-26).
VENDORS: dict[str, Vendor] = {
    "google": Vendor("emoji-datasource-google", "16.0.0",
                     "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4Q"
                     "xZkOPJCoT8DlPhfQ3A==",
                     "Noto Emoji (Google)", "Apache License 2.0",
                     "https://github.com/googlefonts/noto-emoji/blob/main/LICENSE"),
    "twitter": Vendor("emoji-datasource-twitter", "16.0.0",
                      "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjF"
                      "LWuZewWg8jBbuL2eyELQ==",
                      "Twemoji (Twitter, Inc and other contributors; the jdecked fork)",
                      "Creative Commons Attribution 4.0 (CC-BY 4.0)",
                      "https://creativecommons.org/licenses/by/4.0/"),
}


@dataclass
class Archive:
    """What ldmkit reads from one emoji-datasource-<vendor> .tgz."""

    vendor: str
    package: str
    version: str
    integrity: str
    emoji_json: list[dict]
    licence_text: str
    images: dict[str, bytes]  # file name -> PNG bytes of img/<vendor>/64/


def sha512_integrity(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def read_archive(path: str | Path, allow_unpinned: bool = False) -> Archive:
    """Read an emoji-datasource-<vendor> .tgz; its sha512 must be the pinned one for its
    name and version (unless `allow_unpinned`). Members are read, never extracted, so a
    crafted path inside the archive cannot write anywhere."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: archive not found")
    integrity = sha512_integrity(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            files = _read_members(tar)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a readable .tgz ({exc})") from None
    package = _json_member(files, "package/package.json", path)
    name, version = package.get("name", ""), package.get("version", "")
    vendor = name.removeprefix("emoji-datasource-")
    if vendor not in VENDORS or name != VENDORS[vendor].package:
        raise UserError(f"{path}: package {name!r} is not one of "
                        f"{', '.join(v.package for v in VENDORS.values())}")
    pin = VENDORS[vendor]
    if version == pin.version and integrity != pin.integrity:
        raise UserError(f"{path}: {name}@{version} does not match its pinned sha512 "
                        f"(got {integrity[:30]}..., pinned {pin.integrity[:30]}...)")
    if version != pin.version and not allow_unpinned:
        raise UserError(f"{path}: {name}@{version} is not the pinned version {pin.version} "
                        f"(pass --allow-unpinned to use it anyway, unverified)")
    prefix = f"package/img/{vendor}/{IMAGE_SIZE}/"
    images = {k[len(prefix):]: v for k, v in files.items()
              if k.startswith(prefix) and k.endswith(".png") and "/" not in k[len(prefix):]}
    licence = files.get("package/LICENSE", b"").decode("utf-8", "replace")
    return Archive(vendor, name, version, integrity, _json_member(files, "package/emoji.json",
                                                                  path), licence, images)


def _read_members(tar: tarfile.TarFile) -> dict[str, bytes]:
    wanted = ("package/package.json", "package/emoji.json", "package/LICENSE")
    files = {}
    for member in tar:
        is_image = "/64/" in member.name and member.name.endswith(".png")
        if member.isfile() and (member.name in wanted or is_image):
            handle = tar.extractfile(member)
            files[member.name] = handle.read() if handle else b""
    return files


def _json_member(files: dict[str, bytes], name: str, path: Path):
    if name not in files:
        raise UserError(f"{path}: no {name.removeprefix('package/')} in the archive")
    try:
        return json.loads(files[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: {name} is not valid JSON ({exc})") from None


def npm_pack(vendor: str, dest: Path) -> Path:
    """The pinned package of `vendor` fetched from the npm registry by name (`npm pack`)."""
    npm = shutil.which("npm")
    if npm is None:
        raise UserError("npm is not on PATH: install Node.js's npm, or pass the archives "
                        "with --archive (emoji-datasource-<vendor>-<version>.tgz)")
    spec = f"{VENDORS[vendor].package}@{VENDORS[vendor].version}"
    try:
        done = subprocess.run([npm, "pack", spec, "--json", "--pack-destination", str(dest)],
                              capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"npm pack {spec}: no answer from the registry in 15 minutes; "
                        f"pass the archive with --archive instead") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise UserError(f"npm pack {spec} failed (exit {done.returncode}): {' '.join(tail)}; "
                        f"pass the archive with --archive instead")
    return dest / json.loads(done.stdout)[0]["filename"]
