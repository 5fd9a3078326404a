"""What every benchmark of the suite shares: the pinned setups of the rows, A/B
alternation, medians with their spread, machine facts, a measured matmul peak, profiler
tables, peak RSS in a subprocess, and the results files.

Each comparison runs its contenders in turn, A B A B ..., inside one process, so a
change in machine load during the run hits all of them alike; a contender's rounds are
summarised by the median and the spread (min, max, quartiles).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEMO_CONFIG = ROOT / "configs" / "shapes-demo.toml"
SEED_CONFIG = ROOT / "configs" / "seed-coco64.toml"
DEMO_MODEL = ROOT / "runs" / "demo" / "model"
DEMO_VAE = ROOT / "runs" / "demo" / "vae" / "model"


# ----------------------------------------------------------------------------- setups

# Each row pins what it runs: image size, VAE and U-Net widths, text encoder, schedule.
# They are written out here, not read from configs/shapes-demo.toml, so the table keeps
# measuring what it claims when the demo moves (as it did, to 32x32 / f = 4).
BENCH_UNET = ("unet.base_channels=64", "unet.channel_mult=[1, 2, 2]", "unet.num_res_blocks=1",
              "unet.cross_attn_levels=[1, 2]", "unet.num_heads=4", "unet.self_attn=true",
              "unet.dropout=0.0", "unet.pooled_text=false", "unet.text_layers=0")
BENCH_TEXT = ('text.encoder="sentence-transformers/all-MiniLM-L6-v2"', "text.max_length=24",
              'text.dtype="float32"', "text.hidden_layers=[-1]")
BENCH_DIFFUSION = ('diffusion.schedule="cosine"', "diffusion.timesteps=500",
                   'diffusion.objective="v"', "diffusion.min_snr_gamma=5.0",
                   "diffusion.p_uncond=0.15", "diffusion.x0_clamp=0.0")
BENCH_TRAIN = ("train.lr=8e-4", "train.warmup_steps=100", 'train.mixed_precision="auto"',
               "train.ema_decay=0.995", "train.grad_accum_steps=1", 'train.compile="off"',
               "train.use_cache=true", "train.minutes=0.0", "train.validation_prompts=[]")
# The seed's 64x64 -> 8x8x4 with the seed's VAE widths (configs/seed-coco64.toml [vae];
# a test checks they agree), and the demo's 32x32 -> 8x8x4 (f = 4) with its VAE widths.
SEED_VAE = ("vae.downsample_factor=8", "vae.base_channels=128", "vae.channel_mult=[1, 1, 2, 4]",
            "vae.num_res_blocks=2", "vae.latent_channels=4", "vae.attention=true")
DEMO_VAE_WIDTHS = ("vae.downsample_factor=4", "vae.base_channels=16",
                   "vae.channel_mult=[1, 2, 4]", "vae.num_res_blocks=1",
                   "vae.latent_channels=4", "vae.attention=true")
GEOMETRIES = {
    "seed": ("data.image_size=64", *SEED_VAE),
    "demo": ("data.image_size=32", *DEMO_VAE_WIDTHS),
    # the seed's geometry at widths a 2-core CPU trains in minutes (the sampling row's model)
    "seed-small": ("data.image_size=64", "vae.downsample_factor=8", "vae.base_channels=16",
                   "vae.channel_mult=[1, 2, 4, 8]", "vae.num_res_blocks=1",
                   "vae.latent_channels=4", "vae.attention=true"),
}


def bench_config(geometry: str, batch: int, extra: tuple[str, ...] = ()):
    """A row's pinned config: shapes data at `geometry` ("seed", "demo" or "seed-small"),
    the bench U-Net, MiniLM, the demo's schedule and training settings, `batch`."""
    from ldmkit.config import load_config

    return load_config(None, ['data.dataset="shapes"', *GEOMETRIES[geometry], *BENCH_UNET,
                              *BENCH_TEXT, *BENCH_DIFFUSION, *BENCH_TRAIN,
                              f"train.batch_size={batch}", *extra])


def describe(cfg) -> dict:
    """What a row ran, in words: image size, latents, VAE, U-Net, text (for its setup)."""
    v, u, side = cfg.vae, cfg.unet, cfg.data.image_size // cfg.vae.downsample_factor
    return {"image_size": cfg.data.image_size,
            "latent": f"{v.latent_channels}x{side}x{side} (f = {v.downsample_factor})",
            "vae": f"base {v.base_channels} x {tuple(v.channel_mult)}, "
                   f"{v.num_res_blocks} block(s) per level",
            "unet": f"base {u.base_channels} x {tuple(u.channel_mult)}, {u.num_res_blocks} "
                    f"block(s) per level, cross-attn levels {u.cross_attn_levels}, "
                    f"{u.num_heads} heads",
            "text_encoder": f"{cfg.text.encoder} (max_length {cfg.text.max_length}, "
                            f"hidden layers {cfg.text.hidden_layers})"}


