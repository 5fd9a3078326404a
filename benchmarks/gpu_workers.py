"""The measuring halves of gpu_check.py, each run in a child process of its own
(`gpu_check.py --worker KIND --spec JSON`); each writes its result file as it goes, so
what it finished survives a timeout.

- peak:     the bf16 matmul FLOP/s of an n x n x n product (the MFU denominator);
- unet:     at one config's widths, per batch: the FLOPs of a forward + backward; the
            trainer's `DiffusionStep` (caption dropout, loss, backward, clipping, fused
            AdamW, LR, EMA; bf16) in each asked train.compile mode, with compile time, and
            for a compiled mode the loss difference to eager over the same draws; eager
            only, the bare U-Net step of ldmkit and of diffusers at a matched parameter
            count (bench_unet's match), and whether the step syncs with the host;
- sampling: prompt -> image images/s at the shapes-demo widths (random weights cost the
            same), DPM-Solver++ 20 steps, bf16, with the U-Net eager or compiled.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from gpu_sizes import DRY, TEXT_WIDTHS

ROOT = Path(__file__).resolve().parents[1]


class Result(dict):
    """A dict that rewrites its file on every `save`."""

    def __init__(self, path: str):
        super().__init__()
        self.path = Path(path)

    def save(self) -> None:
        self.path.write_text(json.dumps(self, indent=1))


def device_of(spec: dict) -> torch.device:
    return torch.device("cpu" if spec["dry"] else "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, k: int, rounds: int) -> float:
    """Median seconds per call over `rounds` rounds of `k` calls, the device drained at the
    ends of a round only (so the host can run ahead, as in training)."""
    fn()
    sync(device)
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(k):
            fn()
        sync(device)
        seconds.append((time.perf_counter() - start) / k)
    return statistics.median(seconds)


def config_of(spec: dict):
    from ldmkit.config import load_config

    overrides = list(DRY["overrides"]) if spec["dry"] else []
    return load_config(ROOT / "configs" / f"{spec['config']}.toml", overrides)


def context_width(text_cfg) -> int:
    """The text tokens' width without loading the encoder (the configs' encoders)."""

    return TEXT_WIDTHS[text_cfg.encoder] * len(text_cfg.hidden_layers)


# ----------------------------------------------------------------------------- peak


def peak(spec: dict) -> None:
    from benchlib import matmul_peak

    out = Result(spec["result"])
    p = matmul_peak(torch.bfloat16, spec["n"], reps=10, device=device_of(spec))
    out.update({"dtype": "bf16", "n": spec["n"], "flops_per_s": p["flops_per_s"],
                "tflops": round(p["flops_per_s"] / 1e12, 1),
                "tflops_median": round(p["flops_per_s_median"] / 1e12, 1)})
    out.save()


# ----------------------------------------------------------------------------- unet


def unet(spec: dict) -> None:
    """One config: for each batch, FLOPs and the training step in each mode."""
    from bench_unet import make_batch, params
    from ldmkit.models.unet import UNet

    device, cfg, out = device_of(spec), config_of(spec), Result(spec["result"])
    width, side = context_width(cfg.text), cfg.data.image_size // cfg.vae.downsample_factor
    latent = (cfg.vae.latent_channels, side, side)
    torch.manual_seed(0)
    with torch.device(device):
        model = UNet(cfg.unet, latent[0], width)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    out.update({"config": spec["config"], "params": params(model), "latent": list(latent),
                "text": f"{cfg.text.max_length} tokens x {width}", "batches": {}})
    out.save()
    for b in spec["batches"]:
        batch = {k: v.to(device) for k, v in make_batch(b, cfg.text.max_length,
                                                        cfg.diffusion.timesteps, latent,
                                                        width).items()}
        row = out["batches"].setdefault(str(b), {})
        row["flops"] = flops_of(model, batch)
        out.save()
        for mode in spec["modes"]:
            row[mode] = training_step(cfg, init, batch, mode, device, spec["dry"])
            out.save()
            release(device)
        if spec.get("diffusers"):
            row["bare"] = bare_steps(model, cfg, batch, latent, width, device)
            out.save()
        if "off" in spec["modes"] and device.type == "cuda":
            row["host_syncs"] = host_syncs(cfg, init, batch, device)
            out.save()


def release(device: torch.device) -> None:
    """Free the last step's weights, optimizer state and graphs before the next one."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flops_of(model, batch: dict) -> int:
    from bench_unet import step_flops

    return step_flops(model, batch)


def new_step(cfg, init: dict, mode: str, device: torch.device, dry: bool):
    """The trainer's step around a U-Net loaded with `init`, in train.compile `mode`."""
    from ldmkit.config import override_config
    from ldmkit.models.text import TextEmbeddings
    from ldmkit.models.unet import UNet
    from ldmkit.training.diffusion_step import DiffusionStep

    cfg = override_config(cfg, [f"train.compile={mode}", "train.grad_accum_steps=1"])
    width = context_width(cfg.text)
    with torch.device(device):
        unet = UNet(cfg.unet, cfg.vae.latent_channels, width)
    unet.load_state_dict(init)
    null = TextEmbeddings(torch.zeros(1, cfg.text.max_length, width, device=device),
                          torch.ones(1, cfg.text.max_length, dtype=torch.bool, device=device))
    # dry run: TorchDynamo traces, nothing is generated (inductor's C++ build takes minutes)
    return DiffusionStep(unet, cfg, null, compile_backend="eager" if dry else "inductor")


