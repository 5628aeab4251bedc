"""diffusers model folders (UNet2DConditionModel, AutoencoderKL) <-> our UNet and VAE.

A diffusers model folder (`unet/` or `vae/` of a Stable Diffusion download, or
a standalone VAE such as stabilityai/sd-vae-ft-mse) holds

    config.json                           {"_class_name": "UNet2DConditionModel", ...hyper-parameters}
    diffusion_pytorch_model.safetensors   (or diffusion_pytorch_model.bin)

Our module names are diffusers' except for these renames, applied by rule in
both directions (RENAMES):

    ff.net.0.proj, ff.net.2        <->  ff.proj, ff.out_proj          GEGLU feed-forward W_1, W_2
    to_q, to_k, to_v, to_out.0     <->  q_proj, k_proj, v_proj, out_proj   every attention's W_Q, W_K, W_V, W_O
    downsamplers.0, upsamplers.0   <->  downsample, upsample          one resampler per level, not a list

Older VAE checkpoints name the mid-block attention query, key, value, proj_attn
(LEGACY_VAE_ATTENTION); they load through the same q_proj ... out_proj.

Shapes: SD 1.x stores the spatial Transformer's proj_in/proj_out as 1x1
convolutions, (out, in, 1, 1); SD 2.x, and we, as linear layers, (out, in).
A 1x1 convolution multiplies each pixel's channel vector by the same matrix,
which is the linear map, so the rule is  W_linear = W_conv[:, :, 0, 0]  (and
back, W_conv = W_linear[:, :, None, None], when writing an SD 1.x config).
The same rule reads VAE attention weights stored as 1x1 convolutions.
Every other tensor keeps its shape; `load_into` checks all of them.

Loading is strict and all-or-nothing: the config's repeat counts (levels,
resnets per level, Transformer blocks) are compared with the file's key
indices first (`unet_repeats`, `vae_repeats`), then the model is built on the meta device,
the renamed state dict is compared with it (missing, unexpected, wrongly
shaped keys are an error naming the file and the keys), and only then are the
tensors assigned.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from parti_from_scratch.configuration import ConfigError, config_to_dict, read_json, resolve_folder
from weights_convert.common import (Repeat, StateDict, build_on_meta, check_repeats, find_weights_file, load_into,
                                    read_state_dict, rename_keys)

PathLike = Union[str, Path]
WEIGHTS_STEM = "diffusion_pytorch_model"

# (diffusers name, our name), as dotted fragments of a key. The feed-forward comes first so that,
# written back, "ff.out_proj" is not taken for an attention's "out_proj".
RENAMES: Tuple[Tuple[str, str], ...] = (
    ("ff.net.0.proj", "ff.proj"),
    ("ff.net.2", "ff.out_proj"),
    ("to_q", "q_proj"),
    ("to_k", "k_proj"),
    ("to_v", "v_proj"),
    ("to_out.0", "out_proj"),
    ("downsamplers.0", "downsample"),
    ("upsamplers.0", "upsample"),
)
# The VAE mid-block attention as checkpoints written before diffusers 0.14 name it.
LEGACY_VAE_ATTENTION: Tuple[Tuple[str, str], ...] = (
    ("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("proj_attn", "out_proj"))

# Our linear weights that a checkpoint may hold as 1x1 convolutions.
LINEAR_STORED_AS_CONV = re.compile(r".*\.(proj_in|proj_out|q_proj|k_proj|v_proj|out_proj)\.weight")
# The UNet weights an SD 1.x config (use_linear_projection=False) stores as 1x1 convolutions.
UNET_CONV_PROJECTIONS = re.compile(r".*\.attentions\.\d+\.(proj_in|proj_out)\.weight")


def _fragment_rule(source: str, target: str, prefix: str = r".*\.") -> Tuple[str, str]:
    """A rename_keys rule replacing the dotted fragment `source` by `target` anywhere after `prefix`."""
    return rf"({prefix}){re.escape(source)}\.(.+)", rf"\g<1>{target}.\g<2>"


# every other key keeps its name (and must then be one of the model's, which load_into checks)
KEEP = (r"(.+)", r"\g<1>")
FROM_DIFFUSERS = [_fragment_rule(d, o) for d, o in RENAMES] + [
    _fragment_rule(d, o, prefix=r".*mid_block\.attentions\.\d+\.") for d, o in LEGACY_VAE_ATTENTION] + [KEEP]
TO_DIFFUSERS = [_fragment_rule(o, d) for d, o in RENAMES] + [KEEP]


def conv1x1_to_linear(state: StateDict) -> StateDict:
    """W (out, in, 1, 1) -> W[:, :, 0, 0] (out, in) for our linear weights held as 1x1 convolutions."""
    return {k: (v[:, :, 0, 0] if v.ndim == 4 and v.shape[2:] == (1, 1) and LINEAR_STORED_AS_CONV.fullmatch(k)
                else v)
            for k, v in state.items()}


def from_diffusers(state: StateDict, source: str = "checkpoint") -> StateDict:
    """A diffusers UNet2DConditionModel or AutoencoderKL state dict in our names and shapes."""
    return conv1x1_to_linear(rename_keys(state, FROM_DIFFUSERS, source=source))


def to_diffusers(state: StateDict, conv_keys: Optional[re.Pattern] = None) -> StateDict:
    """Our state dict in diffusers' names; keys matching `conv_keys` become 1x1 convolutions (out, in, 1, 1)."""
    out = rename_keys(state, TO_DIFFUSERS, source="model")
    if conv_keys is not None:
        out = {k: (v[:, :, None, None] if v.ndim == 2 and conv_keys.fullmatch(k) else v) for k, v in out.items()}
    return out


