"""Stage-2 training images/s with 1 and 2 processes on this CPU (issue 12).

    python benchmarks/bench_distributed.py [--batch 128] [--steps 15] [--rounds 2]

Each contender is a fresh `torchrun --nproc_per_node N` of this script's worker (loopback
rendezvous, OMP_NUM_THREADS and torch threads as the contender says), running the
trainer's own pieces: `make_accelerator` (one gloo run over the processes),
`DiffusionStep` with that Accelerator (DDP: gradients all-reduced every update) and
`training_batches` (the sharded cache, built once before the first contender). The
demo's geometry pinned in benchlib (`bench_config("demo")`: 32x32 -> 8x8x4, the bench
U-Net, MiniLM, bf16), batch per process --batch. After 3 warm-up updates, --steps
updates are timed between two barriers; images/s = steps x batch x processes / seconds.
Contenders alternate over --rounds rounds:

- 1 process, 1 thread;
- 2 processes, 1 thread each (global batch twice as large);
- with --with-threads also 1 process, 2 threads (the same two cores used by threads; on a
  machine shared with other work its OpenMP barriers make it far slower, see BENCHMARKS.md).

Results: benchmarks/results/distributed.json; run_all.py runs the same as its
"distributed" row (`distributed_row`, fewer steps) into latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RESULTS_DIR, ROOT, Sizes, bench_config, busy_warning, machine_info

CONTENDERS = {"1 process x 1 thread": (1, 1), "2 processes x 1 thread": (2, 1)}
THREADS_CONTENDER = {"1 process x 2 threads": (1, 2)}
WARMUP = 3


def worker(work: Path, batch: int, steps: int, threads: int) -> None:
    """One process of a contender; rank 0 prints the result as one JSON line."""
    import torch
    import torch.distributed as dist

    from ldmkit.data import build_dataset
    from ldmkit.models.text import TextEncoder
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.training.common import make_accelerator
    from ldmkit.training.diffusion_step import DiffusionStep
    from ldmkit.training.distributed import split_random_streams
    from ldmkit.training.latent_cache import training_batches

    torch.set_num_threads(threads)
    cfg = bench_config("demo", batch, ("data.num_items=2048",
                                       f"text.cache_dir={json.dumps(str(work / 'cache'))}"))
    acc = make_accelerator(cfg.train.mixed_precision)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)
    text = TextEncoder.from_config(cfg.text)
    torch.manual_seed(cfg.train.seed)
    step = DiffusionStep(UNet(cfg.unet, vae.config.latent_channels, text.hidden_size), cfg,
                         text.null(), acc)
    split_random_streams(cfg.train.seed, acc.process_index)
    batches = training_batches(cfg, vae, work / "vae", text, build_dataset(cfg.data, "train"),
                               work, acc.device, 0, acc)
    for _ in range(WARMUP):
        step(*batches.next())
    barrier = dist.barrier if acc.num_processes > 1 else (lambda: None)
    barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step(*batches.next())
    barrier()
    seconds = time.perf_counter() - start
    if acc.is_main_process:
        print(json.dumps({"seconds": seconds, "images": steps * batch * acc.num_processes,
                          "distributed_type": str(acc.distributed_type)}))


def run_contender(work: Path, world: int, threads: int, batch: int, steps: int) -> dict:
    """`torchrun --nproc_per_node WORLD` of this script's worker, on loopback."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__,
           "--worker", str(work), "--batch", str(batch), "--steps", str(steps),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(batch: int, steps: int, rounds: int, with_threads: bool = False) -> dict:
    """images/s of each contender, alternated over `rounds` rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _untrained_demo_vae(work / "vae")
        contenders = {**CONTENDERS, **(THREADS_CONTENDER if with_threads else {})}
        seen: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, (world, threads) in contenders.items():
                r = run_contender(work, world, threads, batch, steps)
                seen[name].append(r["images"] / r["seconds"])
                print(f"{name}: {seen[name][-1]:.1f} images/s ({r['distributed_type']})",
                      flush=True)
    return {k: {"median": round(statistics.median(v), 1), "rounds": [round(x, 1) for x in v]}
            for k, v in seen.items()}


def distributed_row(sz: Sizes) -> dict:
    """The suite's row: 1 against 2 processes at batch 128 per process (quick: 8)."""
    batch = 8 if sz.quick else 128
    ips = measure(batch, sz.dist_steps, sz.dist_rounds)
    one, two = (ips[name]["median"] for name in CONTENDERS)
    return {"distributed_ips": ips, "distributed_speedup_2_over_1": round(two / one, 3),
            "distributed_setup": {
                "contenders": "torchrun --nproc_per_node 1 and 2, one torch thread per "
                              "process, gloo (DistributedType.MULTI_CPU)",
                "batch_per_process": batch, "warmup_updates": WARMUP,
                "timed_updates": sz.dist_steps, "rounds": sz.dist_rounds,
                "geometry": "the demo's (benchlib bench_config('demo'))"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128, help="per process")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--with-threads", action="store_true", help="add 1 process x 2 threads")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "distributed.json")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.batch, args.steps, args.threads)
    warning = busy_warning()
    ips = measure(args.batch, args.steps, args.rounds, args.with_threads)
    result = {"benchmark": "distributed", "machine": machine_info(), "busy_warning": warning,
              "command": "python " + " ".join(sys.argv), "batch_per_process": args.batch,
              "steps": args.steps, "rounds": args.rounds, "images_per_s": ips}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["images_per_s"]))


def _untrained_demo_vae(folder: Path) -> None:
    """The demo's VAE widths with random weights: what it encodes does not change speed."""
    import torch

    from ldmkit.models.vae import AutoencoderKL

    cfg = bench_config("demo", 1)
    torch.manual_seed(0)
    AutoencoderKL(cfg.vae, cfg.data.image_size).save_pretrained(folder)


if __name__ == "__main__":
    main()
