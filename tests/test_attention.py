"""Tutorial §4.1: Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, its masks and its multi-head form."""
import math

import pytest
import torch

from parti_from_scratch.nn.attention import (MultiHeadAttention, attention_backend, attention_weights, causal_mask,
                                             explicit_attention, merge_heads, padding_mask,
                                             scaled_dot_product_attention, split_heads)

# float32, two orders of the same sums: |out| <= max|v| <= 4.2 (randn); scores are d <= 64-term dot products
# (|s| <= 5), outputs n_k <= 19-term weighted sums; with sqrt(n) accumulation the two differ by about
# eps * max|v| * (sqrt(d) |s| + n_k) <= 2.9e-5 at the extremes, ~3e-7 measured; 1e-5 = 20 ulps of 4.
TOL = dict(atol=1e-5, rtol=0)


def test_scaled_dot_product_attention_matches_equation_by_hand():
    # Two queries, three keys, d_k = 2: compute softmax(QK^T/sqrt(2))V with plain Python floats.
    q = [[1.0, 0.0], [0.0, 2.0]]
    k = [[1.0, 1.0], [0.0, 1.0], [-1.0, 0.5]]
    v = [[1.0, 2.0, 3.0], [0.0, -1.0, 0.5], [4.0, 0.0, -2.0]]
    expected = []
    for qi in q:
        s = [sum(a * b for a, b in zip(qi, kj)) / math.sqrt(2) for kj in k]
        e = [math.exp(x) for x in s]
        w = [x / sum(e) for x in e]
        expected.append([sum(w[j] * v[j][c] for j in range(3)) for c in range(3)])
    got = explicit_attention(torch.tensor(q, dtype=torch.float64), torch.tensor(k, dtype=torch.float64),
                             torch.tensor(v, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(12))
def test_fused_attention_equals_explicit(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 4, (1,), generator=g))
    h = int(torch.randint(1, 9, (1,), generator=g))
    n_q = int(torch.randint(1, 20, (1,), generator=g))
    n_k = n_q if seed % 2 == 0 else int(torch.randint(1, 20, (1,), generator=g))
    d = int(torch.randint(1, 65, (1,), generator=g))
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (n_q, n_k, n_k))
    mask = None
    if seed % 3 == 1:  # padding mask: keep at least the first key for every row
        lengths = torch.randint(1, n_k + 1, (b,), generator=g)
        mask = padding_mask((torch.arange(n_k)[None] < lengths[:, None]).long())
    elif seed % 3 == 2:  # arbitrary boolean mask with the first key always visible
        mask = torch.rand(b, h, n_q, n_k, generator=g) > 0.5
        mask[..., 0] = True
    causal = seed % 4 == 3 and n_q <= n_k
    ref = explicit_attention(q, k, v, mask=mask, causal=causal)
    with attention_backend("fused"):
        fused = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)
    assert (ref - fused).abs().max() <= TOL["atol"]
    with attention_backend("explicit"):
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask=mask, causal=causal), ref, **TOL)


def test_attention_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    a = attention_weights(q, k, mask=(torch.rand(2, 3, 5, 7, generator=g) > 0.3) | (torch.arange(7) == 0))
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 5))
    assert (a >= 0).all()


def test_masked_key_gets_zero_weight():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    keep = torch.tensor([1, 1, 0, 1, 0, 1])
    a = attention_weights(q, k, padding_mask(keep[None]))
    assert (a[..., keep == 0] == 0).all()
    # and its value cannot influence the output
    v2 = v.clone()
    v2[..., keep == 0, :] = 1e6
    torch.testing.assert_close(explicit_attention(q, k, v2, padding_mask(keep[None])),
                               explicit_attention(q, k, v, padding_mask(keep[None])), **TOL)


def test_causal_mask_hides_future_keys():
    m = causal_mask(4)
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [True, True, True, False], [True, True, True, True]]
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 4, 3, generator=g), torch.randn(1, 1, 4, 3, generator=g)
    a = attention_weights(q, k, m)
    assert (a.triu(diagonal=1) == 0).all()


