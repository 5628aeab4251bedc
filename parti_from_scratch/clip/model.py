"""CLIP's two encoders and the model that joins them.

Tutorial "Parti原理与代码实例讲解" §2.3 (CLIP), §3.1 (encoding the prompt), §4.3 (the loss).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", arXiv 2103.00020: §2.4 and Figure 3 (the pseudocode below).

    I_f = image_encoder(I)              # vision Transformer, pooled at the class token
    T_f = text_encoder(T)               # causal Transformer, pooled at the end-of-text token
    I_e = l2_normalize(I_f W_i)         # W_i: visual_projection
    T_e = l2_normalize(T_f W_t)         # W_t: text_projection
    logits = I_e T_e^T * exp(t)         # t: logit_scale, the learned log inverse temperature

Both encoders are stacks of pre-LayerNorm Transformer blocks (Vaswani et al.
2017, arXiv 1706.03762, with the normalisation moved before each sub-layer):

    x = x + MultiHead(LN_1(x))          the attention of tutorial §4.1
    x = x + MLP(LN_2(x))                MLP(x) = W_2 act(W_1 x + b_1) + b_2

A text-to-image model reads the text encoder's `last_hidden_state` (one vector
per token) as its condition; Stable Diffusion 2.x and SDXL read the
second-to-last layer instead ("clip skip"), `hidden_states[-2]` here.

Module names follow the transformers CLIP classes (apart from the spelling of
`pre_layernorm`), so weights_convert/transformers_clip.py loads their
checkpoints with a handful of prefix rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from parti_from_scratch.clip.loss import similarity_logits, symmetric_cross_entropy
from parti_from_scratch.configuration import Config, positive, require
from parti_from_scratch.nn.attention import MultiHeadAttention, causal_mask, combine_masks, padding_mask
from parti_from_scratch.nn.positional import LearnedPositionalEmbedding
from parti_from_scratch.outputs import ModelOutput


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


# config.json's `hidden_act` -> the function. gelu_new and gelu_pytorch_tanh are both the tanh approximation.
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


def _check_encoder_config(config: Union["CLIPTextConfig", "CLIPVisionConfig"]) -> None:
    """The rules both towers share: positive sizes, heads dividing the width."""
    positive(config, "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
             "num_attention_heads", "layer_norm_eps")
    require(config.hidden_size % config.num_attention_heads == 0,
            f"num_attention_heads={config.num_attention_heads}: does not divide hidden_size={config.hidden_size}")


@dataclass
class CLIPTextConfig(Config):
    """The text encoder's hyper-parameters; defaults are openai/clip-vit-base-patch32's."""
    vocab_size: int = 49408                 # BPE vocabulary, special tokens included
    hidden_size: int = 512                  # width d of the residual stream
    intermediate_size: int = 2048           # width of the MLP's hidden layer (4 d)
    projection_dim: int = 512               # width of the joint text-image space (text_projection's output)
    num_hidden_layers: int = 12             # number of Transformer blocks
    num_attention_heads: int = 8            # heads h; each has d / h channels
    max_position_embeddings: int = 77       # context length: one learned position vector per token slot
    hidden_act: str = "quick_gelu"          # MLP non-linearity, a key of ACTIVATIONS
    layer_norm_eps: float = 1e-5            # epsilon of every LayerNorm
    pad_token_id: int = 1                   # the tokenizer's ids, written back by save_pretrained (the model
    bos_token_id: int = 49406               #   masks with attention_mask and reads only eos_token_id)
    eos_token_id: int = 49407               # <|endoftext|>: the token whose final state is the pooled output
    model_type: ClassVar[str] = "clip_text_model"
    choices: ClassVar[Mapping[str, Tuple[Any, ...]]] = {"hidden_act": tuple(ACTIVATIONS)}

    def normalize(self) -> None:
        if isinstance(self.eos_token_id, (list, tuple)):
            require(len(self.eos_token_id) == 1,
                    f"eos_token_id={list(self.eos_token_id)!r}: pooling needs a single end-of-text id")
            self.eos_token_id = self.eos_token_id[0]

    def check(self) -> None:
        _check_encoder_config(self)
        positive(self, "vocab_size", "max_position_embeddings")


@dataclass
class CLIPVisionConfig(Config):
    """The vision encoder's hyper-parameters; defaults are openai/clip-vit-base-patch32's."""
    hidden_size: int = 768                  # width d of the residual stream
    intermediate_size: int = 3072           # width of the MLP's hidden layer (4 d)
    projection_dim: int = 512               # width of the joint text-image space (visual_projection's output)
    num_hidden_layers: int = 12             # number of Transformer blocks
    num_attention_heads: int = 12           # heads h
    num_channels: int = 3                   # input image channels (RGB)
    image_size: int = 224                   # input images are image_size x image_size pixels
    patch_size: int = 32                    # each patch_size x patch_size patch becomes one token
    hidden_act: str = "quick_gelu"          # MLP non-linearity, a key of ACTIVATIONS
    layer_norm_eps: float = 1e-5            # epsilon of every LayerNorm
    model_type: ClassVar[str] = "clip_vision_model"
    choices: ClassVar[Mapping[str, Tuple[Any, ...]]] = {"hidden_act": tuple(ACTIVATIONS)}

    def normalize(self) -> None:
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):  # config.json may store a square size as [s, s]
                require(len(value) >= 1 and all(v == value[0] for v in value),
                        f"{name}={list(value)!r}: only square sizes are supported")
                setattr(self, name, value[0])

    def check(self) -> None:
        _check_encoder_config(self)
        positive(self, "num_channels", "image_size", "patch_size")
        require(self.image_size % self.patch_size == 0,
                f"image_size={self.image_size}: not a multiple of patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class CLIPConfig(Config):
    """Both towers plus the joint space; nested exactly as a transformers CLIPModel's config.json."""
    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512               # width of the joint space both projections map into
    logit_scale_init_value: float = 2.6592  # initial t = log(1 / 0.07): CLIP's initial temperature 0.07
    model_type: ClassVar[str] = "clip"

    def check(self) -> None:
        positive(self, "projection_dim")
        require(math.isfinite(self.logit_scale_init_value),
                f"logit_scale_init_value={self.logit_scale_init_value}: must be finite")


