"""Parti's encoder-decoder Transformer: text tokens in, image-token logits out.

Yu et al. 2022, arXiv 2206.10789, §2 (the model). The tutorial calls Parti a diffusion model; this is
the real one (README, "The real Parti").

The encoder reads the prompt; the decoder writes the image tokens of the
tokenizer's grid in raster order, attending causally to the tokens already
written and, by cross-attention, to the encoded text. That is the
autoregressive factorisation

    p(y | x) = prod_{i=1}^{N} p(y_i | y_<i, x)                  (the likelihood the model is trained on)

and training minimises its negative log, the teacher-forced cross-entropy of the
next image token (`autoregressive_loss`).

One set of blocks covers two layer styles, chosen by switches of the config:

* Parti's standard pre-LayerNorm block (the Transformer of Vaswani et al. with
  the norm moved in front of each sub-layer, as in MBart):
      x <- x + Attn(LN(x));   x <- x + CrossAttn(LN(x), text);   x <- x + W_2 act(W_1 LN(x))
* the DALL·E mini/mega block (BART-derived, min-dalle's files): a LayerNorm before
  AND after each attention sub-layer inside the residual, a gated feed-forward
  with its own inner LayerNorm, no biases:
      x <- x + LN(Attn(LN(x)));   x <- x + LN(CrossAttn(LN(x), text))
      x <- x + W_2 LN( gelu(W_0 LN(x)) * (W_1 LN(x)) )

Module names are the keys of min-dalle's `encoder.pt`/`decoder.pt`
(`embed_tokens`, `embed_positions`, `layers.i.pre_self_attn_layer_norm`,
`layers.i.self_attn.q_proj`, ..., `layernorm_embedding`, `final_ln`, `lm_head`)
except that the feed-forward is `ffn` where min-dalle says `glu` (it is a GLU only
in that style); a loader renames `glu.` to `ffn.` and nothing else.

Attention is `nn.attention.MultiHeadAttention`. For generation the decoder keeps
a preallocated cache of its self-attention keys and values (`KVCache`,
`cached_self_attention`) and projects the text's keys and values once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import Config, positive, require
from ..nn.attention import MultiHeadAttention, padding_mask, split_heads


@dataclass
class PartiTransformerConfig(Config):
    """Sizes and layer style of the encoder-decoder. Defaults: DALL·E mini as min-dalle ships it.

    Size keys are those of a transformers BART/MBart `config.json`; the style
    switches select between Parti's pre-LN block and the DALL·E mini/mega block.
    """
    vocab_size: int = 50264                  # text tokens (encoder embedding rows)
    image_vocab_size: int = 16385            # decoder embedding rows = lm_head outputs (codes + start token)
    codebook_size: int = 16384               # the first codebook_size outputs are image codes: only these are sampled
    d_model: int = 1024                      # width of both stacks
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 2730              # hidden width of the feed-forward
    decoder_ffn_dim: int = 2730
    max_text_positions: int = 64             # encoder learned positions: the longest prompt in tokens
    image_grid_size: Tuple[int, int] = (16, 16)   # decoder positions: rows x columns of the token grid
    # layer style
    ffn_type: str = "glu"                    # "glu": W_2 LN(gelu(W_0 x) * W_1 x); "mlp": W_2 act(W_1 x)
    sublayer_post_norm: bool = True          # LayerNorm on each attention output inside the residual (DALL·E)
    bias: bool = False                       # biases on the attention and feed-forward projections
    layernorm_embedding: bool = True         # LayerNorm on token + position embeddings
    final_layer_norm: bool = True            # LayerNorm after the last layer of each stack ("final_ln")
    scale_embedding: bool = False            # token embeddings times sqrt(d_model)
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    # special tokens
    pad_token_id: int = 1                    # text padding (hidden from attention)
    bos_token_id: int = 0                    # <s>
    eos_token_id: int = 2                    # </s>
    decoder_start_token_id: int = 16383      # the decoder's first input (min-dalle: 2**14 - 1)
    # factorised image codes: code k = (k_1, ..., k_F) in mixed radix (K_1, ..., K_F), k_F varying fastest, with
    # E[k] = sum_f E_f[k_f] and l[k] = sum_f l_f[k_f] (`FactorisedEmbedding`, `FactorisedHead`); None: one codebook
    codebook_factors: Optional[Tuple[int, ...]] = None

    choices: ClassVar[Mapping[str, Tuple[Any, ...]]] = {
        "ffn_type": ("glu", "mlp"), "activation_function": ("gelu", "relu")}

    def check(self) -> None:
        positive(self, "vocab_size", "image_vocab_size", "codebook_size", "d_model", "encoder_layers",
                 "decoder_layers", "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                 "decoder_ffn_dim", "max_text_positions", "image_grid_size", "layer_norm_eps")
        for key in ("encoder_attention_heads", "decoder_attention_heads"):
            require(self.d_model % getattr(self, key) == 0,
                    f"{key}={getattr(self, key)} does not divide d_model={self.d_model}")
        require(self.codebook_size <= self.image_vocab_size,
                f"codebook_size={self.codebook_size} exceeds image_vocab_size={self.image_vocab_size}")
        if self.codebook_factors is not None:
            require(len(self.codebook_factors) >= 2 and all(int(k) >= 1 for k in self.codebook_factors)
                    and math.prod(self.codebook_factors) == self.codebook_size,
                    f"codebook_factors={self.codebook_factors} must be two or more sizes whose product is "
                    f"codebook_size={self.codebook_size}")
            require(self.decoder_start_token_id >= self.codebook_size,
                    f"decoder_start_token_id={self.decoder_start_token_id} must come after the "
                    f"{self.codebook_size} factorised codes")
        require(0 <= self.decoder_start_token_id < self.image_vocab_size,
                f"decoder_start_token_id={self.decoder_start_token_id} is outside the image vocabulary "
                f"(0..{self.image_vocab_size - 1})")

    @property
    def image_token_count(self) -> int:
        """N = rows * columns: tokens per image, written in raster order."""
        return self.image_grid_size[0] * self.image_grid_size[1]


# Published sizes (PARTI.md): DALL·E mini/mega as min-dalle ships them, Parti 350M (paper, Table 1).
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "dalle-mini": dict(),
    "dalle-mega": dict(vocab_size=50272, image_vocab_size=16416, d_model=2048, encoder_layers=24, decoder_layers=24,
                       encoder_attention_heads=32, decoder_attention_heads=32, encoder_ffn_dim=4096,
                       decoder_ffn_dim=4096),
    "parti-350m": dict(vocab_size=16000, image_vocab_size=8193, codebook_size=8192, decoder_start_token_id=8192,
                       d_model=1024, encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                       decoder_ffn_dim=4096, max_text_positions=128, image_grid_size=(32, 32), ffn_type="mlp",
                       sublayer_post_norm=False, bias=True),
    # the Parti trained here on the built-in shapes (train/parti_recipe.py): Parti's pre-LN block at a small
    # size; the text and image vocabularies, text length and grid are those of its two tokenizers
    # (the recipe sets them from the tokenizer folders), the values below are the shipped ones: 512 structure
    # codes x 8 colour codes of its ValueChromaVQModel
    "shapes": dict(vocab_size=133, image_vocab_size=4097, codebook_size=4096, decoder_start_token_id=4096,
                   codebook_factors=(512, 8),
                   d_model=128, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, max_text_positions=24,
                   image_grid_size=(8, 8), ffn_type="mlp", sublayer_post_norm=False, bias=True),
}


def preset_config(name: str, **overrides: Any) -> PartiTransformerConfig:
    """A config of `PRESETS` (e.g. "dalle-mini"), with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PartiTransformerConfig(**{**PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------ blocks

class FeedForward(nn.Module):
    """The position-wise feed-forward, pre-normed by `ln0`.

        mlp: FFN(x) = W_2 act(W_0 LN_0(x))                                  (Vaswani et al. 2017, Eq. 2)
        glu: FFN(x) = W_2 LN_1( gelu(W_0 LN_0(x)) * W_1 LN_0(x) )           (GLU, Shazeer 2020, arXiv 2002.05202,
                                                                             with DALL·E mini's inner LayerNorm)
    """

    def __init__(self, config: PartiTransformerConfig, ffn_dim: int):
        super().__init__()
        d, eps, bias = config.d_model, config.layer_norm_eps, config.bias
        self.gated = config.ffn_type == "glu"
        self.act = nn.GELU() if config.activation_function == "gelu" else nn.ReLU()
        self.ln0 = nn.LayerNorm(d, eps=eps)
        self.fc0 = nn.Linear(d, ffn_dim, bias=bias)
        if self.gated:
            self.fc1 = nn.Linear(d, ffn_dim, bias=bias)
            self.ln1 = nn.LayerNorm(ffn_dim, eps=eps)
        self.fc2 = nn.Linear(ffn_dim, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, n, d) -> (b, n, d)."""
        h = self.ln0(x)
        if self.gated:
            # gelu(x W_0) * (x W_1), then LN_1: (b, n, ffn_dim)
            h = self.ln1(self.act(self.fc0(h)) * self.fc1(h))
        else:
            h = self.act(self.fc0(h))
        return self.fc2(h)


class KVCache:
    """Preallocated keys and values of the decoder's self-attention, plus the text's projected keys and values.

    self_kv: (layers, 2, batch, heads, N, d_head), [:, 0] keys and [:, 1] values,
        N = the image's token count; positions [0, length) are filled.
    cross_kv: per layer, the keys and values of the encoder states, projected once
        (they do not change while the image is written).
    Size in elements: 2 * layers * batch * N * d_model for self_kv (`self_kv_numel`).
    """

    def __init__(self, config: PartiTransformerConfig, batch: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        heads = config.decoder_attention_heads
        shape = (config.decoder_layers, 2, batch, heads, config.image_token_count, config.d_model // heads)
        self.self_kv = torch.zeros(shape, dtype=dtype, device=device)
        self.cross_kv: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.cross_mask: Optional[torch.Tensor] = None
        self.length = 0

    @staticmethod
    def self_kv_numel(config: PartiTransformerConfig, batch: int) -> int:
        """2 (K and V) * layers * batch * N * d_model: the analytic size of `self_kv` in elements."""
        return 2 * config.decoder_layers * batch * config.image_token_count * config.d_model


def cached_self_attention(attn: MultiHeadAttention, x: torch.Tensor, kv: torch.Tensor, start: int) -> torch.Tensor:
    """Causal self-attention of new positions start..start+n-1 over a KV cache.

        K[start:start+n] = x W^K,   V[start:start+n] = x W^V            (written into the cache)
        out_i = softmax(q_i K[:i+1]^T / sqrt(d_k)) V[:i+1]               (keys of positions <= i only)

    This is row i of the full causal pass (tests: test_kv_cache), computed with the
    new positions' projections only: one token per step costs O(i) instead of O(i^2).
    Shapes: x (b, n, d), kv (2, b, h, N, d_head) -> (b, n, d).
    """
    n = x.shape[1]
    if start + n > kv.shape[-2]:
        raise ValueError(f"the cache holds {kv.shape[-2]} positions; cannot write positions {start}..{start + n - 1}")
    # (b, n, h*d) -> (b, h, n, d)
    q = split_heads(attn.q_proj(x), attn.n_heads)
    k_new, v_new = attn.project_kv(x)
    kv[0, :, :, start:start + n] = k_new
    kv[1, :, :, start:start + n] = v_new
    # (b, h, start+n, d): every position written so far
    k, v = kv[0, :, :, :start + n], kv[1, :, :, :start + n]
    # one new query sees every cached key; several are masked causally (diagonal aligned to the end)
    return attn.attend(q, k, v, causal=n > 1)


class TransformerLayer(nn.Module):
    """One encoder layer (self-attention, feed-forward) or decoder layer (+ cross-attention to the text).

    Each sub-layer f is applied as a residual with a LayerNorm in front and, if
    `sublayer_post_norm`, one behind it: x <- x + LN_post(f(LN_pre(x))).
    """

    def __init__(self, config: PartiTransformerConfig, heads: int, ffn_dim: int, cross_attention: bool):
        super().__init__()
        d, eps, bias = config.d_model, config.layer_norm_eps, config.bias
        self.post_norm = config.sublayer_post_norm
        self.pre_self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = MultiHeadAttention(d, heads, qkv_bias=bias, out_bias=bias)
        if self.post_norm:
            self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.has_cross = cross_attention
        if cross_attention:
            self.pre_encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
            self.encoder_attn = MultiHeadAttention(d, heads, qkv_bias=bias, out_bias=bias)
            if self.post_norm:
                self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.ffn = FeedForward(config, ffn_dim)

    def forward(self, x: torch.Tensor, self_mask: Optional[torch.Tensor] = None, causal: bool = False,
                cross_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                cross_mask: Optional[torch.Tensor] = None,
                kv: Optional[torch.Tensor] = None, start: int = 0) -> torch.Tensor:
        """x (b, n, d); cross_kv: the text's keys and values, 2 x (b, h, T, d_head); kv: this layer's cache slice."""
        # x <- x + LN_post(SelfAttn(LN_pre(x)))
        h = self.pre_self_attn_layer_norm(x)
        h = self.self_attn(h, mask=self_mask, causal=causal) if kv is None else \
            cached_self_attention(self.self_attn, h, kv, start)
        x = x + (self.self_attn_layer_norm(h) if self.post_norm else h)
        if self.has_cross:
            # x <- x + LN_post(CrossAttn(LN_pre(x), text))
            h = self.pre_encoder_attn_layer_norm(x)
            q = split_heads(self.encoder_attn.q_proj(h), self.encoder_attn.n_heads)
            h = self.encoder_attn.attend(q, *cross_kv, mask=cross_mask)
            x = x + (self.encoder_attn_layer_norm(h) if self.post_norm else h)
        # x <- x + FFN(x)   (the FFN norms its input itself)
        return x + self.ffn(x)


def code_digits(codes: torch.Tensor, factors: Tuple[int, ...]) -> List[torch.Tensor]:
    """The mixed-radix digits (k_1, ..., k_F) of codes k = sum_f k_f prod_{g > f} K_g, each shaped like `codes`."""
    digits = []
    for size in reversed(factors):
        digits.append(codes % size)
        codes = torch.div(codes, size, rounding_mode="floor")
    return digits[::-1]


class FactorisedEmbedding(nn.Module):
    """Rows of the decoder's input embedding for factorised codes: E[k] = sum_f E_f[k_f] for k < C = prod_f K_f;
    ids C, C + 1, ... (the start token) have rows of their own (`special`)."""

    def __init__(self, factors: Tuple[int, ...], num_special: int, d: int):
        super().__init__()
        self.sizes = tuple(int(k) for k in factors)
        self.factors = nn.ModuleList(nn.Embedding(k, d) for k in self.sizes)
        self.special = nn.Embedding(num_special, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (b, n) -> (b, n, d)."""
        C = math.prod(self.sizes)
        digits = code_digits(ids.clamp(max=C - 1), self.sizes)
        codes = sum(table(k) for table, k in zip(self.factors, digits))
        special = self.special((ids - C).clamp(min=0))
        return torch.where((ids < C)[..., None], codes, special)


class FactorisedHead(nn.Module):
    """The decoder's output for factorised codes: l[k] = sum_f l_f[k_f], l_f = W_f h; the special tokens get 0.

    Because the logits add, the softmax over the C joint codes is the product of the factors' softmaxes,
    p(k | h) = prod_f softmax(l_f)[k_f]: the factors are drawn independently given h, and a combination
    of factors never seen together in training is as reachable as any other. The special tokens (the start
    token) are read, never drawn and never a target, so their logits carry no weights: a constant 0 keeps
    the output image_vocab_size wide (and leaves no parameter without a gradient, which DDP refuses).
    """

    def __init__(self, factors: Tuple[int, ...], num_special: int, d: int):
        super().__init__()
        self.factors = nn.ModuleList(nn.Linear(d, int(k), bias=False) for k in factors)
        self.num_special = num_special

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> logits (..., C + num_special), joint codes in mixed-radix order first."""
        logits = self.factors[0](h)
        for head in self.factors[1:]:
            # (..., C_so_far, 1) + (..., 1, K_f) -> (..., C_so_far * K_f)
            logits = (logits[..., :, None] + head(h)[..., None, :]).flatten(-2)
        return torch.cat([logits, logits.new_zeros(*logits.shape[:-1], self.num_special)], dim=-1)


class _Stack(nn.Module):
    """Token + learned position embeddings, the layers, the final LayerNorm: shared by encoder and decoder."""

    def __init__(self, config: PartiTransformerConfig, vocab: int, positions: int, layers: int, heads: int,
                 ffn_dim: int, cross_attention: bool):
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_positions = nn.Embedding(positions, d)
        if config.layernorm_embedding:
            self.layernorm_embedding = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(TransformerLayer(config, heads, ffn_dim, cross_attention) for _ in range(layers))
        if config.final_layer_norm:
            self.final_ln = nn.LayerNorm(d, eps=eps)

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """h_0 = LN(E[ids] * scale + P[start..start+n-1]): (b, n) -> (b, n, d)."""
        n, limit = ids.shape[1], self.embed_positions.num_embeddings
        if start + n > limit:
            raise ValueError(f"positions {start}..{start + n - 1} exceed the {limit} learned positions")
        positions = torch.arange(start, start + n, device=ids.device)
        h = self.embed_tokens(ids) * self.embed_scale + self.embed_positions(positions)
        return self.layernorm_embedding(h) if hasattr(self, "layernorm_embedding") else h

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_ln(h) if hasattr(self, "final_ln") else h


class PartiEncoder(_Stack):
    """The text encoder: bidirectional self-attention over the prompt's tokens."""

    def __init__(self, config: PartiTransformerConfig):
        super().__init__(config, config.vocab_size, config.max_text_positions, config.encoder_layers,
                         config.encoder_attention_heads, config.encoder_ffn_dim, cross_attention=False)
        self.pad_token_id = config.pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (b, T) -> encoder states (b, T, d). attention_mask (b, T), 1 = real token;
        by default every token but `pad_token_id` is attended to."""
        if attention_mask is None:
            attention_mask = input_ids != self.pad_token_id
        mask = padding_mask(attention_mask)          # (b, 1, 1, T)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, self_mask=mask)
        return self.finish(h)


class PartiDecoder(_Stack):
    """The image-token decoder: causal self-attention, cross-attention to the text, logits over the image vocabulary."""

    def __init__(self, config: PartiTransformerConfig):
        super().__init__(config, config.image_vocab_size, config.image_token_count, config.decoder_layers,
                         config.decoder_attention_heads, config.decoder_ffn_dim, cross_attention=True)
        self.config = config
        if config.codebook_factors is None:
            self.lm_head = nn.Linear(config.d_model, config.image_vocab_size, bias=False)
        else:
            special = config.image_vocab_size - config.codebook_size
            self.embed_tokens = FactorisedEmbedding(config.codebook_factors, special, config.d_model)
            self.lm_head = FactorisedHead(config.codebook_factors, special, config.d_model)

    def text_kv(self, encoder_hidden_states: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention keys and values of the text, 2 x (b, h, T, d_head) per layer."""
        return [layer.encoder_attn.project_kv(encoder_hidden_states) for layer in self.layers]

    def new_cache(self, encoder_hidden_states: torch.Tensor,
                  encoder_attention_mask: Optional[torch.Tensor] = None) -> KVCache:
        """An empty self-attention cache for this batch, with the text's keys and values projected once."""
        cache = KVCache(self.config, encoder_hidden_states.shape[0], encoder_hidden_states.dtype,
                        encoder_hidden_states.device)
        cache.cross_kv = self.text_kv(encoder_hidden_states)
        cache.cross_mask = None if encoder_attention_mask is None else padding_mask(encoder_attention_mask)
        return cache

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """Logits (b, n, image_vocab_size) for the next token at each of the n input positions.

        Without a cache: the full causal pass over decoder_input_ids (b, n) from position 0.
        With a cache: the input continues at position cache.length; the text's keys and
        values come from the cache (encoder arguments are ignored) and cache.length advances by n.
        """
        return self.lm_head(self.hidden_states(decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
                                               cache))

    def hidden_states(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                      encoder_attention_mask: Optional[torch.Tensor] = None,
                      cache: Optional[KVCache] = None) -> torch.Tensor:
        """The last layer's states h (b, n, d) that `lm_head` reads; arguments as `forward`."""
        if cache is None:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states is required without a cache")
            cross_kv = self.text_kv(encoder_hidden_states)
            cross_mask = None if encoder_attention_mask is None else padding_mask(encoder_attention_mask)
            start = 0
        else:
            cross_kv, cross_mask, start = cache.cross_kv, cache.cross_mask, cache.length
        h = self.embed(decoder_input_ids, start)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.self_kv[i]
            h = layer(h, causal=True, cross_kv=cross_kv[i], cross_mask=cross_mask, kv=kv, start=start)
        if cache is not None:
            cache.length += decoder_input_ids.shape[1]
        return self.finish(h)


class PartiTransformer(nn.Module):
    """The encoder-decoder: `forward(input_ids, decoder_input_ids)` gives teacher-forced logits (b, N, V)."""

    def __init__(self, config: PartiTransformerConfig):
        super().__init__()
        self.config = config
        self.encoder = PartiEncoder(config)
        self.decoder = PartiDecoder(config)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (b, T) text, decoder_input_ids (b, n) image tokens shifted right -> logits (b, n, V)."""
        return self.decoder.lm_head(self.hidden_states(input_ids, decoder_input_ids, attention_mask))

    def hidden_states(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The decoder's last states h (b, n, d), which `decoder.lm_head` turns into the logits; arguments as
        `forward` (attention_mask defaults to every token but padding)."""
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        states = self.encoder(input_ids, attention_mask)
        return self.decoder.hidden_states(decoder_input_ids, states, attention_mask)


# ---------------------------------------------------------------------- the autoregressive factorisation

def shift_right(image_tokens: torch.Tensor, start_token_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: (start, y_1, ..., y_{N-1}) from targets (y_1..y_N), shape (b, N)."""
    start = torch.full_like(image_tokens[:, :1], start_token_id)
    return torch.cat([start, image_tokens[:, :-1]], dim=1)


def sequence_log_likelihood(logits: torch.Tensor, image_tokens: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """log p(y | x) = sum_i log p(y_i | y_<i, x), per sequence: (b,).

    logits (b, N, V) from the teacher-forced pass (position i read y_<i only);
    p(. | y_<i, x) = softmax over the first `codebook_size` logits (the image codes, what sampling draws from).
    """
    # log p(y_i | y_<i, x): (b, N)
    log_p = logits[..., :codebook_size].float().log_softmax(dim=-1)
    per_token = log_p.gather(-1, image_tokens.unsqueeze(-1)).squeeze(-1)
    # the product of the conditionals, in log space
    return per_token.sum(dim=-1)


def autoregressive_loss(model: PartiTransformer, input_ids: torch.Tensor, image_tokens: torch.Tensor,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Teacher-forced cross-entropy L = -(1 / (b N)) sum_b sum_i log p(y_i | y_<i, x), a scalar.

    The decoder reads the true previous tokens (shifted right behind the start
    token) and is scored on the next one at every position at once.
    """
    config = model.config
    previous = shift_right(image_tokens, config.decoder_start_token_id)
    if config.codebook_factors is not None:
        # factorised codes: -log p(k) = sum_f -log softmax(l_f)[k_f] (`FactorisedHead`), the same number
        # without forming the prod_f K_f joint logits
        h = model.hidden_states(input_ids, previous, attention_mask)
        digits = code_digits(image_tokens, tuple(config.codebook_factors))
        return sum(F.cross_entropy(head(h).flatten(0, 1).float(), k.flatten())
                   for head, k in zip(model.decoder.lm_head.factors, digits))
    logits = model(input_ids, previous, attention_mask)
    # (b, N, C) -> (b*N, C) against (b*N,)
    return F.cross_entropy(logits[..., :config.codebook_size].flatten(0, 1).float(), image_tokens.flatten())
