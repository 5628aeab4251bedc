"""Positional encodings: the Transformer sinusoid, the diffusion timestep embedding, learned positions."""
import math

import pytest
import torch

from parti_from_scratch.nn.positional import (LearnedPositionalEmbedding, sinusoidal_position_encoding,
                                              timestep_embedding)


def test_sinusoid_formula_pointwise():
    pe = sinusoidal_position_encoding(50, 16, dtype=torch.float64)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            # float64: the angles (<= 49) are rounded differently on each side and sin/cos are within 1 ulp:
            # measured 1.7e-15; 1e-12 >= 500x
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)


def test_sinusoid_values_in_unit_interval():
    pe = sinusoidal_position_encoding(2048, 512)
    assert pe.abs().max() <= 1.0


@pytest.mark.parametrize("k", [1, 5, 33])
def test_sinusoid_shift_is_fixed_linear_map(k):
    """PE(pos + k) = PE(pos) M_k for one matrix M_k, the same at every pos."""
    n, d = 200, 32
    pe = sinusoidal_position_encoding(n + k, d, dtype=torch.float64)
    a, b = pe[:n], pe[k:n + k]
    # M_k is the block-diagonal rotation by k * omega_i predicted by trigonometry; it does not depend on pos
    expected = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d // 2):
        w = k / 10000 ** (2 * i / d)
        expected[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[math.cos(w), -math.sin(w)],
                                                                    [math.sin(w), math.cos(w)]], dtype=torch.float64)
    # float64: angles up to 233 rad carry a few ulps (2.8e-14 each) of rounding into sin/cos on both sides,
    # ~1e-13 at most (measured 1.2e-14): 1e-12 >= 10x
    torch.testing.assert_close(a @ expected, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("flip_sin_to_cos,downscale_freq_shift", [(True, 0), (False, 1), (True, 1), (False, 0)])
@pytest.mark.parametrize("dim", [32, 320, 7])
def test_timestep_embedding_matches_diffusers(flip_sin_to_cos, downscale_freq_shift, dim):
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 1, 17, 250, 999, 981.5])
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=downscale_freq_shift)
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=downscale_freq_shift)
    # float32 angles t w up to 999 rad (ulp 6.1e-5): both drift up to 5.9e-5 from float64, but ours performs
    # diffusers' float32 operations in the same order (measured 0 apart on any CPU: the same kernels on the same
    # shapes), so 1e-5 (~80 ulps of 1) checks that order, not the angle's rounding
    assert (ours - ref).abs().max() <= 1e-5


def test_timestep_embedding_values_in_unit_interval():
    emb = timestep_embedding(torch.arange(1000), 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert emb.abs().max() <= 1.0


def test_learned_positions_are_rows_of_weight():
    emb = LearnedPositionalEmbedding(77, 8)
    torch.testing.assert_close(emb(5, offset=2), emb.weight[2:7], rtol=0, atol=0)  # a lookup: exact
    with pytest.raises(ValueError, match="77 learned positions"):
        emb(78)
