"""diffusers VQModel folders (aMUSEd's `vqvae/`, LDM's vq-f4/f8/f16 conversions) <-> our VQModel.

A diffusers VQModel folder holds

    config.json                           {"_class_name": "VQModel", ...the keys of VQModelConfig}
    diffusion_pytorch_model.safetensors   (or diffusion_pytorch_model.bin)

The encoder and decoder carry the names of the KL autoencoder, so the rules of
`diffusers_models` (RENAMES: to_q ... to_out.0 -> q_proj ... out_proj,
downsamplers.0 / upsamplers.0 -> downsample / upsample; legacy mid-block
attention names; 1x1-conv attention weights -> linear) apply unchanged, inside
the levels with attention too. The parts a VQModel adds keep their names:

    quant_conv, post_quant_conv    1x1 convolutions latent_channels <-> vq_embed_dim
    quantize.embedding.weight      the codebook (num_vq_embeddings, vq_embed_dim)

Loading is strict as for the VAE: the config's repeat counts are compared with
the file's key indices first (`vq_repeats`), the model is built on the meta
device, every tensor is compared by name, shape and kind of dtype, and only then
assigned. An error names the file and the keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from parti_from_scratch.configuration import ConfigError, resolve_folder
from weights_convert.common import Repeat
from weights_convert.diffusers_models import load_model, read_config, save_model, to_diffusers, vae_repeats

PathLike = Union[str, Path]
CLASS_NAME = "VQModel"


def vq_repeats(config) -> Iterator[Repeat]:
    """The VQModel's ModuleLists in our names and the length `config` gives each, outer lists first.

    The levels and resnets of the KL autoencoder (`vae_repeats`), then the
    self-attention of each level whose block type starts with "Attn".
    """
    yield from vae_repeats(config)
    n = config.layers_per_block
    for i, kind in enumerate(config.down_block_types):
        yield f"encoder.down_blocks.{i}.attentions", n if kind.startswith("Attn") else 0, "down_block_types"
    for i, kind in enumerate(config.up_block_types):
        yield f"decoder.up_blocks.{i}.attentions", n + 1 if kind.startswith("Attn") else 0, "up_block_types"


def load_vq_model(path: PathLike, subfolder: Optional[str] = None, dtype: Optional[torch.dtype] = torch.float32):
    """Our VQModel from a diffusers `VQModel` folder (e.g. `amused/amused-256`, subfolder="vqvae")."""
    from parti_from_scratch.parti.vqgan import VQModel, VQModelConfig
    folder = resolve_folder(path, subfolder)
    values, source = read_config(folder, CLASS_NAME)
    config = VQModelConfig.from_dict(values, source=source)
    return load_model(folder, lambda: VQModel(config), dtype, vq_repeats(config), source)


def save_vq_model(model, folder: PathLike) -> None:
    """Write `model` as a diffusers VQModel folder (modern attention names, linear attention weights)."""
    if model.encoder is None:
        raise ConfigError(f"{folder}: a decoder-only VQModel cannot be written as a diffusers VQModel folder, "
                          f"which always holds an encoder")
    save_model(folder, CLASS_NAME, model.config, to_diffusers(model.state_dict()))
