"""Tiny random min-dalle and transformers MBart models: the references the Parti Transformer tests compare against.

Shared by tests/test_parti_transformer.py, tests/test_parti_sampling.py and benchmarks/ar_decode.py.
min-dalle and transformers are imported here only, as test-time oracles; the library never imports them.

min-dalle's quirks handled here:
- importing it runs `torch.set_grad_enabled(False)` and `torch.set_num_threads(os.cpu_count())`:
  `import_min_dalle` restores both;
- the decoder's token count is the module constant IMAGE_TOKEN_COUNT read at construction:
  `min_dalle_models` sets it for the build and puts 256 back;
- its encoder's positions are a fixed (2, text_token_count) tensor: feed exactly 2 rows of
  text_token_count tokens;
- its generation loop lives in `MinDalle` (which downloads weights); `min_dalle_sample` runs the
  same steps as `MinDalle.generate_raw_image_stream` (rows [uncond]*n + [cond]*n, the
  (layers, 4n, N, d) cache, start token 2**14 - 1, the global RNG seeded with torch.manual_seed)
  around min-dalle's own `DalleBartDecoder.sample_tokens`.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

import pytest
import torch
from torch import nn

from parti_from_scratch.parti.transformer import PartiTransformer, PartiTransformerConfig

MIN_DALLE_START = 2 ** 14 - 1          # min-dalle's decoder start token
MIN_DALLE_CODES = 2 ** 14              # min-dalle samples only the first 2**14 logits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a busy machine idle threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def import_min_dalle():
    """min_dalle.models, imported with autograd and the thread count restored afterwards."""
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    try:
        models = pytest.importorskip("min_dalle.models")
    finally:
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
    return models


def randomize_(module: nn.Module, seed: int, std: float = 0.15) -> nn.Module:
    """Every parameter drawn at random (LayerNorm weights around 1), so no term of the forward pass is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                centre = 1.0 if isinstance(m, nn.LayerNorm) and pname == "weight" else 0.0
                p.copy_(centre + std * torch.randn(p.shape, generator=g))
    return module


def min_dalle_config(**sizes) -> PartiTransformerConfig:
    """Our config in the DALL·E mini style with min-dalle's special tokens, at the given sizes."""
    base = dict(vocab_size=40, image_vocab_size=MIN_DALLE_CODES + 1, codebook_size=MIN_DALLE_CODES,
                decoder_start_token_id=MIN_DALLE_START, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                max_text_positions=8, image_grid_size=(3, 4))
    return PartiTransformerConfig(**{**base, **sizes})


def min_dalle_models(config: PartiTransformerConfig, seed: int = 0):
    """min-dalle's DalleBartEncoder and DalleBartDecoder at `config`'s sizes, random weights, eval mode."""
    models = import_min_dalle()
    decoder_module = models.dalle_bart_decoder
    assert config.encoder_layers == config.decoder_layers and config.encoder_ffn_dim == config.decoder_ffn_dim
    assert config.encoder_attention_heads == config.decoder_attention_heads
    encoder = models.DalleBartEncoder(layer_count=config.encoder_layers, embed_count=config.d_model,
                                      attention_head_count=config.encoder_attention_heads,
                                      text_vocab_count=config.vocab_size, text_token_count=config.max_text_positions,
                                      glu_embed_count=config.encoder_ffn_dim, device="cpu")
    decoder_module.IMAGE_TOKEN_COUNT = config.image_token_count
    try:
        decoder = models.DalleBartDecoder(image_vocab_count=config.image_vocab_size - 1, embed_count=config.d_model,
                                          attention_head_count=config.decoder_attention_heads,
                                          glu_embed_count=config.decoder_ffn_dim, layer_count=config.decoder_layers,
                                          device="cpu")
    finally:
        decoder_module.IMAGE_TOKEN_COUNT = 256
    return randomize_(encoder, seed).eval(), randomize_(decoder, seed + 1).eval()


def from_min_dalle_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The one renaming rule from min-dalle's keys to ours: the feed-forward `glu.` is our `ffn.`."""
    return {re.sub(r"\.glu\.", ".ffn.", k): v for k, v in state.items()}


def ours_from_min_dalle(config: PartiTransformerConfig, encoder: nn.Module, decoder: nn.Module) -> PartiTransformer:
    """Our model holding min-dalle's weights, loaded strictly (every key used, every parameter filled)."""
    model = PartiTransformer(config).eval()
    model.encoder.load_state_dict(from_min_dalle_state(encoder.state_dict()), strict=True)
    model.decoder.load_state_dict(from_min_dalle_state(decoder.state_dict()), strict=True)
    return model


