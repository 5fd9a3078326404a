"""The `ldmkit` command. Parsers live here; each command's work lives in the module named
for it and is imported only when that command runs (so `ldmkit --help` is instant).

Exit codes: 0 success, 2 bad usage/config/input (message names the culprit), 1 unexpected.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from ldmkit import __version__
from ldmkit.diffusion.registry import HEADLINE, SAMPLERS  # torch-free: --help stays instant
from ldmkit.errors import UserError


def _add_config_args(p: argparse.ArgumentParser, required: bool = False,
                     resolve: bool = True) -> None:
    """--config FILE and overrides. With `resolve`, `main` hands the command the validated
    Config as `args.cfg` (the library never parses command lines itself)."""
    p.add_argument("--config", required=required, help="TOML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.batch_size=64")
    p.set_defaults(resolve_config=resolve)


def _add_device_arg(p: argparse.ArgumentParser, what: str = "the model") -> None:
    # same words as ldmkit.devices.DEVICE_HELP, repeated here so --help needs no torch
    p.add_argument("--device", default="auto",
                   help=f"where {what} runs: auto (the GPU when there is one, else the CPU), "
                        "cpu, cuda or cuda:N (default %(default)s)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """Shortcut flags for the data section; they become data.* overrides."""
    p.add_argument("--dataset", choices=("shapes", "coco", "folder"))
    p.add_argument("--root", help="dataset folder (coco, folder)")
    p.add_argument("--split", help="coco split (train, val)")


def _add_decoder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", metavar="DIR", default=None,
                   help="decode with this VAE folder instead of the model's (same latents, "
                        "e.g. a decoder fine-tune)")


def _add_lora_args(p: argparse.ArgumentParser, merge_flag: bool = True) -> None:
    p.add_argument("--lora", metavar="DIR", default=None,
                   help="a LoRA adapter folder (ldmkit train --init-from ... lora.rank=N)"
                        + ("" if merge_flag else "; merged into the weights at start"))
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="the adapter's weight, 0 = the base model (default %(default)s)")
    if merge_flag:
        p.add_argument("--merge", action="store_true",
                       help="merge the adapter into the weights: sampling at the base's speed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldmkit", description="Train and run a text-to-image latent diffusion model.")
    parser.add_argument("--version", action="version", version=f"ldmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train both stages on the built-in shapes data, judge, report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=None, help="training budget (both stages)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI)")
    _add_device_arg(p, "generation and judging (training follows Accelerate)")
    _add_config_args(p, resolve=False)  # the demo layers its own defaults (demo_config)
    p.set_defaults(handler="ldmkit.demo:cli_demo")

    p = sub.add_parser("demo-emoji", help="the demo on real images: emoji data (npm), VAE, "
                                          "U-Net, generation, emoji judge, report")
    p.add_argument("--out", default="runs/emoji")
    p.add_argument("--data", default="runs/emoji-data",
                   help="emoji folder; written by `ldmkit data emoji` when missing")
    p.add_argument("--vendors", default=None, help="comma-separated: google, twitter")
    p.add_argument("--archive", nargs="+", metavar="FILE.tgz",
                   help="emoji-datasource-<vendor> archives instead of npm pack")
    p.add_argument("--allow-unpinned", action="store_true")
    p.add_argument("--judge", default=None, help="emoji judge .safetensors (default: shipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tests)")
    _add_device_arg(p, "generation and judging (training follows Accelerate)")
    _add_config_args(p, resolve=False)  # the demo layers its own defaults (emoji_config)
    p.set_defaults(handler="ldmkit.emoji_demo:cli_demo_emoji")

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved, validated config as JSON")
    _add_config_args(show)
    show.set_defaults(handler="ldmkit.cli:cli_config_show")

    p = sub.add_parser("data", help="check, preview or write datasets (emoji)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = dsub.add_parser("check", help="read every item and report problems")
    _add_data_args(check)
    check.add_argument("--json", action="store_true", help="print only the JSON report")
    _add_config_args(check)
    check.set_defaults(handler="ldmkit.data.check:cli_check")
    preview = dsub.add_parser("preview", help="write a captioned grid of dataset items")
    _add_data_args(preview)
    preview.add_argument("--out", default="preview.png")
    preview.add_argument("--n", type=int, default=16)
    _add_config_args(preview)
    preview.set_defaults(handler="ldmkit.data.check:cli_preview")
    emoji = dsub.add_parser("emoji", help="write the emoji image folder (npm packages of "
                                          "Noto Emoji and Twemoji, pinned; see data/emoji.py)")
    emoji.add_argument("--out", required=True, help="folder to write (train/, heldout/, ...)")
    emoji.add_argument("--vendors", default=None,
                       help="comma-separated: google, twitter (default: both, or the archives')")
    emoji.add_argument("--archive", nargs="+", metavar="FILE.tgz",
                       help="use these emoji-datasource-<vendor> archives instead of npm pack")
    emoji.add_argument("--allow-unpinned", action="store_true",
                       help="accept archives of versions other than the pinned ones (unverified)")
    emoji.set_defaults(handler="ldmkit.data.emoji:cli_emoji")

    p = sub.add_parser("train-vae", help="stage 1: train the KL-VAE")
    p.add_argument("--out", default="runs/vae", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--init-from", metavar="DIR", default=None,
                   help="fine-tune: start from this VAE (or model folder's vae/); its "
                        "architecture must be the config's (vae.freeze_encoder=true trains "
                        "the decoder only, docs/editing.md)")
    _add_config_args(p, required=True)
    p.set_defaults(handler="ldmkit.training.vae_trainer:cli_train_vae")

    p = sub.add_parser("evaluate-vae", help="PSNR / SSIM of a trained VAE on held-out images")
    p.add_argument("--vae", required=True, help="VAE folder (config.json + model.safetensors)")
    p.add_argument("--out", default=None, help="JSON file (default: <vae>/evaluation.json)")
    _add_data_args(p)
    _add_config_args(p)
    p.set_defaults(handler="ldmkit.evaluation.vae_metrics:cli_evaluate_vae")

    p = sub.add_parser("train", help="stage 2: train the conditional U-Net (VAE frozen)")
    p.add_argument("--vae", default=None,
                   help="trained VAE folder (required unless --init-from gives one)")
    p.add_argument("--out", default="runs/diffusion", help="run directory")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", metavar="MODEL_DIR", default=None,
                   help="fine-tune this model folder's denoiser (with [lora] rank > 0: a "
                        "LoRA adapter on it), keeping its text encoder, schedule and "
                        "geometry; without --config its settings are the run's")
    _add_config_args(p)
    p.set_defaults(handler="ldmkit.training.diffusion_trainer:cli_train")

    p = sub.add_parser("cache", help="encode the dataset's latents and captions once, in "
                                     "shards (several processes share the work)")
    p.add_argument("--vae", required=True, help="trained VAE folder")
    p.add_argument("--out", default=None, help="cache folder (default: text.cache_dir, else "
                                               "runs/diffusion/cache, where train looks)")
    _add_config_args(p, required=True)
    p.set_defaults(handler="ldmkit.training.latent_cache:cli_cache")

    p = sub.add_parser("sample", help="generate images from a prompt")
    p.add_argument("--model", required=True, help="model folder (docs/model-folder.md)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=HEADLINE.steps,
                   help="denoising steps (default %(default)s)")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default=HEADLINE.sampler,
                   help="one of %(choices)s (default %(default)s)")
    p.add_argument("--guidance", type=float, default=HEADLINE.guidance,
                   help="classifier-free guidance scale (default %(default)s)")
    p.add_argument("--guidance-rescale", type=float, default=HEADLINE.guidance_rescale,
                   help="Lin et al.'s phi, 0..1; 0 = plain CFG (default %(default)s)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--progress", action="store_true", help="also write denoising frames")
    p.add_argument("--init-image", metavar="FILE", default=None,
                   help="img2img: start from this picture (square; resized to the model's "
                        "size); with --mask, inpaint it")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of --init-image to redraw, 0..1: 0 = its VAE round trip, "
                        "1 = text-to-image (default 0.8; 1 with --mask)")
    p.add_argument("--mask", metavar="FILE", default=None,
                   help="inpainting: white = repaint, black = keep (the picture's size)")
    p.add_argument("--source-prompt", metavar="TEXT", default=None,
                   help="layout edit: what --init-image shows (\"a red square\"); --prompt's "
                        "change then keeps its shapes and places (try --guidance 20; it "
                        "samples with DDPM, whatever --sampler says)")
    p.add_argument("--mask-feather", type=int, default=1,
                   help="latent cells over which the mask's edge blends (default %(default)s)")
    p.add_argument("--resample-steps", type=int, default=0,
                   help="RePaint passes per inpainting step (default %(default)s)")
    _add_decoder_arg(p)
    _add_lora_args(p)
    _add_device_arg(p)
    p.set_defaults(handler="ldmkit.sample:cli_sample")

    p = sub.add_parser("serve", help="HTTP API and web page over a model (FastAPI + uvicorn)")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _add_device_arg(p)
    p.add_argument("--queue-size", type=int, default=64,
                   help="requests waiting at most; more get 503 (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="images per U-Net batch; 1 = no batching (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=("warning", "info", "debug"))
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="every API route then needs 'Authorization: Bearer KEY' (or "
                        "x-api-key); default: $LDMKIT_API_KEY, else no key")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let browser pages on ORIGIN (e.g. http://localhost:3000, or *) "
                        "call the API; repeat for more")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host beyond this machine (e.g. 0.0.0.0) without a key")
    p.add_argument("--model-id", default="ldmkit",
                   help="the model's name in the OpenAI and A1111 APIs (default %(default)s)")
    _add_decoder_arg(p)
    _add_lora_args(p, merge_flag=False)  # one adapter for every request: always merged
    p.set_defaults(handler="ldmkit.server.app:cli_serve")

    p = sub.add_parser("evaluate", help="judge prompt fidelity of a model on the shapes data")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default=None, help="JSON file (default: <model>/evaluation.json)")
    p.add_argument("--n", type=int, default=200, help="images per headline entry")
    p.add_argument("--quick", action="store_true", help="fewer entries, fewer images")
    _add_device_arg(p, "generation (the judge runs on the CPU)")
    p.set_defaults(handler="ldmkit.evaluation.fidelity:cli_evaluate")
    return parser


def config_from_args(args: argparse.Namespace):
    """The validated Config for a command: --config file, data shortcut flags, overrides."""
    from ldmkit.config import load_config

    overrides = list(getattr(args, "overrides", None) or [])
    for flag in ("dataset", "root", "split"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.insert(0, f"data.{flag}={json.dumps(value)}")
    return load_config(getattr(args, "config", None), overrides)


def cli_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(args.cfg.to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    module_name, func_name = args.handler.split(":")
    try:
        if getattr(args, "resolve_config", False):
            args.cfg = config_from_args(args)
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except UserError as exc:
        print(f"ldmkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ldmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
