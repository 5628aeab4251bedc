"""The spatial Transformer: how the UNet reads the text (tutorial §4.1 attention inside the §5.2 UNet).

Latent diffusion conditions the denoiser on the text states c = tau_theta(y)
through cross-attention at several resolutions (Rombach et al. 2022,
arXiv 2112.10752, Eq. 3 and Fig. 3):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,   Q = W_Q phi(z_t),  K = W_K c,  V = W_V c

where phi(z_t) are the feature map's pixels, flattened into a sequence of
tokens. One SpatialTransformer is

    x = GroupNorm(x_in);  x = proj_in(flatten(x))                          (b, c, H, W) -> (b, H*W, d)
    for each BasicTransformerBlock:
        x = x + SelfAttention(LayerNorm(x))                                 pixels look at pixels
        x = x + CrossAttention(LayerNorm(x), text)                          pixels look at words
        x = x + FeedForward_GEGLU(LayerNorm(x))
    y = x_in + unflatten(proj_out(x))                                       (b, H*W, d) -> (b, c, H, W)

proj_in and proj_out are linear maps of each pixel's channel vector. SD 1.x
stores them as 1x1 convolutions and SD 2.x as linear layers; the two are the
same map (a (d, c, 1, 1) kernel is a (d, c) matrix), so we always use a linear
layer and the checkpoint converter reshapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parti_from_scratch.nn.attention import MultiHeadAttention


class FeedForward(nn.Module):
    """FF(x) = W_2 (a * GELU(g)),  [a, g] = W_1 x + b_1: the GEGLU feed-forward (Shazeer 2020, arXiv 2002.05202, Eq. 6).

    W_1 maps dim -> 2 * inner (value a and gate g side by side), W_2 maps inner -> dim; inner = mult * dim.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, 2 * inner)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, n, dim) -> (b, n, dim).

        Without autograd the product overwrites GELU(g) in place: the same values (a * GELU(g) = GELU(g) * a
        exactly), one fewer full-size tensor, and a contiguous input for W_2.
        """
        # [a, g] = W_1 x + b_1: (b, n, 2*inner) -> two (b, n, inner) halves
        a, g = self.proj(x).chunk(2, dim=-1)
        # a * GELU(g): the gate decides, per feature, how much of a passes
        gated = F.gelu(g).mul_(a) if not torch.is_grad_enabled() else a * F.gelu(g)
        return self.out_proj(self.dropout(gated))


class BasicTransformerBlock(nn.Module):
    """x + SelfAttn(LN(x)), then + CrossAttn(LN(x), text), then + FF(LN(x)): pre-norm residual sub-layers.

    Args:
        dim: token width d.
        n_heads: attention heads (each of width dim // n_heads).
        cross_attention_dim: width of the text states (768 for SD 1.x, 1024 for SD 2.x).
        only_cross_attention: the first attention also reads the text instead of the pixels.
        upcast_attention: compute the attention scores in float32 under half precision (SD 2.x).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, n_heads: int, cross_attention_dim: int, only_cross_attention: bool = False,
                 upcast_attention: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        attention = dict(n_heads=n_heads, qkv_bias=False, out_bias=True, upcast=upcast_attention)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = MultiHeadAttention(dim, context_dim=cross_attention_dim if only_cross_attention else None,
                                        **attention)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = MultiHeadAttention(dim, context_dim=cross_attention_dim, **attention)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (b, n, dim) pixel tokens, context (b, n_text, cross_attention_dim) -> (b, n, dim).

        Without autograd the second and third residual sums are added in place into the block's own
        first sum (never into the caller's x): the same values, two fewer full-size tensors.
        """
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        if torch.is_grad_enabled():
            x = x + self.attn2(self.norm2(x), context)
            return x + self.ff(self.norm3(x))
        x += self.attn2(self.norm2(x), context)
        x += self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """y = x + unflatten(proj_out(Blocks(proj_in(flatten(GroupNorm(x))), text))): a feature map reads the text.

    diffusers calls it Transformer2DModel. The heads split inner_dim = n_heads * (channels // n_heads).

    Args:
        channels: channel count c of the feature map (in and out).
        n_heads: attention heads of every block.
        cross_attention_dim: width of the text states.
        n_layers: number of BasicTransformerBlocks (1 in SD 1.x/2.x).
        norm_num_groups: groups of the input GroupNorm (its epsilon is 1e-6).
        only_cross_attention, upcast_attention: passed to the blocks.
    """

    def __init__(self, channels: int, n_heads: int, cross_attention_dim: int, n_layers: int = 1,
                 norm_num_groups: int = 32, only_cross_attention: bool = False, upcast_attention: bool = False):
        super().__init__()
        inner_dim = n_heads * (channels // n_heads)
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, cross_attention_dim, only_cross_attention=only_cross_attention,
                                  upcast_attention=upcast_attention)
            for _ in range(n_layers))
        self.proj_out = nn.Linear(inner_dim, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (b, c, H, W), context (b, n_text, cross_attention_dim) -> (b, c, H, W)."""
        b, c, height, width = x.shape
        # (b, c, H, W) -> (b, H, W, c) -> (b, H*W, c): one token per pixel
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)
        # (b, H*W, c) -> (b, H, W, c) -> (b, c, H, W)
        return x + tokens.reshape(b, height, width, c).permute(0, 3, 1, 2)
