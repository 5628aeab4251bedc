"""Tiny random diffusers UNet2DConditionModel / AutoencoderKL models: the oracles of the UNet and VAE tests.

Shared by tests/test_unet.py, tests/test_vae.py and tests/test_weights_convert_diffusers.py.
diffusers is imported here only, as a test-time oracle; the library never imports it.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

# name -> (diffusers UNet2DConditionModel kwargs, latent size (H, W))
UNET_CONFIGS = {
    # SD 1.x-like: 1x1-conv proj_in/proj_out, one int attention_head_dim (= 4 heads), SD's last DownBlock2D/UpBlock2D
    "sd1-like": (dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=24, attention_head_dim=4,
                      norm_num_groups=8, sample_size=16,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), (16, 16)),
    # SD 2.x-like: linear projections, heads per level, upcast attention, text width != any block width, 3 levels
    "sd2-like": (dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=40,
                      attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True,
                      norm_num_groups=16, sample_size=32,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), (32, 32)),
    # the less common keys: per-level layers and text widths, 2 transformer layers, only_cross_attention,
    # odd latent sizes (the upsamplers resize to the skip connections), centred input, mid-block scale, freq shift
    "extras": (dict(block_out_channels=(32, 48, 64), layers_per_block=(1, 2, 1), cross_attention_dim=(24, 24, 24),
                    transformer_layers_per_block=2, only_cross_attention=(True, False, False), attention_head_dim=2,
                    norm_num_groups=16, center_input_sample=True, mid_block_scale_factor=1.5, freq_shift=1,
                    flip_sin_to_cos=False, downsample_padding=0, time_embedding_dim=96, sample_size=16,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")), (18, 14)),
}


# name -> (diffusers AutoencoderKL kwargs, image size)
VAE_CONFIGS = {
    # SD-like: every level a DownEncoderBlock2D/UpDecoderBlock2D, mid-block attention, quant convs
    "two-levels": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=32), 32),
    "three-levels": (dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=16,
                          latent_channels=3, scaling_factor=0.13025,
                          down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                          sample_size=16), 16),
    # without the mid-block attention and the 1x1 quant convs
    "bare": (dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
                  use_quant_conv=False, use_post_quant_conv=False,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=16), 16),
}


CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def reference(kind: str, kwargs: dict, seed: int = 0):
    """A diffusers UNet2DConditionModel ("unet") or AutoencoderKL ("vae") with seeded random weights."""
    torch.manual_seed(seed)
    return getattr(diffusers, CLASSES[kind])(**kwargs).eval()


def saved_reference(kind: str, name: str, tmp_path_factory):
    """(diffusers model, the folder its save_pretrained wrote) for UNET_CONFIGS or VAE_CONFIGS[name]."""
    kwargs = (UNET_CONFIGS if kind == "unet" else VAE_CONFIGS)[name][0]
    ref = reference(kind, kwargs)
    folder = tmp_path_factory.mktemp(f"{kind}-{name}")
    ref.save_pretrained(folder)
    return ref, folder


def unet_inputs(kwargs: dict, size, batch: int = 2, n_text: int = 7, seed: int = 1):
    """A latent z_t (batch, 4, *size) and text states c (batch, n_text, cross_attention_dim)."""
    dim = kwargs["cross_attention_dim"]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, *size, generator=g)
    c = torch.randn(batch, n_text, dim[0] if isinstance(dim, tuple) else dim, generator=g)
    return z, c


def image(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """A random image batch in [-1, 1], shape (batch, 3, size, size)."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