# ----------------------------------------------------------------------------- timing


def alternate(contenders: dict[str, Callable[[], object]], rounds: int,
              warmup: int | dict[str, int] = 1,
              repeat: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each contender, over `rounds` rounds run A B A B ...

    `warmup` untimed calls each first (oneDNN builds its kernels on first use), or per
    contender as a dict (a contender whose one call runs hundreds of network passes warms
    itself); `repeat[name]` calls make up one timed round of that contender (for
    contenders much faster than the others, so every round lasts long enough to time),
    and the round's time is divided by it."""
    repeat = repeat or {}
    warm = warmup if isinstance(warmup, dict) else dict.fromkeys(contenders, warmup)
    for i in range(max(warm.values(), default=0)):
        for name, fn in contenders.items():
            if warm.get(name, 0) > i:
                fn()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            k = repeat.get(name, 1)
            start = time.perf_counter()
            for _ in range(k):
                fn()
            seconds[name].append((time.perf_counter() - start) / k)
    return seconds


def summarize(values: list[float], digits: int = 4) -> dict[str, float]:
    """Median, min, max and quartiles (inclusive method: exact for few rounds)."""
    if not values:
        raise ValueError("no values to summarise")
    q1, _, q3 = (statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1
                 else (values[0],) * 3)
    return {k: round(float(v), digits) for k, v in
            (("median", statistics.median(values)), ("min", min(values)),
             ("max", max(values)), ("q1", q1), ("q3", q3), ("n", len(values)))}


def rates(items: int, seconds: list[float]) -> list[float]:
    """Items per second of each round."""
    return [items / s for s in seconds]


def ratio_summary(numer: list[float], denom: list[float]) -> dict[str, float]:
    """Ratio of medians, with the spread of the per-round ratios (round i of A against
    round i of B: the pair ran back to back, so their ratio is the least noisy)."""
    per_round = [a / b for a, b in zip(numer, denom)]
    out = summarize(per_round)
    out["median_of_medians"] = round(statistics.median(numer) / statistics.median(denom), 4)
    return out


# ----------------------------------------------------------------------------- machine


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int = 0) -> int:
    """torch threads = `threads`, or (0) the cores this process may use."""
    torch.set_num_threads(threads or available_cores())
    return torch.get_num_threads()


def busy_warning() -> str:
    """A warning when other work already loads the CPU: every figure is then suspect, and
    small ops suffer most (OpenMP threads wait at each op's barrier for a descheduled
    sibling), so e.g. sampling at batch 2 can slow down far more than a large matmul."""
    load, cores = os.getloadavg()[0], available_cores()
    if load <= 0.5 * cores:
        return ""
    return (f"machine busy: 1-min load average {load:.1f} on {cores} cores before the "
            f"suite started; figures are unreliable (for a machinery check on a shared "
            f"machine, --threads 1 avoids the worst of it)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU flags that decide bf16 speed (AMX tiles, AVX-512 bf16)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2")))
    except OSError:
        pass
    return []


