"""One stage-1 update: the VAE's loss (pixel term, KL and the [vae] terms of
training/vae_losses.py), AdamW, the LR schedule, the EMA copy, and — with vae.gan_weight —
the PatchGAN discriminator's own update, as taming / CompVis latent-diffusion train
their autoencoders (two optimisers, the discriminator switched on at vae.gan_start).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from ldmkit.config import Config
from ldmkit.models.discriminator import PatchDiscriminator
from ldmkit.models.vae import AutoencoderKL, vae_loss
from ldmkit.training import vae_losses
from ldmkit.training.common import make_lr_schedule, make_optimizer
from ldmkit.training.diffusion_step import ema_decay, update_ema

# the reconstruction terms a [vae] weight switches on, by the key that weighs them
RECON_TERMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ssim": vae_losses.ssim_loss,
    "ffl": vae_losses.focal_frequency_loss,
    "blur": vae_losses.blur_loss,
}


class VAEStep:
    """Owns what one update touches. `vae` is the plain module (checkpoints, EMA, the
    adaptive weight's last layer); `model`, `disc` and the optimisers become Accelerate's
    prepared copies after `prepare`."""

    def __init__(self, vae: AutoencoderKL, cfg: Config,
                 progress: Callable[[int], float] | None = None):
        v = self.v = cfg.vae
        self.grad_clip = cfg.train.grad_clip
        self.vae = self.model = vae
        betas = (v.adam_beta1, v.adam_beta2)
        self.optimizer = make_optimizer(vae.parameters(), v.lr, cfg.train.weight_decay, betas)
        self.scheduler = make_lr_schedule(self.optimizer, v.warmup_steps, v.steps, progress)
        self.ema = copy.deepcopy(vae).requires_grad_(False).eval() if v.ema_decay else None
        self.grad_norm: torch.Tensor | None = None  # the VAE's last update's, when clipping
        self.disc = self.disc_module = None
        self.d_optimizer = None
        if v.gan_weight:
            self.disc = self.disc_module = PatchDiscriminator(v.disc_channels, v.disc_layers)
            # constant LR, as taming's discriminator
            self.d_optimizer = make_optimizer(self.disc.parameters(), v.lr, 0.0, betas)

    def prepare(self, accelerator) -> None:
        """Wrap for the device / processes (the scheduler keeps the unwrapped optimizer's
        param groups, which the prepared one shares)."""
        self.accelerator = accelerator
        if self.disc is None:
            self.model, self.optimizer = accelerator.prepare(self.vae, self.optimizer)
        else:
            self.model, self.optimizer, self.disc, self.d_optimizer = accelerator.prepare(
                self.vae, self.optimizer, self.disc_module, self.d_optimizer)
        if self.ema is not None:
            self.ema.to(accelerator.device)

    # ------------------------------------------------------------------ the update

    def gan_on(self, step: int) -> bool:
        return self.disc is not None and step >= self.v.gan_start

    def __call__(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One update at `step` (0-based); returns the detached losses to log. The LR
        schedule is the caller's to step (after its budget's clock, which drives it)."""
        acc, v = self.accelerator, self.v
        with acc.autocast():
            recon, posterior = self.model(images)
        _, rec, kl = vae_loss(images, recon, posterior, v.kl_weight, v.recon_loss)
        logged = {"recon": rec, "kl": kl}
        for name, term in RECON_TERMS.items():
            weight = getattr(v, f"{name}_weight")
            if weight:
                logged[name] = term(images, recon)
                rec = rec + weight * logged[name]
        loss = rec + v.kl_weight * kl
        gan = self.gan_on(step)
        if gan:
            loss = loss + self._generator_term(rec, recon, logged)
        acc.backward(loss)
        self.grad_norm = self._update(self.model, self.optimizer)
        if gan:
            logged["d_loss"] = self._discriminator_update(images, recon.detach())
        if self.ema is not None:
            update_ema(self.ema, self.vae, ema_decay(step, v.ema_decay))
        return {"loss": loss.detach(), **{k: t.detach() for k, t in logged.items()}}

    def _generator_term(self, rec: torch.Tensor, recon: torch.Tensor, logged: dict
                        ) -> torch.Tensor:
        """gan_weight * adaptive weight * -E D(recon); the discriminator's own weights
        take no gradient from it (its plain module, frozen for this pass)."""
        self.disc_module.requires_grad_(False)
        with self.accelerator.autocast():
            logits = self.disc_module(recon)
        self.disc_module.requires_grad_(True)
        g_loss = vae_losses.generator_loss(logits)
        weight = vae_losses.adaptive_weight(rec, g_loss, self.vae.decoder.conv_out.weight)
        logged["g_loss"], logged["d_weight"] = g_loss, weight
        return self.v.gan_weight * weight * g_loss

    def _discriminator_update(self, images: torch.Tensor, recon: torch.Tensor
                              ) -> torch.Tensor:
        with self.accelerator.autocast():
            d_loss = vae_losses.hinge_d_loss(self.disc(images), self.disc(recon))
        self.accelerator.backward(d_loss)
        self._update(self.disc, self.d_optimizer)
        return d_loss.detach()

    def _update(self, module: torch.nn.Module, optimizer) -> torch.Tensor | None:
        """Clip, step, zero; the gradient norm before clipping (unread), when clipping."""
        norm = None
        if self.grad_clip:
            norm = self.accelerator.clip_grad_norm_(module.parameters(), self.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ checkpoints

    def modules(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds weights of."""
        named = {"vae": self.vae}
        if self.ema is not None:
            named["ema"] = self.ema
        if self.disc_module is not None:
            named["disc"] = self.disc_module
        return named

    def states(self) -> dict:
        """The discriminator's optimizer, beside the VAE's (checkpoint `states`)."""
        return {"disc_optimizer": self.d_optimizer} if self.d_optimizer is not None else {}

    def final(self) -> AutoencoderKL:
        """The weights to save and evaluate: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.vae