# ----------------------------------------------------------------------------------------------- outputs

@dataclass
class CLIPEncoderOutput(ModelOutput):
    """What CLIPTextModel and CLIPVisionModel return."""
    last_hidden_state: torch.Tensor                           # (b, n, d) final states (text: after final_layer_norm)
    pooler_output: torch.Tensor                               # (b, d) one vector per input: end-of-text / class token
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # L+1 x (b, n, d): encoder input, then each block's output


@dataclass
class CLIPTextModelOutput(ModelOutput):
    """What CLIPTextModelWithProjection returns; text_embeds first, as SDXL's listing reads `[0]`."""
    text_embeds: torch.Tensor                                 # (b, projection_dim) pooled output times W_t
    last_hidden_state: torch.Tensor                           # (b, n, d)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # L+1 x (b, n, d)
    pooler_output: Optional[torch.Tensor] = None              # (b, d) before the projection


@dataclass
class CLIPVisionModelOutput(ModelOutput):
    """What CLIPVisionModelWithProjection returns."""
    image_embeds: torch.Tensor                                # (b, projection_dim) pooled output times W_i
    last_hidden_state: torch.Tensor                           # (b, 1 + patches, d)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # L+1 x (b, 1 + patches, d)
    pooler_output: Optional[torch.Tensor] = None              # (b, d) before the projection


@dataclass
class CLIPOutput(ModelOutput):
    """What CLIPModel returns."""
    loss: Optional[torch.Tensor]                              # () symmetric cross-entropy, if return_loss
    logits_per_image: torch.Tensor                            # (b_img, b_txt) exp(t) cos(I_e, T_e)
    logits_per_text: torch.Tensor                             # (b_txt, b_img) its transpose
    text_embeds: torch.Tensor                                 # (b_txt, projection_dim), unit length
    image_embeds: torch.Tensor                                # (b_img, projection_dim), unit length
    text_model_output: CLIPEncoderOutput
    vision_model_output: CLIPEncoderOutput


# ----------------------------------------------------------------------------------------------- blocks

class CLIPMLP(nn.Module):
    """MLP(x) = W_2 act(W_1 x + b_1) + b_2, the position-wise feed-forward layer."""

    def __init__(self, config: Union[CLIPTextConfig, CLIPVisionConfig]):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm block: x = x + MultiHead(LN_1(x)); x = x + MLP(LN_2(x))."""

    def __init__(self, config: Union[CLIPTextConfig, CLIPVisionConfig]):
        super().__init__()
        d = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.self_attn = MultiHeadAttention(d, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (b, n, d); mask boolean, broadcastable to (b, h, n, n), True = may attend."""
        x = x + self.self_attn(self.layer_norm1(x), mask=mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """num_hidden_layers blocks in sequence; optionally returns every intermediate state."""

    def __init__(self, config: Union[CLIPTextConfig, CLIPVisionConfig]):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, output_hidden_states: bool = False
                ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, ...]]]:
        """x (b, n, d) -> (b, n, d), and (x, block_1(x), ..., block_L(...)) if output_hidden_states."""
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return x, (tuple(states) if output_hidden_states else None)


