# Question: can the trained shapes demo learn a colour it never saw (pink) in <= 3 CPU-minutes,
# by a fine-tune and by a LoRA of rank <= 8, without forgetting? Answer: BENCHMARKS.md
# "Teaching a colour"; results/teach_colour.json and teach_colour.png
"""Teach the shapes demo model pink from 500 captioned renders, two ways, on one CPU thread.

The demo's VAE was never shown pink and gives it back as purple (a round trip lands at hue
~284, pink is 330), so no denoiser alone can draw it: every way starts with a decoder-only
VAE fine-tune (`train-vae --init-from`, `vae.freeze_encoder=true`: the latents, and so the
trained denoiser's whole world, stay the same). Then

  full: `ldmkit train --init-from MODEL` on the new VAE, every U-Net weight trains;
  lora: the same run with a rank-4 LoRA (PEFT adapters on the attention projections and
        the ResBlocks' 3x3 convolutions; --attention-only for the projections alone), the
        base weights frozen.

Of the 500 images, half are pink for the full fine-tune and 15 % for the LoRA
(data.extra_color_fraction), the rest the six old colours: the old data is rehearsed, which
is what keeps the old prompts, and an adapter needs more of it (BENCHMARKS.md). Each run is a fixed
number of updates, so what it learns does not depend on the machine's load; its cost is the
CPU seconds the child process used (user + system, from getrusage), not wall time.

Read with the shipped judge and a hue test (ldmkit.evaluation.hue; the judge knows only the
six training colours):
  pink:   200 one-object prompts of the "single" set with their colour word made "pink":
          the share whose object's hue reads pink, and the share that also has the prompt's
          shape, size and place by the judge;
  old:    the demo's headline fidelity on its three prompt sets (200 prompts each, the same
          prompts and noise as evaluation.json), base model against each taught one.

    .venv/bin/python benchmarks/studies/teach_colour.py runs/demo/model
    -> benchmarks/results/teach_colour.json, teach_colour.png (work in runs/teach-colour/)
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"  # the children too: CPU seconds on one core

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchlib: benchmarks/
import torch  # noqa: E402

from benchlib import DEMO_CONFIG, DEMO_MODEL, RESULTS_DIR, ROOT, machine_info, run_study  # noqa: E402
from ldmkit.data.shapes import COLORS  # noqa: E402
from ldmkit.diffusion.registry import HEADLINE  # noqa: E402
from ldmkit.evaluation.fidelity import PROMPT_SETS, Entry, FidelityEvaluator  # noqa: E402

COLOUR = "pink"
DATA = (f"data.extra_colors=['{COLOUR}']", "data.num_items=500")
VAE_RUN = ("vae.freeze_encoder=true", "vae.steps=600", "vae.warmup_steps=0", "vae.lr=5e-4")
UNET_RUN = ("train.steps=600", "train.batch_size=64", "train.warmup_steps=20",
            "train.validation_prompts=[]", "train.checkpoint_every=1000")
FULL_LR, LORA_LR = 2e-4, 1e-3  # an adapter starts at zero and needs the larger steps
# An adapter forgets the old prompts more than a full fine-tune does on the same data:
# fewer pink images (more of the old ones rehearsed) keep them (BENCHMARKS.md).
LORA_PINK_FRACTION = 0.15
PINK_PROMPTS = 200
PROMPT_SEED = 7  # not the evaluation sets' seed: other prompts than evaluation.json's
COLOUR_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b")


def ldmkit_run(out: Path, *args: str) -> float:
    """Run one `ldmkit` training into `out` and return the CPU seconds it used (kept in
    out/cpu_seconds.json with the command: a finished run of the same command is read, not
    trained again; one of another command is refused)."""
    from ldmkit.io import read_json, write_json_atomic

    record = out / "cpu_seconds.json"
    if record.exists():
        done = read_json(record)
        if done.get("args", list(args)) != list(args):
            sys.exit(f"{out} holds a run of another command; remove it or give another --work")
        return done["cpu_s"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "ldmkit.cli", *args, "--out", str(out)], check=True,
                   cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1)
    write_json_atomic(record, {"cpu_s": cpu, "args": list(args)})
    return cpu


def teach(base: Path, work: Path, rank: int, lora_conv: bool, lora_lr: float,
          lora_fraction: float) -> dict[str, float]:
    """The three runs -> the CPU seconds of each."""
    common = ("--config", str(DEMO_CONFIG), *DATA)
    vae = work / "vae" / "model"
    targets = "['attention', 'conv']" if lora_conv else "['attention']"
    unet_runs = {"full": (f"train.lr={FULL_LR}",),
                 "lora": (f"train.lr={lora_lr}", f"lora.rank={rank}", f"lora.targets={targets}",
                          f"data.extra_color_fraction={lora_fraction}")}
    cpu = {"vae": ldmkit_run(work / "vae", "train-vae", "--init-from", str(base / "vae"),
                             *common, *VAE_RUN)}
    for name, extra in unet_runs.items():
        cpu[name] = ldmkit_run(work / name, "train", "--init-from", str(base), "--vae", str(vae),
                               *common, *UNET_RUN, *extra)
    return cpu


def pink_prompts(n: int) -> tuple[list[str], list[str]]:
    """(the prompts in pink, the same prompts in their own colour) for the judge's reading
    of everything but the colour."""
    from ldmkit.evaluation.prompts import prompt_set

    own = [p for p in prompt_set("single", 4 * n, PROMPT_SEED) if COLOUR_WORD.search(p)][:n]
    pink = [COLOUR_WORD.sub(COLOUR, p, count=1) for p in own]
    return [re.sub(rf"\ban {COLOUR}\b", f"a {COLOUR}", p) for p in pink], own  # "an orange"


def read_pink(pipe, evaluator: FidelityEvaluator, n: int) -> tuple[dict, torch.Tensor]:
    from ldmkit.evaluation.hue import reads_as
    from ldmkit.evaluation.judge import judge_images
    from ldmkit.evaluation.prompts import prompt_matches
    from ldmkit.viz import to_pil

    pink, own = pink_prompts(n)
    latents = pipe.generate_latents(pink, generator=torch.Generator().manual_seed(0),
                                    bf16=evaluator.bf16)
    images = pipe.decode(latents)
    is_pink = reads_as(to_pil(images), COLOUR)
    # the judge reads shape, size and place; the hue test reads the colour
    judged_colour_blind = [_with_prompt_colour(s, p) for s, p in
                           zip(judge_images(evaluator.judge, images), own)]
    rest = prompt_matches(judged_colour_blind, own)
    return {"reads_pink": sum(is_pink) / n,
            "pink_and_rest_right": sum(a and b for a, b in zip(is_pink, rest)) / n}, images


def _with_prompt_colour(scene, prompt: str):
    """The judged scene with its colour set to the prompt's: a match then tests the rest."""
    from dataclasses import replace

    colour = COLOUR_WORD.search(prompt).group(1)
    return replace(scene, objects=tuple(replace(o, color=colour) for o in scene.objects))


