"""The benchmark suite's machinery (benchmarks/): A/B alternation, summaries, results files,
the BENCHMARKS.md writer and row selection. Seconds; no model is built."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "studies"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the suite

import bench_table
import benchlib
import run_all


def test_alternate_runs_contenders_in_turn_after_warmup():
    calls = []
    seconds = benchlib.alternate({"a": lambda: calls.append("a"),
                                  "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then A B A B A B
    assert {k: len(v) for k, v in seconds.items()} == {"a": 3, "b": 3}


def test_alternate_divides_a_repeated_round_by_its_repeats():
    seconds = benchlib.alternate({"slow": lambda: time.sleep(0.02),
                                  "fast": lambda: time.sleep(0.005)},
                                 rounds=2, warmup=0, repeat={"fast": 4})
    assert min(seconds["slow"]) >= 0.02
    assert 0.005 <= max(seconds["fast"]) < 0.015  # per call, not per round of 4


def test_summarize_gives_median_extremes_and_quartiles():
    s = benchlib.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["n"]) == (3, 1, 5, 2, 4, 5)
    assert benchlib.summarize([7.0])["q1"] == 7.0
    with pytest.raises(ValueError):
        benchlib.summarize([])


def test_ratio_summary_pairs_rounds_and_reports_ratio_of_medians():
    r = benchlib.ratio_summary([4.0, 6.0, 10.0], [2.0, 2.0, 2.0])
    assert (r["min"], r["max"], r["median"]) == (2.0, 5.0, 3.0)
    assert r["median_of_medians"] == 3.0


def test_write_results_writes_latest_and_dated_copy(tmp_path):
    results = {"machine": {"date": "2031-01-02"}, "x": 1}
    paths = benchlib.write_results(results, tmp_path)
    assert sorted(p.name for p in paths) == ["2031-01-02.json", "latest.json"]
    assert json.loads((tmp_path / "2031-01-02.json").read_text()) == results
    assert [p.name for p in benchlib.write_results(results, tmp_path / "q", dated=False)] == \
        ["latest.json"]


def test_machine_info_names_cpu_cores_torch_and_date():
    info = benchlib.machine_info()
    assert info["cpu_model"] and info["cores"] >= 1
    assert info["torch"] == torch.__version__ and len(info["date"]) == 10


# ----------------------------------------------------------------------------- BENCHMARKS.md


def _block(text: str) -> str:
    return f"{bench_table.START}\n{text}\n{bench_table.END}"


def test_update_markdown_replaces_only_between_markers(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Title\nhand intro\n{_block('old table')}\nhand notes\n")
    bench_table.update_markdown(md, _block("new table"))
    text = md.read_text()
    assert "old table" not in text and "new table" in text
    assert text.startswith("# Title\nhand intro\n") and text.endswith("\nhand notes\n")
    bench_table.update_markdown(md, _block("newer"))  # idempotent shape: one block only
    assert md.read_text().count(bench_table.START) == 1


def test_update_markdown_appends_block_to_a_file_without_markers(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Only prose\n")
    bench_table.update_markdown(md, _block("table"))
    assert md.read_text().startswith("# Only prose\n") and "table" in md.read_text()
    missing = tmp_path / "new.md"
    bench_table.update_markdown(missing, _block("fresh"))
    assert "fresh" in missing.read_text()


def _results(**extra) -> dict:
    ips = {"median": 10.0, "min": 9.0, "max": 11.0, "q1": 9.5, "q3": 10.5, "n": 3}
    spread = {"median": 2.5, "min": 2.0, "max": 3.0, "q1": 2.2, "q3": 2.8, "n": 3,
              "median_of_medians": 2.5}
    return {"quick": False, "machine": {"cpu_model": "Test CPU", "cores": 2, "torch": "9.9",
                                        "date": "2031-01-02"},
            "train_speedup_vs_seed": 2.5, "train_speedup_vs_seed_spread": spread,
            "train_target_met": False, "train_ips_fast": ips,
            "train_profiles": ["benchmarks/results/profile_train_fast.txt"],
            "unet_step_time_ratio_vs_diffusers": 0.9, "unet_target_met": True,
            "bf16_peak_utilisation": 0.123, "vae_encode_ips_bf16": ips,
            "sample_speedup_vs_seed": None, "sample_skipped": "run make demo first", **extra}


def test_render_shows_every_row_machine_targets_and_profiles():
    text = bench_table.render(_results())
    assert text.startswith(bench_table.START) and text.endswith(bench_table.END)
    for key in ("train_speedup_vs_seed", "sample_speedup_vs_seed",
                "unet_step_time_ratio_vs_diffusers", "bf16_peak_utilisation",
                "fp32_peak_utilisation", "vae_encode_ips_fp32", "peak_rss_train_mb"):
        assert f"`{key}`" in text
    assert "Test CPU, 2 cores" in text and "torch 9.9" in text
    assert "2.50×" in text and "per-round 2.00–3.00" in text and "12.3 %" in text
    assert "**missed**" in text and "profile_train_fast.txt" in text
    assert "run make demo first" in text
    assert "QUICK MODE" not in text


def test_render_marks_quick_results_as_preliminary_and_lists_experiments():
    experiments = {"quick": True, "date": "2031-01-02", "experiments": {
        "channels_last": {"baseline": "contiguous", "variant": "channels_last",
                          "baseline_ms": 50.0, "variant_ms": 62.5, "speedup": 0.8,
                          "helped": False, "note": "U-Net"},
        "torch_compile": {"error": "RuntimeError: boom"}}}
    text = bench_table.render(_results(quick=True), experiments)
    assert "QUICK MODE — preliminary" in text
    assert "| channels_last | contiguous: 50.0 ms | channels_last: 62.5 ms | 0.80× | no |" \
        in text
    assert "failed: RuntimeError: boom" in text


# ----------------------------------------------------------------------------- run_all


def test_only_selects_rows_and_rejects_unknown_names():
    assert run_all.selected(run_all.parse_args(["--only", "unet,vae"])) == (["unet", "vae"],
                                                                           False)
    assert run_all.selected(run_all.parse_args(["--only", "experiments"])) == ([], True)
    assert run_all.selected(run_all.parse_args([]))[0] == list(run_all.ROWS)
    with pytest.raises(SystemExit):
        run_all.selected(run_all.parse_args(["--only", "nope"]))


def test_partial_run_keeps_other_rows_of_the_previous_results(tmp_path):
    previous = {"quick": False, "train_speedup_vs_seed": 4.0, "row_seconds": {"train": 30},
                "machine": {"date": "2031-01-01"}}
    (tmp_path / "latest.json").write_text(json.dumps(previous))
    new = {"quick": False, "unet_step_time_ratio_vs_diffusers": 0.8,
           "row_seconds": {"unet": 20}, "machine": {"date": "2031-01-02"}}
    merged = run_all.merge_previous(new, tmp_path / "latest.json", ["unet"])
    assert merged["train_speedup_vs_seed"] == 4.0
    assert merged["unet_step_time_ratio_vs_diffusers"] == 0.8
    assert merged["row_seconds"] == {"train": 30, "unet": 20}
    assert merged["machine"]["date"] == "2031-01-02"


def test_alternate_warms_up_only_the_contenders_asked_for():
    calls = []
    benchlib.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                       rounds=1, warmup={"a": 2, "b": 0})
    assert calls == ["a", "a", "a", "b"]


# ----------------------------------------------------------------------------- training glue


def test_benchmark_training_step_is_the_trainers_public_step_at_its_precision(tmp_path):
    """bench_train runs the trainer's `DiffusionStep` (AdamW moves the weights, the EMA
    follows) with autocast on for the fast path only."""
    import bench_train
    from _tiny_text import make_tiny_bert
    from ldmkit.models.text import TextEmbeddings, TextEncoder
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.training.diffusion_step import DiffusionStep

    cfg = benchlib.bench_config("seed-small", 2, (
        "unet.base_channels=16", "unet.channel_mult=[1, 2]", "unet.cross_attn_levels=[1]",
        "unet.num_heads=2", "diffusion.timesteps=20"))
    text = TextEncoder(str(make_tiny_bert(tmp_path)), max_length=8)
    vae = AutoencoderKL(cfg.vae)
    init = UNet(cfg.unet, 4, text.hidden_size).state_dict()
    batch = (torch.randn(2, 4, 8, 8), TextEmbeddings(torch.randn(2, 8, text.hidden_size),
                                                     torch.ones(2, 8, dtype=torch.bool)))
    for bf16 in (True, False):
        run = bench_train.make_step(cfg, text, vae, init, bf16)
        assert isinstance(run, DiffusionStep)
        with run.autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == \
                (torch.bfloat16 if bf16 else torch.float32)
        ema_before = next(run.ema.parameters()).clone()
        bench_train.Stepper(run, type("B", (), {"next": lambda self: batch})(), k=2)()
        assert run.step == 2
        assert not torch.equal(run.unet.conv_in.weight, init["conv_in.weight"])
        assert not torch.equal(next(run.ema.parameters()), ema_before)


def test_shard_cache_benchmark_captions_are_fixed_and_few():
    """The 1M-item cache benchmark's made-up captions: the same every run, 2,544 distinct
    (so MiniLM encodes them in seconds), and the made-up dataset never loads an item."""
    import shard_cache

    caps = [shard_cache.made_up_caption(i) for i in range(200_000)]
    assert caps[:50] == [shard_cache.made_up_caption(i) for i in range(50)]
    assert len(set(caps)) == 2544
    items = shard_cache.MadeUpItems(1_000_000)
    assert len(items) == 1_000_000
    with pytest.raises(AssertionError, match="cache should have served it"):
        items[5]


# ----------------------------------------------------------------------------- pinned setups


def test_rows_pin_their_geometry_without_reading_the_demo_config(monkeypatch, tmp_path):
    """The seed rows run at the seed's 64x64 -> 8x8x4 with its VAE widths, the demo rows at
    32x32 -> 8x8x4, whatever configs/shapes-demo.toml says (here: it is gone)."""
    from ldmkit.config import load_config

    monkeypatch.setattr(benchlib, "DEMO_CONFIG", tmp_path / "missing.toml")
    seed, demo = benchlib.bench_config("seed", 128), benchlib.bench_config("demo", 64)
    assert (seed.data.image_size, seed.vae.downsample_factor) == (64, 8)
    assert (demo.data.image_size, demo.vae.downsample_factor) == (32, 4)
    assert benchlib.describe(seed)["latent"] == "4x8x8 (f = 8)"
    assert benchlib.describe(demo)["latent"] == "4x8x8 (f = 4)"
    assert seed.train.batch_size == 128 and seed.unet == demo.unet
    seed_toml = load_config(benchlib.SEED_CONFIG).vae
    assert seed.vae.architecture() == seed_toml.architecture()  # the seed's widths
    small = benchlib.bench_config("seed-small", 8)
    assert (small.data.image_size, small.vae.downsample_factor) == (64, 8)


def test_the_sampling_rows_model_is_reused_only_for_the_same_recipe(monkeypatch, tmp_path):
    import bench_model

    trained = []

    def fake_train(cfg, folder, text=None):
        trained.append(cfg.train.steps)
        (folder / "model").mkdir(parents=True, exist_ok=True)
        (folder / "model" / "model_index.json").write_text("{}")
        return {"date": "2031-01-02", "train_seconds": 12.0, "vae_steps": cfg.vae.steps,
                "vae_psnr_db": 20.0, "unet_steps": cfg.train.steps, "unet_seconds": 5.0}

    monkeypatch.setattr(bench_model, "MODEL_ROOT", tmp_path)
    monkeypatch.setattr(bench_model, "train", fake_train)
    path, how = bench_model.sample_model(benchlib.QUICK)
    assert path == tmp_path / "sample-model-quick" / "model" and how["how"].startswith("trained")
    assert "4x8x8 (f = 8)" in how["latent"] and "U-Net 2 steps" in how["training"]
    assert bench_model.sample_model(benchlib.QUICK)[1]["how"].startswith("reused: trained 2031")
    other = dataclasses.replace(benchlib.QUICK, model_unet_steps=3)
    assert bench_model.sample_model(other)[1]["how"].startswith("trained now")
    assert trained == [2, 3]


def test_a_row_that_failed_or_was_not_run_keeps_its_line_and_says_why():
    r = _results(train_speedup_vs_seed=None, train_error="RuntimeError: out of memory",
                 unet_step_time_ratio_vs_diffusers=None)
    text = bench_table.render(r)
    assert "| 1 | training images/s" in text and "RuntimeError: out of memory" in text
    assert "not run (`python benchmarks/run_all.py --only unet`)" in text
    assert "not run (`python benchmarks/run_all.py --only distributed`)" in text
    done = bench_table.render(_results(distributed_speedup_2_over_1=1.8, distributed_ips={
        "1 process x 1 thread": {"median": 380.0}, "2 processes x 1 thread": {"median": 684.0}}))
    assert "| 6 | training images/s, 2 processes over 1" in done and "1.80×" in done


def test_the_table_names_the_geometry_each_row_ran_at():
    text = bench_table.render(_results(
        train_setup={"image_size": 64, "latent": "4x8x8 (f = 8)"},
        vae_setup={"image_size": 32, "latent": "4x8x8 (f = 4)"}, vae_encode_ips_fp32={
            "median": 1.0, "min": 1.0, "max": 1.0}))
    assert "fast path over seed-style (64×64 → 4x8x8 (f = 8))" in text
    assert "VAE encode images/s, fp32 (32×32 → 4x8x8 (f = 4))" in text


def test_binding_sweep_collects_a_workers_last_line_and_says_why_when_there_is_none():
    import subprocess

    import binding

    def worker(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)

    done = worker("print('progress'); print('{\"variant\": \"v\", \"two\": 0.9}')")
    done.wait()
    assert binding._collect(done, "v", 0) == {"variant": "v", "two": 0.9}
    failed = worker("import sys; sys.exit(3)")
    failed.wait()
    assert binding._collect(failed, "v", 1)["error"].startswith("exit 3; see v-1.log")
    hung = worker("import time; time.sleep(60)")  # past the deadline: stopped, not awaited
    start = time.monotonic()
    row = binding._collect(hung, "v", 2)
    assert row["steps"] is None and time.monotonic() - start < 10


def test_a_study_given_a_path_that_is_not_a_model_stops_in_one_line_with_exit_2(
        capsys, monkeypatch):
    from ldmkit.errors import UserError

    def main():
        raise UserError("README.md: model folder not found")

    monkeypatch.setattr(sys, "argv", ["benchmarks/studies/recolour_methods.py", "README.md"])
    with pytest.raises(SystemExit) as stop:
        benchlib.run_study(main)
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "recolour_methods: error: README.md: model folder not found\n")
    with pytest.raises(SystemExit) as stop:
        benchlib.run_study(lambda: 3)  # a study's own exit code passes through
    assert stop.value.code == 3