def machine_info() -> dict:
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "date": datetime.date.today().isoformat(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_average_1m_start": round(os.getloadavg()[0], 2)}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5,
                device: str | torch.device = "cpu") -> dict[str, float]:
    """FLOP/s of an n x n x n matmul in `dtype` on `device`: the machine's practical peak
    for that precision. The best of `reps` timed calls (after a warm-up) is the peak; the
    median is recorded too, as a sign of how busy the machine was."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def mm():
        torch.mm(a, b)
        sync()  # a GPU queues the product; the time is when it is done

    seconds = alternate({"mm": mm}, rounds=reps)["mm"]
    flops = 2.0 * n ** 3
    return {"flops_per_s": flops / min(seconds),
            "flops_per_s_median": flops / statistics.median(seconds), "n": n}


# ----------------------------------------------------------------------------- profiles


def profile_table(fn: Callable[[], object], path: Path, title: str, calls: int = 1,
                  rows: int = 30, warmup: bool = False) -> str:
    """Run `fn` `calls` times under torch.profiler (after a warm-up call if `warmup`; the
    suite profiles contenders it has already timed, so they are warm) and write the top
    ops by self CPU time to `path`."""
    from torch.profiler import ProfilerActivity, profile

    if warmup:
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(calls):
            fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n# {calls} call(s), torch {torch.__version__}, "
                    f"{torch.get_num_threads()} threads\n\n{table}\n")
    return display_path(path)


def display_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (for reports)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    VmHWM from /proc/self/status where there is one: it belongs to the process's own
    address space, which exec() replaces. ru_maxrss is not used there because Linux
    carries it across fork + exec, so a child started by a 2 GB parent reports at least
    2 GB whatever it does itself; it is the fallback elsewhere (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_subprocess(task: str, extra: list[str] | None = None,
                        timeout: float = 600) -> dict:
    """Run benchmarks/bench_rss.py `task` in a fresh interpreter (so its allocations don't
    mix with this process's) and return the JSON it prints."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_rss.py"), task, *(extra or [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- results


def write_results(results: dict, out_dir: Path, name: str = "latest",
                  dated: bool = True) -> list[Path]:
    """`out_dir/<name>.json` plus, if `dated`, `out_dir/<YYYY-MM-DD>.json` (atomic writes)."""
    from ldmkit.io import write_json_atomic

    paths = [out_dir / f"{name}.json"]
    if dated:
        paths.append(out_dir / f"{results['machine']['date']}.json")
    for path in paths:
        write_json_atomic(path, results)
    return paths


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """How big and how long each row runs. FULL fits `make bench` in 15 minutes on a
    quiet 2-core CPU, the sampling row's model trained from nothing included; QUICK only
    checks the machinery (numbers are not meaningful)."""

    quick: bool
    train_batch: int       # diffusion training batch (the demo's is 128)
    train_items: int       # images in the training set both paths draw from
    train_rounds: int
    train_steps: int       # training steps per round and contender
    sample_batch: int      # prompts in the timed sampling batch
    sample_rounds: int
    fidelity_n: int        # judged prompts per sampler
    model_items: int       # the sampling row's model: images it trains on,
    model_vae_steps: int   # its VAE's steps (batch 8),
    model_unet_steps: int  # its U-Net's steps (batch model_unet_batch)
    model_unet_batch: int
    unet_batch: int
    unet_rounds: int
    unet_steps: int
    vae_batch: int
    vae_rounds: int
    matmul_n: int
    dist_steps: int        # timed updates per contender of the distributed row
    dist_rounds: int


FULL = Sizes(quick=False, train_batch=128, train_items=512, train_rounds=3, train_steps=1,
             sample_batch=8, sample_rounds=3, fidelity_n=100, model_items=4096,
             model_vae_steps=700, model_unet_steps=600, model_unet_batch=128,
             unet_batch=128, unet_rounds=5, unet_steps=2, vae_batch=64, vae_rounds=5,
             matmul_n=2048, dist_steps=10, dist_rounds=2)
QUICK = Sizes(quick=True, train_batch=16, train_items=64, train_rounds=2, train_steps=1,
              sample_batch=2, sample_rounds=2, fidelity_n=4, model_items=64,
              model_vae_steps=2, model_unet_steps=2, model_unet_batch=8,
              unet_batch=16, unet_rounds=2, unet_steps=1, vae_batch=8, vae_rounds=2,
              matmul_n=512, dist_steps=2, dist_rounds=1)


def sizes(quick: bool) -> Sizes:
    return QUICK if quick else FULL


def run_study(main: Callable[[], int | None]) -> None:
    """Run a study's `main` as a command: a user mistake (a path that is not a model
    folder, a bad judge file) is one line on stderr and exit 2, as `ldmkit` does, not a
    traceback."""
    from ldmkit.errors import UserError

    try:
        code = main()
    except UserError as exc:
        print(f"{Path(sys.argv[0]).stem}: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)


def judge_demo_models(description: str, default_out: Path, measure: Callable,
                      header: dict) -> None:
    """The command line of a paired-fidelity benchmark on trained demo models: for each
    model folder, `measure(model, evaluator, n)` -> {prompt set: {row: fidelity}}; writes
    {machine, n, **header, models} to --out."""
    import argparse

    from ldmkit.evaluation.fidelity import PROMPT_POOL, FidelityEvaluator
    from ldmkit.io import write_json_atomic

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("models", nargs="+", type=Path, help="model folders (ldmkit demo's model/)")
    ap.add_argument("--n", type=int, default=PROMPT_POOL, help="prompts per set")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()
    set_threads(args.threads)
    torch.set_grad_enabled(False)
    evaluator = FidelityEvaluator()
    results = {"machine": machine_info(), "n": args.n, **header,
               "models": {str(m): measure(m, evaluator, args.n) for m in args.models}}
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")
