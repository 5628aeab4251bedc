"""Single-file Stable Diffusion checkpoints in the original CompVis/LDM layout.

The original releases (`v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned.ckpt`,
most community models) are one file in the layout of the Latent Diffusion code
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", arXiv:2112.10752), which the tutorial's §5.2-5.3 listing runs:

    model.diffusion_model.*   the UNet eps_theta(z_t, t, tau(y))
    first_stage_model.*       the autoencoder: encoder E(x) -> z, decoder D(z) -> x
    cond_stage_model.*        the text encoder tau(y): transformers' CLIP ViT-L/14 (SD 1.x)
                              or OpenCLIP ViT-H/14 (SD 2.x)

`read_ldm_checkpoint` opens the file safely, `infer_configs` reads the three
configs off the tensor shapes, and `ldm_to_diffusers` renames every key, by
rules computed from the config, onto the diffusers/transformers layout that
`diffusers_models` and `transformers_clip` turn into our modules.
`diffusers_to_ldm` is the inverse. Name correspondence (LDM on the left;
n = layers_per_block, b = level, j = layer in the level, L = number of levels):

    UNet (model.diffusion_model. -> unet)
    time_embed.0 / .2                       time_embedding.linear_1 / linear_2
    input_blocks.0.0                        conv_in
    input_blocks.{1 + b(n+1) + j}.0 / .1    down_blocks.b.resnets.j / attentions.j      j < n
    input_blocks.{1 + b(n+1) + n}.0.op      down_blocks.b.downsamplers.0.conv           b < L-1
    middle_block.0 / .1 / .2                mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{b(n+1) + j}.0 / .1       up_blocks.b.resnets.j / attentions.j        j <= n
    output_blocks.{b(n+1) + n}.{1 or 2}.conv  up_blocks.b.upsamplers.0.conv  (2 when the level has attention)
    out.0 / out.2                           conv_norm_out / conv_out
      inside a resnet: in_layers.0/.2 -> norm1/conv1, emb_layers.1 -> time_emb_proj,
      out_layers.0/.3 -> norm2/conv2, skip_connection -> conv_shortcut; inside an attention: same names
    VAE (first_stage_model. -> vae): taming's autoencoder without a codebook (taming_vqgan.taming_blocks)
    {encoder,decoder}.norm_out              {encoder,decoder}.conv_norm_out (conv_in, conv_out, quant convs: same)
    encoder.down.b.block.j / .downsample    encoder.down_blocks.b.resnets.j / .downsamplers.0
    decoder.up.{L-1-b}.block.j / .upsample  decoder.up_blocks.b.resnets.j / .upsamplers.0   (LDM counts up from z)
    *.mid.block_1 / attn_1 / block_2        *.mid_block.resnets.0 / attentions.0 / resnets.1
      inside a resnet: nin_shortcut -> conv_shortcut; inside the attention: norm, q, k, v, proj_out ->
      group_norm, to_q, to_k, to_v, to_out.0, whose 1x1-conv weights (C, C, 1, 1) become linear (C, C)
    text encoder, SD 1.x (cond_stage_model.transformer. -> text_encoder): text_model.* unchanged
    text encoder, SD 2.x (cond_stage_model.model. -> text_encoder.text_model.), OpenCLIP's names
    token_embedding.weight, positional_embedding   embeddings.token_embedding.weight, .position_embedding.weight
    transformer.resblocks.i.{ln_1, ln_2, mlp.c_fc, mlp.c_proj, attn.out_proj}
                                            encoder.layers.i.{layer_norm1, layer_norm2, mlp.fc1, mlp.fc2,
                                            self_attn.out_proj}
    transformer.resblocks.i.attn.in_proj_{weight,bias}  = [W_Q; W_K; W_V] split along dim 0 into
                                            encoder.layers.i.self_attn.{q,k,v}_proj
    ln_final                                final_layer_norm

SD 2.x conditions on the *penultimate* layer. LDM's FrozenOpenCLIPEmbedder
(layer="penultimate") runs resblocks 0..N-2, skips the last one, then applies
ln_final. Like diffusers' conversion, we build a CLIPTextModel with N-1 layers
(num_hidden_layers=23 for ViT-H's 24 blocks) and ignore the last block: its
last_hidden_state, final_layer_norm(output of block N-2), is exactly what SD 2.x
feeds the UNet. A pipeline therefore uses `text_encoder(ids)[0]` for both
versions, with no layer skipping of its own. (Its tokenizer pads with "!",
id 0, as open_clip's tokenizer does; SD 1.x pads with <|endoftext|>.)

What the weights cannot say: whether an SD 2.x model predicts noise or
velocity. The 768-px models (2.0, 2.1) were trained with v-prediction, the
512-px "-base" models with epsilon; we default to the 768-px kind
(`prediction_type="v_prediction"`, sample_size 96) and the user passes
`prediction_type="epsilon"` for a -base model (sample_size 64). Any other
inferred value can be overridden with `configs={"unet": {...}, ...}`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from weights_convert.common import (SAME, Block, CheckpointError, Leaves, PathLike, StateDict, block_rules,
                                    build_on_meta, check_blocks, check_shapes, count_indices, load_into,
                                    read_state_dict, rename_keys, tensor_shape)
from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.diffusion.schedule import check_betas
from weights_convert.safe_unpickle import restricted_load
from weights_convert.taming_vqgan import ATTENTION_CONV, taming_blocks

UNET, VAE = "model.diffusion_model.", "first_stage_model."
HF_CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
COMPONENTS = ("unet", "vae", "text_encoder")
VERSIONS = ("1", "2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
HEAD_DIM = 64  # both text encoders (768 = 12 x 64, 1024 = 16 x 64) and SD 2.x's UNet use 64-dim heads

# Keys of an LDM checkpoint that no inference module needs, each with the reason.
IGNORED: Tuple[Tuple[str, str], ...] = (
    (r"model_ema\..+", "the training-time EMA copy of the UNet under flattened names; released -ema/-pruned "
                       "files already hold the EMA weights under model.diffusion_model"),
    (r"betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+",
     "the noise schedule beta_t and quantities derived from it, which the scheduler recomputes from its config "
     "(`betas`, when present, sets that config: see _scheduler_config)"),
    (r"logvar", "LDM's learned log-variance weighting of the training loss, unused in sampling"),
    (r"first_stage_model\.loss\..+", "the autoencoder's training loss (LPIPS network, discriminator)"),
    (re.escape(HF_CLIP) + r"text_model\.embeddings\.position_ids", "the buffer 0..76, recomputed by the model"),
    (re.escape(OPEN_CLIP) + r"(text_projection|logit_scale)",
     "OpenCLIP's contrastive head (projection of the pooled text, temperature); SD reads the token states"),
)

# Leaf renames inside one block (common.Block): (LDM name, diffusers/transformers name).
UNET_RESNET: Leaves = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                       ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
OPENCLIP_LAYER: Leaves = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                          ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"),
                          ("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                          ("attn.v_proj", "self_attn.v_proj"))  # q/k/v: the split in_proj, see _unpack
# Blocks here: (LDM prefix, our-side prefix "<component>.<diffusers prefix>", leaves).

# scheduler/scheduler_config.json of the Stable Diffusion v1.5 repository (PNDM, the scaled-linear schedule
# beta_t = (sqrt(beta_start) + t/(T-1) (sqrt(beta_end) - sqrt(beta_start)))^2 that SD 1.x and 2.x were trained with)
PNDM_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
               "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


# ------------------------------------------------------------------------------------------------ reading

def read_ldm_checkpoint(path: PathLike) -> StateDict:
    """Every tensor of a `.safetensors` / `.ckpt` / `.pt` / `.bin` file, without running code from it.

    Pickles go through `torch.load(weights_only=True)`; a training checkpoint
    that it refuses because of framework objects (Lightning callbacks, numpy
    scalars) is read by `safe_unpickle.restricted_load`, which turns those into
    inert placeholders and refuses, with CheckpointError, any pickle that
    would call something. The `state_dict` entry is unwrapped.
    """
    return read_state_dict(path, fallback=restricted_load)


# ------------------------------------------------------------------------------------ config inference

def detect_version(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """"1" if the text encoder is transformers' CLIP (SD 1.x), "2" if it is OpenCLIP (SD 2.x)."""
    hf, open_clip = HF_CLIP + "text_model.embeddings.token_embedding.weight", OPEN_CLIP + "token_embedding.weight"
    if hf in state:
        return "1"
    if open_clip in state:
        return "2"
    raise CheckpointError(f"{source}: no Stable Diffusion text encoder found (looked for {hf!r} and {open_clip!r})")


