"""enhancing-transformers ViT-VQGAN checkpoints <-> `ViTVQModel`.

thuanz123/enhancing-transformers (`enhancing/modules/stage1/vitvqgan.py`, class `ViTVQ`, a
Lightning module; released ViT-VQGAN small and base weights trained on ImageNet) saves a
`.ckpt` whose `state_dict` holds, for each side s in {encoder, decoder} and block i:

    s.transformer.layers.i.0.norm.{weight,bias}       LayerNorm before attention  (PreNorm.norm)
    s.transformer.layers.i.0.fn.to_qkv.weight         (3 heads dim_head, dim): W^Q, W^K, W^V stacked, no bias
    s.transformer.layers.i.0.fn.to_out.{weight,bias}  W^O (absent when heads = 1 and dim_head = dim: refused)
    s.transformer.layers.i.1.norm.{weight,bias}       LayerNorm before the MLP
    s.transformer.layers.i.1.fn.net.0.{weight,bias}   W_1 (mlp_dim, dim); net.1 is the tanh
    s.transformer.layers.i.1.fn.net.2.{weight,bias}   W_2 (dim, mlp_dim)
    s.transformer.norm.{weight,bias}                  the final LayerNorm
    encoder.to_patch_embedding.0.{weight,bias}        Conv2d (dim, channels, p, p), stride p; .1 is the rearrange
    encoder.en_pos_embedding                          (1, h w, dim) fixed 2-D sine-cosine table
    decoder.de_pos_embedding                          (1, h w, decoder dim)
    decoder.to_pixel.1.{weight,bias}                  ConvTranspose2d (decoder dim, channels, p, p); .0 rearranges
    pre_quant.{weight,bias}                           Linear (codebook_dim, dim)
    post_quant.{weight,bias}                          Linear (decoder dim, codebook_dim)
    quantizer.embedding.weight                        (K, codebook_dim), l2-normalised at lookup
    loss.*                                            ignored (see IGNORED)

The rules below rename these keys to ours one template at a time (and back, for saving); the only
tensor that is not renamed whole is to_qkv, split into q_proj, k_proj, v_proj in that order (the
reference chunks its output in three along the features). The architecture is read off the
shapes; the head count is not in any shape (to_qkv has 3 heads dim_head rows), so it is
inner / dim_head with the reference's default dim_head = 64 (pass `heads=` or `dim_head=` for
another file). The enhancing-transformers data loaders feed images in [0, 1] (torchvision's
ToTensor, no normalisation), so a loaded model has pixel_range="zero_one" and converts from and
to [-1, 1] at its boundary.

Versions: the released weights (base 2022-08-16, small 2022-09-09) were trained by the source of
July-August 2022 (commits 71cbd37, ebe80ca), whose keys and computation are those above (it adds the
positions in place, `x += pos`). From 2022-12-22 (1e5e8cc) to 2023-01-18 (c3a947e) the reference's
decoder computed `token + pos` but fed `token` to its Transformer, dropping the positions; a file
trained in that window has the same keys but decodes differently, and is not what this loader models.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.parti.vit_vqgan import ViTVQGANConfig, ViTVQModel
from weights_convert.common import (CheckpointError, PathLike, Rule, StateDict, build_on_meta, check_shapes,
                                    load_into, rename_keys)
from weights_convert.ldm_checkpoint import read_ldm_checkpoint

# Keys of an enhancing-transformers ViTVQ state_dict that the tokenizer does not need, each with the reason.
IGNORED: Tuple[Tuple[str, str], ...] = (
    (r"loss\..+", "the training loss (VQLPIPSWithDiscriminator: the LPIPS VGG network and the StyleGAN "
                  "discriminator), used only to train the tokenizer"),
)

DEFAULT_DIM_HEAD = 64  # enhancing-transformers' ViTEncoder/ViTDecoder default; its configs never set it

# (enhancing-transformers key, our key) templates: {side} encoder|decoder, {i} a block index, {p} weight|bias
TEMPLATES: Tuple[Tuple[str, str], ...] = (
    ("{side}.transformer.layers.{i}.0.norm.{p}", "{side}.transformer.blocks.{i}.norm1.{p}"),
    ("{side}.transformer.layers.{i}.0.fn.to_qkv.weight", "{side}.transformer.blocks.{i}.attn.qkv.weight"),
    ("{side}.transformer.layers.{i}.0.fn.to_out.{p}", "{side}.transformer.blocks.{i}.attn.out_proj.{p}"),
    ("{side}.transformer.layers.{i}.1.norm.{p}", "{side}.transformer.blocks.{i}.norm2.{p}"),
    ("{side}.transformer.layers.{i}.1.fn.net.0.{p}", "{side}.transformer.blocks.{i}.mlp.fc1.{p}"),
    ("{side}.transformer.layers.{i}.1.fn.net.2.{p}", "{side}.transformer.blocks.{i}.mlp.fc2.{p}"),
    ("{side}.transformer.norm.{p}", "{side}.transformer.norm.{p}"),
    ("encoder.to_patch_embedding.0.{p}", "encoder.patch_embed.{p}"),
    ("encoder.en_pos_embedding", "encoder.position_embedding"),
    ("decoder.de_pos_embedding", "decoder.position_embedding"),
    ("decoder.to_pixel.1.{p}", "decoder.to_pixels.{p}"),
    ("pre_quant.{p}", "pre_quant.{p}"),
    ("post_quant.{p}", "post_quant.{p}"),
    ("quantizer.embedding.weight", "quantize.embedding.weight"),
)
_GROUPS = {"side": r"(?P<side>encoder|decoder)", "i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}
QKV = ".attn.qkv.weight"          # the intermediate name of the stacked W^Q, W^K, W^V
QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def _rule(source: str, target: str) -> Rule:
    """A template pair as a (regex, replacement) rule for `rename_keys`."""
    pattern = re.escape(source)
    for name, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return pattern, re.sub(r"\{(\w+)\}", r"\\g<\1>", target)


RULES: List[Rule] = [_rule(theirs, ours) for theirs, ours in TEMPLATES]
REVERSE_RULES: List[Rule] = [_rule(ours, theirs) for theirs, ours in TEMPLATES]


# ------------------------------------------------------------------------------------------------ conversion

def split_qkv(state: Mapping[str, torch.Tensor], source: str) -> StateDict:
    """`<block>.attn.qkv.weight` (3 inner, dim) -> q_proj, k_proj, v_proj (inner, dim) each, in that order."""
    out: StateDict = {}
    for key, tensor in state.items():
        if not key.endswith(QKV):
            out[key] = tensor
            continue
        if tensor.ndim != 2 or tensor.shape[0] % 3 != 0:
            raise CheckpointError(f"{source}: {key}: W^Q, W^K, W^V stacked should be (3 inner, dim), got "
                                  f"{tuple(tensor.shape)}")
        stem = key[:-len("qkv.weight")]
        for part, chunk in zip(QKV_PARTS, tensor.chunk(3, dim=0)):
            out[f"{stem}{part}.weight"] = chunk
    return out


def merge_qkv(state: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of `split_qkv`: q_proj, k_proj, v_proj weights stacked back into `<block>.attn.qkv.weight`."""
    out: StateDict = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(.+\.attn\.)(q_proj|k_proj|v_proj)\.weight", key)
        if match is None:
            out[key] = tensor
        elif match.group(2) == "q_proj":
            stem = match.group(1)
            out[stem + "qkv.weight"] = torch.cat([state[f"{stem}{part}.weight"] for part in QKV_PARTS], dim=0)
    return out


