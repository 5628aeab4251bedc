"""The convolutional encoder and decoder of the image autoencoders: the KL VAE's and the VQGAN's.

Latent diffusion's autoencoder (Rombach et al. 2022, arXiv 2112.10752,
Appendix G) and the VQGAN (Esser et al. 2021, "Taming Transformers",
arXiv 2012.09841, §3.1 and Fig. 2) share one convolutional body; they differ
in what sits between encoder and decoder (a Gaussian posterior, or a codebook):

    encoder: conv_in -> L levels of [n ResnetBlock2D (each optionally followed by
             single-head self-attention over the pixels), then a stride-2
             Downsample2D except at the last level] -> mid block (resnet,
             attention, resnet) -> GroupNorm -> SiLU -> conv_out
    decoder: conv_in -> mid block -> L levels, deepest first, of [n + 1 resnets
             (optionally each followed by attention), then an Upsample2D except
             at the last level] -> GroupNorm -> SiLU -> conv_out

A level with attention is diffusers' AttnDownEncoderBlock2D / AttnUpDecoderBlock2D
(taming's `attn_resolutions`, e.g. the 16x16 level of `vqgan_imagenet_f16_16384`);
one without is DownEncoderBlock2D / UpDecoderBlock2D. Module names follow
diffusers' (`down_blocks.i.resnets.j`, `attentions.j`, `mid_block`,
`conv_norm_out`), with one resampler per level (`downsample`, `upsample`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from einops import rearrange
from torch import nn

from parti_from_scratch.nn.attention import MultiHeadAttention
from parti_from_scratch.nn.resnet import ResnetBlock2D, group_norm_silu
from parti_from_scratch.nn.updown import Downsample2D, Upsample2D

NORM_EPS = 1e-6  # GroupNorm epsilon of every normalisation in these autoencoders


class SpatialSelfAttention(MultiHeadAttention):
    """x + W_O Attention(W_Q n, W_K n, W_V n), n = GroupNorm(x) flattened to one token per pixel; a single head.

    Every pixel of the feature map looks at every other, with one head as wide
    as the channels (taming's AttnBlock, diffusers' Attention with one head).
    """

    def __init__(self, channels: int, groups: int, eps: float = NORM_EPS):
        super().__init__(channels, n_heads=1, qkv_bias=True, out_bias=True, upcast=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, c, H, W) -> (b, c, H, W)."""
        height = x.shape[2]
        # (b, c, H, W) -> (b, H*W, c)
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        out = super().forward(tokens)
        # (b, H*W, c) -> (b, c, H, W)
        return x + rearrange(out, "b (h w) c -> b c h w", h=height)


class AutoencoderMidBlock(nn.Module):
    """ResnetBlock2D -> SpatialSelfAttention -> ResnetBlock2D at the lowest resolution (diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, groups=groups, eps=NORM_EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (b, c, H, W) -> (b, c, H, W)."""
        h = self.resnets[0](h)
        for attention in self.attentions:
            h = attention(h)
        return self.resnets[1](h)


class ResnetLevel(nn.Module):
    """n_layers ResnetBlock2D (no time embedding), each optionally followed by self-attention, then a resampler.

    resample="down": Downsample2D with the asymmetric padding (encoder);
    resample="up": Upsample2D (decoder); None: the level keeps its resolution.
    """

    def __init__(self, in_channels: int, out_channels: int, n_layers: int, groups: int, resample: Optional[str],
                 attention: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=NORM_EPS)
            for i in range(n_layers))
        self.attentions = nn.ModuleList(
            SpatialSelfAttention(out_channels, groups) for _ in range(n_layers if attention else 0))
        self.downsample = Downsample2D(out_channels, padding=0) if resample == "down" else None
        self.upsample = Upsample2D(out_channels) if resample == "up" else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (b, c_in, H, W) -> (b, c_out, H', W') with H' = H/2, H or 2H."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(h)
            if self.attentions:
                h = self.attentions[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class ConvEncoder(nn.Module):
    """x (b, in_channels, H, W) -> (b, out_channels, H / 2^(L-1), W / 2^(L-1)).

    block_out_channels: width of each level, shallowest first (L = its length).
    attention: per level, whether each resnet is followed by self-attention.
    out_channels: 2 * latent_channels for the KL VAE (mu, log sigma^2), latent_channels for a VQGAN.
    """

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                 groups: int, attention: Optional[Sequence[bool]] = None, mid_block_add_attention: bool = True):
        super().__init__()
        widths, n = tuple(block_out_channels), len(block_out_channels)
        attention = (False,) * n if attention is None else tuple(attention)
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            ResnetLevel(widths[max(i - 1, 0)], widths[i], layers_per_block, groups,
                        resample="down" if i < n - 1 else None, attention=attention[i])
            for i in range(n))
        self.mid_block = AutoencoderMidBlock(widths[-1], groups, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(group_norm_silu(h, self.conv_norm_out))


class ConvDecoder(nn.Module):
    """z (b, in_channels, h, w) -> x_hat (b, out_channels, h * 2^(L-1), w * 2^(L-1)).

    block_out_channels: the encoder's widths, shallowest first; the decoder runs them deepest first.
    attention: per decoder level, deepest first (diffusers' up_block_types order).
    Each decoder level has one resnet more than the encoder's.
    """

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                 groups: int, attention: Optional[Sequence[bool]] = None, mid_block_add_attention: bool = True):
        super().__init__()
        widths, n = tuple(block_out_channels)[::-1], len(block_out_channels)
        attention = (False,) * n if attention is None else tuple(attention)
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        self.mid_block = AutoencoderMidBlock(widths[0], groups, mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            ResnetLevel(widths[max(i - 1, 0)], widths[i], layers_per_block + 1, groups,
                        resample="up" if i < n - 1 else None, attention=attention[i])
            for i in range(n))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(group_norm_silu(h, self.conv_norm_out))
