"""TextToImagePipeline: prompt -> text embeddings -> guided sampler over latents -> VAE decode.

The model directory (like a diffusers repo, loaded without executing anything from it):

    model_index.json     what this folder is, and the ldmkit version that wrote it
    vae/                 config.json + model.safetensors (with the latent scale factor)
    unet/                config.json + model.safetensors (the EMA weights)
    text_encoder.json    Hugging Face name or path of the frozen encoder, max_length, dtype
    scheduler.json       the objective (eps | v on a DDPM schedule: kind, T; or flow: T,
                         shift), the network's prediction type, x0 clamp
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from ldmkit import __version__
from ldmkit.devices import resolve_device
from ldmkit.diffusion.editing import KnownRegion, sample_from
from ldmkit.diffusion.guidance import CFGDenoiser
from ldmkit.diffusion.objective import Schedule, schedule_from_dict, scheduler_dict
from ldmkit.diffusion.registry import HEADLINE
from ldmkit.editing import EditInputs, edit_latents, edited_images, prepare_edit
from ldmkit.errors import UserError
from ldmkit.io import read_json, write_json_atomic
from ldmkit.layout_edit import layout_edit_latents
from ldmkit.models.denoiser import FolderModel, load_denoiser
from ldmkit.models.text import TextEmbeddings, TextEncoder, check_prompts
from ldmkit.models.vae import AutoencoderKL
from ldmkit.sampling_args import (
    CHUNK,
    NonFiniteOutputError,
    SamplingArgumentError,
    check_count,
    check_eta,
    check_guidance,
    check_guidance_rescale,
    check_prompt,
    check_sampler,
    check_steps,
)
from ldmkit.viz import to_pil

REQUIRED_FILES = ("model_index.json", "scheduler.json", "text_encoder.json",
                  "vae/config.json", "vae/model.safetensors",
                  "unet/config.json", "unet/model.safetensors")
# Formats that unpickle (run code) when loaded: a folder holding one is refused outright.
LORA_SCALE_MAX = 4.0
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class TextToImagePipeline:
    """Generate images from prompts with classifier-free guidance."""

    def __init__(self, vae: AutoencoderKL, unet: FolderModel, text_encoder: TextEncoder,
                 schedule: Schedule, prediction: str = "eps", x0_clamp: float = 0.0,
                 image_size: int | None = None):
        if unet.in_channels != vae.config.latent_channels:
            raise UserError(f"unet in_channels {unet.in_channels} != vae latent_channels "
                            f"{vae.config.latent_channels}")
        if unet.context_dim != text_encoder.hidden_size:
            raise UserError(f"unet context_dim {unet.context_dim} != text encoder hidden size "
                            f"{text_encoder.hidden_size} ({text_encoder.name})")
        self.vae, self.unet = vae.eval(), unet.eval()
        self.text_encoder, self.schedule = text_encoder, schedule
        self.prediction, self.x0_clamp = prediction, x0_clamp
        self.image_size = image_size or vae.image_size or 64
        self.lora: dict | None = None  # the loaded adapter's record (load_lora)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def with_unet(self, unet: FolderModel) -> TextToImagePipeline:
        """The same pipeline around other U-Net weights (e.g. a training snapshot), moved
        to this pipeline's device and put through the constructor's fit checks again."""
        return TextToImagePipeline(self.vae, unet.to(self.device), self.text_encoder,
                                   self.schedule, self.prediction, self.x0_clamp,
                                   self.image_size)

    def with_vae(self, vae: AutoencoderKL) -> TextToImagePipeline:
        """The same pipeline decoding (and encoding) with another VAE of the same latent
        space, e.g. a decoder fine-tune (`train-vae --init-from`, vae.freeze_encoder)."""
        return TextToImagePipeline(vae.to(self.device).eval(), self.unet, self.text_encoder,
                                   self.schedule, self.prediction, self.x0_clamp,
                                   self.image_size)

    def to(self, device: str | torch.device) -> TextToImagePipeline:
        for part in (self.vae, self.unet, self.text_encoder):
            part.to(device)
        return self

    # ------------------------------------------------------------------ generation

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        h, w = self.vae.latent_size(self.image_size)
        return batch, self.vae.config.latent_channels, h, w

    def denoiser(self, cond: TextEmbeddings, uncond: TextEmbeddings, guidance_scale: float,
                 guidance_rescale: float = HEADLINE.guidance_rescale,
                 two_pass: bool = False) -> CFGDenoiser:
        device = self.device
        return CFGDenoiser(self.unet, self.schedule, self.prediction, cond.to(device),
                           uncond.to(device), guidance_scale, guidance_rescale, self.x0_clamp,
                           two_pass)

    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T for `n` images, drawn on the CPU so a seed gives the same images on any
        device. A chunk of images draws its noise in one call, after the previous chunk."""
        return torch.randn(self.latent_shape(n), generator=generator)

    def conditioning(self, prompts: Sequence[str], negative_prompt: str | None = None
                     ) -> tuple[TextEmbeddings, TextEmbeddings]:
        """(cond with one row per prompt, uncond of batch 1). Each distinct prompt is
        encoded once, so a prompt's embedding does not depend on how often it repeats
        (the server relies on this: a request batched with others is encoded as alone)."""
        distinct = list(dict.fromkeys(prompts))
        cond = self.text_encoder.encode(distinct)
        if len(distinct) < len(prompts):
            row = {p: i for i, p in enumerate(distinct)}
            cond = cond.index_select(torch.tensor([row[p] for p in prompts]))
        uncond = (self.text_encoder.null() if negative_prompt is None
                  else self.text_encoder.encode([negative_prompt]))
        return cond, uncond

    @torch.no_grad()
    def denoise(self, x_T: torch.Tensor, cond: TextEmbeddings, uncond: TextEmbeddings,
                num_inference_steps: int, guidance_scale: float, sampler: str,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                eta: float = 0.0, guidance_rescale: float = HEADLINE.guidance_rescale,
                two_pass: bool = False, bf16: bool = False, start: int = 0,
                known: tuple[torch.Tensor, torch.Tensor] | None = None,
                resample: int = 0) -> torch.Tensor:
        """The guided sampler from given noise and conditioning (rows = images): the one
        loop that `generate_latents`, the edits and the server's batches run. An edit
        starts at grid level `start` (x_T is then the picture noised to it) and may hold
        `known` = (latents, latent mask, 1 = repaint) with `resample` RePaint passes
        (diffusion/editing.py). Arguments are trusted (checked by the callers);
        non-finite latents are refused."""
        x_T = x_T.to(self.device)
        denoiser = self.denoiser(cond, uncond, guidance_scale, guidance_rescale, two_pass)
        if known is not None:
            denoiser = KnownRegion(denoiser, self.schedule, *(k.to(self.device) for k in known))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            latents = sample_from(sampler, denoiser, x_T, self.schedule, num_inference_steps,
                                  start, resample, eta=eta,
                                  generator=_device_generator(generator, self.device),
                                  callback=callback).float()
        return check_finite(latents, "latents")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) in [-1, 1] -> scaled latents (the posterior's mean, so a
        picture always encodes the same), on this pipeline's device."""
        return self.vae.encode_latents(images.to(self.device)).float()

    @torch.no_grad()
    def generate_latents(self, prompts: Sequence[str], negative_prompt: str | None = None,
                         num_inference_steps: int = HEADLINE.steps,
                         guidance_scale: float = HEADLINE.guidance,
                         sampler: str = HEADLINE.sampler, generator: torch.Generator | None = None,
                         callback: StepCallback | None = None, eta: float = 0.0,
                         guidance_rescale: float = HEADLINE.guidance_rescale,
                         two_pass: bool = False, bf16: bool = False) -> torch.Tensor:
        """Scaled latents for a list of prompts (one image each). `bf16` runs the U-Net
        under bf16 autocast (the sampler's own arithmetic stays float32). More than
        `sampling_args.CHUNK` prompts run that many at a time (bounded memory); the
        callback then sees each chunk's steps in turn. Bad arguments -> a
        SamplingArgumentError (a UserError) naming the parameter."""
        prompts = self._checked(prompts, negative_prompt, num_inference_steps, guidance_scale,
                                sampler, guidance_rescale, eta)
        chunks = []
        for start in range(0, len(prompts), CHUNK):
            part = prompts[start:start + CHUNK]
            cond, uncond = self.conditioning(part, negative_prompt)
            x_T = self.initial_noise(len(part), generator)
            chunks.append(self.denoise(x_T, cond, uncond, num_inference_steps, guidance_scale,
                                       sampler, generator, callback, eta, guidance_rescale,
                                       two_pass, bf16))
        return torch.cat(chunks)

    def _checked(self, prompts, negative_prompt, steps, guidance_scale, sampler,
                 guidance_rescale, eta) -> list[str]:
        """The prompts as a list, every sampling argument checked (Python's names)."""
        prompts = check_prompts(prompts)
        check_count(len(prompts), "prompts")
        if negative_prompt is not None:
            check_prompt(negative_prompt, "negative_prompt")
        check_sampler(sampler)
        check_steps(steps, self.schedule.timesteps, "num_inference_steps")
        check_guidance(guidance_scale, "guidance_scale")
        check_guidance_rescale(guidance_rescale)
        check_eta(eta)
        return prompts

    @torch.no_grad()
    def edit_images(self, prompts: Sequence[str], edit: EditInputs,
                    negative_prompt: str | None = None,
                    num_inference_steps: int = HEADLINE.steps,
                    guidance_scale: float = HEADLINE.guidance, sampler: str = HEADLINE.sampler,
                    generator: torch.Generator | None = None,
                    callback: StepCallback | None = None, eta: float = 0.0,
                    guidance_rescale: float = HEADLINE.guidance_rescale,
                    bf16: bool = False, blend_words: Sequence[str] | None = None
                    ) -> torch.Tensor:
        """img2img / inpainting images in [-1, 1] for prompts and a checked `edit` (one row
        per prompt; see editing.prepare_edit), through `denoise`; with the edit's
        `source_prompt`, a layout edit (layout_edit.py) instead."""
        prompts = self._checked(prompts, negative_prompt, num_inference_steps, guidance_scale,
                                sampler, guidance_rescale, eta)
        if edit.source_prompt is None:
            latents, known, lmask = edit_latents(
                self, prompts, edit, negative_prompt, num_inference_steps, guidance_scale,
                sampler, generator, callback, eta, guidance_rescale, bf16)
        else:
            latents, known, lmask = layout_edit_latents(
                self, prompts, edit.source_prompt, edit.images, edit.strength,
                num_inference_steps, guidance_scale, guidance_rescale, generator, bf16,
                blend_words, negative_prompt, callback)
        return edited_images(self, latents, known, lmask)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]; non-finite pixels are refused."""
        images = self.vae.decode_latents(latents.to(self.device)).float()
        return check_finite(images, "decoded images").clamp(-1, 1).cpu()

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | None = None,
                 num_inference_steps: int = HEADLINE.steps,
                 guidance_scale: float = HEADLINE.guidance, sampler: str = HEADLINE.sampler,
                 generator: torch.Generator | None = None,
                 callback: StepCallback | None = None, num_images_per_prompt: int = 1,
                 eta: float = 0.0, guidance_rescale: float = HEADLINE.guidance_rescale,
                 image=None, mask=None, strength: float | None = None,
                 resample_steps: int = 0, mask_feather: int = 1,
                 source_prompt: str | Sequence[str] | None = None,
                 blend_words: Sequence[str] | None = None) -> list[Image.Image]:
        """PIL images, `num_images_per_prompt` per prompt; deterministic for a generator.
        `callback(step_index, t, x_t, x0_hat)` sees every step (latents, scaled).

        img2img: `image` (PIL image, path or bytes; or one per image) and `strength` in
        0..1 (default 0.8): 0 gives the picture's VAE round trip, 1 text-to-image.
        Inpainting: also `mask` (white = repaint; strength default 1), `mask_feather`
        latent cells of soft edge, `resample_steps` RePaint passes (docs/editing.md).
        Layout edit: also `source_prompt` (what the picture shows, e.g. "a red square"):
        the new prompt's change with the picture's shapes and places kept (layout_edit.py;
        the DDPM posterior is its sampler; guidance_scale 20 in the study); `blend_words`
        the words whose attention bounds the change (default the source's content words)."""
        prompts = check_prompts(prompt)
        check_count(num_images_per_prompt, "num_images_per_prompt")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if image is not None or mask is not None or strength is not None \
                or source_prompt is not None:
            edit = prepare_edit(image, mask, len(prompts), self.image_size, strength,
                                resample_steps, mask_feather, source_prompt=source_prompt)
            return to_pil(self.edit_images(prompts, edit, negative_prompt,
                                           num_inference_steps, guidance_scale, sampler,
                                           generator, callback, eta, guidance_rescale,
                                           blend_words=blend_words))
        images = []
        for start in range(0, len(prompts), CHUNK):  # decode as chunks finish
            latents = self.generate_latents(prompts[start:start + CHUNK], negative_prompt,
                                            num_inference_steps, guidance_scale, sampler,
                                            generator, callback, eta, guidance_rescale)
            images += to_pil(self.decode(latents))
        return images

    # ------------------------------------------------------------------ LoRA (models/lora.py)

    def load_lora(self, directory: str | Path, scale: float = 1.0,
                  verify_base: bool = True) -> TextToImagePipeline:
        """Add a LoRA adapter folder to the denoiser at `scale` (0 = the base model). An
        adapter for another model (other geometry or, with `verify_base`, other base
        weights) is refused with a UserError naming the difference."""
        from ldmkit.models import lora

        check_lora_scale(scale)
        self.lora = lora.load_lora(self.unet, directory, scale, verify_base)
        self.lora["path"] = str(directory)
        return self

    def set_lora_scale(self, scale: float) -> None:
        from ldmkit.models import lora

        lora.set_lora_scale(self._lora_unet(), check_lora_scale(scale))

    def merge_lora(self) -> None:
        """Fold the adapter into the weights (sampling at the base model's speed)."""
        from ldmkit.models import lora

        lora.merge_lora(self._lora_unet())

    def unmerge_lora(self) -> None:
        from ldmkit.models import lora

        lora.unmerge_lora(self._lora_unet())

    def unload_lora(self) -> None:
        """Remove the adapter: the denoiser is the base model again."""
        from ldmkit.models import lora

        lora.unload_lora(self._lora_unet())
        self.lora = None

    def _lora_unet(self):
        from ldmkit.models.lora import has_lora

        if not has_lora(self.unet):
            raise UserError("no LoRA adapter is loaded (load_lora first)")
        return self.unet

    # ------------------------------------------------------------------ folder format

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.vae.save_pretrained(directory / "vae", image_size=self.image_size)
        self.unet.save_pretrained(directory / "unet")
        enc = self.text_encoder
        write_json_atomic(directory / "text_encoder.json", {
            "name": enc.name, "revision": enc.revision, "max_length": enc.max_length,
            "dtype": enc.dtype, "hidden_layers": list(enc.hidden_layers),
            "hidden_size": enc.hidden_size})
        write_json_atomic(directory / "scheduler.json",
                          scheduler_dict(self.schedule, self.prediction, self.x0_clamp))
        # Written last: a folder without it was interrupted mid-save and is refused.
        write_json_atomic(directory / "model_index.json", {
            "_class_name": "TextToImagePipeline", "ldmkit_version": __version__,
            "image_size": self.image_size,
            "components": {"vae": "vae", "unet": "unet", "text_encoder": "text_encoder.json",
                           "scheduler": "scheduler.json"}})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "auto",
                        text_encoder: TextEncoder | None = None) -> TextToImagePipeline:
        """Load a model folder; anything missing, pickled or inconsistent -> UserError.
        `device`: auto (the GPU when there is one), cpu, cuda or cuda:N. Pass
        `text_encoder` to reuse one already loaded (it must match the folder's)."""
        device = resolve_device(device, "device")
        directory = check_model_dir(directory)
        index = read_json(directory / "model_index.json", "model index")
        scheduler = read_json(directory / "scheduler.json", "scheduler config")
        schedule, prediction = schedule_from_dict(scheduler, str(directory / "scheduler.json"))
        text_encoder = text_encoder or _load_text_encoder(directory / "text_encoder.json")
        vae = AutoencoderKL.from_pretrained(directory / "vae", device)
        unet = load_denoiser(directory / "unet", device)
        try:
            pipe = cls(vae, unet, text_encoder, schedule, prediction,
                       float(scheduler.get("x0_clamp", 0.0)), index.get("image_size"))
        except UserError as exc:
            raise UserError(f"{directory}: components do not fit together: {exc}") from None
        return pipe.to(device)


