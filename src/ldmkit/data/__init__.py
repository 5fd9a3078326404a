"""ldmkit.data: the built-in shapes data, MS-COCO captions and image folders.

Every dataset yields (image tensor (3, S, S) float32 in [-1, 1], caption) and exposes
`skipped` (how many unreadable images were replaced) and `problems` ([{"path", "reason"}]).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from ldmkit.data.coco import CocoCaptions, annotation_path
from ldmkit.data.folder import ImageFolderCaptions
from ldmkit.data.robust import CaptionedFiles
from ldmkit.data.shapes import ShapesDataset
from ldmkit.errors import UserError

__all__ = [
    "CaptionedFiles",
    "CocoCaptions",
    "ImageFolderCaptions",
    "ShapesDataset",
    "build_dataset",
    "build_source",
    "build_vae_dataset",
    "train_subset",
    "val_count",
]


def build_source(data_cfg) -> Dataset:
    """Every item of the configured data, with no validation split carved out (for checks)."""
    if data_cfg.dataset == "shapes":
        split = data_cfg.split if data_cfg.split in ("train", "val") else "train"
        return ShapesDataset.from_config(data_cfg, split)
    if data_cfg.dataset == "coco":
        return CocoCaptions(data_cfg.root, data_cfg.split, data_cfg.image_size)
    if data_cfg.dataset == "folder":
        return ImageFolderCaptions(data_cfg.root, data_cfg.image_size, data_cfg.balance_by)
    raise UserError(f"data.dataset = {data_cfg.dataset!r} is not one of shapes, coco, folder")


def val_count(n: int, val_items: int) -> int:
    """Items held out for validation from n: val_items, but at most a tenth (at least 1),
    so a small folder still keeps most of its images for training."""
    return max(1, min(val_items, n // 10))


def build_dataset(data_cfg, split: str = "train") -> Dataset:
    """The training or validation dataset named by `data_cfg.dataset`.

    shapes: split "val" is its own random stream of `val_items` items.
    coco: "val" is the first `val_items` of ROOT's val2017 split when that exists;
      otherwise, as for folder, the last `val_count` items, which training then leaves out.
    """
    if split not in ("train", "val"):
        raise UserError(f"dataset split {split!r} is not 'train' or 'val'")
    if data_cfg.dataset == "shapes":
        return ShapesDataset.from_config(data_cfg, split)
    if (data_cfg.dataset == "coco" and data_cfg.split != "val"
            and annotation_path(data_cfg.root, "val").is_file()):
        if split == "train":
            return build_source(data_cfg)
        val = CocoCaptions(data_cfg.root, "val", data_cfg.image_size)
        return val.subset(0, data_cfg.val_items)
    source = build_source(data_cfg)
    if split == "val":
        n = len(source)
        return source.subset(n - val_count(n, data_cfg.val_items))
    return train_subset(source, data_cfg.val_items)


def build_vae_dataset(cfg, train_set: Dataset | None = None) -> Dataset:
    """What stage 1 trains on: the training split (`train_set` when the caller built it
    already), or with vae.include_heldout the shapes stream drawn with the held-out pairs
    in. The VAE never reads a caption, so "held out" there means that the text-to-image model
    never pairs those words: latent diffusion's autoencoders train on image data of their own
    (Stable Diffusion's on OpenImages), not on the captioned pairs."""
    if cfg.vae.include_heldout:
        return ShapesDataset.from_config(cfg.data, "train", include_heldout=True)
    return train_set if train_set is not None else build_dataset(cfg.data, "train")


def train_subset(source, val_items: int):
    """What training uses of a source that carries its own validation images: all but
    the last val_count of them (a one-item source keeps its item)."""
    n = len(source)
    k = val_count(n, val_items)
    return source.subset(0, n - k) if n - k >= 1 else source
