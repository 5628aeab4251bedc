"""The residual block of the UNet and the VAE, conditioned on the diffusion time step.

Tutorial §5.2: the denoiser eps_theta(z_t, t, c) is a UNet built from residual
blocks (He et al. 2016, arXiv 1512.03385) in the form of latent diffusion
(Rombach et al. 2022, arXiv 2112.10752, Appendix G; the block comes from
Ho et al. 2020, arXiv 2006.11239, Appendix B):

    h = Conv_3x3( SiLU( GroupNorm(x) ) )
    h = h + W_t SiLU(t_emb)                       (the time embedding, one shift per channel)
    h = Conv_3x3( Dropout( SiLU( GroupNorm(h) ) ) )
    y = (shortcut(x) + h) / output_scale_factor

shortcut is the identity, or a 1x1 convolution when the channel count changes.
The VAE uses the same block without the time term (temb_channels=None).
GroupNorm (Wu & He 2018, arXiv 1803.08494) normalises each sample over groups
of channels, so it behaves the same at batch size 1 and at batch size 64.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from parti_from_scratch.nn.conv import Conv2d


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """SiLU(GroupNorm(x)), SiLU(u) = u * sigmoid(u).

    The activation overwrites the normalised tensor in place when no gradient is
    being recorded (inference): the same values, one fewer full-size tensor.
    """
    h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(h, inplace=not torch.is_grad_enabled())


class ResnetBlock2D(nn.Module):
    """y = (shortcut(x) + Conv(Dropout(SiLU(GN(Conv(SiLU(GN(x))) + W_t SiLU(t_emb)))))) / output_scale_factor.

    Args:
        in_channels, out_channels: channel counts of x and y (out defaults to in).
        temb_channels: width of the time embedding, or None for the VAE's unconditioned blocks.
        groups, groups_out: GroupNorm groups of the first and second normalisation (groups_out defaults to groups).
        eps: GroupNorm epsilon.
        dropout: dropout probability before the second convolution (0 for Stable Diffusion inference).
        output_scale_factor: the sum is divided by it (1 everywhere in Stable Diffusion).
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, temb_channels: Optional[int] = None,
                 groups: int = 32, groups_out: Optional[int] = None, eps: float = 1e-6, dropout: float = 0.0,
                 output_scale_factor: float = 1.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # 1x1 convolution on the skip path only when the widths differ
        self.conv_shortcut = Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (b, c_in, H, W), temb (b, temb_channels) or None -> (b, c_out, H, W)."""
        # without autograd the sums and the division overwrite the block's own fresh tensors (conv1's and
        # conv2's outputs): the same values (skip + h = h + skip exactly), fewer full-size tensors
        in_place = not torch.is_grad_enabled()
        h = self.conv1(group_norm_silu(x, self.norm1))
        if self.time_emb_proj is not None and temb is not None:
            # + W_t SiLU(t_emb): (b, c_out) -> (b, c_out, 1, 1), broadcast over every pixel
            shift = self.time_emb_proj(F.silu(temb))[:, :, None, None]
            h = h.add_(shift) if in_place else h + shift
        h = self.conv2(self.dropout(group_norm_silu(h, self.norm2)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        y = h.add_(skip) if in_place else skip + h
        if self.output_scale_factor != 1.0:
            y = y.div_(self.output_scale_factor) if in_place else y / self.output_scale_factor
        return y
