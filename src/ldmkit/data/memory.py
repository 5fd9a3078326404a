"""A dataset rendered (or loaded) once into RAM as uint8, so several stages can share it.

The built-in shapes are drawn on the fly; at ~1-2 ms an image, re-drawing them for every
VAE batch and again for the latent cache would eat a large part of a CPU demo's budget.
20k 64x64 images take 250 MB as uint8.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


class InMemoryDataset(Dataset):
    """(image in [-1, 1], caption) pairs held as one uint8 tensor plus a caption list."""

    def __init__(self, images: torch.Tensor, captions: list[str], source: Dataset | None = None):
        if images.dtype != torch.uint8 or images.shape[0] != len(captions):
            raise ValueError("images must be uint8 (N, 3, H, W) with one caption per image")
        self.images, self.caption_list, self.source = images, captions, source

    def __len__(self) -> int:
        return len(self.caption_list)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.images[i].float() / 127.5 - 1.0, self.caption_list[i]

    def scene(self, i: int):
        """Ground-truth attributes, when the source dataset has them (shapes)."""
        return self.source.scene(i)

    @property
    def skipped(self) -> int:
        return int(getattr(self.source, "skipped", 0))


def materialize(dataset: Dataset, batch_size: int = 256, num_workers: int = 0,
                desc: str = "rendering data") -> InMemoryDataset:
    """Read every item of `dataset` once (in worker processes if asked) into RAM."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    images, captions = [], []
    for batch_images, batch_captions in tqdm(loader, desc=desc, dynamic_ncols=True):
        images.append(((batch_images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8))
        captions += list(batch_captions)
    return InMemoryDataset(torch.cat(images), captions, dataset)


def materialize_stages(cfg, num_workers: int = 2) -> tuple[InMemoryDataset, InMemoryDataset]:
    """The U-Net's and the VAE's training images in RAM (one copy when they are the same
    images; with vae.include_heldout the VAE's stream has the held-out pairs in)."""
    from ldmkit.data import build_dataset, build_vae_dataset

    unet_set = materialize(build_dataset(cfg.data, "train"), num_workers=num_workers)
    vae_set = build_vae_dataset(cfg, unet_set)
    if vae_set is not unet_set:
        vae_set = materialize(vae_set, num_workers=num_workers, desc="rendering VAE data")
    return unet_set, vae_set
