"""Optional experiments (`run_all.py --experiments`): one change at a time to the U-Net
training step or the sampler, each against its baseline, alternated A B A B.

"helped" means the variant's median is at least 5 % faster than the baseline's: smaller
differences are inside what a shared machine's drift does to medians of a few rounds.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from bench_unet import LATENT, TEXT_WIDTH, make_batch
from benchlib import DEMO_CONFIG, Sizes, alternate, available_cores
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
    batch = make_batch(sz.unet_batch, cfg.text.max_length, cfg.diffusion.timesteps)
    model = _unet(cfg)
    other = torch.compile(copy.deepcopy(model))
    start = time.perf_counter()
    compiled_step = _step(other, batch)
    compiled_step()  # compiles forward and backward
    compile_s = time.perf_counter() - start
    return compare(("eager", _step(model, batch)), ("torch.compile", compiled_step),
                   sz.unet_rounds, f"U-Net train step, bf16; compiling took {compile_s:.0f} s "
                                   "(less with a warm inductor cache)")


def bf16_sampling(cfg, sz: Sizes) -> dict:
    from bench_sample import load_pipeline, standin_pipeline
    from ldmkit.diffusion.registry import HEADLINE, SAMPLERS
    from ldmkit.evaluation.fidelity import PROMPT_SEED
    from ldmkit.evaluation.prompts import prompt_set

    pipe, _ = load_pipeline(sz)
    pipe = pipe or standin_pipeline(cfg.diffusion.timesteps)
    prompts = prompt_set("single", max(sz.sample_batch, 8), PROMPT_SEED)

    def run(bf16: bool):
        def go():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pipe.generate_latents(prompts, None, HEADLINE.steps, HEADLINE.guidance,
                                      HEADLINE.sampler, torch.Generator().manual_seed(0))
        return go

    title = SAMPLERS[HEADLINE.sampler].title
    return compare(("fp32", run(False)), ("bf16 autocast", run(True)), sz.sample_rounds + 1,
                   f"{title} {HEADLINE.steps} steps, batch {len(prompts)}, latents only")


EXPERIMENTS = {"channels_last": channels_last, "adamw_fused_vs_foreach": adamw,
               "threads": threads, "torch_compile": compiled, "bf16_sampling": bf16_sampling}


def run_experiments(sz: Sizes, only: list[str] | None = None) -> dict:
    from ldmkit.config import load_config

    cfg = load_config(DEMO_CONFIG)
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
