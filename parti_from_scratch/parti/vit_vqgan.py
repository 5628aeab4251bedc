"""ViT-VQGAN: Parti's image tokenizer, a Vision Transformer on both sides of the codebook.

Yu et al. 2021, "Vector-quantized Image Modeling with Improved VQGAN", arXiv 2110.04627, §3.1-3.2;
used as the tokenizer of Parti (Yu et al. 2022, arXiv 2206.10789, §2.1). A 256x256 image becomes a
32x32 grid of integers in [0, 8192):

    x_p     = patchify(x)                       8x8 patches, each mapped linearly to a d-vector   `patch_embed`
    h_0     = x_p + PE_2d                       fixed 2-D sine-cosine positions                   `add_positions`
    h       = LN(Block_L(... Block_1(h_0)))     pre-norm Transformer blocks:                      `ViTBlock`
                  h = h + W_O Attention(LN(h)),  h = h + W_2 act(W_1 LN(h))
    z       = W_pre h                           factorised codes: d -> 32 dimensions               `pre_quant`
    k*      = argmax_k l2(z) . l2(e_k)          l2-normalised lookup (parti/quantize.py)           `quantize`
    z_q     = l2(e_{k*}), with the straight-through gradient to z
    x_hat   = unpatchify(Dec(W_post z_q + PE_2d))   each token mapped linearly back to an 8x8 patch `unpatchify`

Tokens are in raster order: token (i, j) of the (h, w) grid is the patch in row i, column j, and the
flat sequence a Transformer writes is k = i * w + j (row-major). `encode(x).latents` is the
channels-first map (b, codebook_dim, h, w), so `quantize(latents).indices` is the grid (b, h, w).

The paper's ViT-VQGAN-Small, the encoder of Parti's tokenizer, is 8 blocks, 8 heads, width 512, MLP
2048 (`ViTVQGANConfig()` defaults); Parti later enlarged the decoder to 32 blocks of width 1280 and
fine-tuned it with the encoder and codebook frozen (`decoder_*` fields). Module shapes follow the
public reimplementation enhancing-transformers (its checkpoints load with weights_convert/vit_vqgan.py):
attention without q/k/v biases and heads of width 64, a tanh between the two linear maps of each
block's MLP, a final LayerNorm after the blocks, patches in and out by stride-8 convolutions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from parti_from_scratch.configuration import Config, config_from_dict, positive, require
from parti_from_scratch.nn.attention import MultiHeadAttention
from parti_from_scratch.nn.positional import sincos_2d_position_encoding
from parti_from_scratch.parti.quantize import VectorQuantizer, VectorQuantizerConfig
from parti_from_scratch.parti.vqgan import VQDecoderOutput, VQEncoderOutput  # the same outputs as VQModel's

# the activation between the two linear maps of each block's MLP
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"tanh": torch.tanh, "gelu": F.gelu}
# the pixel range the weights were trained in; the model's API always speaks [-1, 1]
PIXEL_RANGES = ("minus_one_one", "zero_one")


@dataclass
class ViTVQGANConfig(Config):
    """Hyper-parameters of `ViTVQModel`.

    Defaults: ViT-VQGAN-Small at 256 px (arXiv 2110.04627), the encoder of Parti's tokenizer.

    The decoder_* fields default (None) to the encoder's values; Parti's enlarged decoder is
    decoder_depth=32, decoder_dim=1280 (arXiv 2206.10789, §2.1).
    """
    image_size: Tuple[int, int] = (256, 256)    # (height, width) in pixels; an int means a square
    patch_size: int = 8                         # p: each p x p patch becomes one token (grid 32x32 at 256 px)
    channels: int = 3                           # image channels, in and out
    dim: int = 512                              # encoder width d
    depth: int = 8                              # encoder Transformer blocks
    heads: int = 8                              # encoder attention heads
    dim_head: int = 64                          # width of one head (heads * dim_head need not equal dim)
    mlp_dim: int = 2048                         # hidden width of each block's MLP
    decoder_dim: Optional[int] = None           # decoder width (None: dim)
    decoder_depth: Optional[int] = None         # decoder blocks (None: depth)
    decoder_heads: Optional[int] = None         # decoder heads (None: heads)
    decoder_mlp_dim: Optional[int] = None       # decoder MLP width (None: mlp_dim)
    codebook_size: int = 8192                   # K, number of codes
    codebook_dim: int = 32                      # lookup dimension of the factorised, l2-normalised codes
    hidden_act: str = "tanh"                    # MLP activation (enhancing-transformers: tanh)
    layer_norm_eps: float = 1e-5
    beta: float = 0.25                          # commitment weight of the VQ loss (VQ-VAE Eq. 3, paper form)
    pixel_range: str = "minus_one_one"          # range the weights were trained in ("zero_one": enhancing-
    #                                             transformers, whose images are ToTensor() output in [0, 1])

    choices: ClassVar[Mapping[str, Tuple[Any, ...]]] = {"hidden_act": tuple(ACTIVATIONS),
                                                         "pixel_range": PIXEL_RANGES}

    def normalize(self) -> None:
        if isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            self.image_size = (self.image_size, self.image_size)

    def check(self) -> None:
        positive(self, "image_size", "patch_size", "channels", "dim", "heads", "dim_head", "mlp_dim",
                 "decoder_dim", "decoder_heads", "decoder_mlp_dim", "codebook_size", "codebook_dim",
                 "layer_norm_eps")
        for name in ("depth", "decoder_depth"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"{name}={value!r}: must be >= 0")
        height, width = self.image_size
        require(height % self.patch_size == 0 and width % self.patch_size == 0,
                f"image_size={self.image_size!r}: not divisible by patch_size={self.patch_size}")
        for name in ("dim", "decoder_dim"):
            value = getattr(self, name)
            require(value is None or value % 4 == 0,
                    f"{name}={value!r}: the 2-D sine-cosine positions need a width divisible by 4")

    @property
    def grid_size(self) -> Tuple[int, int]:
        """(h, w) of the token grid: image_size / patch_size."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    def decoder(self, name: str) -> int:
        """decoder_<name>, or the encoder's <name> when unset."""
        value = getattr(self, f"decoder_{name}")
        return getattr(self, name) if value is None else value