def training_step(cfg, init: dict, batch: dict, mode: str, device: torch.device,
                  dry: bool) -> dict:
    """ms per update in `mode`; the first update's time (the compile, when a mode is on);
    for a compiled mode, the largest |loss| difference to an eager twin over 3 updates from
    the same weights with the same draws."""
    from ldmkit.models.text import TextEmbeddings

    text = TextEmbeddings(batch["ctx"], batch["mask"])
    step = new_step(cfg, init, mode, device, dry)
    twin = new_step(cfg, init, "off", device, dry) if mode != "off" else None
    worst, start = 0.0, time.perf_counter()
    for i in range(3 if twin else 1):
        draws = step.draw(batch["x"])
        loss = step(batch["x"], text, draws)
        if i == 0:
            sync(device)
            first_s = time.perf_counter() - start
        if twin:
            worst = max(worst, float((loss - twin(batch["x"], text, draws)).abs()))
    del twin
    k, rounds = (2, 2) if dry else (10, 5)
    out = {"ms": round(1e3 * timed(lambda: step(batch["x"], text), device, k, rounds), 3),
           "first_step_s": round(first_s, 2), "backend": step_backend(mode, dry)}
    if mode != "off":
        out["max_loss_diff_vs_eager_3_updates"] = worst
    return out


def step_backend(mode: str, dry: bool) -> str:
    if mode == "off":
        return "eager"
    return "torch.compile, backend eager (dry run: traced only)" if dry else \
        f"torch.compile inductor, mode {mode}"


def bare_steps(model, cfg, batch: dict, latent: tuple, width: int, device) -> dict:
    """unet_step.py's step (zero_grad, bf16 forward, MSE, backward, fused AdamW) for ldmkit
    and for diffusers at the nearest parameter count; diffusers may be absent."""
    from bench_unet import DiffusersAdapter, matched_diffusers, params
    from ldmkit.training.common import make_optimizer
    from unet_step import make_step

    out: dict = {}
    # the dry run's tiny widths match diffusers only loosely: its numbers mean nothing
    tolerance = 0.5 if device.type == "cpu" else 0.1
    try:
        with torch.device(device):
            theirs, base = matched_diffusers(params(model), cfg.unet, width, latent, tolerance)
        out["diffusers"] = {"params": params(theirs), "base_width": base}
        contenders = {"ldmkit": model, "diffusers": DiffusersAdapter(theirs)}
    except (ImportError, RuntimeError) as exc:
        out["diffusers"] = {"skipped": f"{type(exc).__name__}: {exc}"}
        contenders = {"ldmkit": model}
    for name, m in contenders.items():
        step = make_step(m, make_optimizer(m.parameters(), 1e-4), batch, device)
        for _ in range(2):
            step("bf16")
        ms = [step("bf16") for _ in range(3 if device.type == "cpu" else 10)]
        out.setdefault(name, {})["ms"] = round(statistics.median(ms), 3)
    if "ms" in out["diffusers"]:
        out["ratio_ldmkit_over_diffusers"] = round(out["ldmkit"]["ms"] / out["diffusers"]["ms"],
                                                   3)
    return out


def host_syncs(cfg, init: dict, batch: dict, device) -> str:
    """One eager step with CUDA's sync check on: "none", or where the step waited."""
    from ldmkit.models.text import TextEmbeddings

    step = new_step(cfg, init, "off", device, False)
    text = TextEmbeddings(batch["ctx"], batch["mask"])
    step(batch["x"], text)
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(batch["x"], text)
    except RuntimeError as exc:
        return f"syncs: {str(exc)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "none"


# ----------------------------------------------------------------------------- sampling


def sampling(spec: dict) -> None:
    """Prompt -> image at the shapes-demo widths, random weights, bf16 autocast."""
    from bench_experiments import untrained_pipeline
    from ldmkit.diffusion.registry import HEADLINE
    from ldmkit.evaluation.fidelity import PROMPT_SEED
    from ldmkit.evaluation.prompts import prompt_set
    from ldmkit.training.diffusion_step import compile_unet

    device, out = device_of(spec), Result(spec["result"])
    pipe = untrained_pipeline(config_of({**spec, "config": "shapes-demo"})).to(device)
    mode = spec["compile"]
    pipe.unet = compile_unet(pipe.unet, mode, "eager" if spec["dry"] else "inductor")
    n = DRY["sample_batch"] if spec["dry"] else 256
    prompts = prompt_set("single", n, PROMPT_SEED)

    def generate():
        pipe.decode(pipe.generate_latents(prompts, None, HEADLINE.steps, HEADLINE.guidance,
                                          HEADLINE.sampler, torch.Generator().manual_seed(0),
                                          bf16=True))

    start = time.perf_counter()
    generate()
    first_s = time.perf_counter() - start
    seconds = timed(generate, device, 1, 2 if spec["dry"] else 3)
    out.update({"compile": mode, "batch": n, "sampler": HEADLINE.sampler,
                "steps": HEADLINE.steps, "bf16": True, "first_call_s": round(first_s, 2),
                "images_per_s": round(n / seconds, 1),
                "includes": "text encoding, sampling, VAE decode; U-Net at shapes-demo "
                            "widths, random weights"})
    out.save()


WORKERS = {"peak": peak, "unet": unet, "sampling": sampling}
