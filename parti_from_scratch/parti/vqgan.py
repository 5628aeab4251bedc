"""The convolutional VQGAN: an image <-> a grid of codebook indices (Esser et al. 2021, arXiv 2012.09841).

Parti (Yu et al. 2022, arXiv 2206.10789) writes images as token grids. The
tokenizer of its open relatives (DALL·E mini/mega, aMUSEd, LDM's VQ
autoencoders) is the VQGAN of "Taming Transformers" (§3.1, Eq. 1-4): a
convolutional encoder E, a codebook {e_k}, a decoder G,

    z     = quant_conv(E(x))                       (b, vq_embed_dim, h, w), h = H / 2^(L-1)   `encode`
    k*    = argmin_k ||z_ij - e_k||^2 per pixel    indices (b, h, w)                          `quantize`
    z_q   = z + sg(e_{k*} - z)                     the straight-through estimator
    x_hat = G(post_quant_conv(z_q))                (b, out_channels, H, W)                     `decode`

with the VQ loss of diffusers/taming ("legacy": beta = 0.25 on the codebook
term; parti/quantize.py states both forms). The encoder and decoder bodies are
those of the KL autoencoder (nn/autoencoder.py); what differs is the middle: a
codebook instead of a Gaussian posterior, and an encoder that writes one vector
per pixel instead of (mu, log sigma^2).

The config keys are those of diffusers' `VQModel` config.json, and so is the
behaviour: `encode(x).latents` is the pre-quantisation z (after quant_conv),
`decode(z)` quantises first (pass force_not_quantize=True for codes that are
already on the codebook), `decode_indices(indices)` decodes a token grid.
Images are in [-1, 1].

Not built: MoVQ's spatially conditioned normalisation (norm_type "spatial",
Kandinsky's `movq`): a config asking for it is refused with a ConfigError
naming the file and the key (the `refused` table; act_fn other than SiLU likewise).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from parti_from_scratch.configuration import (Config, Refused, check_groups_divide_widths, check_levels,
                                              config_from_dict, positive)
from parti_from_scratch.nn.autoencoder import ConvDecoder, ConvEncoder
from parti_from_scratch.outputs import ModelOutput
from parti_from_scratch.parti.quantize import VectorQuantizer, VectorQuantizerConfig

DOWN_BLOCKS = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_BLOCKS = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")
VQ_BETA = 0.25  # the commitment weight every public VQGAN was trained with (legacy form, see parti/quantize.py)


@dataclass
class VQModelConfig(Config):
    """Hyper-parameters of the VQGAN; field names and defaults are those of diffusers' VQModel config.json."""
    in_channels: int = 3                        # image channels
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)   # per level; "Attn..." adds self-attention
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)       # per decoder level, deepest first
    block_out_channels: Tuple[int, ...] = (64,)  # widths per level; L levels downsample by 2^(L-1)
    layers_per_block: int = 1                   # resnets per encoder level (decoder levels have one more)
    latent_channels: int = 3                    # channels of the encoder/decoder ends (taming's z_channels)
    sample_size: int = 32                       # image size it was trained at
    num_vq_embeddings: int = 256                # K, codebook size (taming's n_embed)
    norm_num_groups: int = 32
    vq_embed_dim: Optional[int] = None          # width of the codes (taming's embed_dim); None = latent_channels
    scaling_factor: float = 0.18215             # for latent diffusion on VQ latents; unused by the tokenizer
    mid_block_add_attention: bool = True        # self-attention in the mid blocks
    lookup_from_codebook: bool = False          # decode(..., force_not_quantize=True) reads indices (aMUSEd)
    force_upcast: bool = False                  # pipelines should run this model in float32

    choices: ClassVar[Mapping[str, Tuple[Any, ...]]] = {"down_block_types": DOWN_BLOCKS, "up_block_types": UP_BLOCKS}
    # Keys of diffusers' VQModel that select what we do not build (read from config.json, never fields).
    refused: ClassVar[Mapping[str, Refused]] = {
        "act_fn": Refused(("silu", "swish"), "another non-linearity than SiLU"),
        "norm_type": Refused(("group",), "MoVQ's spatially conditioned GroupNorm, Kandinsky's movq"),
    }

    def check(self) -> None:
        check_levels(self)
        positive(self, "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                 "sample_size", "num_vq_embeddings", "norm_num_groups", "vq_embed_dim")
        check_groups_divide_widths(self)

    @property
    def code_dim(self) -> int:
        """Width of the codebook vectors: vq_embed_dim, or latent_channels when it is unset."""
        return self.latent_channels if self.vq_embed_dim is None else self.vq_embed_dim

    @property
    def downsampling(self) -> int:
        """Pixels per token side: 2^(L-1)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class VQEncoderOutput(ModelOutput):
    """vq.encode(x).latents: the pre-quantisation z, (b, vq_embed_dim, h, w)."""
    latents: torch.Tensor


@dataclass
class VQDecoderOutput(ModelOutput):
    """vq.decode(z).sample: the image (b, out_channels, H, W); commit_loss: the VQ loss (zeros(b) if not quantised)."""
    sample: torch.Tensor
    commit_loss: Optional[torch.Tensor] = None


class VQModel(nn.Module):
    """The VQGAN tokenizer: `encode(x).latents`, `quantize(z).indices`, `decode(z).sample`, `decode_indices(k)`.

    Build from a config (`VQModel(VQModelConfig(...))` or keyword arguments),
    or load weights with `from_pretrained` (a diffusers VQModel folder). A model
    built with `decoder_only=True` has no encoder and no quant_conv (min-dalle's
    detokenizer ships only these halves); it decodes but cannot encode.
    """

    def __init__(self, config: Optional[VQModelConfig] = None, decoder_only: bool = False, **kwargs):
        super().__init__()
        config = config_from_dict(VQModelConfig, kwargs, strict=True) if config is None else config
        self.config = config
        c, d = config.latent_channels, config.code_dim
        common = dict(block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                      groups=config.norm_num_groups, mid_block_add_attention=config.mid_block_add_attention)
        self.decoder_only = decoder_only
        if decoder_only:
            self.encoder, self.quant_conv = None, None
        else:
            self.encoder = ConvEncoder(config.in_channels, c, attention=[t.startswith("Attn")
                                                                         for t in config.down_block_types], **common)
            # z = quant_conv(E(x)): latent_channels -> vq_embed_dim
            self.quant_conv = nn.Conv2d(c, d, kernel_size=1)
        # taming/diffusers quantizer: Euclidean lookup, no projection, loss with beta on the codebook term
        self.quantize = VectorQuantizer(VectorQuantizerConfig(
            num_embeddings=config.num_vq_embeddings, embedding_dim=d, use_cosine_sim=False, beta=VQ_BETA,
            legacy=True))
        self.post_quant_conv = nn.Conv2d(d, c, kernel_size=1)
        self.decoder = ConvDecoder(c, config.out_channels, attention=[t.startswith("Attn")
                                                                      for t in config.up_block_types], **common)

    @property
    def codebook_size(self) -> int:
        """K: how many distinct tokens there are (num_vq_embeddings)."""
        return self.config.num_vq_embeddings

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Union[VQEncoderOutput, Tuple[torch.Tensor]]:
        """z = quant_conv(E(x)): x (b, in_channels, H, W) in [-1, 1] -> latents (b, vq_embed_dim, h, w), h = H/2^(L-1).

        `self.quantize(latents)` then gives z_q, indices (b, h, w), the VQ loss and the perplexity.
        """
        if self.encoder is None:
            raise RuntimeError("this VQModel was built decoder_only (e.g. from min-dalle's detoker.pt, which has no "
                               "encoder): it can decode indices but not encode images")
        z = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=z) if return_dict else (z,)

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """The image's tokens: x (b, in_channels, H, W) -> indices (b, H/2^(L-1), W/2^(L-1)), int64."""
        return self.quantize(self.encode(x).latents).indices

    def _decode_codes(self, z_q: torch.Tensor) -> torch.Tensor:
        """x_hat = G(post_quant_conv(z_q)): (b, vq_embed_dim, h, w) -> (b, out_channels, H, W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True,
               shape: Optional[Tuple[int, ...]] = None) -> Union[VQDecoderOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """x_hat = G(post_quant_conv(z_q)), as diffusers' VQModel.decode.

        h: latents (b, vq_embed_dim, h, w), quantised here unless force_not_quantize (then used as they are).
        With force_not_quantize and config.lookup_from_codebook, h holds indices instead: (b, h, w), or flat
        (b*h*w,) with shape = (b, h, w[, channels]) as diffusers' `shape` argument.
        """
        if not force_not_quantize:
            out = self.quantize(h)
            z_q, loss = out.quantized, out.loss
        else:
            if self.config.lookup_from_codebook:
                indices = h if shape is None else h.reshape(tuple(shape)[:3])
                z_q = self.quantize.indices_to_codes(indices)
            else:
                z_q = h
            loss = torch.zeros(z_q.shape[0], dtype=z_q.dtype, device=z_q.device)
        x = self._decode_codes(z_q)
        return VQDecoderOutput(sample=x, commit_loss=loss) if return_dict else (x, loss)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """A token grid back to pixels: indices (b, h, w) -> e_k -> x_hat (b, out_channels, h 2^(L-1), w 2^(L-1))."""
        if indices.ndim != 3:
            raise ValueError(f"indices must be (batch, h, w), got shape {tuple(indices.shape)}")
        return self._decode_codes(self.quantize.indices_to_codes(indices))

    def forward(self, sample: torch.Tensor, return_dict: bool = True
                ) -> Union[VQDecoderOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """The reconstruction G(q(E(x))) and the VQ loss, as diffusers' forward."""
        return self.decode(self.encode(sample).latents, return_dict=return_dict)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], subfolder: Optional[str] = None,
                        dtype: Optional[torch.dtype] = torch.float32) -> "VQModel":
        """Load a diffusers VQModel folder (config.json + diffusion_pytorch_model.safetensors or .bin).

        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        Other layouts: weights_convert.taming_vqgan.load_taming_vqgan (a taming-transformers .ckpt),
        weights_convert.min_dalle_detoker.load_min_dalle_detokenizer (min-dalle's detoker.pt).
        """
        from weights_convert.diffusers_vq import load_vq_model
        return load_vq_model(path, subfolder=subfolder, dtype=dtype)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write config.json and diffusion_pytorch_model.safetensors in diffusers' layout (diffusers loads it).

        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        """
        from weights_convert.diffusers_vq import save_vq_model
        save_vq_model(self, folder)