def to_model_state(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> StateDict:
    """enhancing-transformers names -> ours: every key renamed by one rule or ignored with its reason."""
    return split_qkv(rename_keys(state, RULES, IGNORED, source), source)


def to_reference_state(state: Mapping[str, torch.Tensor], source: str = "model") -> StateDict:
    """Our names -> enhancing-transformers' (the inverse of `to_model_state`, without the loss.* keys)."""
    return rename_keys(merge_qkv(state), REVERSE_RULES, (), source)


# ------------------------------------------------------------------------------------------------ architecture

def _shape(state: Mapping[str, torch.Tensor], key: str, source: str, rank: int) -> Tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key} (needed to read the architecture off the file)")
    shape = tuple(state[key].shape)
    if len(shape) != rank:
        raise CheckpointError(f"{source}: {key} should have {rank} dimensions, got shape {shape}")
    return shape


def _side(state: Mapping[str, torch.Tensor], side: str, dim_head: int, heads: Optional[int], source: str
          ) -> Dict[str, int]:
    """depth, heads, mlp_dim of one side's Transformer, from its blocks' shapes (block 0 if any)."""
    block = re.compile(re.escape(f"{side}.transformer.layers.") + r"(\d+)\..+")
    depth = len({m.group(1) for m in map(block.fullmatch, state) if m})
    if depth == 0:
        return {"depth": 0}
    inner = _shape(state, f"{side}.transformer.layers.0.0.fn.to_qkv.weight", source, 2)[0] // 3
    if heads is None:
        if inner % dim_head != 0:
            raise CheckpointError(f"{source}: {side} attention width {inner} is not a multiple of dim_head="
                                  f"{dim_head}; pass heads= or dim_head=")
        heads = inner // dim_head
    mlp_dim = _shape(state, f"{side}.transformer.layers.0.1.fn.net.0.weight", source, 2)[0]
    return {"depth": depth, "heads": heads, "mlp_dim": mlp_dim}


