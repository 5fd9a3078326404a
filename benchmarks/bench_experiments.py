"""Optional experiments (`run_all.py --experiments`): one change at a time to the U-Net
training step or the sampler, each against its baseline, alternated A B A B.

    python benchmarks/bench_experiments.py torch_compile [--quick] [--threads 1]   # some

"helped" means the variant's median is at least 5 % faster than the baseline's: smaller
differences are inside what a shared machine's drift does to medians of a few rounds.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from bench_unet import LATENT, TEXT_WIDTH, make_batch
from benchlib import Sizes, alternate, available_cores, bench_config
from unet_step import make_step

HELPED = 1.05


def compare(baseline: tuple[str, callable], variant: tuple[str, callable], rounds: int,
            note: str = "", warmup: int = 1) -> dict:
    seconds = alternate({"a": baseline[1], "b": variant[1]}, rounds, warmup=warmup)
    a, b = statistics.median(seconds["a"]), statistics.median(seconds["b"])
    return {"baseline": baseline[0], "variant": variant[0], "baseline_ms": 1e3 * a,
            "variant_ms": 1e3 * b, "speedup": a / b, "helped": a / b >= HELPED,
            "rounds": rounds, "note": note}


def _unet(cfg):
    from ldmkit.models.unet import UNet

    torch.manual_seed(0)
    return UNet(cfg.unet, LATENT[0], TEXT_WIDTH)


def _step(model, batch, fused: bool = True, mode: str = "bf16"):
    from ldmkit.training.common import make_optimizer

    opt = make_optimizer(model.parameters(), 1e-4) if fused else \
        torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    step = make_step(model, opt, batch, torch.device("cpu"))
    return lambda: step(mode)


def channels_last(cfg, sz: Sizes) -> dict:
    batch = make_batch(sz.unet_batch, cfg.text.max_length, cfg.diffusion.timesteps)
    last = {**batch, "x": batch["x"].contiguous(memory_format=torch.channels_last)}
    model = _unet(cfg)
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return compare(("contiguous", _step(model, batch)), ("channels_last", _step(other, last)),
                   sz.unet_rounds, "U-Net train step, bf16")


def adamw(cfg, sz: Sizes) -> dict:
    """The optimizer step alone, on the U-Net's parameters with gradients in place."""
    from ldmkit.training.common import make_optimizer

    model = _unet(cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    fused = make_optimizer(model.parameters(), 1e-4)
    foreach = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    loop = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    out = compare(("foreach", foreach.step), ("fused", fused.step), 3 * sz.unet_rounds,
                  f"optimizer step, {sum(p.numel() for p in model.parameters()):,} params")
    out["for_loop_ms"] = 1e3 * statistics.median(alternate({"l": loop.step}, sz.unet_rounds)["l"])
    return out


def threads(cfg, sz: Sizes) -> dict:
    batch = make_batch(sz.unet_batch, cfg.text.max_length, cfg.diffusion.timesteps)
    step, before, cores = _step(_unet(cfg), batch), torch.get_num_threads(), available_cores()

    def with_threads(k: int):
        def go():
            torch.set_num_threads(k)
            try:
                step()
            finally:
                torch.set_num_threads(before)
        return go

    return compare(("1 thread", with_threads(1)), (f"{cores} threads", with_threads(cores)),
                   sz.unet_rounds, "U-Net train step, bf16; on a busy machine many threads "
                   "can be far slower (each op waits for a descheduled thread)")


def compiled(cfg, sz: Sizes) -> dict:
    """train.compile = "default" against "off": the trainer's own step (`DiffusionStep`),
    bf16, same initial weights and batch; the first compiled step's time is the compile."""
    from ldmkit.config import override_config
    from ldmkit.models.text import TextEmbeddings
    from ldmkit.training.diffusion_step import DiffusionStep

    batch = make_batch(sz.unet_batch, cfg.text.max_length, cfg.diffusion.timesteps)
    latents, text = batch["x"], TextEmbeddings(batch["ctx"], batch["mask"])
    null = TextEmbeddings(torch.zeros(1, *batch["ctx"].shape[1:]), batch["mask"][:1])
    init = _unet(cfg).state_dict()
    steps = {}
    for mode in ("off", "default"):
        unet = _unet(cfg)
        unet.load_state_dict(init)
        steps[mode] = DiffusionStep(unet, override_config(cfg, [f"train.compile={mode}",
                                                               "train.mixed_precision=bf16"]),
                                    null)
    start = time.perf_counter()
    steps["default"](latents, text)  # compiles forward and backward
    compile_s = time.perf_counter() - start
    return compare(("eager", lambda: steps["off"](latents, text)),
                   ("train.compile=default", lambda: steps["default"](latents, text)),
                   sz.unet_rounds, f"DiffusionStep, bf16, batch {sz.unet_batch}; compiling "
                                   f"took {compile_s:.0f} s (less with a warm inductor cache)")


def bf16_sampling(cfg, sz: Sizes) -> dict:
    from bench_sample import load_pipeline
    from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
    from ldmkit.evaluation.fidelity import PROMPT_SEED
    from ldmkit.evaluation.prompts import prompt_set

    pipe, _ = load_pipeline(sz, train=False)
    pipe = pipe or untrained_pipeline(bench_config("seed-small", 1))
    prompts = prompt_set("single", max(sz.sample_batch, 8), PROMPT_SEED)

    def run(bf16: bool):
        def go():
            pipe.generate_latents(prompts, None, HEADLINE.steps, HEADLINE.guidance,
                                  HEADLINE.sampler, torch.Generator().manual_seed(0), bf16=bf16)
        return go

    title = SAMPLERS[HEADLINE.sampler].title
    return compare(("fp32", run(False)), ("bf16 autocast", run(True)), sz.sample_rounds + 1,
                   f"{title} {HEADLINE.steps} steps, batch {len(prompts)}, latents only")


def untrained_pipeline(cfg):
    """A pipeline at `cfg`'s widths with random weights: it costs what a trained one costs."""
    from ldmkit.diffusion.objective import make_schedule
    from ldmkit.models.text import TextEncoder
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.pipeline import TextToImagePipeline

    text = TextEncoder.from_config(cfg.text)
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg.vae, cfg.data.image_size)
    unet = UNet(cfg.unet, cfg.vae.latent_channels, text.hidden_size)
    schedule = make_schedule(cfg.diffusion)
    return TextToImagePipeline(vae, unet, text, schedule, cfg.diffusion.objective,
                               cfg.diffusion.x0_clamp, cfg.data.image_size)


EXPERIMENTS = {"channels_last": channels_last, "adamw_fused_vs_foreach": adamw,
               "threads": threads, "torch_compile": compiled, "bf16_sampling": bf16_sampling}


def run_experiments(sz: Sizes, only: list[str] | None = None) -> dict:
    cfg = bench_config("demo", sz.unet_batch)
    out = {}
    for name, fn in EXPERIMENTS.items():
        if only and name not in only:
            continue
        print(f"experiment: {name}", flush=True)
        try:
            out[name] = fn(cfg, sz)
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the others
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


if __name__ == "__main__":
    import argparse
    import json

    from benchlib import set_threads, sizes

    ap = argparse.ArgumentParser(description="some of the optional experiments, as JSON")
    ap.add_argument("names", nargs="+", choices=list(EXPERIMENTS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads)
    print(json.dumps(run_experiments(sizes(args.quick), args.names), indent=1))
