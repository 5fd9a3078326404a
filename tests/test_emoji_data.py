"""`ldmkit data emoji`: the folder format plus attributes, captions from names, a split
that holds out whole emoji, pinned archives checked, npm reached only by package name."""

import json
import subprocess

import pytest

from _emoji_archive import codes, make_archive
from ldmkit.cli import main
from ldmkit.data import ImageFolderCaptions, emoji_sources
from ldmkit.data import emoji as emoji_data
from ldmkit.data.emoji import build_emoji_folder, caption_name, is_heldout, load_split, tone_name
from ldmkit.errors import UserError


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archives")
    return [make_archive(folder, "google"), make_archive(folder, "twitter")]


@pytest.fixture(scope="module")
def written(archives, tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji") / "data"
    argv = ["data", "emoji", "--out", str(out), "--allow-unpinned", "--archive"]
    assert main(argv + [str(a) for a in archives]) == 0
    return out


def rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_the_folder_dataset_reads_what_the_command_writes(written):
    data = ImageFolderCaptions(written / "train", image_size=64)
    image, caption = data[0]
    assert image.shape == (3, 64, 64) and -1 <= image.min() and image.max() <= 1
    assert caption in rows(written / "train")[0]["text"]
    assert len(data) == len(rows(written / "train"))


def test_every_row_carries_its_attributes(written):
    for row in rows(written / "train") + rows(written / "heldout"):
        assert {"file_name", "text", "emoji", "unified", "base", "name", "vendor",
                "category", "subcategory", "skin_tone"} <= set(row)
        assert row["vendor"] in ("google", "twitter")
        assert row["file_name"].startswith(row["vendor"] + "/")
        assert row["text"] == [row["name"], f"{row['name']}, {row['vendor']} style"]
    assert not any(r["category"] == "Component" for r in rows(written / "train"))


def test_captions_come_from_the_names(written):
    names = {r["name"] for r in rows(written / "train") + rows(written / "heldout")}
    assert "flag: japan" in names
    assert "thumbs up sign: medium skin tone" in names and "thumbs up sign" in names
    assert {"person in tuxedo", "man in tuxedo"} <= names  # a shared name made unique
    assert caption_name("RED APPLE") == "red apple"
    assert caption_name("Japan Flag") == "flag: japan"
    assert caption_name("CHEQUERED FLAG") == "chequered flag"
    assert tone_name("1F3FB-1F3FE") == "light skin tone, medium-dark skin tone"


def test_the_split_holds_out_whole_emoji_every_vendor_and_tone(written):
    train, held = rows(written / "train"), rows(written / "heldout")
    assert held and train
    assert not {r["base"] for r in train} & {r["base"] for r in held}
    assert all(is_heldout(r["base"]) for r in held)
    for base in {r["base"] for r in held}:
        assert {r["vendor"] for r in held if r["base"] == base} == {"google", "twitter"}
    assert len(codes()) == 13 and sum(map(is_heldout, codes())) == 3


def test_the_split_holds_out_about_a_tenth_and_never_changes():
    many = [f"{v:X}" for v in range(0x1F000, 0x1F000 + 4000)]
    share = sum(map(is_heldout, many)) / len(many)
    assert 0.08 < share < 0.12
    assert [is_heldout(c) for c in many[:50]] == [is_heldout(c) for c in many[:50]]


def test_attribution_and_source_name_the_licences_and_hashes(written):
    text = (written / "ATTRIBUTION.md").read_text()
    assert "Apache License 2.0" in text and "CC-BY 4.0" in text and "Cal Henderson" in text
    source = json.loads((written / "source.json").read_text())
    assert [p["vendor"] for p in source["packages"]] == ["google", "twitter"]
    assert all(p["integrity"].startswith("sha512-") and not p["pinned"]
               for p in source["packages"])
    assert source["counts"]["train"]["images"] == len(rows(written / "train"))


def test_load_split_gives_images_with_their_rows_and_all_captions(written):
    split = load_split(written / "heldout")
    assert split.images.dtype.is_floating_point is False and split.images.shape[1:] == (3, 64, 64)
    assert len(split) == len(split.rows)
    assert split.captions(0) == tuple(split.rows[0]["text"])
    assert split.images[0, :, 0, 0].tolist() == [255, 255, 255]  # transparency on white


def test_a_pinned_version_whose_hash_differs_is_refused(tmp_path, capsys):
    fake = make_archive(tmp_path, "google", version=emoji_data.VENDORS["google"].version)
    assert main(["data", "emoji", "--out", str(tmp_path / "d"), "--archive", str(fake)]) == 2
    assert "does not match its pinned sha512" in capsys.readouterr().err


def test_an_unpinned_version_needs_allow_unpinned(archives, tmp_path, capsys):
    assert main(["data", "emoji", "--out", str(tmp_path / "d"), "--archive",
                 str(archives[0])]) == 2
    assert "--allow-unpinned" in capsys.readouterr().err


def test_a_damaged_archive_or_a_foreign_package_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tarball")
    assert main(["data", "emoji", "--out", str(tmp_path / "d"), "--archive", str(bad)]) == 2
    assert "not a readable .tgz" in capsys.readouterr().err
    other = make_archive(tmp_path, "apple")
    assert main(["data", "emoji", "--out", str(tmp_path / "d"), "--allow-unpinned",
                 "--archive", str(other)]) == 2
    assert "is not one of" in capsys.readouterr().err


def test_archive_members_are_read_never_extracted(tmp_path):
    evil = make_archive(tmp_path, "google", extra={"../../escaped.png": b"x",
                                                   "package/img/google/64/../../x.png": b"x"})
    build_emoji_folder(tmp_path / "d", archives=[evil], allow_unpinned=True, log=lambda m: None)
    assert not (tmp_path.parent / "escaped.png").exists()
    assert not any(p.name in ("escaped.png", "x.png") for p in tmp_path.rglob("*.png"))


def test_vendors_pick_among_the_archives(archives, tmp_path):
    folder = build_emoji_folder(tmp_path / "d", ["twitter"], archives, allow_unpinned=True,
                                log=lambda m: None)
    assert {r["vendor"] for r in rows(folder.train)} == {"twitter"}
    with pytest.raises(UserError, match="must be one of"):
        build_emoji_folder(tmp_path / "e", ["apple"], archives, allow_unpinned=True)


def test_npm_pack_asks_for_the_pinned_version_by_package_name(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("--pack-destination") + 1]
        path = make_archive(tmp_path, "google", version=emoji_data.VENDORS["google"].version)
        (tmp_path / dest).mkdir(parents=True, exist_ok=True)
        path.rename(f"{dest}/{path.name}")
        return subprocess.CompletedProcess(cmd, 0, json.dumps([{"filename": path.name}]), "")

    monkeypatch.setattr(emoji_sources.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(emoji_sources.subprocess, "run", fake_run)
    with pytest.raises(UserError, match="pinned sha512"):  # the made-up archive's hash
        build_emoji_folder(tmp_path / "d", ["google"], log=lambda m: None)
    assert calls[0][:3] == ["/usr/bin/npm", "pack", "emoji-datasource-google@16.0.0"]
    assert not any("http" in part for part in calls[0])


def test_without_npm_the_message_says_to_pass_archives(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji_sources.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="--archive"):
        build_emoji_folder(tmp_path / "d", ["google"], log=lambda m: None)


def test_a_folder_written_from_the_pinned_packages_is_kept(monkeypatch, tmp_path):
    out = tmp_path / "d"
    for split in ("train", "heldout"):
        (out / split).mkdir(parents=True)
        (out / split / "metadata.jsonl").write_text("")
    v = emoji_data.VENDORS["google"]
    (out / "source.json").write_text(json.dumps({
        "format": emoji_data.FORMAT, "counts": {"train": {}, "heldout": {}},
        "packages": [{"vendor": "google", "package": v.package, "version": v.version,
                      "integrity": v.integrity}]}))
    monkeypatch.setattr(emoji_data, "npm_pack", lambda *a: pytest.fail("fetched again"))
    assert build_emoji_folder(out, ["google"], log=lambda m: None).train == out / "train"


def test_a_folder_not_written_by_the_command_is_not_overwritten(archives, tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="not written by"):
        build_emoji_folder(tmp_path / "d", archives=archives, allow_unpinned=True)
