"""Tokens that factor into structure x colour: a VQGAN of the image's value, and a colour code per token.

A VQGAN token (`vqgan.py`) must say everything about its patch at once: where an
edge runs AND what colour lies inside it. On the built-in shapes its 512 codes
entangle the two, and a colour x shape combination the tokenizer never saw has no
codes: a plain VQGAN of 512 codes trained by the same recipe rebuilt a held-out red
triangle as a red circle or square about half the time (54% of 200 held-out single
objects exact), so no Transformer writing its tokens could draw one; this tokenizer
rebuilds all 200 (assets/parti_model/vqvae/RECIPE.md).
This tokenizer writes each token as two codes, one per factor, the way JPEG keeps
brightness at full resolution and colour once per block:

    v      = max_c x_c                                      value (HSV's V), (b, 1, H, W): x in [0, 1] here
    a      = VQGAN tokens of v                              structure codes (b, h, w), K_a of them
    u_t    = sum_{p in t} x_p / sum_{p in t} v_p            the colour of token t: the value-weighted mean of x / v
    c_t    = 0                   if sum_{p in t} v_p < tau  no colour (a black patch)
             1 + argmin_j ||u_t - m_j||^2  otherwise         one of J colours m_j (k-means of training tokens)
    k      = a K_c + c,   K_c = J + 1                       one token per position, K_a K_c codes (mixed radix)
    x_hat  = G(e_a) * upsample(m_c),   m_0 = 0               decode: the value times its token's colour

A Transformer with a factorised output (`transformer.FactorisedHead`: l[k] = l_a[a] + l_c[c])
draws a and c independently given its state, so "red" and "triangle" can each pick
their own factor even when the two were never seen together.

Where it fails: one colour per token. A token holding two differently coloured
objects gets one colour (on the shapes, objects are 3 px apart or more, so this
happens only where two large ones come close); a natural photo comes back with
8x8 blocks of flat colour.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from parti_from_scratch.configuration import Config, positive, require
from parti_from_scratch.parti.vqgan import VQModel


@dataclass
class ValueChromaConfig(Config):
    """The colour half of the tokenizer (the structure half is its VQModel's own config)."""
    num_colours: int = 7                 # J learned colours; code 0 is "no colour", so K_c = J + 1
    min_value: float = 0.5               # tau: a token with less total value (pixels of full brightness) is black

    def check(self) -> None:
        positive(self, "num_colours")
        require(self.min_value >= 0, f"min_value must be >= 0, got {self.min_value}")


def image_value(x: torch.Tensor) -> torch.Tensor:
    """v = max_c x_c: (b, 3, H, W) -> (b, 1, H, W), in the images' own range ([-1, 1] maps to [-1, 1])."""
    return x.amax(dim=1, keepdim=True)


def token_colours(x: torch.Tensor, patch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(u, s): each token's colour u_t = sum x / sum v, (b, h, w, 3), and its total value s_t = sum v, (b, h, w).

    x (b, 3, H, W) in [-1, 1]; sums over the patch x patch pixels of each token, on the [0, 1] scale.
    """
    x01 = (x.float() + 1) / 2
    sum_x = F.avg_pool2d(x01, patch) * patch * patch                      # (b, 3, h, w)
    sum_v = F.avg_pool2d(x01.amax(dim=1, keepdim=True), patch) * patch * patch   # (b, 1, h, w)
    u = sum_x / sum_v.clamp(min=1e-6)
    return u.permute(0, 2, 3, 1), sum_v[:, 0]


class ValueChromaVQModel(nn.Module):
    """`tokenize(x)` -> tokens (b, h, w) in [0, K_a K_c), `decode_indices(tokens)` -> x_hat (b, 3, H, W) in [-1, 1].

    `structure`: a VQModel with one input and one output channel (the value); `colours`: the J colours
    m_j (J, 3) on the [0, 1] scale. `split_indices` / `join_indices` convert between tokens and (a, c).
    """

    def __init__(self, structure: VQModel, config: Optional[ValueChromaConfig] = None,
                 colours: Optional[torch.Tensor] = None):
        super().__init__()
        config = ValueChromaConfig() if config is None else config
        sc = structure.config
        if sc.in_channels != 1 or sc.out_channels != 1:
            raise ValueError(f"the structure VQModel must read and write one channel (the value), it has "
                             f"in_channels={sc.in_channels}, out_channels={sc.out_channels}")
        self.config, self.structure = config, structure
        colours = torch.zeros(config.num_colours, 3) if colours is None else colours
        if tuple(colours.shape) != (config.num_colours, 3):
            raise ValueError(f"colours must be ({config.num_colours}, 3), got {tuple(colours.shape)}")
        self.register_buffer("colours", colours.float().clone())

    # ------------------------------------------------------------------ sizes
    @property
    def codebook_factors(self) -> Tuple[int, int]:
        """(K_a, K_c): structure codes, colour codes (J colours and "none")."""
        return self.structure.config.num_vq_embeddings, self.config.num_colours + 1

    @property
    def codebook_size(self) -> int:
        """K_a K_c: how many distinct tokens there are."""
        k_a, k_c = self.codebook_factors
        return k_a * k_c

    @property
    def patch(self) -> int:
        """Pixels per token side."""
        return self.structure.config.downsampling

    @property
    def dtype(self) -> torch.dtype:
        return self.structure.dtype

    @property
    def device(self) -> torch.device:
        return self.structure.device

    # ------------------------------------------------------------------ the two factors
    def join_indices(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """k = a K_c + c."""
        return a * self.codebook_factors[1] + c

    def split_indices(self, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(a, c) = (k // K_c, k mod K_c)."""
        k_c = self.codebook_factors[1]
        return torch.div(k, k_c, rounding_mode="floor"), k % k_c

    def colour_codes(self, x: torch.Tensor) -> torch.Tensor:
        """c_t: 0 where the token's total value is under tau, else 1 + the nearest of the J colours: (b, h, w)."""
        u, s = token_colours(x, self.patch)
        # ||u_t - m_j||^2: (b, h, w, J)
        distance = ((u[..., None, :] - self.colours.float()) ** 2).sum(dim=-1)
        nearest = distance.argmin(dim=-1) + 1
        return torch.where(s < self.config.min_value, torch.zeros_like(nearest), nearest)

    def colour_map(self, c: torch.Tensor) -> torch.Tensor:
        """upsample(m_c): colour codes (b, h, w) -> (b, 3, H, W) on the [0, 1] scale, m_0 = black."""
        table = torch.cat([self.colours.new_zeros(1, 3), self.colours])
        per_token = table[c].permute(0, 3, 1, 2)                                  # (b, 3, h, w)
        return per_token.repeat_interleave(self.patch, dim=2).repeat_interleave(self.patch, dim=3)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, 3, H, W) in [-1, 1] -> tokens k = a K_c + c, (b, H / patch, W / patch), int64."""
        a = self.structure.tokenize(image_value(x).to(self.dtype))
        return self.join_indices(a, self.colour_codes(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """tokens (b, h, w) -> x_hat = G(e_a) * upsample(m_c), (b, 3, H, W) in [-1, 1]."""
        if indices.ndim != 3:
            raise ValueError(f"indices must be (batch, h, w), got shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got {int(indices.min())}.."
                             f"{int(indices.max())}")
        a, c = self.split_indices(indices)
        value = ((self.structure.decode_indices(a).float() + 1) / 2).clamp(0, 1)    # (b, 1, H, W) in [0, 1]
        return (value * self.colour_map(c) * 2 - 1).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction through the tokens alone."""
        return self.decode_indices(self.tokenize(x))

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], subfolder: Optional[str] = None,
                        dtype: Optional[torch.dtype] = torch.float32) -> "ValueChromaVQModel":
        """Load a folder written by `save_pretrained` (the documented upward edge: weights_convert knows the layout)."""
        from weights_convert.value_chroma import load_value_chroma
        return load_value_chroma(path, subfolder=subfolder, dtype=dtype)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write config.json, colour_codebook.safetensors and structure/ (a diffusers VQModel folder)
        (the documented upward edge: weights_convert knows the layout)."""
        from weights_convert.value_chroma import save_value_chroma
        save_value_chroma(self, folder)
