"""Changing resolution inside a UNet or a VAE: halve with a strided convolution, double with nearest + convolution.

Tutorial §5.2 ("the UNet predicts the noise"): the UNet's encoder path halves the
feature map's height and width at each level and its decoder path doubles them
back (Ronneberger et al. 2015, arXiv 1505.04597, Fig. 1). Latent diffusion
(Rombach et al. 2022, arXiv 2112.10752, §3 and Appendix G) uses

* Downsample2D: a 3x3 convolution with stride 2,
      y = Conv_{3x3, stride 2}(pad(x)),   (b, c, H, W) -> (b, c', H/2, W/2) for even H, W
  with symmetric zero padding of 1 in the UNet and, in the VAE's encoder, the
  asymmetric padding (left 0, right 1, top 0, bottom 1) of the original
  autoencoder (`padding=0` selects it);
* Upsample2D: nearest-neighbour doubling then a 3x3 convolution,
      y = Conv_{3x3}(NearestUp_2(x)),     (b, c, H, W) -> (b, c', 2H, 2W)
  (a transposed convolution would leave checkerboard artefacts).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from parti_from_scratch.nn.conv import Conv2d


class Downsample2D(nn.Module):
    """y = Conv_{3x3, stride 2}(pad(x)); padding=1 pads every side by 1, padding=0 pads right and bottom by 1."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, out_channels or channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, c, H, W) -> (b, c', ceil(H/2), ceil(W/2)) with padding 1, (b, c', H//2, W//2) with padding 0."""
        if self.padding == 0:
            # (left, right, top, bottom) = (0, 1, 0, 1): the reference autoencoder's asymmetric padding
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """y = Conv_{3x3}(NearestUp(x)): double the resolution (or resize to `output_size`), then mix neighbours."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """x (b, c, H, W) -> (b, c', 2H, 2W), or (b, c', *output_size) when the skip connection has an odd size."""
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)