def _unet_config(state: Mapping[str, torch.Tensor], version: str, prediction_type: str, source: str) -> dict:
    downsamplers = re.compile(re.escape(UNET) + r"input_blocks\.\d+\.0\.op\.weight")
    levels = 1 + sum(1 for k in state if downsamplers.fullmatch(k))
    n_out = count_indices(state, re.escape(UNET) + r"output_blocks\.(\d+)\.", source)
    n = n_out // levels - 1
    if n < 1 or n_out != levels * (n + 1):
        raise CheckpointError(f"{source}: {n_out} UNet output blocks do not make {levels} levels of equal size")
    first = [1 + b * (n + 1) for b in range(levels)]  # input block of each level's first resnet
    # a level has cross-attention if any of its layers has a SpatialTransformer (whose input is proj_in)
    attention_down = [any(f"{UNET}input_blocks.{i + j}.1.proj_in.weight" in state for j in range(n)) for i in first]
    attention_up = [any(f"{UNET}output_blocks.{b * (n + 1) + j}.1.proj_in.weight" in state for j in range(n + 1))
                    for b in range(levels)]
    channels = [tensor_shape(state, f"{UNET}input_blocks.{i}.0.out_layers.3.weight", source, 4)[0] for i in first]
    proj_in = tensor_shape(state, f"{UNET}middle_block.1.proj_in.weight", source, 2, 4)
    v_model = version == "2" and prediction_type == "v_prediction"
    return {
        "sample_size": 96 if v_model else 64,  # latent side: 768 or 512 px / 8
        "in_channels": tensor_shape(state, UNET + "input_blocks.0.0.weight", source, 4)[1],
        "out_channels": tensor_shape(state, UNET + "out.2.weight", source, 4)[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_down],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention_up],
        "block_out_channels": channels,
        "layers_per_block": n,
        "cross_attention_dim": tensor_shape(state, f"{UNET}middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                                            source, 2)[1],
        # diffusers' name for the NUMBER of heads: SD 1.x has 8 everywhere, SD 2.x 64-dim heads per level
        "attention_head_dim": 8 if version == "1" else [c // HEAD_DIM for c in channels],
        "use_linear_projection": len(proj_in) == 2,  # SD 2.x: linear (C, C); SD 1.x: 1x1 conv (C, C, 1, 1)
        "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
    }


def _vae_config(state: Mapping[str, torch.Tensor], latent_size: int, source: str) -> dict:
    levels = count_indices(state, re.escape(VAE) + r"encoder\.down\.(\d+)\.", source)
    n = count_indices(state, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\.", source)
    return {
        "sample_size": latent_size * 2 ** (levels - 1),
        "in_channels": tensor_shape(state, VAE + "encoder.conv_in.weight", source, 4)[1],
        "out_channels": tensor_shape(state, VAE + "decoder.conv_out.weight", source, 4)[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [tensor_shape(state, f"{VAE}encoder.down.{b}.block.{n - 1}.conv2.weight", source, 4)[0]
                               for b in range(levels)],
        "layers_per_block": n,
        "latent_channels": tensor_shape(state, VAE + "post_quant_conv.weight", source, 4)[0],
        "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": 0.18215,
    }


def _text_config(state: Mapping[str, torch.Tensor], version: str, source: str) -> dict:
    if version == "1":
        prefix = HF_CLIP + "text_model."
        embed, position = prefix + "embeddings.token_embedding.weight", prefix + "embeddings.position_embedding.weight"
        layers = count_indices(state, re.escape(prefix) + r"encoder\.layers\.(\d+)\.", source)
        fc1 = prefix + "encoder.layers.0.mlp.fc1.weight"
    else:
        embed, position = OPEN_CLIP + "token_embedding.weight", OPEN_CLIP + "positional_embedding"
        # SD 2.x reads the penultimate layer: one block fewer than the file holds
        layers = count_indices(state, re.escape(OPEN_CLIP) + r"transformer\.resblocks\.(\d+)\.", source) - 1
        fc1 = OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight"
    vocab_size, hidden_size = tensor_shape(state, embed, source, 2)
    return {
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": tensor_shape(state, fc1, source, 2)[0],
        "num_hidden_layers": layers,
        "num_attention_heads": hidden_size // HEAD_DIM,
        "max_position_embeddings": tensor_shape(state, position, source, 2)[0],
        "hidden_act": "quick_gelu" if version == "1" else "gelu",  # OpenAI's x*sigmoid(1.702x); OpenCLIP's exact GELU
        "layer_norm_eps": 1e-5,
    }


def _scheduler_config(state: Mapping[str, torch.Tensor], prediction_type: str, source: str) -> dict:
    """PNDM_CONFIG with the file's schedule: scaled-linear endpoints read off `betas`, or the betas themselves.

    `betas` is validated (schedule.check_betas: 1-D, at most MAX_TRAIN_TIMESTEPS values, each in (0, 1))
    before any value is copied, and the file's `alphas_cumprod`, if present, must be as long.
    """
    config = dict(PNDM_CONFIG, prediction_type=prediction_type)
    if "betas" in state:
        try:
            check_betas(state["betas"], "betas")
        except ConfigError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if "alphas_cumprod" in state and tuple(state["alphas_cumprod"].shape) != tuple(state["betas"].shape):
            raise CheckpointError(f"{source}: alphas_cumprod has shape {tuple(state['alphas_cumprod'].shape)}, "
                                  f"betas {tuple(state['betas'].shape)}: one value per timestep in both")
        betas = state["betas"].double()
        scaled_linear = torch.linspace(betas[0].sqrt().item(), betas[-1].sqrt().item(), len(betas),
                                       dtype=torch.float64) ** 2
        config["num_train_timesteps"] = len(betas)
        if torch.allclose(betas, scaled_linear, rtol=1e-5, atol=0):
            config.update(beta_start=float(f"{betas[0]:.6g}"), beta_end=float(f"{betas[-1]:.6g}"))
        else:
            config["trained_betas"] = betas.tolist()
    return config


def _check_heads(configs: dict, source: str) -> None:
    unet, text = configs["unet"], configs["text_encoder"]
    heads = unet["attention_head_dim"]
    heads = heads if isinstance(heads, (list, tuple)) else [heads] * len(unet["block_out_channels"])
    pairs = [("unet.attention_head_dim", c, h) for c, h in zip(unet["block_out_channels"], heads)]
    pairs.append(("text_encoder.num_attention_heads", text["hidden_size"], text["num_attention_heads"]))
    bad = [f"{name}={h} for width {c}" for name, c, h in pairs if h < 1 or c % h]
    if bad:
        raise CheckpointError(f"{source}: cannot split into attention heads: {', '.join(bad)}; these models do not "
                              f"use {HEAD_DIM}-channel heads, pass the head counts in `configs`")


# The config keys that fix how many blocks each model has; the file's tensors say them, so an override
# must agree (a larger count would only build parts the file cannot fill).
STRUCTURE = {"unet": ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block"),
             "vae": ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block"),
             "text_encoder": ("num_hidden_layers",)}


def _structure_of(key: str, value: Any) -> Any:
    """What of a structural value the block count depends on: a list's length (block_out_channels), else the value."""
    if key == "block_out_channels":
        return len(value) if isinstance(value, (list, tuple)) else value
    return list(value) if isinstance(value, (list, tuple)) else value


def infer_configs(state: Mapping[str, torch.Tensor], version: Optional[str] = None,
                  prediction_type: Optional[str] = None, configs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                  source: str = "checkpoint") -> Dict[str, Any]:
    """The configs of an LDM checkpoint: {"version", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}.

    Each config dict uses the keys of the matching diffusers/transformers config.json.
    version: "1" or "2"; inferred from the text encoder's layout, and an error if it disagrees.
    prediction_type: "epsilon" or "v_prediction" (the weights cannot tell); default
        epsilon for SD 1.x, v_prediction for SD 2.x (its 768-px models; pass "epsilon" for -base).
    configs: per-component overrides, e.g. {"unet": {"sample_size": 64}}, applied last.
    """
    found = detect_version(state, source)
    if version is not None and str(version) != found:
        raise CheckpointError(f"{source}: version={version!r} was requested, but the text encoder is SD {found}.x's "
                              f"({'transformers CLIP' if found == '1' else 'OpenCLIP'} layout)")
    prediction_type = prediction_type or ("epsilon" if found == "1" else "v_prediction")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
    unet = _unet_config(state, found, prediction_type, source)
    text = _text_config(state, found, source)
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise CheckpointError(f"{source}: the UNet attends to {unet['cross_attention_dim']}-wide text states but the "
                              f"text encoder is {text['hidden_size']} wide")
    result: Dict[str, Any] = {
        "version": found,
        "unet": unet,
        "vae": _vae_config(state, unet["sample_size"], source),
        "text_encoder": text,
        "tokenizer": {"model_max_length": text["max_position_embeddings"],
                      "pad_token": "<|endoftext|>" if found == "1" else "!"},
        "scheduler": _scheduler_config(state, prediction_type, source),
    }
    for component, values in (configs or {}).items():
        if component not in result or component == "version":
            raise ValueError(f"configs: unknown component {component!r} (expected one of "
                             f"{', '.join(k for k in result if k != 'version')})")
        if not isinstance(values, Mapping):
            raise ValueError(f"configs[{component!r}]: expected a mapping of config keys, got {type(values).__name__}")
        for key in STRUCTURE.get(component, ()):
            if key in values and _structure_of(key, values[key]) != _structure_of(key, result[component][key]):
                raise CheckpointError(f"{source}: configs[{component!r}][{key!r}]={values[key]!r} does not match "
                                      f"the file, which holds {result[component][key]!r}")
        result[component] = {**result[component], **values}
    _check_heads(result, source)
    return result


# --------------------------------------------------------------------------------- the correspondence

def _unet_blocks(config: Mapping[str, Any]) -> List[Block]:
    n, down, up = config["layers_per_block"], config["down_block_types"], config["up_block_types"]

    def same(ldm: str, ours: str) -> Block:
        return UNET + ldm, "unet." + ours, SAME

    def resnet(ldm: str, ours: str) -> Block:
        return UNET + ldm, "unet." + ours, UNET_RESNET

    blocks = [same("time_embed.0", "time_embedding.linear_1"), same("time_embed.2", "time_embedding.linear_2"),
              same("input_blocks.0.0", "conv_in"), same("out.0", "conv_norm_out"), same("out.2", "conv_out"),
              resnet("middle_block.0", "mid_block.resnets.0"), same("middle_block.1", "mid_block.attentions.0"),
              resnet("middle_block.2", "mid_block.resnets.1")]
    for b, kind in enumerate(down):
        first = 1 + b * (n + 1)  # input block 0 is conv_in; each level has n resnets and one downsampler
        for j in range(n):
            blocks.append(resnet(f"input_blocks.{first + j}.0", f"down_blocks.{b}.resnets.{j}"))
            if kind.startswith("CrossAttn"):
                blocks.append(same(f"input_blocks.{first + j}.1", f"down_blocks.{b}.attentions.{j}"))
        if b < len(down) - 1:
            blocks.append(same(f"input_blocks.{first + n}.0.op", f"down_blocks.{b}.downsamplers.0.conv"))
    for b, kind in enumerate(up):
        attention = kind.startswith("CrossAttn")
        for j in range(n + 1):  # up levels have one resnet more, and the upsampler sits in the last one
            i = b * (n + 1) + j
            blocks.append(resnet(f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}"))
            if attention:
                blocks.append(same(f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}"))
        if b < len(up) - 1:
            blocks.append(same(f"output_blocks.{b * (n + 1) + n}.{2 if attention else 1}.conv",
                               f"up_blocks.{b}.upsamplers.0.conv"))
    return blocks


def _vae_blocks(config: Mapping[str, Any]) -> List[Block]:
    """LDM's first stage is taming's autoencoder (taming_vqgan.taming_blocks) without a codebook, under VAE."""
    plain = [False] * len(config["down_block_types"])  # attention only in the mid blocks
    return [(VAE + theirs, "vae." + ours, leaves)
            for theirs, ours, leaves in taming_blocks(config["layers_per_block"], plain, plain, codebook=None)]


def _text_blocks(config: Mapping[str, Any], version: str) -> List[Block]:
    layers, ours = range(config["num_hidden_layers"]), "text_encoder.text_model."
    if version == "1":
        theirs = HF_CLIP + "text_model."
        return [(theirs + part, ours + part, SAME)
                for part in ["embeddings", "final_layer_norm", *(f"encoder.layers.{i}" for i in layers)]]
    return [(OPEN_CLIP + "token_embedding", ours + "embeddings.token_embedding", SAME),
            (OPEN_CLIP + "positional_embedding", ours + "embeddings.position_embedding.weight", SAME),
            (OPEN_CLIP + "ln_final", ours + "final_layer_norm", SAME),
            *((f"{OPEN_CLIP}transformer.resblocks.{i}", f"{ours}encoder.layers.{i}", OPENCLIP_LAYER) for i in layers)]


def _blocks(configs: Mapping[str, Any]) -> List[Block]:
    return (_unet_blocks(configs["unet"]) + _vae_blocks(configs["vae"])
            + _text_blocks(configs["text_encoder"], configs["version"]))


def _ignored(configs: Mapping[str, Any]) -> List[Tuple[str, str]]:
    ignore = list(IGNORED)
    if configs["version"] == "2":
        last = configs["text_encoder"]["num_hidden_layers"]
        ignore.append((rf"{re.escape(OPEN_CLIP)}transformer\.resblocks\.{last}\..+",
                       "OpenCLIP's last block: SD 2.x conditions on the penultimate layer, so it never runs"))
    return ignore


# LDM-side reshapes, so that everything else is a rename.
_VAE_ATTENTION_WEIGHT = re.compile(re.escape(VAE) + ATTENTION_CONV.pattern)
_IN_PROJ = re.compile(re.escape(OPEN_CLIP) + r"(transformer\.resblocks\.\d+\.attn)\.in_proj_(weight|bias)")
_QKV = re.compile(re.escape(OPEN_CLIP) + r"(transformer\.resblocks\.\d+\.attn)\.([qkv])_proj\.(weight|bias)")


def _unpack(state: Mapping[str, torch.Tensor], source: str) -> StateDict:
    """VAE attention 1x1 convs -> linear weights; OpenCLIP's fused in_proj -> q, k, v projections."""
    out: StateDict = {}
    for key, tensor in state.items():
        fused = _IN_PROJ.fullmatch(key)
        if _VAE_ATTENTION_WEIGHT.fullmatch(key) and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            # a 1x1 convolution applies the same (C, C) matrix at every pixel: W_linear = W_conv[:, :, 0, 0]
            out[key] = tensor[:, :, 0, 0]
        elif fused:
            if tensor.ndim == 0 or tensor.shape[0] % 3:
                raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, not 3 x width rows")
            # in_proj = [W_Q; W_K; W_V] stacked along the output dimension: (3d, d) -> 3 x (d, d)
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"{OPEN_CLIP}{fused[1]}.{name}_proj.{fused[2]}"] = part.clone()
        else:
            out[key] = tensor
    return out


def _pack(state: StateDict, source: str) -> StateDict:
    """The inverse of `_unpack`: linear VAE attention weights -> 1x1 convs; q, k, v -> fused in_proj."""
    out: StateDict = {}
    groups: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        qkv = _QKV.fullmatch(key)
        if _VAE_ATTENTION_WEIGHT.fullmatch(key) and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
        elif qkv:
            groups.setdefault((qkv[1], qkv[3]), {})[qkv[2]] = tensor
        else:
            out[key] = tensor
    for (attn, kind), parts in groups.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise CheckpointError(f"{source}: {attn} {kind} needs q, k and v projections, found {sorted(parts)}")
        out[f"{OPEN_CLIP}{attn}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _split(tagged: Mapping[str, torch.Tensor]) -> Tuple[StateDict, StateDict, StateDict]:
    parts: Dict[str, StateDict] = {c: {} for c in COMPONENTS}
    for key, tensor in tagged.items():
        component, name = key.split(".", 1)
        parts[component][name] = tensor
    return parts["unet"], parts["vae"], parts["text_encoder"]


def ldm_to_diffusers(state: Mapping[str, torch.Tensor], configs: Optional[Mapping[str, Any]] = None,
                     source: str = "checkpoint") -> Tuple[StateDict, StateDict, StateDict]:
    """(unet, vae, text_encoder) state dicts in diffusers / transformers names from an LDM state dict.

    Every key is renamed by a rule or ignored with a reason (IGNORED); any other
    key, or a block of the config with no tensors, raises CheckpointError naming
    `source`. The text encoder's keys start with `text_model.`, as in a
    downloaded `text_encoder/model.safetensors`.
    """
    configs = configs or infer_configs(state, source=source)
    blocks = _blocks(configs)
    tagged = rename_keys(_unpack(state, source), block_rules(blocks), _ignored(configs), source=source)
    check_blocks(blocks, tagged, reverse=False, source=source)
    return _split(tagged)


def _structure(unet: Mapping[str, Any], vae: Mapping[str, Any], text: Mapping[str, Any], version: str,
               source: str) -> Dict[str, Any]:
    """The part of the configs the block arithmetic needs, counted from diffusers-layout keys."""
    def kinds(prefix: str, levels: int, attention: str, plain: str) -> List[str]:
        return [attention if any(k.startswith(f"{prefix}.{b}.attentions.") for k in unet) else plain
                for b in range(levels)]
    levels = count_indices(unet, r"down_blocks\.(\d+)\.", source)
    vae_levels = count_indices(vae, r"encoder\.down_blocks\.(\d+)\.", source)
    return {"version": version,
            "unet": {"layers_per_block": count_indices(unet, r"down_blocks\.0\.resnets\.(\d+)\.", source),
                     "down_block_types": kinds("down_blocks", levels, "CrossAttnDownBlock2D", "DownBlock2D"),
                     "up_block_types": kinds("up_blocks", levels, "CrossAttnUpBlock2D", "UpBlock2D")},
            "vae": {"layers_per_block": count_indices(vae, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", source),
                    "down_block_types": ["DownEncoderBlock2D"] * vae_levels},
            "text_encoder": {"num_hidden_layers": count_indices(text, r"text_model\.encoder\.layers\.(\d+)\.", source)}}


def diffusers_to_ldm(unet: Mapping[str, torch.Tensor], vae: Mapping[str, torch.Tensor],
                     text_encoder: Mapping[str, torch.Tensor], version: str,
                     source: str = "diffusers state dicts") -> StateDict:
    """One LDM-layout state dict from diffusers UNet/VAE and transformers CLIP text state dicts.

    The text encoder's keys may carry the `text_model.` prefix or not
    (transformers 5's CLIPTextModel.state_dict() has none). For SD 2.x the
    file gets OpenCLIP's full depth: the last block, which SD 2.x never runs
    (it reads the penultimate layer), is written as zeros.
    """
    version = str(version)
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: expected one of {VERSIONS}")
    text = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_encoder.items()}
    configs = _structure(unet, vae, text, version, source)
    blocks = _blocks(configs)
    tagged = {f"{component}.{key}": tensor for component, part in zip(COMPONENTS, (unet, vae, text))
              for key, tensor in part.items()}
    state = _pack(rename_keys(tagged, block_rules(blocks, reverse=True), source=source), source)
    check_blocks(blocks, state, reverse=True, source=source)
    if version == "2":
        last = configs["text_encoder"]["num_hidden_layers"]
        template = re.compile(rf"{re.escape(OPEN_CLIP)}transformer\.resblocks\.{last - 1}\.(.+)")
        state.update({f"{OPEN_CLIP}transformer.resblocks.{last}.{m[1]}": torch.zeros_like(t)
                      for k, t in list(state.items()) if (m := template.fullmatch(k))})
    return state


def save_ldm_checkpoint(path: PathLike, unet: Mapping[str, torch.Tensor], vae: Mapping[str, torch.Tensor],
                        text_encoder: Mapping[str, torch.Tensor], version: str) -> Path:
    """Write the three state dicts as one LDM-layout `.safetensors` file (what `load_single_file` reads)."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single files are written as .safetensors")
    state = diffusers_to_ldm(unet, vae, text_encoder, version)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


# ------------------------------------------------------------------------------------------ entry points

def load_single_file(path: PathLike, version: Optional[str] = None, prediction_type: Optional[str] = None,
                     configs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, Any]:
    """Configs and diffusers/transformers-layout state dicts of a single-file SD checkpoint.

    Returns {"version": "1"|"2",
             "unet" / "vae" / "text_encoder": {"config": config.json keys, "state_dict": tensors},
             "tokenizer": {"config": {"model_max_length", "pad_token"}},
             "scheduler": {"config": scheduler_config.json keys, prediction_type included}}.
    Keys are all accounted for here; that every parameter is filled with the
    right shape is checked when the modules are built (`load_single_file_components`).
    """
    source = str(path)
    state = read_ldm_checkpoint(path)
    found = infer_configs(state, version, prediction_type, configs, source=source)
    parts = dict(zip(COMPONENTS, ldm_to_diffusers(state, found, source=source)))
    result: Dict[str, Any] = {"version": found["version"]}
    result.update({c: {"config": found[c], "state_dict": parts[c]} for c in COMPONENTS})
    result.update({c: {"config": found[c]} for c in ("tokenizer", "scheduler")})
    return result


def _build_models(configs: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """Our UNet, VAE and text encoder for `configs`, on the meta device (no memory for weights yet)."""
    from parti_from_scratch.clip.model import CLIPTextConfig, CLIPTextModel
    from parti_from_scratch.configuration import ConfigError
    from parti_from_scratch.unet import UNet2DConditionConfig, UNet2DConditionModel
    from parti_from_scratch.vae import AutoencoderKL, AutoencoderKLConfig
    try:
        unet = UNet2DConditionConfig.from_dict(configs["unet"], source=f"{source} (unet config)")
        vae = AutoencoderKLConfig.from_dict(configs["vae"], source=f"{source} (vae config)")
        text = CLIPTextConfig.from_dict(configs["text_encoder"], source=f"{source} (text_encoder config)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return {"unet": build_on_meta(lambda: UNet2DConditionModel(unet)),
            "vae": build_on_meta(lambda: AutoencoderKL(vae)),
            "text_encoder": build_on_meta(lambda: CLIPTextModel(text))}


def _check_file_against(models: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                        configs: Mapping[str, Any], source: str) -> None:
    """Every tensor the models need is in the file with the right shape, named in the file's own layout.

    The (meta) models are written out in LDM names by the same rules read in
    reverse, then compared key by key with the file, ignored keys left aside.
    """
    from weights_convert.diffusers_models import UNET_CONV_PROJECTIONS, to_diffusers
    from weights_convert.transformers_clip import save_rules
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    conv_keys = None if unet.config.use_linear_projection else UNET_CONV_PROJECTIONS
    expected = diffusers_to_ldm(to_diffusers(unet.state_dict(), conv_keys), to_diffusers(vae.state_dict()),
                                rename_keys(text.state_dict(), save_rules(type(text)), source=source),
                                configs["version"], source=source)
    ignored = [re.compile(pattern) for pattern, _ in _ignored(configs)]

    def used(keys: Iterable[str]) -> List[str]:
        return [k for k in keys if not any(p.fullmatch(k) for p in ignored)]
    check_shapes({k: tuple(expected[k].shape) for k in used(expected)}, {k: state[k] for k in used(state)}, source)


def load_single_file_components(path: PathLike, version: Optional[str] = None,
                                prediction_type: Optional[str] = None, dtype: Optional[torch.dtype] = torch.float32,
                                configs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, Any]:
    """Our tokenizer, text_encoder, unet, vae and scheduler from a single-file SD checkpoint.

    The keyword names match `TextToImagePipeline(**components)`. The file is
    checked against the models before any weight is assigned: a missing,
    unexpected or wrongly shaped tensor raises CheckpointError naming the file
    and the keys in the file's own (LDM) names. The scheduler is PNDM with the
    file's schedule and `prediction_type` (see `infer_configs`).
    """
    from parti_from_scratch.clip.model import CLIPTextModel
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    from parti_from_scratch.diffusion.schedulers import PNDMScheduler
    from weights_convert.diffusers_models import from_diffusers
    from weights_convert.transformers_clip import ignore_rules, load_rules

    source = str(path)
    state = read_ldm_checkpoint(path)
    found = infer_configs(state, version, prediction_type, configs, source=source)
    models = _build_models(found, source)
    _check_file_against(models, state, found, source)
    unet, vae, text = ldm_to_diffusers(state, found, source=source)
    ours = {"unet": from_diffusers(unet, source=source), "vae": from_diffusers(vae, source=source),
            "text_encoder": rename_keys(text, load_rules(CLIPTextModel), ignore_rules(CLIPTextModel, "clip_text_model"),
                                        source=source)}
    components: Dict[str, Any] = {c: load_into(models[c], ours[c], source=f"{source} ({c})", dtype=dtype)
                                  for c in COMPONENTS}
    components["tokenizer"] = CLIPTokenizer(**found["tokenizer"])
    components["scheduler"] = PNDMScheduler.from_config(found["scheduler"])
    return components
