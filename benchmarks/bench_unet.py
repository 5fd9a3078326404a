"""Rows 3 and 4: the U-Net training step against diffusers, and its share of the machine.

Row 3: ldmkit's U-Net (the bench's, pinned in benchlib: base 64 x (1, 2, 2), one block per
level, cross-attention at levels 1-2) against `diffusers.UNet2DConditionModel` with block
widths searched to the nearest parameter count (must land within 10 %), same 8x8x4 latents,
text length and width, padding mask (given to diffusers as `encoder_attention_mask`),
batch, precision, loss and AdamW. benchmarks/gpu_check.py reuses the match at the
configs' own widths.
The step is unet_step.py's (zero_grad, forward under autocast, MSE, backward, step).
Ratio = ldmkit time / diffusers time: < 1 means ldmkit is faster.

Row 4: FLOPs of one forward + backward counted by torch.utils.flop_counter (the AdamW
update, elementwise and not counted, is < 1 % of them), divided by the measured step
time, over the machine's bf16 (or fp32) matmul rate measured in the same run.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from torch import nn

from benchlib import (
    RESULTS_DIR,
    Sizes,
    alternate,
    bench_config,
    matmul_peak,
    profile_table,
    ratio_summary,
    summarize,
)
from unet_step import make_step

TARGET = 1.0
TEXT_WIDTH = 384  # MiniLM's hidden size, the demo's text encoder
LATENT = (4, 8, 8)
MODES = ("bf16", "fp32")


class DiffusersAdapter(nn.Module):
    """diffusers' U-Net behind ldmkit's call signature (x, t, context, mask)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, mask):
        return self.unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask,
                         return_dict=False)[0]


def diffusers_unet(width: int, unet_cfg, context_dim: int, latent: tuple = LATENT):
    """diffusers' U-Net shaped like ldmkit's `unet_cfg` at base `width`: the same levels
    (channel_mult), cross-attention at the same levels, plain ResBlocks elsewhere, the same
    ResBlocks per level and heads, ldmkit's group_norm rule."""
    from diffusers import UNet2DConditionModel

    levels = range(len(unet_cfg.channel_mult))
    down = tuple("CrossAttnDownBlock2D" if i in unet_cfg.cross_attn_levels else "DownBlock2D"
                 for i in levels)
    return UNet2DConditionModel(
        sample_size=latent[1], in_channels=latent[0], out_channels=latent[0],
        block_out_channels=tuple(width * m for m in unet_cfg.channel_mult),
        layers_per_block=unet_cfg.num_res_blocks, down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        cross_attention_dim=context_dim,
        attention_head_dim=unet_cfg.num_heads,  # diffusers reads it as the number of heads
        norm_num_groups=math.gcd(32, width))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_diffusers(target: int, unet_cfg, context_dim: int, latent: tuple = LATENT,
                      tolerance: float = 0.1) -> tuple[nn.Module, int]:
    """The diffusers U-Net whose parameter count is nearest `target`, base width a multiple
    of 8 (and of the heads); raises if the nearest is off by more than `tolerance`. The
    search builds the candidates on the meta device: shapes only, no memory, no init time."""
    best = None
    for width in range(8, 1025, 8):
        if width % unet_cfg.num_heads:
            continue
        with torch.device("meta"):
            count = params(diffusers_unet(width, unet_cfg, context_dim, latent))
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (width, count)
        if count > 1.2 * target:
            break
    width, count = best
    if abs(count - target) > tolerance * target:
        raise RuntimeError(f"no diffusers width within {tolerance:.0%} of {target} parameters "
                           f"(nearest: base {width}, {count})")
    torch.manual_seed(0)
    return diffusers_unet(width, unet_cfg, context_dim, latent), width


def make_batch(batch: int, tokens: int, timesteps: int, latent: tuple = LATENT,
               width: int = TEXT_WIDTH) -> dict:
    """Random latents, targets and text with a padding mask of 4..tokens real tokens."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(min(4, tokens), tokens + 1, (batch,), generator=g)
    return {"x": torch.randn(batch, *latent, generator=g),
            "target": torch.randn(batch, *latent, generator=g),
            "t": torch.randint(0, timesteps, (batch,), generator=g),
            "ctx": torch.randn(batch, tokens, width, generator=g),
            "mask": torch.arange(tokens)[None, :] < lengths[:, None]}


def step_flops(model: nn.Module, batch: dict) -> int:
    """FLOPs of one forward + backward (fp32; the count is the same under autocast)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = model(batch["x"], batch["t"], batch["ctx"], batch["mask"])
        torch.nn.functional.mse_loss(out.float(), batch["target"]).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def build(sz: Sizes) -> dict:
    from ldmkit.models.unet import UNet
    from ldmkit.training.common import make_optimizer

    cfg = bench_config("demo", sz.unet_batch)
    torch.manual_seed(0)
    ours = UNet(cfg.unet, LATENT[0], TEXT_WIDTH)
    theirs, width = matched_diffusers(params(ours), cfg.unet, TEXT_WIDTH)
    theirs = DiffusersAdapter(theirs)
    batch = make_batch(sz.unet_batch, cfg.text.max_length, cfg.diffusion.timesteps)
    models = {"ldmkit": ours, "diffusers": theirs}
    steps = {name: make_step(m, make_optimizer(m.parameters(), 1e-4), batch,
                             torch.device("cpu")) for name, m in models.items()}
    return {"cfg": cfg, "models": models, "steps": steps, "batch": batch, "width": width}


