"""Parti's encoder-decoder Transformer: the factorisation, its loss, the KV cache, and parity with min-dalle and MBart.

References (offline, tiny random weights; see tests/min_dalle_oracle.py):
- min-dalle's DalleBartEncoder/DalleBartDecoder for the DALL·E mini style;
- transformers' MBartForConditionalGeneration for Parti's standard pre-LN style.

Tolerance for the reference comparisons: both sides compute in float32 with the same operations
in a different order (einsum vs scaled_dot_product_attention, q scaled before vs after Q K^T,
masking by a -1e12 bias vs -inf, which give the same exp() = 0). Each reordered sum moves a value
by a few ulps; through 2 layers of 3 sub-layers, each re-normalised by a LayerNorm, the logits
(asserted |l| < 8, ulp 4.8e-7) move by at most a few tens of ulps: atol 1e-5, no rtol.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.nn.attention import MultiHeadAttention
from parti_from_scratch.parti.sampling import classifier_free_guidance, empty_prompt_ids
from parti_from_scratch.parti.transformer import (KVCache, PartiTransformer, PartiTransformerConfig,
                                                  autoregressive_loss, cached_self_attention, code_digits,
                                                  preset_config, sequence_log_likelihood, shift_right)
from min_dalle_oracle import one_thread  # noqa: F401  (autouse fixture)
from min_dalle_oracle import (MIN_DALLE_CODES, import_min_dalle, mbart_config, mbart_pair, min_dalle_config,
                              min_dalle_models, min_dalle_text_rows, ours_from_min_dalle)

ATOL = 1e-5          # see the module docstring
LOGIT_BOUND = 8.0    # the magnitude the tolerance's ulp count assumes


def tiny_config(**overrides) -> PartiTransformerConfig:
    base = dict(vocab_size=30, image_vocab_size=12, codebook_size=10, decoder_start_token_id=10, d_model=16,
                encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=4,
                encoder_ffn_dim=24, decoder_ffn_dim=20, max_text_positions=6, image_grid_size=(2, 3))
    return PartiTransformerConfig(**{**base, **overrides})


STYLES = {"dalle": {}, "pre_ln": dict(ffn_type="mlp", sublayer_post_norm=False, bias=True)}
FACTORISED = dict(codebook_factors=(5, 2))        # tiny_config's 10 codes as 5 x 2
# the decoders the cache is checked on: both layer styles, and the factorised embedding and head
DECODERS = {**STYLES, "factorised": {**STYLES["pre_ln"], **FACTORISED}}


def text(config: PartiTransformerConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Random prompts with some padding at the end of the later rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (batch, config.max_text_positions), generator=g)
    for b in range(1, batch):
        ids[b, config.max_text_positions - b:] = config.pad_token_id
    return ids


# ------------------------------------------------------------------------------------------------ config

def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ConfigError, match="decoder_attention_heads"):
        tiny_config(decoder_attention_heads=5)
    with pytest.raises(ConfigError, match="codebook_size"):
        tiny_config(codebook_size=13)
    with pytest.raises(ConfigError, match="decoder_start_token_id"):
        tiny_config(decoder_start_token_id=12)
    with pytest.raises(ConfigError, match="ffn_type"):
        tiny_config(ffn_type="swiglu")
    with pytest.raises(ValueError, match="preset"):
        preset_config("parti-20b")


@pytest.mark.parametrize("name", ["dalle-mini", "dalle-mega"])
def test_preset_sizes_match_min_dalle(name):
    """Our DALL·E mini/mega presets have exactly min-dalle's parameter count (built on the meta device)."""
    models = import_min_dalle()
    config = preset_config(name)
    with torch.device("meta"):
        ours = PartiTransformer(config)
        encoder = models.DalleBartEncoder(config.encoder_layers, config.d_model, config.encoder_attention_heads,
                                          config.vocab_size, config.max_text_positions, config.encoder_ffn_dim,
                                          "meta")
        decoder = models.DalleBartDecoder(config.image_vocab_size - 1, config.d_model,
                                          config.decoder_attention_heads, config.decoder_ffn_dim,
                                          config.decoder_layers, "meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours.encoder) == count(encoder) and count(ours.decoder) == count(decoder)
    # PARTI.md: mini about 0.44B, mega about 2.6B parameters
    expected = {"dalle-mini": 0.44e9, "dalle-mega": 2.6e9}[name]
    assert abs(count(ours) - expected) / expected < 0.05


def test_state_dict_keys_follow_min_dalle():
    """Our keys are min-dalle's with `glu.` read as `ffn.`: the rule of tests/min_dalle_oracle.py, and nothing else."""
    config = min_dalle_config()
    encoder, decoder = min_dalle_models(config)
    ours = PartiTransformer(config)
    assert set(ours.encoder.state_dict()) == {k.replace(".glu.", ".ffn.") for k in encoder.state_dict()}
    assert set(ours.decoder.state_dict()) == {k.replace(".glu.", ".ffn.") for k in decoder.state_dict()}


# ------------------------------------------------------------------------------ parity with min-dalle

def test_encoder_matches_min_dalle():
    config = min_dalle_config()
    encoder, decoder = min_dalle_models(config)
    ours = ours_from_min_dalle(config, encoder, decoder)
    ids = min_dalle_text_rows(config)          # min-dalle's encoder takes exactly 2 full-length rows
    with torch.no_grad():
        expected, got = encoder(ids), ours.encoder(ids)
    assert got.abs().max() < LOGIT_BOUND
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_decoder_logits_match_min_dalle_at_every_step():
    """Teacher-forced image tokens, batch [uncond; cond] x 2 images: min-dalle's cached step vs ours, cached and not."""
    config = min_dalle_config()
    encoder, decoder = min_dalle_models(config)
    ours = ours_from_min_dalle(config, encoder, decoder)
    n, N = 2, config.image_token_count
    ids = min_dalle_text_rows(config)
    rows = [0] * n + [1] * n
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, MIN_DALLE_CODES, (n, N), generator=g)
    prev = shift_right(y, config.decoder_start_token_id)
    with torch.no_grad():
        states = encoder(ids)[rows]
        text_mask = ids[rows] != config.pad_token_id
        attention_state = torch.zeros(config.decoder_layers, 4 * n, N, config.d_model)
        cache = ours.decoder.new_cache(ours.encoder(ids)[rows], text_mask)
        full = ours.decoder(prev.repeat(2, 1), ours.encoder(ids)[rows], text_mask)
        for i in range(N):
            expected, attention_state = decoder(attention_mask=text_mask[:, None, None, :], encoder_state=states,
                                                attention_state=attention_state, prev_tokens=prev[:, [i]],
                                                token_index=torch.arange(N)[[i]])
            got = ours.decoder(prev[:, [i]].repeat(2, 1), cache=cache)
            assert expected.abs().max() < LOGIT_BOUND
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"cached step {i}")
            torch.testing.assert_close(full[:, i:i + 1], expected, atol=ATOL, rtol=0, msg=f"full pass, position {i}")


