"""`make bench`: the whole benchmark suite, within 15 minutes on a quiet 2-core CPU (the
sampling row's model trained from nothing included; about 3 minutes less once it exists).

    .venv/bin/python benchmarks/run_all.py                 # full suite (what make bench runs)
    .venv/bin/python benchmarks/run_all.py --quick         # tiny sizes, checks the machinery
    .venv/bin/python benchmarks/run_all.py --experiments   # also the optional experiments
    .venv/bin/python benchmarks/run_all.py --only unet,vae # some rows, merged into latest.json
    .venv/bin/python benchmarks/run_all.py --render        # only rewrite BENCHMARKS.md

Rows: train (bench_train.py), sample (bench_sample.py, on bench_model.py's model), unet
(bench_unet.py: diffusers ratio and peak utilisation), vae (bench_vae.py), rss
(bench_rss.py, one subprocess per task), distributed (bench_distributed.py: 1 against 2
processes). Each row pins its own setup (benchlib.bench_config), not the demo config's.
Writes benchmarks/results/latest.json and <date>.json (quick mode:
benchmarks/results/quick/latest.json, no dated copy), profiler tables for missed targets
beside them, and regenerates the table in BENCHMARKS.md between its markers; a row that
failed or was skipped says why there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, when imported

import benchlib
from bench_table import render, update_markdown

ROWS = ("train", "sample", "unet", "vae", "rss", "distributed")
MARKDOWN = benchlib.ROOT / "BENCHMARKS.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a machinery check")
    ap.add_argument("--experiments", action="store_true",
                    help="also run the optional experiments (channels_last, compile, ...)")
    ap.add_argument("--only", default="", help=f"comma list of rows: {', '.join(ROWS)}, "
                                               "experiments")
    ap.add_argument("--model", type=Path, default=None,
                    help="model folder for the sampling row (default: the suite's own, "
                         "trained by benchmarks/bench_model.py the first time)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results[/quick])")
    ap.add_argument("--markdown", type=Path, default=MARKDOWN)
    ap.add_argument("--no-markdown", action="store_true")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: regenerate BENCHMARKS.md from the saved results")
    ap.add_argument("--fidelity-n", type=int, default=0,
                    help="prompts judged per sampler in the sampling row (default 100; "
                         "the seed's sampler costs ~2 s per prompt on 2 cores)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: every core this process may use)")
    ap.add_argument("--profile-all", action="store_true",
                    help="write profiler tables even for targets that are met")
    return ap.parse_args(argv)


def selected(args: argparse.Namespace) -> tuple[list[str], bool]:
    only = [r.strip() for r in args.only.split(",") if r.strip()]
    bad = [r for r in only if r not in (*ROWS, "experiments")]
    if bad:
        raise SystemExit(f"--only: unknown rows {bad} (known: {', '.join(ROWS)}, experiments)")
    rows = [r for r in ROWS if not only or r in only]
    return rows, args.experiments or "experiments" in only


def rss_row(sz: benchlib.Sizes, model: Path | None, threads: int) -> dict:
    extra = (["--quick"] if sz.quick else []) + (["--model", str(model)] if model else []) \
        + ["--threads", str(threads)]
    out: dict = {}
    for task in ("train", "sample") if sz.quick else ("train", "train-seed", "sample"):
        info = benchlib.peak_rss_subprocess(task, extra)
        key = task.replace("-", "_")
        out[f"peak_rss_{key}_mb"] = info.get("peak_rss_mb") if "skipped" not in info else None
        out[f"peak_rss_{key}_detail"] = info
    return out


def run_row(name: str, args: argparse.Namespace, sz: benchlib.Sizes, out_dir: Path,
            shared: dict) -> dict:
    force = args.profile_all
    if name == "train":
        from bench_train import train_row
        return train_row(sz, shared.get("text"), out_dir, force)
    if name == "sample":
        from bench_sample import sample_row
        return sample_row(sz, args.model, out_dir, force)
    if name == "unet":
        from bench_unet import unet_rows
        return unet_rows(sz, out_dir, force)
    if name == "vae":
        from bench_vae import vae_row
        return vae_row(sz)
    if name == "distributed":
        from bench_distributed import distributed_row
        return distributed_row(sz)
    return rss_row(sz, args.model, args.threads)


def run_suite(args: argparse.Namespace, rows: list[str], sz: benchlib.Sizes,
              out_dir: Path) -> dict:
    from ldmkit.models.text import TextEncoder

    start = time.perf_counter()
    argv = args.argv
    results = {"suite": "ldmkit benchmarks", "quick": sz.quick,
               "command": f"python benchmarks/run_all.py {' '.join(argv)}" if argv
               else "make bench",
               "machine": {**benchlib.machine_info(), "busy_warning": benchlib.busy_warning()},
               "sizes": dataclasses.asdict(sz),
               "row_seconds": {}}
    shared = {}  # the text encoder of the training row
    if "train" in rows:
        shared["text"] = TextEncoder.from_config(benchlib.bench_config("seed", 1).text)
    for name in rows:
        print(f"\n== bench: {name} ==", flush=True)
        for stale in out_dir.glob(f"profile_{name}_*.txt"):  # only this run's profiles stay
            stale.unlink()
        t0 = time.perf_counter()
        try:
            results.update(run_row(name, args, sz, out_dir, shared))
        except Exception as exc:  # noqa: BLE001 - a broken row is reported, others still run
            traceback.print_exc()
            results[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        results["row_seconds"][name] = round(time.perf_counter() - t0, 1)
    results["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    results["suite_seconds"] = round(time.perf_counter() - start, 1)
    return results


def merge_previous(results: dict, path: Path, rows: list[str]) -> dict:
    """--only: keep the other rows' figures from the previous results file."""
    if not path.is_file():
        return results
    previous = json.loads(path.read_text())
    if previous.get("quick") != results["quick"]:
        return results
    merged = {**previous, **results}
    merged["row_seconds"] = {**previous.get("row_seconds", {}), **results["row_seconds"]}
    merged["partial_update"] = {"rows": rows, "date": results["machine"]["date"]}
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    rows, experiments = selected(args)
    if args.render:
        rows, experiments = [], False
    sz = benchlib.sizes(args.quick)
    if args.fidelity_n:
        sz = dataclasses.replace(sz, fidelity_n=args.fidelity_n)
    out_dir = args.out or (benchlib.RESULTS_DIR / "quick" if sz.quick else benchlib.RESULTS_DIR)
    threads = benchlib.set_threads(args.threads)
    print(f"ldmkit benchmarks: {'QUICK' if sz.quick else 'full'} mode, rows {rows}"
          f"{' + experiments' if experiments else ''}, {threads} threads", flush=True)
    if (rows or experiments) and benchlib.busy_warning():
        print(f"WARNING: {benchlib.busy_warning()}", flush=True)
    if rows:
        results = run_suite(args, rows, sz, out_dir)
        if args.only:
            results = merge_previous(results, out_dir / "latest.json", rows)
        for path in benchlib.write_results(results, out_dir, dated=not sz.quick):
            print(f"wrote {path}")
    if experiments:
        from bench_experiments import run_experiments

        benchlib.write_results({"quick": sz.quick, "date": benchlib.machine_info()["date"],
                                "machine": benchlib.machine_info(),
                                "experiments": run_experiments(sz)},
                               out_dir, "experiments", dated=False)
        print(f"wrote {out_dir / 'experiments.json'}")
    if not args.no_markdown and (out_dir / "latest.json").is_file():
        update_markdown(args.markdown, render(json.loads((out_dir / "latest.json").read_text()),
                                              latest_experiments(out_dir)))
        print(f"updated {args.markdown}")
    return 0


def latest_experiments(out_dir: Path) -> dict | None:
    """The full-mode experiments if any were run, else the quick ones."""
    for folder in (benchlib.RESULTS_DIR, benchlib.RESULTS_DIR / "quick", out_dir):
        if (folder / "experiments.json").is_file():
            return json.loads((folder / "experiments.json").read_text())
    return None


if __name__ == "__main__":
    raise SystemExit(main())
