"""Sampling image tokens: guidance, temperature, top-k, top-p, and the cached generation loop.

Filter outputs are compared with closed forms on small logits chosen so the answer is known
(ties, k larger than the vocabulary, p = 1), and with transformers' logits processors and
min-dalle's sampler as references.

Tolerance of a float32 softmax against its float64 closed form: exp is within 1 ulp (tests/tolerances.py)
and the normalising sum of <= 6 terms adds a few more; on probabilities <= 1 that is < 1e-6.
"""
from __future__ import annotations

import math

import pytest
import torch

from parti_from_scratch.parti.sampling import (apply_temperature, check_sampling_arguments, classifier_free_guidance,
                                               empty_prompt_ids, filtered_distribution, generate_image_tokens,
                                               top_k_filter, top_p_filter)
from parti_from_scratch.parti.transformer import PartiTransformer, PartiTransformerConfig
from min_dalle_oracle import one_thread  # noqa: F401  (autouse fixture)
from min_dalle_oracle import min_dalle_config, min_dalle_models, min_dalle_sample, min_dalle_text_rows, \
    ours_from_min_dalle

PROB_ATOL = 1e-6     # see the module docstring


def closed_form(weights) -> torch.Tensor:
    """A distribution proportional to `weights`, in float64."""
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


def assert_distribution(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), expected, atol=PROB_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ guidance

def test_classifier_free_guidance():
    """l_u + lambda (l_c - l_u) equals min-dalle's "supercondition" l_u (1 - s) + l_c s and transformers' CFG."""
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 11, generator=g, dtype=torch.float64), torch.randn(3, 11, generator=g,
                                                                                    dtype=torch.float64)
    for scale in (0.0, 1.0, 1.2, 3.0, 16.0):
        guided = classifier_free_guidance(cond, uncond, scale)
        supercondition = uncond * (1 - scale) + cond * scale
        # the two forms are the same polynomial: float64 rounding of terms of size <= 16 * 4
        torch.testing.assert_close(guided, supercondition, atol=1e-12, rtol=0)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond, atol=0, rtol=0)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond, atol=1e-15, rtol=0)

    transformers = pytest.importorskip("transformers")
    processor = transformers.ClassifierFreeGuidanceLogitsProcessor(1.2)
    # transformers stacks [cond; uncond] in one batch; ours is called with the halves
    expected = processor(torch.zeros(3, 1, dtype=torch.long), torch.cat([cond, uncond]))
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.2), expected, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ filters

def test_apply_temperature():
    """softmax(l / T) for l = log(1, 2, 4): T = 1 gives (1, 2, 4)/7, T = 2 gives (1, sqrt 2, 2)/(3 + sqrt 2)."""
    logits = torch.tensor([0.0, math.log(2), math.log(4)])
    assert_distribution(apply_temperature(logits, 1.0).softmax(-1), closed_form([1, 2, 4]))
    assert_distribution(apply_temperature(logits, 2.0).softmax(-1), closed_form([1, math.sqrt(2), 2]))
    assert_distribution(apply_temperature(logits, 0.5).softmax(-1), closed_form([1, 4, 16]))


TIES = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0, 0.0]])


def test_top_k_filter():
    """Ties with the k-th largest are kept; k > V keeps everything; as transformers' TopKLogitsWarper."""
    e = math.e
    # k = 1: both 3s survive
    assert_distribution(top_k_filter(TIES, 1).softmax(-1)[0], closed_form([1, 0, 1, 0, 0, 0]))
    # k = 3: the third largest is a 2, tied with another 2: four survive
    assert_distribution(top_k_filter(TIES, 3).softmax(-1)[0], closed_form([e ** 3, 0, e ** 3, e ** 2, e ** 2, 0]))
    # k = 6 and k = 10 > V: nothing is removed
    for k in (6, 10):
        assert torch.equal(top_k_filter(TIES, k), TIES)

    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(1)
    random_logits = torch.randint(-3, 4, (4, 9), generator=g).float()     # many ties
    for k in (1, 2, 4, 9, 20):
        expected = transformers.TopKLogitsWarper(top_k=k)(None, random_logits.clone())
        assert torch.equal(top_k_filter(random_logits, k), expected), k