# -------------------------------------------------------------------------- parity with transformers MBart

def test_standard_style_matches_mbart():
    config = mbart_config()
    reference, ours = mbart_pair(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (3, config.max_text_positions), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    decoder_ids = torch.randint(0, config.vocab_size, (3, config.image_token_count), generator=g)
    with torch.no_grad():
        expected_states = reference.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got_states = ours.encoder(ids, mask)
        got = ours(ids, decoder_ids, mask)
    assert expected.abs().max() < LOGIT_BOUND
    torch.testing.assert_close(got_states, expected_states, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_cached_decoding_matches_mbart():
    """Greedy decoding, both with their KV caches: MBart's past key/values vs ours (top_k=1, no guidance)."""
    from parti_from_scratch.parti.sampling import generate_image_tokens
    config = mbart_config()
    reference, ours = mbart_pair(config, seed=2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (3, config.max_text_positions), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    with torch.no_grad():
        encoder_outputs = reference.model.encoder(input_ids=ids, attention_mask=mask)
        cache = ours.decoder.new_cache(ours.encoder(ids, mask), mask)
        past, token, expected = None, torch.full((3, 1), config.decoder_start_token_id), []
        for i in range(config.image_token_count):
            out = reference(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=token,
                            cache=past, use_cache=True)
            # the step logits too: our cache against MBart's
            torch.testing.assert_close(ours.decoder(token, cache=cache), out.logits, atol=ATOL, rtol=0,
                                       msg=f"step {i}")
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            expected.append(token)
        expected = torch.cat(expected, dim=1)
    tokens = generate_image_tokens(ours, ids, mask, guidance_scale=1.0, top_k=1, progress=False)
    assert len(set(expected.flatten().tolist())) > 3, "the reference's greedy sequence is degenerate"
    assert torch.equal(tokens.flatten(1), expected)


# ------------------------------------------------------------------------------------------- the KV cache

def test_cached_self_attention():
    """Row i of the full causal pass equals attention of query i over the cache filled with positions <= i."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, qkv_bias=True)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        full = attn(x, causal=True)
        kv = torch.zeros(2, 3, 4, 7, 4)
        # the first three positions in one call, then one at a time
        rows = [cached_self_attention(attn, x[:, :3], kv, 0)]
        rows += [cached_self_attention(attn, x[:, i:i + 1], kv, i) for i in range(3, 7)]
        with pytest.raises(ValueError, match="cache holds 7 positions"):
            cached_self_attention(attn, x[:, :1], kv, 7)
    # same products, the softmax over fewer (masked-out) terms: a few ulps of values of size ~1
    torch.testing.assert_close(torch.cat(rows, dim=1), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("style", sorted(DECODERS))
def test_kv_cache(style):
    """Cached and uncached logits agree at every position to 1e-5 (fp32), batch 2 x [uncond; cond], and guided."""
    config = tiny_config(**DECODERS[style])
    torch.manual_seed(0)
    model = PartiTransformer(config).eval()
    n, N = 2, config.image_token_count
    ids = torch.cat([empty_prompt_ids(n, config.max_text_positions, config), text(config, n)])
    mask = ids != config.pad_token_id
    y = torch.randint(0, config.codebook_size, (n, N))
    prev = shift_right(y, config.decoder_start_token_id).repeat(2, 1)
    with torch.no_grad():
        states = model.encoder(ids, mask)
        full = model.decoder(prev, states, mask)
        cache = model.decoder.new_cache(states, mask)
        steps = torch.cat([model.decoder(prev[:, i:i + 1], cache=cache) for i in range(N)], dim=1)
    assert cache.length == N
    assert cache.self_kv.numel() == KVCache.self_kv_numel(config, 2 * n)
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)
    guided_steps = classifier_free_guidance(steps[n:], steps[:n], 1.2)
    guided_full = classifier_free_guidance(full[n:], full[:n], 1.2)
    # guidance adds 1 + 2 * 1.2 = 3.4 times the logits' error at most
    torch.testing.assert_close(guided_steps, guided_full, atol=3.4 * ATOL, rtol=0)


def test_decoder_refuses_positions_beyond_the_grid():
    config = tiny_config()
    model = PartiTransformer(config).eval()
    ids = text(config, 1)
    with torch.no_grad(), pytest.raises(ValueError, match="learned positions"):
        model(ids, torch.zeros(1, config.image_token_count + 1, dtype=torch.long))


# ------------------------------------------------------------------------ the autoregressive factorisation

@pytest.mark.parametrize("style", sorted(STYLES))
def test_autoregressive_factorisation(style):
    """p(y|x) = prod_i p(y_i | y_<i, x) is a distribution: over all C^N grids it sums to 1 (only if the
    decoder is causal), and the teacher-forced product equals the product of step-by-step conditionals."""
    config = tiny_config(codebook_size=3, image_vocab_size=4, decoder_start_token_id=3, image_grid_size=(1, 4),
                         **STYLES[style])
    torch.manual_seed(1)
    model = PartiTransformer(config).eval()
    grids = torch.tensor(list(itertools.product(range(3), repeat=4)))           # (81, 4)
    ids = text(config, 1).expand(len(grids), -1)
    with torch.no_grad():
        logits = model(ids, shift_right(grids, config.decoder_start_token_id))
        log_p = sequence_log_likelihood(logits, grids, config.codebook_size).double()
        # 81 probabilities, each a product of 4 float32 softmax terms: a few ulps each
        torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)
        # step by step: p(y_i | y_<i, x) from a decoder that is given only the prefix y_<i
        y = grids[37:38]
        stepwise = 0.0
        for i in range(4):
            step_logits = model(ids[:1], shift_right(y, config.decoder_start_token_id)[:, :i + 1])[:, -1]
            stepwise += step_logits[:, :3].log_softmax(-1)[0, y[0, i]].item()
    assert abs(stepwise - log_p[37].item()) < 1e-5


@pytest.mark.parametrize("codes", ["one codebook", "factorised"])
def test_autoregressive_loss(codes):
    """L = -(1/(bN)) sum log p(y_i | y_<i, x), and it trains: one gradient step on a batch lowers it. With
    factorised codes the loss sums the factors' cross-entropies without forming the joint logits; it equals
    the same L computed from the joint logits."""
    config = tiny_config(**(FACTORISED if codes == "factorised" else {}))
    torch.manual_seed(2)
    model = PartiTransformer(config)
    ids = text(config, 3)
    y = torch.randint(0, config.codebook_size, (3, config.image_token_count))
    loss = autoregressive_loss(model, ids, y)
    logits = model(ids, shift_right(y, config.decoder_start_token_id))
    expected = -sequence_log_likelihood(logits, y, config.codebook_size).sum() / y.numel()
    # two summation orders of ~18 terms ~ 2; factorised, each term is itself the sum of two log-softmaxes
    torch.testing.assert_close(loss, expected, atol=1e-6 if codes == "one codebook" else 2e-6, rtol=0)
    loss.backward()
    # every parameter learns (DDP refuses a parameter without a gradient)
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    assert autoregressive_loss(model, ids, y) < loss


# ------------------------------------------------------------------------------------- factorised codes

def test_code_digits_are_mixed_radix():
    """k = sum_f k_f prod_{g > f} K_g, the last factor varying fastest."""
    a, c = code_digits(torch.arange(10), (5, 2))
    assert a.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and c.tolist() == [0, 1] * 5
    # 23 = 1 * (3 * 4) + 2 * 4 + 3
    assert [d.item() for d in code_digits(torch.tensor(23), (2, 3, 4))] == [1, 2, 3]


def test_factorised_config_is_checked():
    with pytest.raises(ConfigError, match="product"):
        tiny_config(codebook_factors=(3, 3))              # 9 != 10 codes
    with pytest.raises(ConfigError, match="product"):
        tiny_config(codebook_factors=(10,))               # one factor is no factorisation
    with pytest.raises(ConfigError, match="after the"):
        # the start token's id must not be one of the codes
        tiny_config(codebook_factors=(2, 2), codebook_size=4, image_vocab_size=12, decoder_start_token_id=2)


def test_factorised_embedding_rows_are_sums_of_factor_rows():
    """E[k] = E_a[k // 2] + E_c[k mod 2] for the 10 codes; the start token (id 10) has its own row."""
    torch.manual_seed(0)
    embed = PartiTransformer(tiny_config(**FACTORISED)).decoder.embed_tokens
    with torch.no_grad():
        rows = embed(torch.arange(12)[None])[0]
    E_a, E_c, E_s = embed.factors[0].weight, embed.factors[1].weight, embed.special.weight
    for k in range(10):
        # one float32 addition, the same on both sides
        assert torch.equal(rows[k], E_a[k // 2] + E_c[k % 2]), k
    assert torch.equal(rows[10], E_s[0]) and torch.equal(rows[11], E_s[1])


def test_factorised_head_softmax_is_the_product_of_the_factors_softmaxes():
    """l[k] = l_a[k // 2] + l_c[k mod 2], so log softmax(l)[k] = log softmax(l_a)[k // 2] + log softmax(l_c)[k mod 2]:
    the two factors are independent given h."""
    torch.manual_seed(0)
    head = PartiTransformer(tiny_config(**FACTORISED)).decoder.lm_head
    h = torch.randn(4, 16)
    with torch.no_grad():
        logits = head(h)                                                   # (4, 10 + 2)
        l_a, l_c = head.factors[0](h), head.factors[1](h)                  # the factors' own logits
    assert logits.shape == (4, 12)
    k = torch.arange(10)
    # the same float32 additions on both sides: equal bit for bit
    assert torch.equal(logits[:, :10], l_a[:, k // 2] + l_c[:, k % 2])
    assert torch.equal(logits[:, 10:], torch.zeros(4, 2))          # the special tokens: never drawn, no weights
    joint = logits[:, :10].double().log_softmax(-1)
    product = l_a.double().log_softmax(-1)[:, k // 2] + l_c.double().log_softmax(-1)[:, k % 2]
    # float32 logits (|l| < 8 here, ulp 4.8e-7) summed in two orders
    assert l_a.abs().max() + l_c.abs().max() < LOGIT_BOUND
    torch.testing.assert_close(joint, product, atol=2e-6, rtol=0)


def test_factorised_autoregressive_factorisation_sums_to_one():
    """With factorised codes p(y | x) is still a distribution over every grid of the 4 = 2 x 2 codes."""
    config = tiny_config(codebook_size=4, image_vocab_size=5, decoder_start_token_id=4, image_grid_size=(1, 3),
                         codebook_factors=(2, 2), **STYLES["pre_ln"])
    torch.manual_seed(2)
    model = PartiTransformer(config).eval()
    grids = torch.tensor(list(itertools.product(range(4), repeat=3)))         # (64, 3)
    ids = text(config, 1).expand(len(grids), -1)
    with torch.no_grad():
        log_p = sequence_log_likelihood(model(ids, shift_right(grids, 4)), grids, 4).double()
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)