class CLIPTextEmbeddings(nn.Module):
    """x_0 = E_tok[ids] + P[0..n-1]: token embedding plus learned position embedding."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = LearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (b, n) -> (b, n, d)."""
        positions = (self.position_embedding(input_ids.shape[-1]) if position_ids is None
                     else self.position_embedding.weight[position_ids])
        return self.token_embedding(input_ids) + positions


class CLIPVisionEmbeddings(nn.Module):
    """x_0 = [x_class; patch_1 E; ...; patch_N E] + P: the ViT input.

    Dosovitskiy et al. 2020, arXiv 2010.11929, Eq. 1; E is the patch embedding, P the position embedding.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        # a stride-p convolution with a p x p kernel is a linear map E applied to each non-overlapping patch
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = LearnedPositionalEmbedding(config.num_patches + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (b, c, H, W) -> (b, 1 + N, d) with N = (H / p) (W / p)."""
        b, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {height}x{width}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (b, d, H/p, W/p)
        # (b, d, H/p, W/p) -> (b, N, d)
        patches = rearrange(patches, "b d gh gw -> b (gh gw) d")
        # (d,) -> (b, 1, d): the same learned class token leads every sequence
        cls = self.class_embedding.expand(b, 1, -1)
        x = torch.cat([cls, patches], dim=1)
        return x + self.position_embedding(x.shape[1])


# ----------------------------------------------------------------------------------------------- loading, saving

