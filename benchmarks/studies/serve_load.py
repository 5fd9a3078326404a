# Question: does `ldmkit serve`'s batching give >= 2x the images/s of one at a time?
# Answer: BENCHMARKS.md "Serving load test"; results/serve_load.json
"""Load test of `ldmkit serve` on this machine: concurrent clients (batched) against the
same requests sent one at a time. Localhost only; bounded in requests and time.

    .venv/bin/python benchmarks/studies/serve_load.py          # 32 clients x 4 requests, 20 steps
    .venv/bin/python benchmarks/studies/serve_load.py --quick  # tiny sizes: a machinery check

Starts `ldmkit serve` as its own process on a free loopback port, with `runs/demo/model`
when present, else a model built with random weights at the demo's widths
(configs/shapes-demo.toml; random weights cost the same to run, and the output says so).
Each request asks for one image with the headline sampler and guidance and its own seed.
Phase 1: `clients` threads, each sending `requests` requests one after another. Phase 2:
the same requests (or the first `--sequential` of them) one at a time. Reports errors,
p50/p99 latency, images/s of each phase, the U-Net batch sizes the server formed, and the
largest pixel difference between a request's batched image and its image alone. Writes
benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/

import benchlib

PROMPTS = ["a small red circle", "a large blue square on the left",
           "a green triangle above a yellow cross", "a purple circle at the top",
           "an orange square right of a red triangle", "a big yellow cross at the bottom"]
TARGET = 2.0  # batched images/s over sequential images/s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default runs/demo/model, "
                                                  "else random weights at the demo's widths)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sequential", type=int, default=0,
                    help="requests in the one-at-a-time phase (default: all of them)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request")
    ap.add_argument("--quick", action="store_true", help="4 clients x 2 requests, 4 steps")
    ap.add_argument("--out", default=str(benchlib.RESULTS_DIR / "serve_load.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.steps = 4, 2, 4
    return args


# ----------------------------------------------------------------------------- model


def random_demo_model(root: Path) -> Path:
    """A model folder at the demo's widths with random weights (nothing is trained)."""
    import torch

    from ldmkit.config import load_config
    from ldmkit.diffusion.objective import make_schedule
    from ldmkit.models.text import TextEncoder
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.pipeline import TextToImagePipeline

    cfg = load_config(benchlib.DEMO_CONFIG, [])
    text = TextEncoder.from_config(cfg.text)
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg.vae, image_size=cfg.data.image_size)
    unet = UNet(cfg.unet, cfg.vae.latent_channels, text.hidden_size)
    # the zero-initialised output conv would give every seed the same image
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    schedule = make_schedule(cfg.diffusion)
    pipe = TextToImagePipeline(vae, unet, text, schedule, cfg.diffusion.objective,
                               cfg.diffusion.x0_clamp, cfg.data.image_size)
    pipe.save_pretrained(root / "model")
    return root / "model"


# ----------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None,
         timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body),
                     {"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit.cli", "serve", "--model", str(model),
                             "--port", str(port), "--device", "cpu", "--log-level", "warning"],
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if call(port, "GET", "/health")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"ldmkit serve did not start; its log:\n{log.read_text()[-3000:]}")


# ----------------------------------------------------------------------------- load


def one(port: int, body: dict, timeout: float) -> dict:
    start = time.perf_counter()
    try:
        status, reply = call(port, "POST", "/v1/images", body, timeout)
    except OSError as exc:
        status, reply = 0, {"detail": repr(exc)}
    out = {"seed": body["seed"], "status": status, "seconds": time.perf_counter() - start}
    if status == 200:
        out["png"] = reply["images"][0]
        out["batch_images"] = reply["timing"]["batch_images"]
    else:
        out["detail"] = str(reply.get("detail"))[:200]
    return out


def concurrent_phase(port: int, bodies: list[list[dict]], timeout: float) -> tuple[list, float]:
    results: list[dict] = []
    lock, barrier = threading.Lock(), threading.Barrier(len(bodies) + 1)

    def client(mine: list[dict]) -> None:
        barrier.wait()
        for body in mine:
            r = one(port, body, timeout)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(mine,)) for mine in bodies]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def sequential_phase(port: int, bodies: list[dict], timeout: float) -> tuple[list, float]:
    start = time.perf_counter()
    results = [one(port, body, timeout) for body in bodies]
    return results, time.perf_counter() - start


