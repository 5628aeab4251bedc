"""The autoencoder of latent diffusion: images <-> latents 8x smaller per side (tutorial §5.2).

Stable Diffusion does not denoise pixels but latents z of a KL-regularised
autoencoder (Rombach et al. 2022, arXiv 2112.10752, §3.1 and Appendix G),
a variational autoencoder (Kingma & Welling 2013, arXiv 1312.6114):

    encoder:  q_phi(z | x) = N(z; mu_phi(x), diag(sigma_phi(x)^2))
    sample:   z = mu + sigma * eps,  eps ~ N(0, I)          (the reparameterisation trick, Kingma & Welling Eq. 10)
    decoder:  x_hat = D_theta(z)
    regulariser: KL(q_phi(z | x) || N(0, I)), weighted ~1e-6 in training, so z stays close to Gaussian

The diffusion model sees z * scaling_factor (0.18215 for SD 1.x/2.x), which
gives the latents roughly unit variance; `decode` expects z / scaling_factor back.

The convolutional body is nn/autoencoder.py's, shared with the VQGAN (parti/vqgan.py):
Encoder: conv_in -> down blocks (ResnetBlock2D without time embedding, then
Downsample2D with the asymmetric padding) -> mid block (resnet, single-head
self-attention over the pixels, resnet) -> GroupNorm -> SiLU -> conv_out to
2 * latent_channels (mu and log sigma^2) -> quant_conv (1x1).
Decoder: post_quant_conv (1x1) -> conv_in -> mid block -> up blocks (resnets,
then Upsample2D) -> GroupNorm -> SiLU -> conv_out.
What is the VAE's own is below: the diagonal Gaussian q(z | x), its KL to N(0, I),
and the 1x1 convolutions around the latent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from parti_from_scratch.configuration import (Config, Refused, check_groups_divide_widths, check_levels,
                                              config_from_dict, positive, require)
from parti_from_scratch.diffusion.process import randn
from parti_from_scratch.nn.autoencoder import ConvDecoder, ConvEncoder
from parti_from_scratch.outputs import ModelOutput


@dataclass
class AutoencoderKLConfig(Config):
    """Hyper-parameters of the VAE; field names and defaults are those of diffusers' `vae/config.json`."""
    in_channels: int = 3                       # image channels
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)   # one entry per level
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)   # SD: (128, 256, 512, 512), so latents are 8x smaller per side
    layers_per_block: int = 1                  # resnets per encoder level (decoder levels have one more); SD: 2
    latent_channels: int = 4                   # channels of z
    norm_num_groups: int = 32
    sample_size: Union[int, Tuple[int, ...]] = 32    # image size it was trained at
    scaling_factor: float = 0.18215            # the UNet sees z * scaling_factor (about unit variance)
    use_quant_conv: bool = True                # 1x1 conv after the encoder
    use_post_quant_conv: bool = True           # 1x1 conv before the decoder
    mid_block_add_attention: bool = True       # self-attention in the mid blocks

    choices: ClassVar[Mapping[str, Tuple[Any, ...]]] = {
        "down_block_types": ("DownEncoderBlock2D",),
        "up_block_types": ("UpDecoderBlock2D",)}
    # Keys of diffusers' AutoencoderKL that select what we do not build: another activation, another latent space.
    refused: ClassVar[Mapping[str, Refused]] = {
        "act_fn": Refused(("silu", "swish"), "another non-linearity than SiLU"),
        "shift_factor": Refused((None,), "latents shifted as (z - shift_factor) * scaling_factor"),
        "latents_mean": Refused((None,), "latents normalised per channel"),
        "latents_std": Refused((None,), "latents normalised per channel"),
    }

    def check(self) -> None:
        check_levels(self)
        positive(self, "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                 "norm_num_groups", "sample_size", "scaling_factor")
        require(math.isfinite(self.scaling_factor), f"scaling_factor={self.scaling_factor}: must be finite")
        check_groups_divide_widths(self)


class DiagonalGaussianDistribution:
    """q(z | x) = N(mu, diag(sigma^2)), from the encoder's 2 * latent_channels output [mu, log sigma^2].

    log sigma^2 is clamped to [-30, 20] as in the reference autoencoder, so sigma
    can neither vanish nor overflow.
    """

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        # (b, 2C, h, w) -> mu (b, C, h, w), log sigma^2 (b, C, h, w)
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        # sigma = exp(log sigma^2 / 2)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): a differentiable sample (the reparameterisation trick)."""
        if noise is None:
            noise = randn(self.mean.shape, generator, self.mean.dtype, self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The most likely z: mu."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(0, I)) per sample, summed over the latent's elements, shape (b,).

            KL = 0.5 * sum( mu^2 + sigma^2 - 1 - log sigma^2 )

        (per element, the closed form of KL between two Gaussians with the second standard normal).
        """
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


@dataclass
class AutoencoderKLOutput(ModelOutput):
    """vae.encode(x).latent_dist: the posterior q(z | x)."""
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(ModelOutput):
    """vae.decode(z).sample: the image x_hat, shape (b, out_channels, H, W)."""
    sample: torch.Tensor


class AutoencoderKL(nn.Module):
    """The KL autoencoder: `vae.encode(x).latent_dist.sample(generator)` and `vae.decode(z).sample`.

    Build from a config (`AutoencoderKL(AutoencoderKLConfig(...))` or keyword
    arguments) or load a diffusers folder with `from_pretrained`.
    """

    def __init__(self, config: Optional[AutoencoderKLConfig] = None, **kwargs):
        super().__init__()
        config = config_from_dict(AutoencoderKLConfig, kwargs, strict=True) if config is None else config
        self.config = config
        c = config.latent_channels
        body = dict(block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                    groups=config.norm_num_groups, mid_block_add_attention=config.mid_block_add_attention)
        # E(x) -> [mu, log sigma^2]: (b, in_channels, H, W) -> (b, 2 * latent_channels, H / 2^(L-1), W / 2^(L-1))
        self.encoder = ConvEncoder(config.in_channels, 2 * c, **body)
        # D(z): (b, latent_channels, h, w) -> (b, out_channels, h * 2^(L-1), w * 2^(L-1))
        self.decoder = ConvDecoder(c, config.out_channels, **body)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1) if config.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def encode(self, x: torch.Tensor, return_dict: bool = True
               ) -> Union[AutoencoderKLOutput, Tuple[DiagonalGaussianDistribution]]:
        """x (b, in_channels, H, W), pixels in [-1, 1] -> q(z | x) over z of shape (b, latent_channels, h, w)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        """z (b, latent_channels, h, w), unscaled (divide the UNet's latents by scaling_factor) -> x_hat in ~[-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        x = self.decoder(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: Optional[torch.Generator] = None) -> DecoderOutput:
        """Reconstruction D(z), z ~ q(z | x) if sample_posterior else z = mu."""
        posterior = self.encode(x).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], subfolder: Optional[str] = None,
                        dtype: Optional[torch.dtype] = torch.float32) -> "AutoencoderKL":
        """Load a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors or .bin).

        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        """
        from weights_convert.diffusers_models import load_vae
        return load_vae(path, subfolder=subfolder, dtype=dtype)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write config.json and diffusion_pytorch_model.safetensors in diffusers' layout (diffusers loads it).

        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        """
        from weights_convert.diffusers_models import save_vae
        save_vae(self, folder)