class _Pretrained(nn.Module):
    """from_pretrained / save_pretrained for transformers folders (the layout lives in weights_convert)."""
    config_class: ClassVar[type]

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], subfolder: Optional[str] = None,
                        dtype: Optional[torch.dtype] = torch.float32, *, torch_dtype: Optional[torch.dtype] = None):
        """Load a transformers folder (config.json + model.safetensors or pytorch_model.bin), strictly.

        A full CLIPModel folder also loads as one of its towers. dtype=None keeps the file's dtype;
        torch_dtype, if given, is another name for dtype (the one diffusers' listings use).
        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        """
        from weights_convert.transformers_clip import load_pretrained
        return load_pretrained(cls, path, subfolder=subfolder, dtype=dtype if torch_dtype is None else torch_dtype)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write config.json and model.safetensors in transformers' layout (transformers can load the folder).

        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        """
        from weights_convert.transformers_clip import save_pretrained
        save_pretrained(self, folder)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def _init_encoder(encoder: CLIPEncoder, width: int) -> None:
    """OpenAI's initialisation: the residual branches shrink with depth so the sum stays O(1)."""
    n_layers = len(encoder.layers)
    attn_std = width ** -0.5
    proj_std = width ** -0.5 * (2 * n_layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for layer in encoder.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            nn.init.normal_(proj.weight, std=attn_std)
        nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
        nn.init.normal_(layer.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)


# ----------------------------------------------------------------------------------------------- text

def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(b, n) token ids -> (b,) index of each sequence's first end-of-text token, where the text is pooled.

    Configs written before transformers stored the real end-of-text id carry
    eos_token_id=2; for them (as transformers does) the position of the largest
    id is taken, which in CLIP's vocabulary is <|endoftext|> (49407, the last id).
    A sequence without the token pools at position 0.
    """
    if eos_token_id == 2:
        return input_ids.argmax(dim=-1)
    # argmax of a 0/1 row is its first 1
    return (input_ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextModel(_Pretrained):
    """The text encoder: a causal Transformer whose end-of-text state summarises the prompt.

    `text_encoder(input_ids)[0]` is the (b, n, d) sequence a diffusion UNet attends to.
    """
    config_class = CLIPTextConfig

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        _init_encoder(self.encoder, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, output_hidden_states: bool = False
                ) -> CLIPEncoderOutput:
        """Encode token ids.

        Shapes: b batch, n tokens (<= max_position_embeddings), d hidden_size, L num_hidden_layers.
            input_ids (b, n) long; attention_mask (b, n) 1 = token, 0 = padding; position_ids (b, n) or None.
            -> last_hidden_state (b, n, d), pooler_output (b, d), hidden_states L+1 x (b, n, d) or None.
        Every token sees itself and the tokens before it (causal mask), never a padded key.
        """
        b, n = input_ids.shape
        x = self.embeddings(input_ids, position_ids)                                # (b, n, d)
        # (n, n) causal AND (b, 1, 1, n) padding -> (b, 1, n, n), broadcast over heads
        mask = combine_masks(causal_mask(n, device=input_ids.device),
                             None if attention_mask is None else padding_mask(attention_mask))
        x, hidden_states = self.encoder(x, mask, output_hidden_states)
        last_hidden_state = self.final_layer_norm(x)
        # the state at each sequence's end-of-text token: (b, n, d) -> (b, d)
        rows = torch.arange(b, device=input_ids.device)
        pooled = last_hidden_state[rows, eos_positions(input_ids, self.config.eos_token_id)]
        return CLIPEncoderOutput(last_hidden_state, pooled, hidden_states)


class CLIPTextModelWithProjection(CLIPTextModel):
    """The text encoder plus W_t: text_embeds = pooler_output W_t (SDXL's second text encoder)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=config.hidden_size ** -0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, output_hidden_states: bool = False
                ) -> CLIPTextModelOutput:
        """As CLIPTextModel.forward, plus text_embeds (b, projection_dim) first."""
        out = super().forward(input_ids, attention_mask, position_ids, output_hidden_states)
        return CLIPTextModelOutput(self.text_projection(out.pooler_output), out.last_hidden_state,
                                   out.hidden_states, out.pooler_output)


# ----------------------------------------------------------------------------------------------- vision

class CLIPVisionModel(_Pretrained):
    """The vision encoder: a ViT whose class-token state, normalised, summarises the image."""
    config_class = CLIPVisionConfig

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        nn.init.normal_(self.embeddings.class_embedding, std=config.hidden_size ** -0.5)
        nn.init.normal_(self.embeddings.patch_embedding.weight, std=0.02)
        _init_encoder(self.encoder, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> CLIPEncoderOutput:
        """Encode images.

        Shapes: b batch, c num_channels, H = W = image_size, N = (H / patch_size)^2 patches, d hidden_size.
            pixel_values (b, c, H, W) -> last_hidden_state (b, 1 + N, d), pooler_output (b, d),
            hidden_states L+1 x (b, 1 + N, d) or None (the first is the encoder input, after pre_layernorm).
        """
        x = self.pre_layernorm(self.embeddings(pixel_values))                      # (b, 1 + N, d)
        last_hidden_state, hidden_states = self.encoder(x, None, output_hidden_states)
        # the class token's state: (b, 1 + N, d) -> (b, d)
        pooled = self.post_layernorm(last_hidden_state[:, 0])
        return CLIPEncoderOutput(last_hidden_state, pooled, hidden_states)


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """The vision encoder plus W_i: image_embeds = pooler_output W_i."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=config.hidden_size ** -0.5)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> CLIPVisionModelOutput:
        """As CLIPVisionModel.forward, plus image_embeds (b, projection_dim) first."""
        out = super().forward(pixel_values, output_hidden_states)
        return CLIPVisionModelOutput(self.visual_projection(out.pooler_output), out.last_hidden_state,
                                     out.hidden_states, out.pooler_output)


# ----------------------------------------------------------------------------------------------- both

class CLIPModel(_Pretrained):
    """Both encoders, their projections W_t, W_i into the joint space, and the temperature parameter t."""
    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(config.text_config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        # t: logits are scaled by exp(t), so the temperature 1/exp(t) stays positive while t is trained freely
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        nn.init.normal_(self.text_projection.weight, std=config.text_config.hidden_size ** -0.5)
        nn.init.normal_(self.visual_projection.weight, std=config.vision_config.hidden_size ** -0.5)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """T_f W_t, shape (b, projection_dim), not yet normalised.

        A tensor, as transformers 4 returned and CLIP tutorials use it (transformers 5 wraps it in an output object).
        """
        return self.text_projection(self.text_model(input_ids, attention_mask, position_ids).pooler_output)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """I_f W_i, shape (b, projection_dim), not yet normalised."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                return_loss: bool = False, output_hidden_states: bool = False) -> CLIPOutput:
        """Score every image against every text.

        Shapes: input_ids (b_txt, n), pixel_values (b_img, c, H, W)
            -> logits_per_image (b_img, b_txt), logits_per_text (b_txt, b_img),
               text_embeds (b_txt, projection_dim), image_embeds (b_img, projection_dim), loss () if return_loss.
        """
        text_out = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)
        vision_out = self.vision_model(pixel_values, output_hidden_states)
        # I_e, T_e: the projected features on the unit sphere (similarity_logits is then exp(t) I_e T_e^T)
        image_embeds = F.normalize(self.visual_projection(vision_out.pooler_output), dim=-1)
        text_embeds = F.normalize(self.text_projection(text_out.pooler_output), dim=-1)
        logits_per_image = similarity_logits(image_embeds, text_embeds, self.logit_scale)
        loss = symmetric_cross_entropy(logits_per_image) if return_loss else None
        return CLIPOutput(loss, logits_per_image, logits_per_image.t(), text_embeds, image_embeds,
                          text_out, vision_out)