def check_model_dir(directory: str | Path) -> Path:
    """Refuse a folder that is missing, incomplete, or holds pickled weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: model folder not found")
    pickles = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                     if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{directory}: refusing a model folder with pickle files "
                        f"({', '.join(pickles)}); ldmkit loads safetensors only")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise UserError(f"{directory}: not an ldmkit model folder, missing {', '.join(missing)}")
    return directory


def _load_text_encoder(path: Path) -> TextEncoder:
    spec = read_json(path, "text encoder reference")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise UserError(f"{path}: expected a JSON object with a string 'name'")
    layers = spec.get("hidden_layers", [-1])  # absent in folders written before the option
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise UserError(f"{path}: hidden_layers = {layers!r} must be a list of integers")
    encoder = TextEncoder(spec["name"], int(spec.get("max_length", 77)),
                          spec.get("dtype", "float32"), spec.get("revision", ""),
                          hidden_layers=layers)
    if spec.get("hidden_size") not in (None, encoder.hidden_size):
        raise UserError(f"{path}: hidden_size {spec['hidden_size']} does not match the "
                        f"encoder {spec['name']} ({encoder.hidden_size})")
    return encoder


def _device_generator(generator: torch.Generator | None, device: torch.device
                      ) -> torch.Generator | None:
    """Stochastic samplers draw step noise on the latents' device; derive a generator there
    from the caller's so results stay deterministic."""
    if generator is None or generator.device == device:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def check_lora_scale(value: object, field: str = "scale") -> float:
    """A LoRA scale: finite, 0..LORA_SCALE_MAX (past a few times the trained weight an
    adapter only distorts)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0.0 <= value <= LORA_SCALE_MAX:
        raise SamplingArgumentError(field, f"must be a finite number in 0..{LORA_SCALE_MAX:g}, "
                                    f"got {value!r:.40}")
    return float(value)


def check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """`values`, or a NonFiniteOutputError saying how many images hold NaN or inf: such an
    image would be written as black, and must never pass for a result."""
    bad = ~torch.isfinite(values).flatten(1).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteOutputError(
            f"the {what} of {int(bad.sum())} of {values.shape[0]} images are not finite (NaN "
            "or inf): the model's weights or the sampling settings diverged; nothing is "
            "returned for them")
    return values