def min_dalle_text_rows(config: PartiTransformerConfig, seed: int = 3) -> torch.Tensor:
    """The two text rows min-dalle's encoder takes: [<s></s> + padding; a prompt of random ids + padding]."""
    g = torch.Generator().manual_seed(seed)
    T = config.max_text_positions
    ids = torch.full((2, T), config.pad_token_id, dtype=torch.long)
    ids[0, :2] = torch.tensor([config.bos_token_id, config.eos_token_id])
    length = T - 2
    ids[1, :length] = torch.randint(3, config.vocab_size, (length,), generator=g)
    ids[1, 0], ids[1, length - 1] = config.bos_token_id, config.eos_token_id
    return ids


@torch.no_grad()
def min_dalle_sample(encoder: nn.Module, decoder: nn.Module, text_rows: torch.Tensor, image_count: int,
                     image_token_count: int, seed: int, temperature: float, top_k: int,
                     supercondition_factor: float) -> torch.Tensor:
    """min-dalle's guided top-k sampling loop (the steps of MinDalle.generate_raw_image_stream), tokens (n, N)."""
    encoder_state = encoder(text_rows)
    expanded = [0] * image_count + [1] * image_count
    text_tokens, encoder_state = text_rows[expanded], encoder_state[expanded]
    attention_mask = text_tokens.not_equal(1)[:, None, None, :]
    layers, width = decoder.layer_count, decoder.embed_count
    attention_state = torch.zeros(layers, image_count * 4, image_token_count, width)
    image_tokens = torch.full((image_count, image_token_count + 1), MIN_DALLE_START, dtype=torch.long)
    torch.manual_seed(seed)
    token_indices = torch.arange(image_token_count)
    settings = torch.tensor([temperature, top_k, supercondition_factor], dtype=torch.float32)
    for i in range(image_token_count):
        image_tokens[:, i + 1], attention_state = decoder.sample_tokens(
            settings=settings, attention_mask=attention_mask, encoder_state=encoder_state,
            attention_state=attention_state, prev_tokens=image_tokens[:, [i]], token_index=token_indices[[i]])
    return image_tokens[:, 1:]


# ------------------------------------------------------------------------------------ transformers MBart

MBART_RULES: Tuple[Tuple[str, str], ...] = (
    (r"^model\.", ""),
    (r"\.self_attn_layer_norm\.", ".pre_self_attn_layer_norm."),
    (r"\.encoder_attn_layer_norm\.", ".pre_encoder_attn_layer_norm."),
    (r"\.final_layer_norm\.", ".ffn.ln0."),
    (r"\.fc1\.", ".ffn.fc0."),
    (r"\.fc2\.", ".ffn.fc2."),
    (r"^(encoder|decoder)\.layer_norm\.", r"\1.final_ln."),
    (r"^lm_head\.", "decoder.lm_head."),
)


def mbart_config(**sizes) -> PartiTransformerConfig:
    """Our config in Parti's standard pre-LN style (MLP feed-forward, biases, no post-norms)."""
    base = dict(vocab_size=50, image_vocab_size=50, codebook_size=50, decoder_start_token_id=2, d_model=32,
                encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=48, decoder_ffn_dim=40, max_text_positions=10, image_grid_size=(2, 5),
                ffn_type="mlp", sublayer_post_norm=False, bias=True, scale_embedding=True)
    return PartiTransformerConfig(**{**base, **sizes})


def mbart_pair(config: PartiTransformerConfig, seed: int = 0):
    """A tiny random transformers MBartForConditionalGeneration and ours with its weights (loaded by rule)."""
    transformers = pytest.importorskip("transformers")
    assert config.vocab_size == config.image_vocab_size and config.max_text_positions == config.image_token_count
    reference = transformers.MBartForConditionalGeneration(transformers.MBartConfig(
        vocab_size=config.vocab_size, d_model=config.d_model, encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers, encoder_attention_heads=config.encoder_attention_heads,
        decoder_attention_heads=config.decoder_attention_heads, encoder_ffn_dim=config.encoder_ffn_dim,
        decoder_ffn_dim=config.decoder_ffn_dim, max_position_embeddings=config.max_text_positions,
        activation_function="gelu", scale_embedding=config.scale_embedding, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, decoder_start_token_id=config.decoder_start_token_id,
        tie_word_embeddings=False))   # an lm_head of its own, so greedy decoding does not echo its input
    randomize_(reference, seed).eval()
    # the logits bias is a zero buffer, not a parameter: ours has none
    assert not reference.final_logits_bias.any()
    ours = PartiTransformer(config).eval()
    state = {}
    for key, value in reference.state_dict().items():
        if key in ("model.shared.weight", "final_logits_bias"):
            continue                              # tied to both embed_tokens / a zero buffer
        for pattern, replacement in MBART_RULES:
            key = re.sub(pattern, replacement, key)
        if key.endswith("embed_positions.weight"):
            value = value[2:]                     # MBart offsets positions by 2
        state[key] = value
    ours.load_state_dict(state, strict=True)
    return reference, ours