def read_config(folder: Path, class_name: str) -> Tuple[dict, str]:
    """config.json of a diffusers model folder, refusing one written for another class."""
    path = folder / "config.json"
    values = read_json(path)
    found = values.get("_class_name")
    if found is not None and found != class_name:
        raise ConfigError(f"{path}: _class_name is {found!r}, expected {class_name!r} (wrong model folder?)")
    return values, str(path)


def unet_repeats(config) -> Iterator[Repeat]:
    """The UNet's ModuleLists in our names and the length `config` gives each, outer lists first."""
    n = len(config.block_out_channels)
    layers, depth = config.per_block("layers_per_block"), config.per_block("transformer_layers_per_block")
    yield "down_blocks", n, "block_out_channels"
    yield "up_blocks", n, "block_out_channels"
    attended = []  # (path of a SpatialTransformer, its level)
    for i, kind in enumerate(config.down_block_types):
        cross = kind.startswith("CrossAttn")
        yield f"down_blocks.{i}.resnets", layers[i], "layers_per_block"
        yield f"down_blocks.{i}.attentions", layers[i] if cross else 0, "layers_per_block, down_block_types"
        attended += [(f"down_blocks.{i}.attentions.{j}", i) for j in range(layers[i] if cross else 0)]
    for i, kind in enumerate(config.up_block_types):
        level, cross = n - 1 - i, kind.startswith("CrossAttn")
        yield f"up_blocks.{i}.resnets", layers[level] + 1, "layers_per_block"
        yield f"up_blocks.{i}.attentions", layers[level] + 1 if cross else 0, "layers_per_block, up_block_types"
        attended += [(f"up_blocks.{i}.attentions.{j}", level) for j in range(layers[level] + 1 if cross else 0)]
    attended.append(("mid_block.attentions.0", n - 1))
    for path, level in attended:
        yield f"{path}.transformer_blocks", depth[level], "transformer_layers_per_block"


def vae_repeats(config) -> Iterator[Repeat]:
    """The VAE's ModuleLists in our names and the length `config` gives each, outer lists first."""
    n, layers = len(config.block_out_channels), config.layers_per_block
    yield "encoder.down_blocks", n, "block_out_channels"
    yield "decoder.up_blocks", n, "block_out_channels"
    for i in range(n):
        yield f"encoder.down_blocks.{i}.resnets", layers, "layers_per_block"
        yield f"decoder.up_blocks.{i}.resnets", layers + 1, "layers_per_block"


def load_model(folder: Path, factory: Callable[[], nn.Module], dtype: Optional[torch.dtype],
               repeats: Iterable[Repeat], config_source: str) -> nn.Module:
    """Check the config's repeat counts against the folder's weights, then build `factory()` on the meta
    device and fill it, strictly."""
    weights = find_weights_file(folder, [WEIGHTS_STEM])
    state = from_diffusers(read_state_dict(weights), source=str(weights))
    check_repeats(repeats, state, str(weights), config_source)
    return load_into(build_on_meta(factory), state, source=str(weights), dtype=dtype)


def save_model(folder: PathLike, class_name: str, config, state: StateDict) -> None:
    """Write config.json (with `_class_name`) and diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = {"_class_name": class_name, **config_to_dict(config)}
    (folder / "config.json").write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / f"{WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})


def load_unet(path: PathLike, subfolder: Optional[str] = None, dtype: Optional[torch.dtype] = torch.float32):
    """Our UNet2DConditionModel from a diffusers `unet` folder."""
    from parti_from_scratch.unet import UNet2DConditionConfig, UNet2DConditionModel
    folder = resolve_folder(path, subfolder)
    values, source = read_config(folder, "UNet2DConditionModel")
    config = UNet2DConditionConfig.from_dict(values, source=source)
    return load_model(folder, lambda: UNet2DConditionModel(config), dtype, unet_repeats(config), source)


def load_vae(path: PathLike, subfolder: Optional[str] = None, dtype: Optional[torch.dtype] = torch.float32):
    """Our AutoencoderKL from a diffusers `vae` folder (modern or legacy attention names)."""
    from parti_from_scratch.vae import AutoencoderKL, AutoencoderKLConfig
    folder = resolve_folder(path, subfolder)
    values, source = read_config(folder, "AutoencoderKL")
    config = AutoencoderKLConfig.from_dict(values, source=source)
    return load_model(folder, lambda: AutoencoderKL(config), dtype, vae_repeats(config), source)


def save_unet(model, folder: PathLike) -> None:
    """Write `model` as a diffusers UNet2DConditionModel folder (1x1-conv projections for SD 1.x configs)."""
    conv_keys = None if model.config.use_linear_projection else UNET_CONV_PROJECTIONS
    save_model(folder, "UNet2DConditionModel", model.config, to_diffusers(model.state_dict(), conv_keys))


def save_vae(model, folder: PathLike) -> None:
    """Write `model` as a diffusers AutoencoderKL folder (modern attention names, linear weights)."""
    save_model(folder, "AutoencoderKL", model.config, to_diffusers(model.state_dict()))