def unet_rows(sz: Sizes, profile_dir: Path = RESULTS_DIR, force_profile: bool = False) -> dict:
    b = build(sz)
    k = sz.unet_steps

    def contender(name: str, mode: str):
        return lambda: [b["steps"][name](mode) for _ in range(k)]

    runs = {f"{n}_{m}": contender(n, m) for m in MODES for n in b["models"]}
    seconds = {key: [s / k for s in v] for key, v in alternate(runs, sz.unet_rounds).items()}
    ratio = {m: ratio_summary(seconds[f"ldmkit_{m}"], seconds[f"diffusers_{m}"]) for m in MODES}
    flops = {n: step_flops(m, b["batch"]) for n, m in b["models"].items()}
    peak = {m: matmul_peak(torch.bfloat16 if m == "bf16" else torch.float32, sz.matmul_n)
            for m in MODES}
    achieved = {m: flops["ldmkit"] / statistics.median(seconds[f"ldmkit_{m}"]) for m in MODES}
    cfg, ours = b["cfg"], b["models"]["ldmkit"]
    row = {
        "unet_step_time_ratio_vs_diffusers": ratio["bf16"]["median_of_medians"],
        "unet_step_time_ratio_vs_diffusers_spread": ratio["bf16"],
        "unet_step_time_ratio_vs_diffusers_fp32": ratio["fp32"]["median_of_medians"],
        "unet_target": TARGET,
        "unet_target_met": ratio["bf16"]["median_of_medians"] <= TARGET,
        **{f"unet_step_ms_{key}": summarize([1e3 * s for s in v], 2)
           for key, v in seconds.items()},
        "unet_bf16_speedup_over_fp32": ratio_summary(
            seconds["ldmkit_fp32"], seconds["ldmkit_bf16"])["median_of_medians"],
        "unet_params_ldmkit": params(ours),
        "unet_params_diffusers": params(b["models"]["diffusers"]),
        "unet_setup": {
            "batch": sz.unet_batch, "latent": "x".join(map(str, LATENT)),
            "text": f"{cfg.text.max_length} tokens x {TEXT_WIDTH}, padding mask",
            "ldmkit": f"base {cfg.unet.base_channels} x {tuple(cfg.unet.channel_mult)}, "
                      f"cross-attn levels {cfg.unet.cross_attn_levels}, {cfg.unet.num_heads} heads",
            "diffusers": f"UNet2DConditionModel block_out_channels "
                         f"{tuple(b['width'] * m for m in cfg.unet.channel_mult)}, "
                         f"layers_per_block {cfg.unet.num_res_blocks}, "
                         f"{cfg.unet.num_heads} heads, norm groups {math.gcd(32, b['width'])}",
            "optimizer": "ldmkit make_optimizer (fused AdamW) for both",
            "rounds": sz.unet_rounds, "steps_per_round": k},
        "unet_step_gflops": {n: round(f / 1e9, 2) for n, f in flops.items()},
        "matmul_peak_tflops": {m: round(p["flops_per_s"] / 1e12, 3) for m, p in peak.items()},
        "matmul_median_tflops": {m: round(p["flops_per_s_median"] / 1e12, 3)
                                 for m, p in peak.items()},
        "matmul_n": sz.matmul_n,
        "unet_achieved_tflops": {m: round(a / 1e12, 4) for m, a in achieved.items()},
        "bf16_peak_utilisation": round(achieved["bf16"] / peak["bf16"]["flops_per_s"], 4),
        "fp32_peak_utilisation": round(achieved["fp32"] / peak["fp32"]["flops_per_s"], 4),
    }
    if force_profile or not row["unet_target_met"]:
        row["unet_profiles"] = [str(profile_table(
            runs[f"{name}_bf16"], profile_dir / f"profile_unet_{name}.txt",
            f"U-Net training step, {name}, bf16 autocast, batch {sz.unet_batch}", calls=1))
            for name in ("ldmkit", "diffusers")]
    return row