def infer_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint", **overrides: Any) -> ViTVQGANConfig:
    """The `ViTVQGANConfig` of an enhancing-transformers state_dict, read off its tensor shapes.

    Not in the shapes, so taken from `overrides` or assumed: the head width (dim_head, default 64,
    the reference's default), the image's aspect (a square grid unless image_size is given).
    """
    dim, channels, patch, _ = _shape(state, "encoder.to_patch_embedding.0.weight", source, 4)
    n_tokens = _shape(state, "encoder.en_pos_embedding", source, 3)[1]
    decoder_dim = _shape(state, "decoder.to_pixel.1.weight", source, 4)[0]
    codebook_size, codebook_dim = _shape(state, "quantizer.embedding.weight", source, 2)
    if "image_size" not in overrides:
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise CheckpointError(f"{source}: encoder.en_pos_embedding has {n_tokens} positions, not a square grid; "
                                  f"pass image_size=(height, width)")
        overrides["image_size"] = side * patch
    dim_head = overrides.get("dim_head", DEFAULT_DIM_HEAD)
    encoder = _side(state, "encoder", dim_head, overrides.get("heads"), source)
    decoder = _side(state, "decoder", dim_head, overrides.get("decoder_heads", overrides.get("heads")), source)
    values: Dict[str, Any] = dict(
        patch_size=patch, channels=channels, dim=dim, dim_head=dim_head, decoder_dim=decoder_dim,
        codebook_size=codebook_size, codebook_dim=codebook_dim, hidden_act="tanh", pixel_range="zero_one",
        **encoder, **{f"decoder_{k}": v for k, v in decoder.items()})
    values.update(overrides)
    try:
        return ViTVQGANConfig.from_dict(values, source=f"{source} (inferred config)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


# ------------------------------------------------------------------------------------------------ files

def load_vit_vqgan(path: PathLike, dtype: Optional[torch.dtype] = torch.float32, **overrides: Any) -> ViTVQModel:
    """Load an enhancing-transformers ViT-VQGAN file (.ckpt / .pt / .bin / .safetensors) strictly.

    Pickles are read by `torch.load(weights_only=True)`, or, for a Lightning checkpoint holding
    framework objects, by the restricted unpickler (`safe_unpickle.restricted_load`), which never
    calls anything outside its allow-list. Every key is used once or ignored with a reason
    (IGNORED); a missing, unexpected or misshapen tensor is a CheckpointError naming the file and
    the file's keys. `overrides`: ViTVQGANConfig fields the shapes do not determine (dim_head,
    heads, image_size for a non-square grid).
    """
    source = str(path)
    state = read_ldm_checkpoint(path)   # a state_dict, unwrapped from a Lightning checkpoint if need be
    ignored = [re.compile(p) for p, _ in IGNORED]
    kept = {k: v for k, v in state.items() if not any(p.fullmatch(k) for p in ignored)}
    config = infer_config(kept, source, **overrides)
    model = build_on_meta(lambda: ViTVQModel(config))
    # the file's own names in every error: compare with the model's tensors under the reference's names
    expected = to_reference_state(model.state_dict(), source)
    check_shapes({k: tuple(v.shape) for k, v in expected.items()}, kept, source)
    return load_into(model, to_model_state(kept, source), source, dtype=dtype)


def save_vit_vqgan(model: ViTVQModel, path: PathLike) -> None:
    """Write `model`'s weights under enhancing-transformers' names: .safetensors, or a .ckpt/.pt {"state_dict": ...}."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in to_reference_state(model.state_dict()).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
