"""The PatchGAN discriminator of pix2pix (Isola et al. 2017) as taming-transformers and
CompVis latent-diffusion use it for their autoencoders (`NLayerDiscriminator`): stride-2
4x4 convolutions with BatchNorm and LeakyReLU(0.2), then two stride-1 layers, ending in
one logit per overlapping patch rather than one per image. Only stage 1's training uses it;
it is never saved in a model folder.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) images in [-1, 1] -> (B, 1, h, w) patch logits. `layers` stride-2
    convolutions (taming: 3, 70-pixel patches at 256 pixels; 2 gives a 64x64 image 14x14
    logits, each over a 34-pixel patch)."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1),
                                nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            out = channels * min(2 ** n, 8)
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out),
                    nn.LeakyReLU(0.2, True)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.apply(_taming_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _taming_init(m: nn.Module) -> None:
    """N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales (taming's `weights_init`)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
