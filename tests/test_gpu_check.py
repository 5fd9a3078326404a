"""benchmarks/gpu_check.sh, the one-command GPU check, run as CI can: its --cpu-dry-run runs
every section's code on the CPU at tiny sizes (torch.compile traced by TorchDynamo only)
and writes the same JSON a GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu_check")


@pytest.fixture(scope="module")
def dry_run(dry_run_folder):
    """One dry run of two configs: the first gets every compile mode, the second the best;
    the demo's folder kept (--demo-out)."""
    out = dry_run_folder / "gpu_check.json"
    assert gpu_check.main(["--cpu-dry-run", "--out", str(out), "--configs", "shapes-demo,coco64",
                           "--demo-out", str(dry_run_folder / "demo")]) == 0
    return json.loads(out.read_text())


def test_the_dry_run_runs_every_section_and_writes_one_json(dry_run):
    assert dry_run["mode"] == "cpu-dry-run"
    failed = {k: v for k, v in dry_run.items() if isinstance(v, dict) and "error" in v}
    assert not failed
    versions = dry_run["versions"]
    assert versions["torch"] == torch.__version__ and "diffusers" in versions
    assert dry_run["peak"]["flops_per_s"] > 0
    assert dry_run["tiny_demo"]["skipped"].startswith("dry run")
    assert dry_run["seconds"] <= dry_run["budget_s"]


def test_the_unet_section_measures_the_step_flops_and_diffusers_per_config(dry_run):
    for config in ("shapes-demo", "coco64"):
        result = dry_run["unet"][config]
        assert result["params"] > 0 and "error" not in result
        (row,) = result["batches"].values()
        assert row["flops"] > 0 and row["off"]["ms"] > 0 and row["off"]["backend"] == "eager"
        assert row["bare"]["ldmkit"]["ms"] > 0 and row["bare"]["diffusers"]["ms"] > 0


def test_compile_modes_run_on_the_first_config_and_the_best_on_the_others(dry_run):
    compiled = dry_run["unet_compiled"]
    assert set(compiled["shapes-demo"]) == set(gpu_check.MODES)
    for mode, result in compiled["shapes-demo"].items():
        (row,) = result["batches"].values()
        assert row[mode]["ms"] > 0 and "traced only" in row[mode]["backend"]
        assert row[mode]["max_loss_diff_vs_eager_3_updates"] == 0.0  # the same graph, run as is
    best = gpu_check.best_mode(dry_run, "shapes-demo")
    assert list(compiled["coco64"]) == [best]
    assert dry_run["sampling_compiled"]["compile"] == best


def test_sampling_and_the_demo_report_speed_time_and_fidelity(dry_run):
    assert dry_run["sampling"]["images_per_s"] > 0 and dry_run["sampling"]["compile"] == "off"
    demo = dry_run["demo"]
    assert demo["rc"] == 0 and "--tiny" in demo["command"] and "--device cpu" in demo["command"]
    assert set(demo["fidelity_headline"]) == {"single", "two", "heldout"}
    assert demo["timings"]["total"] > 0
    t = dry_run["targets"]
    assert t["demo total seconds"]["value"] == demo["timings"]["total"]
    assert t["coco64 MFU at batch 256 (best mode)"]["value"] > 0  # the tiny batch stands in
    assert t["shapes-demo step ms at batch 128 (best mode)"]["met"] is not None


def test_the_demo_folder_is_kept_where_asked_and_its_headline_is_read_back(dry_run,
                                                                            dry_run_folder):
    from ldmkit.diffusion.registry import HEADLINE

    evaluation = json.loads((dry_run_folder / "demo" / "evaluation.json").read_text())
    assert (dry_run_folder / "demo" / "report.md").is_file()
    setting = (HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance, HEADLINE.guidance_rescale)
    head = {r["prompt_set"]: r["fidelity"] for r in evaluation["fidelity"]
            if (r["sampler"], r["steps"], r["guidance"], r["guidance_rescale"]) == setting}
    assert dry_run["demo"]["fidelity_headline"] == head


def test_the_demos_headline_is_the_guidance_rescale_row_not_plain_cfg_beside_it():
    """evaluation.json holds the headline (rescale 0.7) and plain CFG (0) at the same
    sampler, steps and guidance: the check reports the first, whatever the order."""
    from ldmkit.diffusion.registry import HEADLINE

    def row(prompt_set, rescale, fidelity):
        return {"prompt_set": prompt_set, "sampler": HEADLINE.sampler, "steps": HEADLINE.steps,
                "guidance": HEADLINE.guidance, "n": 200, "guidance_rescale": rescale,
                "fidelity": fidelity}

    rows = [row("single", HEADLINE.guidance_rescale, 0.995), row("single", 0.0, 0.99),
            row("two", 0.0, 0.5), row("two", HEADLINE.guidance_rescale, 0.97)]
    for order in (rows, rows[::-1]):
        got = gpu_check.demo_fidelity({"fidelity": order, "judge_accuracy": {}})
        assert got["fidelity_headline"] == {"single": 0.995, "two": 0.97}
        assert got["fidelity_n"] == {"single": 200, "two": 200}


def test_a_section_that_does_not_fit_the_budget_says_so(tmp_path):
    out = tmp_path / "g.json"
    assert gpu_check.main(["--cpu-dry-run", "--out", str(out), "--budget-s", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["peak"]["skipped"].startswith("time budget")
    assert report["unet"]["coco64"]["skipped"].startswith("time budget")
    assert report["targets"]["demo total seconds"]["value"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_a_gpu_the_real_check_refuses_and_points_at_the_dry_run(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == 2
    assert "--cpu-dry-run" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()


def test_a_child_that_outlives_its_time_is_stopped_and_recorded():
    done = gpu_check._run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert done.returncode == 124 and "stopped after 1 s" in done.stderr_tail


def test_the_shell_entry_point_runs_the_check_from_anywhere(tmp_path):
    out = tmp_path / "g.json"
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run",
                           "--budget-s", "1", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["mode"] == "cpu-dry-run"