def old_fidelity(pipe, evaluator: FidelityEvaluator, n: int) -> dict[str, float]:
    return {s: evaluator.score(evaluator.images(pipe, Entry(s, HEADLINE.sampler, HEADLINE.steps,
                                                            HEADLINE.guidance, n)), s)
            for s in PROMPT_SETS}


def adapter_share(lora_dir: Path, base: Path) -> dict:
    from safetensors.torch import load_file

    def count(path: Path) -> int:
        return sum(t.numel() for t in load_file(path).values())

    adapter = count(lora_dir / "adapter_model.safetensors")
    unet = sum(count(p) for p in (base / "unet").glob("*.safetensors"))
    return {"adapter_parameters": adapter, "unet_parameters": unet,
            "share": round(adapter / unet, 4)}


def figure(rows: dict[str, torch.Tensor], path: Path) -> None:
    from ldmkit.viz import save_image_grid

    pink, _ = pink_prompts(PINK_PROMPTS)
    per_row = 10
    images = torch.cat([imgs[:per_row] for imgs in rows.values()])
    captions = [f"{name}: {p}" if i == 0 else p for name in rows
                for i, p in enumerate(pink[:per_row])]
    save_image_grid(images, path, nrow=per_row, captions=captions, scale=3)


def main() -> None:
    from ldmkit.io import write_json_atomic
    from ldmkit.pipeline import TextToImagePipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, nargs="?", default=DEMO_MODEL,
                    help="the trained demo model folder (ldmkit demo's model/)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "teach-colour",
                    help="where the runs go; a run already there is read, not retrained")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lora-lr", type=float, default=LORA_LR)
    ap.add_argument("--lora-pink-fraction", type=float, default=LORA_PINK_FRACTION,
                    help="the LoRA run's share of pink images (the full fine-tune: 0.5)")
    ap.add_argument("--attention-only", action="store_true",
                    help="adapters on the attention projections only, not the convs too")
    ap.add_argument("--n", type=int, default=200, help="prompts per old prompt set")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "teach_colour.json")
    args = ap.parse_args()

    cpu = teach(args.model.resolve(), args.work.resolve(), args.rank,
                not args.attention_only, args.lora_lr, args.lora_pink_fraction)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    evaluator = FidelityEvaluator()
    models = {"base": args.model, "full": args.work / "full" / "model",
              "lora": args.work / "lora" / "model"}
    results, pictures = {}, {}
    for name, folder in models.items():
        pipe = TextToImagePipeline.from_pretrained(folder, "cpu")
        pink, pictures[name] = read_pink(pipe, evaluator, PINK_PROMPTS)
        results[name] = {**pink, "old_sets": old_fidelity(pipe, evaluator, args.n)}
        if name in cpu:  # the VAE's decoder fine-tune is part of every taught model's cost
            results[name].update(cpu_s=cpu[name], total_cpu_minutes=round(
                (cpu["vae"] + cpu[name]) / 60, 2))
        print(name, results[name], flush=True)
    results["lora"].update(adapter_share(args.work / "lora" / "lora", args.model))
    figure(pictures, args.out.with_suffix(".png"))
    write_json_atomic(args.out, {
        "machine": machine_info(), "colour": COLOUR, "data": list(DATA),
        "vae_run": {"overrides": list(VAE_RUN), "cpu_s": cpu["vae"]},
        "unet_run": {"overrides": list(UNET_RUN), "full_lr": FULL_LR, "lora_lr": args.lora_lr,
                     "lora_pink_fraction": args.lora_pink_fraction,
                     "rank": args.rank, "lora_conv": not args.attention_only},
        "headline": {"sampler": HEADLINE.sampler, "steps": HEADLINE.steps,
                     "guidance": HEADLINE.guidance, "n": args.n},
        "models": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_study(main)