def test_permuting_keys_and_values_leaves_output_unchanged():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 5, 16, generator=g), torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 4, generator=g)
    perm = torch.randperm(9, generator=g)
    torch.testing.assert_close(explicit_attention(q, k[:, perm], v[:, perm]), explicit_attention(q, k, v), **TOL)


def test_multi_head_split_merge_round_trip():
    x = torch.randn(2, 7, 24)
    heads = split_heads(x, 6)
    assert heads.shape == (2, 6, 7, 4)
    # head i holds columns [4i, 4i+4) of the feature axis
    torch.testing.assert_close(heads[:, 1], x[..., 4:8])
    torch.testing.assert_close(merge_heads(heads), x)


def test_multi_head_attention_equals_per_head_loop():
    torch.manual_seed(4)
    mha = MultiHeadAttention(dim=12, n_heads=3, context_dim=10, inner_dim=18)
    x, ctx = torch.randn(2, 5, 12), torch.randn(2, 4, 10)
    q, k, v = mha.q_proj(x), mha.k_proj(ctx), mha.v_proj(ctx)
    heads = []
    for i in range(3):
        s = slice(6 * i, 6 * (i + 1))
        heads.append(explicit_attention(q[..., s], k[..., s], v[..., s]))
    expected = mha.out_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(mha(x, context=ctx), expected, **TOL)


def test_bad_backend_name_is_refused():
    with pytest.raises(ValueError, match="attention backend"):
        with attention_backend("flash"):
            pass


def test_query_with_no_visible_key_outputs_zero_in_both_backends():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = False          # query 1 sees nothing
    with attention_backend("explicit"):
        ref = scaled_dot_product_attention(q, k, v, mask=mask)
    with attention_backend("fused"):
        fused = scaled_dot_product_attention(q, k, v, mask=mask)
    assert torch.isfinite(ref).all()
    assert (ref[..., 1, :] == 0).all()
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_joint_qkv_projection_equals_three_projections(bias):
    """x [W^Q, W^K, W^V] + [b^Q, b^K, b^V], split in three, equals q_proj(x), k_proj(x), v_proj(x)."""
    torch.manual_seed(6)
    mha = MultiHeadAttention(dim=48, n_heads=4, inner_dim=64, qkv_bias=bias)
    x = torch.randn(2, 150, 48)
    joint = mha.project_qkv(x)
    for got, proj in zip(joint, (mha.q_proj, mha.k_proj, mha.v_proj)):
        expected = split_heads(proj(x), 4)
        # each entry is the same 48-term dot product (+ bias); the two matrix products may block the sum
        # differently, which moves it by at most 48 * eps * sum_i |x_i w_i| (+ eps |b|): that bound, per entry
        bound = 48 * 2.0 ** -23 * split_heads(x.abs() @ proj.weight.abs().T, 4)
        if bias:
            bound = bound + 2.0 ** -23 * split_heads(proj.bias.abs().expand(2, 150, 64), 4)
        assert ((got - expected).abs() <= bound).all()


def test_self_attention_over_many_tokens_fused_equals_explicit():
    """The default self-attention path (joint Q/K/V product, fused kernel) against the explicit one (three
    projections, the equation written out), on more rows than `min_joint_qkv_rows`."""
    torch.manual_seed(7)
    mha = MultiHeadAttention(dim=40, n_heads=5)
    x = torch.randn(2, 600, 40)
    assert x.shape[:-1].numel() >= mha.min_joint_qkv_rows
    with attention_backend("explicit"):
        expected = mha(x)
    with attention_backend("fused"):
        got = mha(x)
    # as TOL's derivation with n_k = 600 keys and |v| <= ~3 (projections of randn with Linear's default init):
    # eps * 3 * (sqrt(8) * |s| + 600) <= 2.2e-4 at the extremes (worst-case sums); 2e-4
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