def test_top_p_filter():
    """Keep the most probable tokens whose mass first reaches p, and their ties; p = 1 keeps all."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    # p = 0.4: 0.5 alone reaches it
    assert_distribution(top_p_filter(logits, 0.4).softmax(-1)[0], closed_form([1, 0, 0, 0]))
    # p = 0.7: 0.5 + 0.25 = 0.75 reaches it
    assert_distribution(top_p_filter(logits, 0.7).softmax(-1)[0], closed_form([2, 1, 0, 0]))
    # p = 0.8: reached at the first 0.125, whose tie is kept too
    assert_distribution(top_p_filter(logits, 0.8).softmax(-1)[0], closed_form([4, 2, 1, 1]))
    # p = 1: every token, including one whose probability (~1e-30) is lost in the running sum's rounding
    tail = torch.tensor([[0.0, 0.0, -69.0]])
    assert torch.equal(top_p_filter(tail, 1.0), tail)
    # after a top-k filter the removed tokens stay removed
    assert torch.isinf(top_p_filter(top_k_filter(TIES, 1), 0.9)[0, [1, 3, 4, 5]]).all()

    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(2)
    random_logits = 2 * torch.randn(5, 12, generator=g)        # no ties
    for p in (0.1, 0.5, 0.9, 0.99):
        expected = transformers.TopPLogitsWarper(top_p=p)(None, random_logits.clone())
        assert torch.equal(top_p_filter(random_logits, p), expected), p


def test_filtered_distribution():
    """softmax(top_p(top_k(l / T))) on TIES with T = 0.5: l / T = (6, 2, 6, 4, 4, 0); top-k 3 keeps 6, 6, 4, 4;
    their probabilities (e^6, e^6, e^4, e^4) / (2 e^6 + 2 e^4) run up to 0.44, 0.88, 0.94, 1:
    top-p 0.85 keeps the two 6s, top-p 0.9 all four (the 4s are tied)."""
    e = math.e
    kept = closed_form([e ** 6, 0, e ** 6, e ** 4, e ** 4, 0])
    assert_distribution(filtered_distribution(TIES, 0.5, top_k=3)[0], kept)
    assert_distribution(filtered_distribution(TIES, 0.5, top_k=3, top_p=0.85)[0], closed_form([1, 0, 1, 0, 0, 0]))
    assert_distribution(filtered_distribution(TIES, 0.5, top_k=3, top_p=0.9)[0], kept)
    assert_distribution(filtered_distribution(TIES)[0], closed_form([e ** v for v in TIES[0].tolist()]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(guidance_scale=-0.5), "guidance_scale"), (dict(guidance_scale=float("inf")), "guidance_scale"),
])
def test_bad_sampling_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        check_sampling_arguments(**kwargs)
    model = PartiTransformer(tiny_config())
    with pytest.raises(ValueError, match=name):
        generate_image_tokens(model, torch.full((1, 4), 5), progress=False, **kwargs)


# --------------------------------------------------------------------------------------- the generation loop

def tiny_config(**overrides) -> PartiTransformerConfig:
    base = dict(vocab_size=30, image_vocab_size=12, codebook_size=10, decoder_start_token_id=10, d_model=16,
                encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=24, decoder_ffn_dim=24, max_text_positions=6, image_grid_size=(2, 3))
    return PartiTransformerConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    ids = torch.randint(3, config.vocab_size, (2, config.max_text_positions))
    ids[1, 4:] = config.pad_token_id
    return PartiTransformer(config).eval(), ids


def test_empty_prompt_ids():
    config = tiny_config()
    assert empty_prompt_ids(2, 6, config).tolist() == [[0, 2, 1, 1, 1, 1]] * 2


def test_generation_is_reproducible():
    """The same generator seed gives the same tokens; the result is the (n, rows, columns) grid of codes."""
    model, ids = tiny_model()
    run = lambda seed: generate_image_tokens(model, ids, guidance_scale=1.5, temperature=1.5,  # noqa: E731
                                             generator=torch.Generator().manual_seed(seed), progress=False)
    first = run(7)
    assert first.shape == (2, 2, 3) and first.dtype == torch.long
    assert ((first >= 0) & (first < model.config.codebook_size)).all()
    assert torch.equal(run(7), first)
    assert not torch.equal(run(8), first)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_generation_cached_equals_uncached(guidance_scale):
    """Same seed, with and without the KV cache: the same tokens (the per-step distributions agree to ~1e-6)."""
    model, ids = tiny_model(seed=3)
    tokens = [generate_image_tokens(model, ids, guidance_scale=guidance_scale, top_p=0.9, use_cache=use_cache,
                                    generator=torch.Generator().manual_seed(11), progress=False)
              for use_cache in (True, False)]
    assert torch.equal(tokens[0], tokens[1])


def test_guidance_zero_is_the_unconditional_model():
    """lambda = 0 samples from the unconditional rows alone: as generating from the empty prompt unguided."""
    model, ids = tiny_model(seed=4)
    empty = empty_prompt_ids(2, ids.shape[1], model.config)
    unguided_empty = generate_image_tokens(model, empty, guidance_scale=1.0, progress=False,
                                           generator=torch.Generator().manual_seed(5))
    guided_zero = generate_image_tokens(model, ids, guidance_scale=0.0, progress=False,
                                        generator=torch.Generator().manual_seed(5))
    assert torch.equal(guided_zero, unguided_empty)


def test_generation_progress_bar(capsys):
    model, ids = tiny_model()
    generate_image_tokens(model, ids, progress=False)
    assert "image tokens" not in capsys.readouterr().err
    generate_image_tokens(model, ids, progress=True)
    assert "image tokens" in capsys.readouterr().err


def test_guided_top_k_sampling_matches_min_dalle():
    """The same tokens as min-dalle's guided top-k sampler for the same seed, 2 images x 12 tokens, 2 settings.

    Both draw with torch.multinomial(weights, 1), which for one sample takes argmax_j w_j / q_j
    with q_j ~ Exp(1): the choice does not depend on the weights' scale, so min-dalle's
    unnormalised exp(l - max) and our probabilities pick the same token from the same draws.
    min-dalle seeds the global generator with torch.manual_seed(s); a torch.Generator seeded
    with s starts in the same state. Its order of operations (top-k on guided logits, then
    temperature) gives the same distribution as ours (temperature, then top-k), since division by
    T > 0 preserves the order of the logits.
    """
    config = min_dalle_config()
    encoder, decoder = min_dalle_models(config)
    ours = ours_from_min_dalle(config, encoder, decoder)
    text_rows = min_dalle_text_rows(config)
    for seed, temperature, top_k, scale in ((1, 0.7, 5, 16.0), (2, 2.0, 1000, 1.2)):
        expected = min_dalle_sample(encoder, decoder, text_rows, image_count=2,
                                    image_token_count=config.image_token_count, seed=seed, temperature=temperature,
                                    top_k=top_k, supercondition_factor=scale)
        got = generate_image_tokens(ours, text_rows[1:].repeat(2, 1), uncond_input_ids=text_rows[:1].repeat(2, 1),
                                    guidance_scale=scale, temperature=temperature, top_k=top_k,
                                    generator=torch.Generator().manual_seed(seed), progress=False)
        assert torch.equal(got.flatten(1), expected), (seed, got.flatten(1), expected)