def summary(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["seconds"] for r in ok) or [float("nan")]
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 \
        else latencies * 99
    return {"requests": len(results), "errors": len(results) - len(ok),
            "error_samples": [r.get("detail") for r in results if r["status"] != 200][:3],
            "wall_s": round(wall, 2), "images_per_s": round(len(ok) / wall, 3),
            "latency_p50_s": round(q[49], 3), "latency_p99_s": round(q[98], 3),
            "latency_max_s": round(latencies[-1], 3)}


def max_pixel_diff(batched: list[dict], alone: list[dict]) -> int | None:
    import numpy as np
    from PIL import Image

    def pixels(b64: str):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)

    by_seed = {r["seed"]: r["png"] for r in batched if "png" in r}
    diffs = [int(np.abs(pixels(by_seed[r["seed"]]) - pixels(r["png"])).max())
             for r in alone if "png" in r and r["seed"] in by_seed]
    return max(diffs) if diffs else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = benchlib.machine_info()
    busy = benchlib.busy_warning()
    with tempfile.TemporaryDirectory() as tmp:
        model, note = args.model, "given"
        if model is None and benchlib.DEMO_MODEL.is_dir():
            model, note = benchlib.DEMO_MODEL, "the demo's trained model (runs/demo/model)"
        elif model is None:
            print("no runs/demo/model: building a random-weight model at the demo's widths "
                  "(configs/shapes-demo.toml); random weights cost the same to run")
            model, note = random_demo_model(Path(tmp)), \
                "random weights at the demo's widths (configs/shapes-demo.toml); no runs/demo/model"
        port = free_port()
        proc = start_server(Path(model), port, Path(tmp) / "serve.log")
        try:
            model_info = call(port, "GET", "/v1/model")[1]
            total = args.clients * args.requests
            bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "steps": args.steps, "seed": i,
                       "n": 1} for i in range(total)]
            one(port, {**bodies[0], "seed": 10**6}, args.timeout)  # warm-up (oneDNN kernels)
            before = call(port, "GET", "/health")[1]
            batched, wall_b = concurrent_phase(
                port, [bodies[c::args.clients] for c in range(args.clients)], args.timeout)
            health = call(port, "GET", "/health")[1]
            seq_bodies = bodies[:args.sequential or total]
            alone, wall_s = sequential_phase(port, seq_bodies, args.timeout)
        finally:
            proc.terminate()
            proc.wait(30)
    batches = health["batches"] - before["batches"]
    result = {
        "command": "python benchmarks/studies/serve_load.py " + " ".join(argv or sys.argv[1:]),
        "machine": info, "busy_warning": busy,
        "load_average_1m_end": round(os.getloadavg()[0], 2),
        "model": note, "image_size": model_info["image_size"],
        "sampler": model_info["defaults"]["sampler"],
        "guidance": model_info["defaults"]["guidance"], "steps": args.steps,
        "clients": args.clients, "requests_per_client": args.requests,
        "max_batch": model_info["limits"]["max_batch"],
        "batched": {**summary(batched, wall_b), "unet_batches": batches,
                    "mean_batch_images": round(len(batched) / max(batches, 1), 2),
                    "batch_images_seen": sorted({r["batch_images"] for r in batched
                                                 if "batch_images" in r})},
        "sequential": summary(alone, wall_s),
        "max_pixel_diff_batched_vs_alone": max_pixel_diff(batched, alone),
    }
    speedup = result["batched"]["images_per_s"] / result["sequential"]["images_per_s"]
    errors = result["batched"]["errors"] + result["sequential"]["errors"]
    result["speedup"] = round(speedup, 2)
    result["target"] = f">= {TARGET}x images/s, 0 errors"
    result["met"] = bool(speedup >= TARGET and errors == 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"wrote {args.out}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    benchlib.run_study(main)
