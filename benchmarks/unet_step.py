"""Time one U-Net training step (forward + backward + AdamW) on random latents and tokens,
fp32 against bf16 autocast, alternating the two so drift in machine load hits both alike.

    python benchmarks/unet_step.py [--config configs/shapes-demo.toml] [--batch 128] ...

Prints one JSON object: per mode the median and every step time in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from ldmkit.config import load_config
from ldmkit.models.unet import UNet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/shapes-demo.toml")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--latent-size", type=int, default=8)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--context-dim", type=int, default=384, help="384 MiniLM, 512 CLIP B/32")
    p.add_argument("--tokens", type=int, default=0, help="0 = the config's text.max_length")
    p.add_argument("--modes", default="fp32,bf16")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per mode")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU intra-op threads; 0 = torch's default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def make_step(model: UNet, opt: torch.optim.Optimizer, batch: dict, device: torch.device):
    """A closure running one optimiser step in a given mode; returns its wall time in ms."""
    def step(mode: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = model(batch["x"], batch["t"], batch["ctx"], batch["mask"])
        F.mse_loss(out.float(), batch["target"]).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3
    return step


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    device = torch.device(args.device)
    tokens = args.tokens or cfg.text.max_length
    model = UNet(cfg.unet, args.latent_channels, args.context_dim).to(device)
    torch.nn.init.normal_(model.conv_out.weight, std=0.02)  # zero-init would skip real work
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = (args.batch, args.latent_channels, args.latent_size, args.latent_size)
    g = torch.Generator(device=device).manual_seed(0)
    batch = {
        "x": torch.randn(shape, generator=g, device=device).contiguous(memory_format=memory),
        "target": torch.randn(shape, generator=g, device=device),
        "t": torch.randint(0, cfg.diffusion.timesteps, (args.batch,), generator=g, device=device),
        "ctx": torch.randn(args.batch, tokens, args.context_dim, generator=g, device=device),
        "mask": torch.ones(args.batch, tokens, dtype=torch.bool, device=device),
    }
    batch["mask"][:, tokens // 2:] = False  # realistic padding
    step = make_step(model, opt, batch, device)
    modes = args.modes.split(",")
    for mode in modes:
        for _ in range(args.warmup):
            step(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:  # alternate, so slow phases of a shared machine hit every mode
            times[mode].append(step(mode))
    result = {
        "benchmark": "unet_step",
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": args.config,
        "unet": cfg.unet.__dict__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "latent": list(shape[1:]),
        "tokens": tokens,
        "context_dim": args.context_dim,
        "channels_last": args.channels_last,
        "results": {m: {"median_ms": round(statistics.median(v), 2),
                        "times_ms": [round(x, 2) for x in v]} for m, v in times.items()},
    }
    if "fp32" in times and "bf16" in times:
        result["bf16_speedup"] = round(statistics.median(times["fp32"])
                                       / statistics.median(times["bf16"]), 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
