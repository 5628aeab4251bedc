"""taming-transformers VQGAN checkpoints (`vqgan_imagenet_f16_16384` and friends) -> our VQModel.

The VQGAN of "Taming Transformers" (Esser et al. 2021, arXiv 2012.09841) was
released as PyTorch Lightning `.ckpt` files: a pickle holding `state_dict`
next to training state (epoch, optimizer states, callback objects). Reading:
`torch.load(weights_only=True)` first; a file it refuses because of framework
objects goes through `safe_unpickle.restricted_load`, which turns them into
inert placeholders and refuses, naming the file and the global, any pickle
that would call something.

LDM's first-stage models (Stable Diffusion's VAE included) are this same
autoencoder, with a Gaussian posterior instead of the codebook:
`ldm_checkpoint` renames their keys by `taming_blocks` too.

Key layout (taming/modules/diffusionmodules/model.py; LDM's autoencoder keeps
it), L levels, level b, resnet j, n = num_res_blocks, diffusers' names on the right:

    encoder.conv_in / conv_out / norm_out     encoder.conv_in / conv_out / conv_norm_out
    encoder.down.b.block.j                    encoder.down_blocks.b.resnets.j            j < n
    encoder.down.b.attn.j                     encoder.down_blocks.b.attentions.j         levels in attn_resolutions
    encoder.down.b.downsample.conv            encoder.down_blocks.b.downsamplers.0.conv  b < L-1
    {encoder,decoder}.mid.block_1 / attn_1 / block_2    *.mid_block.resnets.0 / attentions.0 / resnets.1
    decoder.up.b.block.j / attn.j             decoder.up_blocks.(L-1-b).resnets.j / attentions.j   j <= n
    decoder.up.b.upsample.conv                decoder.up_blocks.(L-1-b).upsamplers.0.conv          b > 0
      taming numbers decoder levels from the image up (up.0 is the full-resolution level, run last);
      diffusers from the latent down (up_blocks.0 runs first)
    inside a resnet: norm1, conv1, norm2, conv2, nin_shortcut -> ..., conv_shortcut
    inside an attention: norm, q, k, v, proj_out -> group_norm, to_q, to_k, to_v, to_out.0,
      1x1 convolutions (C, C, 1, 1), i.e. linear maps applied per pixel: W_linear = W[:, :, 0, 0]
    quant_conv, post_quant_conv, quantize.embedding.weight: same names

The diffusers names then become ours by the rules of `diffusers_models`.
Ignored, with the reason: `loss.*` (LOSS_KEYS). The configuration is read off
the tensor shapes (`infer_vq_config`): levels and resnets from the key indices,
widths from the decoder's convolutions, attention levels from the `attn` keys,
z_channels (latent_channels) from post_quant_conv, embed_dim and n_embed from
the codebook. GroupNorm has 32 groups in every taming model (`Normalize`).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from parti_from_scratch.configuration import ConfigError
from weights_convert.common import (SAME, Block, CheckpointError, Leaves, PathLike, StateDict, block_rules,
                                    build_on_meta, check_blocks, check_shapes, count_indices, load_into,
                                    read_state_dict, rename_keys, tensor_shape)
from weights_convert.diffusers_models import from_diffusers, to_diffusers
from weights_convert.safe_unpickle import restricted_load

# Keys of a taming VQGAN checkpoint that the tokenizer does not need, with the reason.
LOSS_KEYS: Tuple[Tuple[str, str], ...] = (
    (r"loss\..+", "the training loss (VQLPIPSWithDiscriminator: the LPIPS perceptual network and the PatchGAN "
                  "discriminator), used to train the tokenizer, never to encode or decode"),)
NORM_GROUPS = 32           # taming's Normalize: GroupNorm(32, C, eps=1e-6)
DEFAULT_SAMPLE_SIZE = 256  # vqgan_imagenet_f16_* and min-dalle's detokenizer work on 256x256 images
HALVES = ("encoder", "decoder")
# Leaf renames inside taming's blocks: (taming name, diffusers name).
RESNET: Leaves = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                  ("nin_shortcut", "conv_shortcut"))
ATTENTION: Leaves = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))


def _attention_levels(keys: Sequence[str], half: str, levels: int) -> List[bool]:
    """Per taming level b: whether `<half>.{down,up}.b.attn.*` keys exist (the level is in attn_resolutions)."""
    side = "down" if half == "encoder" else "up"
    return [any(k.startswith(f"{half}.{side}.{b}.attn.") for k in keys) for b in range(levels)]


def infer_vq_config(state: Mapping[str, torch.Tensor], source: str, codebook: str = "quantize.embedding",
                    decoder_only: bool = False, sample_size: int = DEFAULT_SAMPLE_SIZE) -> Dict[str, Any]:
    """diffusers VQModel config.json keys for a taming-layout state dict, read off its key names and shapes.

    codebook: the codebook's module name ("quantize.embedding"; min-dalle's "embedding").
    decoder_only: the file holds decoder, post_quant_conv and codebook only (in_channels is then 3).
    """
    keys = list(state)
    levels = count_indices(keys, r"decoder\.up\.(\d+)\.", source)
    n = count_indices(keys, r"decoder\.up\.0\.block\.(\d+)\.", source) - 1
    if levels < 1 or n < 1:
        raise CheckpointError(f"{source}: no decoder levels with resnets found (keys decoder.up.<b>.block.<j>.*)")
    up_attention = _attention_levels(keys, "decoder", levels)
    config = {
        "in_channels": 3,
        "out_channels": tensor_shape(state, "decoder.conv_out.weight", source, 4)[0],
        # taming level b has width ch * ch_mult[b]; its decoder level's resnets end at that width
        "block_out_channels": [tensor_shape(state, f"decoder.up.{b}.block.{n}.conv2.weight", source, 4)[0]
                               for b in range(levels)],
        "layers_per_block": n,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        # diffusers lists decoder levels deepest first: its up_blocks.i is taming's up.(L-1-i)
        "up_block_types": ["AttnUpDecoderBlock2D" if up_attention[levels - 1 - i] else "UpDecoderBlock2D"
                           for i in range(levels)],
        "latent_channels": tensor_shape(state, "post_quant_conv.weight", source, 4)[0],
        "num_vq_embeddings": tensor_shape(state, f"{codebook}.weight", source, 2)[0],
        "vq_embed_dim": tensor_shape(state, f"{codebook}.weight", source, 2)[1],
        "norm_num_groups": NORM_GROUPS,
        "mid_block_add_attention": any(k.startswith("decoder.mid.attn_1.") for k in keys),
        "sample_size": sample_size,
        "act_fn": "silu",
    }
    if not decoder_only:
        encoder_levels = count_indices(keys, r"encoder\.down\.(\d+)\.", source)
        if encoder_levels != levels:
            raise CheckpointError(f"{source}: the encoder has {encoder_levels} levels (encoder.down.<b>), the decoder "
                                  f"{levels} (decoder.up.<b>)")
        config["in_channels"] = tensor_shape(state, "encoder.conv_in.weight", source, 4)[1]
        config["down_block_types"] = ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D"
                                      for a in _attention_levels(keys, "encoder", levels)]
    return config


def taming_blocks(layers_per_block: int, down_attention: Sequence[bool], up_attention: Sequence[bool],
                  mid_attention: bool = True, codebook: Optional[str] = "quantize.embedding",
                  halves: Sequence[str] = HALVES) -> List[Block]:
    """(taming prefix, diffusers prefix, leaf renames) for every block of a taming autoencoder's `halves`.

    down_attention, up_attention: per level in diffusers' order (encoder levels shallowest first, decoder
        levels deepest first), whether its resnets are followed by attention; L = len(up_attention).
    mid_attention: whether the mid blocks have their attention (mid.attn_1).
    codebook: the codebook's name in the file, or None for an autoencoder without one (LDM's KL autoencoder).
    """
    n, levels = layers_per_block, len(up_attention)
    blocks: List[Block] = [("post_quant_conv", "post_quant_conv", SAME)]
    if codebook is not None:
        blocks.append((codebook, "quantize.embedding", SAME))
    if "encoder" in halves:
        blocks.append(("quant_conv", "quant_conv", SAME))
    for half in halves:
        blocks += [(f"{half}.conv_in", f"{half}.conv_in", SAME), (f"{half}.conv_out", f"{half}.conv_out", SAME),
                   (f"{half}.norm_out", f"{half}.conv_norm_out", SAME),
                   (f"{half}.mid.block_1", f"{half}.mid_block.resnets.0", RESNET),
                   (f"{half}.mid.block_2", f"{half}.mid_block.resnets.1", RESNET)]
        if mid_attention:
            blocks.append((f"{half}.mid.attn_1", f"{half}.mid_block.attentions.0", ATTENTION))
    for b in range(levels):
        if "encoder" in halves:
            ours = f"encoder.down_blocks.{b}"
            for j in range(n):
                blocks.append((f"encoder.down.{b}.block.{j}", f"{ours}.resnets.{j}", RESNET))
                if down_attention[b]:
                    blocks.append((f"encoder.down.{b}.attn.{j}", f"{ours}.attentions.{j}", ATTENTION))
            if b < levels - 1:
                blocks.append((f"encoder.down.{b}.downsample.conv", f"{ours}.downsamplers.0.conv", SAME))
        if "decoder" in halves:
            i = levels - 1 - b  # taming's up.b is diffusers' up_blocks.(L-1-b)
            ours = f"decoder.up_blocks.{i}"
            for j in range(n + 1):
                blocks.append((f"decoder.up.{b}.block.{j}", f"{ours}.resnets.{j}", RESNET))
                if up_attention[i]:
                    blocks.append((f"decoder.up.{b}.attn.{j}", f"{ours}.attentions.{j}", ATTENTION))
            if b > 0:
                blocks.append((f"decoder.up.{b}.upsample.conv", f"{ours}.upsamplers.0.conv", SAME))
    return blocks


# taming's attention projections: 1x1 convolutions (C, C, 1, 1) where we hold linear (C, C) weights
ATTENTION_CONV = re.compile(r".+\.(?:attn_1|attn\.\d+)\.(?:q|k|v|proj_out)\.weight")


def expected_file_shapes(model, blocks: Sequence[Block]) -> Dict[str, Tuple[int, ...]]:
    """The tensors a taming-layout file must hold for `model` (on the meta device): names and shapes.

    Our names -> diffusers' -> taming's, by the same block rules read in reverse, so a missing or
    misshapen tensor is reported under the name it has (or should have) in the file.
    """
    theirs = rename_keys(to_diffusers(model.state_dict()), block_rules(blocks, reverse=True), source="model")
    return {k: tuple(v.shape) + ((1, 1) if ATTENTION_CONV.fullmatch(k) else ()) for k, v in theirs.items()}


def taming_to_ours(state: Mapping[str, torch.Tensor], source: str, codebook: str = "quantize.embedding",
                   decoder_only: bool = False, ignore: Sequence[Tuple[str, str]] = LOSS_KEYS,
                   sample_size: int = DEFAULT_SAMPLE_SIZE) -> Tuple[Any, StateDict]:
    """(our VQModel on the meta device, the state dict in our names) for a taming-layout state dict.

    The configuration is inferred from the tensors, the model built on the meta device (no memory for
    weights), and the file compared with it key by key in the file's own names before anything is renamed:
    each key is used once or ignored with a reason (`ignore`); a missing, unexpected or misshapen tensor
    raises CheckpointError naming `source` and the keys.
    """
    from parti_from_scratch.parti.vqgan import VQModel, VQModelConfig
    values = infer_vq_config(state, source, codebook, decoder_only, sample_size)
    try:
        config = VQModelConfig.from_dict(values, source=f"{source} (configuration inferred from the tensors)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = build_on_meta(lambda: VQModel(config, decoder_only=decoder_only))
    blocks = taming_blocks(config.layers_per_block, [t.startswith("Attn") for t in config.down_block_types],
                           [t.startswith("Attn") for t in config.up_block_types], config.mid_block_add_attention,
                           codebook, ("decoder",) if decoder_only else HALVES)
    ignored = [re.compile(pattern) for pattern, _ in ignore]
    used = {k: v for k, v in state.items() if not any(p.fullmatch(k) for p in ignored)}
    check_shapes(expected_file_shapes(model, blocks), used, source)
    renamed = rename_keys(state, block_rules(blocks), ignore, source=source)
    check_blocks(blocks, renamed, reverse=False, source=source)
    return model, from_diffusers(renamed, source=source)


def build_vq_model(state: Mapping[str, torch.Tensor], source: str, dtype: Optional[torch.dtype] = torch.float32,
                   **kwargs: Any):
    """Our VQModel from a taming-layout state dict: built on the meta device, checked strictly, then filled."""
    model, ours = taming_to_ours(state, source, **kwargs)
    return load_into(model, ours, source=source, dtype=dtype)


def load_taming_vqgan(path: PathLike, dtype: Optional[torch.dtype] = torch.float32,
                      sample_size: int = DEFAULT_SAMPLE_SIZE):
    """Our VQModel from a taming-transformers VQGAN checkpoint (`last.ckpt` of vqgan_imagenet_f16_16384, ...).

    Images in and out are in [-1, 1], as taming trained them. The file is read
    without running code from it; `loss.*` is ignored (LOSS_KEYS); every other
    tensor must fill exactly one parameter of the inferred configuration.
    """
    state = read_state_dict(path, fallback=restricted_load)  # the state_dict, unwrapped from the Lightning checkpoint
    return build_vq_model(state, str(path), dtype, sample_size=sample_size)