# ----------------------------------------------------------------------------------------------- equations

def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x_{ij} = W vec(P_{ij}) + b for every non-overlapping p x p patch P_{ij}; tokens in raster order.

    A convolution whose kernel and stride are both p is exactly this linear map,
    applied to each patch once (ViT, Dosovitskiy et al. 2020, arXiv 2010.11929, Eq. 1).

    x (b, c, H, W), weight (d, c, p, p), bias (d,) -> tokens (b, (H/p)(W/p), d), token k = patch (k // w, k % w)
    """
    p = weight.shape[-1]
    # (b, c, H, W) -> (b, d, h, w)
    tokens = F.conv2d(x, weight, bias, stride=p)
    # (b, d, h, w) -> (b, h w, d): row-major, the raster order of the token grid
    return rearrange(tokens, "b d h w -> b (h w) d")


def add_positions(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """h_0 = x + PE: the same fixed 2-D table added to every image of the batch.

    tokens (b, n, d), positions (1, n, d) -> (b, n, d)
    """
    if tokens.shape[1:] != positions.shape[1:]:
        raise ValueError(f"{tokens.shape[1]} tokens of width {tokens.shape[2]} do not fit the position table "
                         f"{tuple(positions.shape[1:])}: is the image the size the model was built for?")
    return tokens + positions


def unpatchify(tokens: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], grid: Tuple[int, int]
               ) -> torch.Tensor:
    """x_hat[:, i p + u, j p + v] = b + sum_d t_{ij, d} W[d, :, u, v]: each token mapped linearly to its own patch.

    A transposed convolution with kernel = stride = p writes every token into its
    p x p patch with no overlap: a linear map d -> c p p per token followed by
    placing the patches side by side in raster order.

    tokens (b, h w, d), weight (d, c, p, p), bias (c,), grid (h, w) -> (b, c, h p, w p)
    """
    h, w = grid
    # (b, h w, d) -> (b, d, h, w)
    tokens = rearrange(tokens, "b (h w) d -> b d h w", h=h, w=w)
    return F.conv_transpose2d(tokens, weight, bias, stride=weight.shape[-1])


# ----------------------------------------------------------------------------------------------- modules

class FeedForward(nn.Module):
    """MLP(x) = W_2 act(W_1 x + b_1) + b_2, the position-wise feed-forward of each block."""

    def __init__(self, dim: int, hidden_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACTIVATIONS[act]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, n, dim) -> (b, n, dim)."""
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """One pre-norm block: h = h + MultiHead(LN_1(h)); h = h + MLP(LN_2(h)) (Vaswani et al. 2017, arXiv 1706.03762)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        # W^Q, W^K, W^V without biases, heads of width dim_head, W^O with a bias
        self.attn = MultiHeadAttention(dim, heads, inner_dim=heads * dim_head, qkv_bias=False, out_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, mlp_dim, act)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (b, n, dim) -> (b, n, dim)."""
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class ViTTransformer(nn.Module):
    """LN(Block_L(... Block_1(h))): the blocks, then a final LayerNorm. Every token sees every other (no mask)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, dim_head, mlp_dim, act, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (b, n, dim) -> (b, n, dim)."""
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


def _position_table(grid: Tuple[int, int], dim: int) -> torch.Tensor:
    """PE_2d as a (1, h w, dim) buffer (the leading axis broadcasts over the batch)."""
    return sincos_2d_position_encoding(grid[0], grid[1], dim)[None]


class ViTEncoder(nn.Module):
    """Image -> tokens: patch_embed, + PE_2d, Transformer. x (b, c, H, W) -> (b, h w, dim)."""

    def __init__(self, config: ViTVQGANConfig):
        super().__init__()
        c, p = config, config.patch_size
        self.patch_embed = nn.Conv2d(c.channels, c.dim, kernel_size=p, stride=p)
        # fixed, not trained; stored in the state dict, so a checkpoint's own table is the one used
        self.register_buffer("position_embedding", _position_table(c.grid_size, c.dim))
        self.transformer = ViTTransformer(c.dim, c.depth, c.heads, c.dim_head, c.mlp_dim, c.hidden_act,
                                          c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = patch_embed(x, self.patch_embed.weight, self.patch_embed.bias)
        return self.transformer(add_positions(tokens, self.position_embedding))


class ViTDecoder(nn.Module):
    """Tokens -> image: + PE_2d, Transformer, unpatchify. (b, h w, dim) -> (b, c, H, W)."""

    def __init__(self, config: ViTVQGANConfig):
        super().__init__()
        c, p, dim = config, config.patch_size, config.decoder("dim")
        self.grid = c.grid_size
        self.register_buffer("position_embedding", _position_table(c.grid_size, dim))
        self.transformer = ViTTransformer(dim, c.decoder("depth"), c.decoder("heads"), c.dim_head,
                                          c.decoder("mlp_dim"), c.hidden_act, c.layer_norm_eps)
        # weight (dim, channels, p, p): token -> its p x p patch
        self.to_pixels = nn.ConvTranspose2d(dim, c.channels, kernel_size=p, stride=p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.transformer(add_positions(tokens, self.position_embedding))
        return unpatchify(h, self.to_pixels.weight, self.to_pixels.bias, self.grid)


class ViTVQModel(nn.Module):
    """The ViT-VQGAN tokenizer: `encode(x).latents`, `quantize(z).indices`, `decode(z).sample`, `decode_indices(k)`.

    The same calls as `VQModel`: images in [-1, 1] (weights trained on [0, 1], config.pixel_range
    "zero_one", are converted at the boundary), latents (b, codebook_dim, h, w), token grids
    (b, h, w) in raster order. Modules: `encoder`, `pre_quant` (d -> codebook_dim), `quantize`
    (a `VectorQuantizer` with l2-normalised codes and the paper's VQ loss), `post_quant`
    (codebook_dim -> decoder width), `decoder`.
    """

    def __init__(self, config: Optional[ViTVQGANConfig] = None, **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise TypeError("pass either a ViTVQGANConfig or keyword arguments, not both")
        config = config_from_dict(ViTVQGANConfig, kwargs, strict=True) if config is None else config
        self.config = config
        self.encoder = ViTEncoder(config)
        # factorised codes (§3.2): a linear map of the encoder width down to the lookup space
        self.pre_quant = nn.Linear(config.dim, config.codebook_dim)
        self.quantize = VectorQuantizer(VectorQuantizerConfig(
            num_embeddings=config.codebook_size, embedding_dim=config.codebook_dim, use_cosine_sim=True,
            beta=config.beta, legacy=False))
        # codes drawn from a normal distribution, i.e. uniform directions on the unit sphere (§3.2)
        nn.init.normal_(self.quantize.embedding.weight)
        self.post_quant = nn.Linear(config.codebook_dim, config.decoder("dim"))
        self.decoder = ViTDecoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant.weight.device

    def _check_image(self, x: torch.Tensor) -> None:
        expected = (self.config.channels, *self.config.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ViTVQModel expects images (batch, {expected[0]}, {expected[1]}, {expected[2]}) "
                             f"(its position table is fixed to that grid), got shape {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, return_dict: bool = True
               ) -> Union[VQEncoderOutput, Tuple[torch.Tensor]]:
        """z = W_pre Enc(x): x (b, c, H, W) in [-1, 1] -> latents (b, codebook_dim, H/p, W/p)."""
        self._check_image(x)
        if self.config.pixel_range == "zero_one":
            # [-1, 1] -> [0, 1], the range these weights were trained in
            x = (x + 1) / 2
        h, w = self.config.grid_size
        # (b, h w, d) -> (b, h w, codebook_dim) -> (b, codebook_dim, h, w)
        z = rearrange(self.pre_quant(self.encoder(x)), "b (h w) c -> b c h w", h=h, w=w)
        return VQEncoderOutput(latents=z) if return_dict else (z,)

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """The image's tokens: x (b, c, H, W) -> indices (b, H/p, W/p), int64, raster order."""
        return self.quantize(self.encode(x).latents).indices

    def _decode_codes(self, z_q: torch.Tensor) -> torch.Tensor:
        """x_hat = Dec(W_post z_q): (b, codebook_dim, h, w) -> (b, c, H, W) in [-1, 1]."""
        # (b, codebook_dim, h, w) -> (b, h w, codebook_dim)
        tokens = rearrange(z_q, "b c h w -> b (h w) c")
        x = self.decoder(self.post_quant(tokens))
        if self.config.pixel_range == "zero_one":
            # [0, 1] -> [-1, 1]
            x = 2 * x - 1
        return x

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True
               ) -> Union[VQDecoderOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """x_hat = Dec(W_post z_q), as VQModel.decode: latents (b, codebook_dim, h, w) -> image (b, c, H, W).

        The latents are quantised here (nearest l2-normalised code) unless force_not_quantize,
        in which case they are decoded as they are.
        """
        if force_not_quantize:
            z_q, loss = h, torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
        else:
            out = self.quantize(h)
            z_q, loss = out.quantized, out.loss
        x = self._decode_codes(z_q)
        return VQDecoderOutput(sample=x, commit_loss=loss) if return_dict else (x, loss)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """A token grid back to pixels: indices (b, h, w) -> l2(e_k) -> x_hat (b, c, h p, w p)."""
        if indices.ndim != 3 or tuple(indices.shape[1:]) != self.config.grid_size:
            raise ValueError(f"indices must be (batch, {self.config.grid_size[0]}, {self.config.grid_size[1]}), "
                             f"got shape {tuple(indices.shape)}")
        return self._decode_codes(self.quantize.indices_to_codes(indices))

    def forward(self, sample: torch.Tensor, return_dict: bool = True
                ) -> Union[VQDecoderOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """The reconstruction Dec(q(Enc(x))) and the VQ loss."""
        return self.decode(self.encode(sample).latents, return_dict=return_dict)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], dtype: Optional[torch.dtype] = torch.float32,
                        **overrides: Any) -> "ViTVQModel":
        """Load an enhancing-transformers ViT-VQGAN checkpoint (.ckpt, .pt or .safetensors), strictly.

        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        """
        from weights_convert.vit_vqgan import load_vit_vqgan
        return load_vit_vqgan(path, dtype=dtype, **overrides)

    def save_pretrained(self, path: Union[str, Path]) -> None:
        """Write the weights in enhancing-transformers' layout (.safetensors, or a .ckpt with a state_dict).

        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        """
        from weights_convert.vit_vqgan import save_vit_vqgan
        save_vit_vqgan(self, path)
