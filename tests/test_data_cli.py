"""`ldmkit data check` and `ldmkit data preview`."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from data_fixtures import write_coco
from ldmkit.cli import main


def test_data_check_reports_items_ok_skipped_and_each_problem(tmp_path, capsys):
    info = write_coco(tmp_path)
    assert main(["data", "check", "--dataset", "coco", "--root", str(tmp_path),
                 "--split", "train", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == len(info["order"]) == 7
    assert (report["ok"], report["skipped"]) == (4, 3)
    assert sorted((p["path"].split("/")[-1], p["reason"]) for p in report["problems"]) == \
        sorted(info["bad"].items())


def test_data_check_json_is_the_only_thing_on_stdout(tmp_path):
    write_coco(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ldmkit.cli", "data", "check", "--dataset",
                           "coco", "--root", str(tmp_path), "--json"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # fails on any stray line
    assert report["skipped"] == 3
    assert "truncated.jpg" in proc.stderr  # warnings still reach the user, on stderr


def test_data_check_human_report_lists_problems(tmp_path, capsys):
    write_coco(tmp_path)
    assert main(["data", "check", "--dataset", "coco", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "7 items, 4 ok, 3 skipped" in out and "not an image:" in out


def test_data_check_on_shapes_reads_num_items(capsys):
    assert main(["data", "check", "--dataset", "shapes", "--json", "data.num_items=40",
                 "data.image_size=16", "vae.downsample_factor=4",
                 "vae.channel_mult=[1,2,4]"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["items"], report["ok"], report["problems"]) == (40, 40, [])


def test_captions_file_with_no_usable_pairs_exits_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    assert main(["data", "check", "--dataset", "coco", "--root", str(tmp_path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_data_check_with_no_readable_image_exits_2(tmp_path, capsys):
    (tmp_path / "only.jpg").write_text("not an image")
    (tmp_path / "only.txt").write_text("a caption")
    assert main(["data", "check", "--dataset", "folder", "--root", str(tmp_path)]) == 2
    assert "no readable items" in capsys.readouterr().err


def test_data_preview_writes_a_captioned_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["data", "preview", "--dataset", "shapes", "--out", str(out), "--n", "4",
                 "data.image_size=32", "vae.downsample_factor=4",
                 "vae.channel_mult=[1,2,4]"]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    # 2x2 tiles upscaled to 128 px, with caption text below each
    assert grid.shape[0] > 2 * 128 and grid.shape[1] >= 2 * 128
    assert (grid == (128, 128, 128)).all(axis=-1).sum() > 4 * 128 * 128 * 0.5  # backgrounds
    assert (grid.max(axis=-1) < 60).sum() > 50  # dark caption text
    assert str(out) in capsys.readouterr().out
