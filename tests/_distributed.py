"""Helpers for the multi-process tests: a tiny run folder setup, a launcher that starts N
processes with the environment `torchrun` gives them (gloo on this CPU, one thread each),
and the worker those processes run (`python tests/_distributed.py grads OUT SETUP`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def tiny_setup(root: Path, *extra: str) -> dict:
    """A tiny VAE folder, a tiny BERT and the overrides of a seconds-long stage-2 run."""
    import torch

    from _tiny_model import TINY
    from _tiny_text import make_tiny_bert
    from ldmkit.config import load_config
    from ldmkit.models.vae import AutoencoderKL

    text = make_tiny_bert(root)
    overrides = TINY + [f"text.encoder={json.dumps(str(text))}", "text.max_length=12",
                        "data.num_items=48", "train.batch_size=4", "train.log_every=1",
                        "train.validation_prompts=[]", "train.mixed_precision=no", *extra]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    vae_dir = root / "vae"
    AutoencoderKL(cfg.vae, cfg.data.image_size).save_pretrained(vae_dir)
    setup = {"vae": str(vae_dir), "overrides": overrides}
    (root / "setup.json").write_text(json.dumps(setup))
    return setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int, log_dir: Path) -> list[subprocess.Popen]:
    """`python ARGS` in `world` processes joined like torchrun joins them (loopback only)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS)}
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def wait(procs: list[subprocess.Popen], log_dir: Path, timeout: float = 240) -> None:
    codes = [p.wait(timeout=timeout) for p in procs]
    if any(codes):
        logs = "\n".join((log_dir / f"rank{r}.log").read_text()[-3000:]
                         for r in range(len(procs)))
        raise AssertionError(f"exit codes {codes}:\n{logs}")


# ----------------------------------------------------------------------------- the worker


def grads_worker(out: Path, setup: dict) -> None:
    """Each rank: three batches from the shared cache, then one update's gradients after
    the all-reduce, with the batch and the draws that made them; then its EMA weights
    after a few updates."""
    import torch

    from ldmkit.config import load_config
    from ldmkit.data import build_dataset
    from ldmkit.io import save_tensors_atomic
    from ldmkit.models.text import TextEncoder
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.training.common import make_accelerator
    from ldmkit.training.diffusion_step import DiffusionStep
    from ldmkit.training.distributed import split_random_streams
    from ldmkit.training.latent_cache import training_batches

    torch.set_num_threads(1)
    cfg = load_config(None, setup["overrides"])
    acc = make_accelerator("no")
    vae = AutoencoderKL.from_pretrained(Path(setup["vae"])).eval()
    text = TextEncoder.from_config(cfg.text)
    torch.manual_seed(cfg.train.seed)
    unet = UNet(cfg.unet, vae.config.latent_channels, text.hidden_size)
    init = {k: v.clone() for k, v in unet.state_dict().items()}
    step = DiffusionStep(unet, cfg, text.null(), acc)
    split_random_streams(cfg.train.seed, acc.process_index)
    batches = training_batches(cfg, vae, Path(setup["vae"]), text,
                               build_dataset(cfg.data, "train"), out, acc.device, 0, acc)
    seen = torch.stack([batches.next()[0] for _ in range(3)])
    latents, emb = batches.next()
    draws = step.draw(latents)
    step.backward(latents, emb, draws)
    tensors = {"seen": seen, "latents": latents, "tokens": emb.tokens, "mask": emb.mask,
               "pooled": emb.pooled, "drop": draws.drop, "t": draws.t, "noise": draws.noise,
               **{f"grad.{n}": p.grad for n, p in unet.named_parameters() if p.grad is not None}}
    if acc.is_main_process:
        tensors.update({f"init.{k}": v for k, v in init.items()})
    for _ in range(3):  # three more updates: the EMA must stay the same on every rank
        step.apply()
        step.backward(*batches.next())
    tensors["ema"] = torch.cat([p.flatten() for p in step.ema.parameters()])
    save_tensors_atomic(out / f"rank{acc.process_index}.safetensors", tensors)


if __name__ == "__main__":
    task, out, setup_file = sys.argv[1:4]
    if task == "grads":
        grads_worker(Path(out), json.loads(Path(setup_file).read_text()))
