"""Positional encodings: how a Transformer or a denoiser learns *where* and *when*.

Attention is permutation-equivariant (shuffle the tokens and the outputs are
shuffled the same way), so order must be added to the input. Tutorial §2.1
mentions this; three forms are used in this package:

* the Transformer sinusoid (Vaswani et al. 2017, arXiv 1706.03762, §3.5):
      PE(pos, 2i) = sin(pos / 10000^(2i/d)),   PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
* the diffusion timestep embedding, the same idea applied to the noise level t
  (Ho et al. 2020, arXiv 2006.11239, Appendix B; as Stable Diffusion computes it,
  sines and cosines in two halves rather than interleaved);
* learned absolute positions, one trainable vector per position (CLIP,
  Radford et al. 2021, arXiv 2103.00020);
* the fixed 2-D sine-cosine table of an image's patch grid (ViT-VQGAN, Yu et al.
  2021, arXiv 2110.04627; MAE, He et al. 2021, arXiv 2111.06377): half the
  channels encode the column, half the row.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_position_encoding(n_positions: int, d_model: int, base: float = 10000.0,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Transformer sinusoid, shape (n_positions, d_model), interleaved sin/cos.

        PE(pos, 2i)   = sin(pos / base^(2i/d_model))
        PE(pos, 2i+1) = cos(pos / base^(2i/d_model))

    Each pair of columns is a rotation at frequency omega_i = base^(-2i/d), so
    PE(pos + k) is a fixed linear map (a block-diagonal rotation by k*omega_i)
    of PE(pos): relative offsets are linear functions of the encoding.
    """
    if d_model % 2 != 0:
        raise ValueError(f"d_model must be even for the interleaved sinusoid, got {d_model}")
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]                 # (n, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)[None, :]             # (1, d/2)
    # omega_i = 1 / base^(2i/d)
    omega = torch.exp(-math.log(base) * two_i / d_model)
    angle = pos * omega                                                          # (n, d/2)
    pe = torch.empty(n_positions, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.to(dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps, shape (batch, dim), as Stable Diffusion's UNet uses it.

        half = dim // 2
        omega_j = exp(-log(max_period) * j / (half - downscale_freq_shift)),  j = 0 .. half-1
        emb = [sin(scale * t * omega), cos(scale * t * omega)]          (or [cos, sin] if flip_sin_to_cos)

    SD 1.x/2.x use flip_sin_to_cos=True, downscale_freq_shift=0; the original
    DDPM code uses the unflipped order with shift 1. An odd `dim` gets one zero column.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor of shape (batch,), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    j = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    # omega_j = max_period^(-j / (half - shift))
    omega = torch.exp(-math.log(max_period) * j / (half - downscale_freq_shift))
    angle = scale * (timesteps[:, None].float() * omega[None, :])                 # (b, half)
    emb = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class LearnedPositionalEmbedding(nn.Module):
    """One trainable vector per position, added to the token embeddings (CLIP's `position_embedding`).

    weight: (n_positions, dim). forward(n) returns the first n rows, (n, dim).
    Nothing constrains these vectors; training finds them (CLIP's learn a
    smooth, roughly sinusoidal structure).
    """

    def __init__(self, n_positions: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_positions, dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, n: int, offset: int = 0) -> torch.Tensor:
        if offset + n > self.weight.shape[0]:
            raise ValueError(f"sequence of length {offset + n} exceeds the {self.weight.shape[0]} learned positions")
        return self.weight[offset:offset + n]


def sincos_2d_position_encoding(height: int, width: int, dim: int, base: float = 10000.0,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed 2-D sine-cosine table of a height x width patch grid, shape (height * width, dim).

        PE(r, c) = [ s(c) | s(r) ]                                   (dim/2 channels each)
        s(p)     = [ sin(p omega_0) .. sin(p omega_{q-1}) | cos(p omega_0) .. cos(p omega_{q-1}) ]
        omega_i  = base^(-i / q),  q = dim / 4

    Row k of the table is the patch at row r = k // width, column c = k % width
    (raster order, the order the patches are flattened in). The first dim/2
    channels encode the column and the last dim/2 the row, each as the
    Transformer sinusoid of `sinusoidal_position_encoding` with its sines and
    cosines in two halves instead of interleaved (the layout of ViT-VQGAN
    reimplementations and MAE).
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be divisible by 4 for the 2-D sine-cosine table, got {dim}")

    def halves(n: int) -> torch.Tensor:
        # the 1-D sinusoid over dim/2 channels, [sin, cos, sin, cos, ...] -> [sin ... | cos ...]: (n, dim/2)
        pe = sinusoidal_position_encoding(n, dim // 2, base, dtype=torch.float64)
        return torch.cat([pe[:, 0::2], pe[:, 1::2]], dim=-1)

    rows = torch.arange(height).repeat_interleave(width)   # r = k // width: (height * width,)
    cols = torch.arange(width).repeat(height)              # c = k % width:  (height * width,)
    return torch.cat([halves(width)[cols], halves(height)[rows]], dim=-1).to(dtype)
