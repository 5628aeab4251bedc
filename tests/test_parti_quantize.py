"""Vector quantisation (parti_from_scratch/parti/quantize.py): one test per equation, and parity with
vector-quantize-pytorch's VectorQuantize and diffusers' VectorQuantizer (the quantizer of VQModel)."""
import pytest
import torch

from parti_from_scratch.parti.quantize import (VectorQuantizer, VectorQuantizerConfig, code_counts, codebook_loss,
                                               codebook_usage, commitment_loss, cosine_nearest_code, ema,
                                               ema_codebook_update, l2_normalize, laplace_smoothing, nearest_code,
                                               perplexity, restart_dead_codes, restart_weights, squared_distances,
                                               straight_through, vq_loss)

F64 = torch.float64
U32 = 2.0 ** -24  # unit roundoff of float32


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------
# k*(z) = argmin_k ||z - e_k||^2 and its cosine form
# --------------------------------------------------------------------------------------------

def test_squared_distances_expansion():
    """||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, against the differences summed directly, in float64."""
    z, e = randn(50, 6, seed=1, dtype=F64), randn(20, 6, seed=2, dtype=F64)
    direct = (z[:, None, :] - e[None, :, :]).pow(2).sum(-1)
    # values are O(10); the expansion cancels terms of that size, so a few float64 ulps of 10 (~2e-15)
    torch.testing.assert_close(squared_distances(z, e), direct, rtol=0, atol=1e-13)


def test_nearest_code_argmin():
    """k*(z) = argmin_k ||z - e_k||^2: the same index as a brute-force search over the codes."""
    z, e = randn(200, 4, seed=3, dtype=F64), randn(32, 4, seed=4, dtype=F64)
    brute = torch.tensor([min(range(32), key=lambda k: float(((zi - e[k]) ** 2).sum())) for zi in z])
    assert torch.equal(nearest_code(z, e), brute)
    # every code is the nearest code of itself
    assert torch.equal(nearest_code(e, e), torch.arange(32))


def test_cosine_nearest_code_on_l2_normalised_vectors():
    """On unit vectors ||z - e||^2 = 2 - 2 z.e, so argmax z.e (cosine) = argmin ||z - e||^2 (ViT-VQGAN §3.2)."""
    z_hat, e_hat = l2_normalize(randn(300, 8, seed=5, dtype=F64)), l2_normalize(randn(64, 8, seed=6, dtype=F64))
    # float64 on unit vectors: both sides within a few ulps of values <= 4 (ulp 8.9e-16; measured 8.9e-16)
    torch.testing.assert_close(squared_distances(z_hat, e_hat), 2 - 2 * z_hat @ e_hat.T, rtol=0, atol=1e-14)
    assert torch.equal(cosine_nearest_code(z_hat, e_hat), nearest_code(z_hat, e_hat))
    # the cosine lookup ignores lengths, the Euclidean one does not: scaling z changes nothing, scaling codes does
    z = randn(300, 8, seed=5, dtype=F64)
    assert torch.equal(cosine_nearest_code(l2_normalize(3.7 * z), e_hat), cosine_nearest_code(z_hat, e_hat))


def test_l2_normalize():
    """l2(x) = x / max(||x||, eps): unit rows, the zero vector stays zero."""
    x = torch.cat([randn(5, 3, seed=7, dtype=F64), torch.zeros(1, 3, dtype=F64)])
    y = l2_normalize(x)
    # float64: a division and a 3-term norm, within a few ulps of 1 (2.2e-16 each; measured 1.1e-16)
    torch.testing.assert_close(y[:5].norm(dim=-1), torch.ones(5, dtype=F64), rtol=0, atol=1e-15)
    assert torch.equal(y[5], torch.zeros(3, dtype=F64))


# --------------------------------------------------------------------------------------------
# z_q = z + sg(e_{k*} - z)
# --------------------------------------------------------------------------------------------

def test_straight_through_forward_is_code_gradient_is_identity():
    """Forward value exactly e_{k*}; dz_q/dz = I; no gradient to the code through z_q."""
    z = randn(6, 5, seed=8).requires_grad_()
    code = randn(6, 5, seed=9).requires_grad_()
    z_q = straight_through(z, code)
    assert torch.equal(z_q, code)  # bit for bit
    upstream = randn(6, 5, seed=10)
    z_q.backward(upstream)
    assert torch.equal(z.grad, upstream)  # the Jacobian is the identity
    assert code.grad is None
    # the full Jacobian, in float64
    z64, c64 = randn(3, 2, seed=11, dtype=F64), randn(3, 2, seed=12, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda t: straight_through(t, c64), z64)
    assert torch.equal(jac.reshape(6, 6), torch.eye(6, dtype=F64))
    # why sg(e) + (z - sg(z)) rather than z + sg(e - z): the latter rounds (here it loses e entirely)
    z_big, e_small = torch.tensor([3.0]), torch.tensor([1e-8])
    assert (z_big + (e_small - z_big)).item() == 0.0
    assert torch.equal(straight_through(z_big, e_small), e_small)


# --------------------------------------------------------------------------------------------
# L = ||sg(z) - e||^2 + beta ||z - sg(e)||^2
# --------------------------------------------------------------------------------------------

def _grads(fn, z, e):
    z, e = z.clone().requires_grad_(), e.clone().requires_grad_()
    loss = fn(z, e)
    gz, ge = torch.autograd.grad(loss, (z, e), materialize_grads=True)
    return loss.detach(), gz, ge


def test_vq_loss_paper_eq3_closed_form():
    """Value (1 + beta) mean((z - e)^2); gradients beta 2 (z - e) / n to z and 2 (e - z) / n to e (n elements)."""
    z, e, beta = randn(4, 3, 5, seed=13, dtype=F64), randn(4, 3, 5, seed=14, dtype=F64), 0.25
    n = z.numel()
    loss, gz, ge = _grads(lambda a, b: vq_loss(a, b, beta), z, e)
    # float64, sums of 60 terms: a few ulps
    torch.testing.assert_close(loss, (1 + beta) * (z - e).pow(2).mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(gz, beta * 2 * (z - e) / n, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(ge, 2 * (e - z) / n, rtol=1e-14, atol=1e-16)
    # the two terms: the codebook term only moves e, the commitment term only moves z
    _, gz_c, ge_c = _grads(codebook_loss, z, e)
    _, gz_m, ge_m = _grads(commitment_loss, z, e)
    assert not gz_c.any() and not ge_m.any()


def test_vq_loss_legacy_is_beta_swap():
    """diffusers' legacy form puts beta on the codebook term: L_legacy(beta) = beta L_paper(1 / beta),
    in value and in both gradients."""
    z, e, beta = randn(2, 4, 3, 3, seed=15, dtype=F64), randn(2, 4, 3, 3, seed=16, dtype=F64), 0.25
    loss_p, gz_p, ge_p = _grads(lambda a, b: vq_loss(a, b, beta), z, e)
    loss_l, gz_l, ge_l = _grads(lambda a, b: vq_loss(a, b, beta, legacy=True), z, e)
    loss_s, gz_s, ge_s = _grads(lambda a, b: beta * vq_loss(a, b, 1 / beta), z, e)
    # float64 products of the same terms: rounding only
    tol = dict(rtol=1e-14, atol=1e-17)
    torch.testing.assert_close(loss_l, loss_s, **tol)
    torch.testing.assert_close(gz_l, gz_s, **tol)
    torch.testing.assert_close(ge_l, ge_s, **tol)
    # same value in the forward pass, the gradients exchange the weight
    torch.testing.assert_close(loss_l, loss_p, **tol)
    torch.testing.assert_close(gz_l, gz_p / beta, **tol)
    torch.testing.assert_close(ge_l, ge_p * beta, **tol)
    assert not torch.allclose(gz_l, gz_p)


def central_difference(f, t: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """d f / d t by (f(t + h) - f(t - h)) / 2h, entry by entry (float64)."""
    grad = torch.zeros_like(t)
    for i in range(t.numel()):
        step = torch.zeros_like(t).view(-1)
        step[i] = h
        step = step.view_as(t)
        grad.view(-1)[i] = (f(t + step) - f(t - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("legacy", [False, True])
def test_vq_loss_gradients_by_finite_differences(legacy):
    """Each term by torch.autograd.gradcheck in the variable it trains; the loss's gradients are those derivatives.

    Finite differences see values, not stop-gradients: d/dz of the value of L is (1 + beta) 2 (z - e) / n, but
    training wants beta 2 (z - e) / n. So the codebook term is checked as a function of e (z a constant) and the
    commitment term as a function of z (e a constant), then vq_loss's autograd gradients are compared with
    those finite differences, weighted by the form's coefficients."""
    z, e, beta = randn(3, 4, seed=17, dtype=F64), randn(3, 4, seed=18, dtype=F64), 0.25
    assert torch.autograd.gradcheck(lambda b: codebook_loss(z, b), (e.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda a: commitment_loss(a, e), (z.clone().requires_grad_(),))
    num_gz = central_difference(lambda a: (a - e).pow(2).mean(), z)
    num_ge = central_difference(lambda b: (z - b).pow(2).mean(), e)
    w_codebook, w_commit = (beta, 1.0) if legacy else (1.0, beta)
    _, gz, ge = _grads(lambda a, b: vq_loss(a, b, beta, legacy=legacy), z, e)
    # central differences of a quadratic are exact up to rounding: ~u |f| / h = 1e-16 * 3 / 1e-6
    torch.testing.assert_close(gz, w_commit * num_gz, rtol=0, atol=1e-8)
    torch.testing.assert_close(ge, w_codebook * num_ge, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------------------------
# EMA codebook, dead codes, usage and perplexity
# --------------------------------------------------------------------------------------------

def test_laplace_smoothing():
    """N_k' = (N_k + eps) / (n + K eps) n: total kept, every count positive."""
    N, eps = torch.tensor([0.0, 3.0, 0.5, 6.5], dtype=F64), 1e-5
    smoothed = laplace_smoothing(N, eps)
    # float64, the same arithmetic (measured 0) and a 4-term sum: within ~2 ulps, rtol 1e-15 = 4.5 ulps
    torch.testing.assert_close(smoothed, (N + eps) / (10 + 4 * eps) * 10, rtol=1e-15, atol=0)
    torch.testing.assert_close(smoothed.sum(), N.sum(), rtol=1e-15, atol=0)
    assert (smoothed > 0).all()


def test_ema_codebook_update_closed_form():
    """N_k <- g N_k + (1 - g) n_k, m_k <- g m_k + (1 - g) sum z, e_k = m_k / N_k', against a per-code loop
    in float64."""
    K, d, g, eps = 5, 3, 0.9, 1e-5
    N, m = torch.rand(K, dtype=F64, generator=torch.Generator().manual_seed(19)) + 0.5, randn(K, d, seed=20, dtype=F64)
    z = randn(12, d, seed=21, dtype=F64)
    idx = torch.tensor([0, 0, 1, 3, 3, 3, 0, 1, 3, 0, 1, 1])  # code 2 and 4 unused
    N_new, m_new, e_new = ema_codebook_update(N, m, z, idx, decay=g, eps=eps)
    for k in range(K):
        chosen = z[idx == k]
        Nk = g * N[k] + (1 - g) * len(chosen)
        mk = g * m[k] + (1 - g) * chosen.sum(0)
        # float64, the loop's arithmetic in another layout (measured 0): a few ulps, rtol 1e-15 = 4.5 ulps
        torch.testing.assert_close(N_new[k], Nk, rtol=1e-15, atol=0)
        torch.testing.assert_close(m_new[k], mk, rtol=1e-14, atol=1e-15)
    n = N_new.sum()
    torch.testing.assert_close(e_new, m_new / ((N_new + eps) / (n + K * eps) * n)[:, None], rtol=1e-15, atol=0)
    # ema is the moving average itself
    assert ema(torch.tensor(2.0), torch.tensor(4.0), 0.75).item() == 2.5


def test_restart_dead_codes():
    """Codes with N_k < threshold become batch vectors with N_k = threshold and m_k = threshold e_k;
    the others are untouched."""
    K, d, thr = 6, 3, 1.0
    codebook, z = randn(K, d, seed=22), randn(10, d, seed=23)
    N = torch.tensor([2.0, 0.1, 5.0, 0.99, 1.0, 0.0])
    m = codebook * N[:, None]
    new_e, new_N, new_m, restarted = restart_dead_codes(codebook, N, z, thr, embed_sum=m,
                                                        generator=torch.Generator().manual_seed(0))
    assert restarted.tolist() == [False, True, False, True, False, True]
    assert torch.equal(new_e[~restarted], codebook[~restarted]) and torch.equal(new_N[~restarted], N[~restarted])
    rows = new_e[restarted]
    # each new code is a distinct row of the batch
    matches = (rows[:, None, :] == z[None, :, :]).all(-1)
    assert (matches.sum(1) == 1).all() and len(set(matches.float().argmax(1).tolist())) == 3
    assert (new_N[restarted] == thr).all() and torch.equal(new_m[restarted], rows * thr)
    # the inputs are not modified; the same generator state gives the same restart
    assert torch.equal(N, torch.tensor([2.0, 0.1, 5.0, 0.99, 1.0, 0.0]))
    again = restart_dead_codes(codebook, N, z, thr, embed_sum=m, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], new_e)
    # more dead codes than vectors: only as many as there are vectors are restarted now
    few = restart_dead_codes(codebook, torch.zeros(K), z[:2], thr, generator=torch.Generator().manual_seed(1))
    assert int(few[3].sum()) == 2 and few[2] is None


def test_restart_weights_kmeans_plus_plus_is_the_squared_distance_to_the_nearest_code():
    """kmeans++: w_i = min_k ||z_i - e_k||^2 (checked by a float64 loop); random: w_i = 1; vectors the codebook
    already holds exactly (w = 0) are never restarted on, so with two off-code vectors and two dead codes
    the restarts land on exactly those two."""
    codebook, z = randn(5, 4, seed=30).double(), randn(7, 4, seed=31).double()
    expected = torch.tensor([min(float(((zi - e) ** 2).sum()) for e in codebook) for zi in z], dtype=torch.float64)
    # squared_distances expands ||z||^2 - 2 z.e + ||e||^2: a few ulps of the largest term in float64
    torch.testing.assert_close(restart_weights(z, codebook, "kmeans++"), expected, rtol=0, atol=1e-12)
    assert torch.equal(restart_weights(z, codebook, "random"), torch.ones(7, dtype=torch.float64))
    with pytest.raises(ValueError, match="restart rule"):
        restart_weights(z, codebook, "nearest")
    with pytest.raises(ValueError, match="restart_rule"):
        VectorQuantizerConfig(num_embeddings=4, embedding_dim=2, restart_rule="nearest")
    # batch: rows 0, 2, 3 are codes 0, 1, 2 exactly; rows 1 and 4 are far away
    on = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    batch = torch.stack([on[0], torch.tensor([5.0, 5.0]), on[1], on[2], torch.tensor([-4.0, 3.0])])
    book = torch.cat([on, torch.zeros(2, 2)])
    N = torch.tensor([3.0, 3.0, 3.0, 0.0, 0.0])
    for seed in range(10):
        new_e, _, _, restarted = restart_dead_codes(book, N, batch, 1.0, rule="kmeans++",
                                                    generator=torch.Generator().manual_seed(seed))
        assert restarted.tolist() == [False, False, False, True, True]
        assert sorted(map(tuple, new_e[3:].tolist())) == [(-4.0, 3.0), (5.0, 5.0)]
    # three dead codes but only two vectors with a nonzero weight: two restart now
    _, _, _, restarted = restart_dead_codes(book, torch.tensor([3.0, 3.0, 0.0, 0.0, 0.0]), batch, 1.0,
                                            rule="kmeans++", generator=torch.Generator().manual_seed(0))
    assert int(restarted.sum()) == 2


def test_codebook_usage_and_perplexity():
    """usage = |{k : n_k > 0}| / K; perplexity = exp(-sum p log p): m for m equally used codes, 1 for one code."""
    K = 16
    equal = torch.arange(4).repeat(25)  # codes 0..3, 25 times each
    counts = code_counts(equal, K)
    assert counts.tolist() == [25] * 4 + [0] * 12
    assert codebook_usage(counts) == 4 / 16
    # float64 exp(-sum p log p): log and exp within 1 ulp each, so ~3 ulps at most (measured 0); 1e-15 = 4.5 ulps
    torch.testing.assert_close(perplexity(counts), torch.tensor(4.0, dtype=F64), rtol=1e-15, atol=0)
    assert perplexity(code_counts(torch.full((7,), 3), K)).item() == 1.0
    skewed = torch.tensor([0, 0, 0, 1])
    p = torch.tensor([0.75, 0.25], dtype=F64)
    expected = torch.exp(-(p * p.log()).sum())
    torch.testing.assert_close(perplexity(code_counts(skewed, K)), expected, rtol=1e-15, atol=0)


# --------------------------------------------------------------------------------------------
# VectorQuantizer
# --------------------------------------------------------------------------------------------

def test_vector_quantizer_layouts_and_indices_to_codes():
    """Maps (b, c, h, w) -> indices (b, h, w) in (b, h, w) order; sequences (b, n, c) -> (b, n); decoding indices
    gives the forward value."""
    q = VectorQuantizer(num_embeddings=32, embedding_dim=8, codebook_dim=4).eval()
    x_map = randn(2, 8, 3, 5, seed=24)
    out = q(x_map)
    assert out.quantized.shape == x_map.shape and out.indices.shape == (2, 3, 5)
    # the index at (b, i, j) is the lookup of the vector x[b, :, i, j]
    with torch.no_grad():
        k = q.lookup(l2_normalize(q.project_in(x_map[1, :, 2, 4])[None]))
    assert out.indices[1, 2, 4] == k[0]
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    x_seq = randn(2, 7, 8, seed=25)
    out = q(x_seq)
    assert out.quantized.shape == x_seq.shape and out.indices.shape == (2, 7)
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    with pytest.raises(ValueError, match="channels = embedding_dim = 8"):
        q(randn(2, 7, 5))
    with pytest.raises(ValueError, match="channels-first map"):
        q(randn(8, 4))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 32\)"):
        q.indices_to_codes(torch.tensor([[0, 32]]))
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizerConfig(decay=1.0)


@pytest.mark.parametrize("cosine,codebook_dim", [(False, None), (True, 3)])
def test_vector_quantizer_gradients_by_finite_differences(cosine, codebook_dim):
    """The module's gradients, against central differences of the functions they are defined to differentiate.

    With the assignment k* fixed, training differentiates (straight-through and Eq. 3)
      w.r.t. the input and project_in:  sum(w * project_out(z_e)) + beta mean((z_e - e)^2), e constant
      w.r.t. the codebook:              mean((z_e - e)^2), z_e constant
      w.r.t. project_out:               sum(w * project_out(e)), e constant
    where z_e = [l2](project_in(z)) and e = [l2](E)[k*]. These are written here from F.linear and the formulas,
    not from the module's code, and differentiated numerically in float64."""
    torch.manual_seed(0)
    beta = 0.25
    q = VectorQuantizer(num_embeddings=8, embedding_dim=4, codebook_dim=codebook_dim, use_cosine_sim=cosine,
                        beta=beta).double()
    with torch.no_grad():
        q.embedding.weight.copy_(randn(8, q.config.lookup_dim, seed=26, dtype=F64))
    x = randn(2, 4, 2, 3, seed=27, dtype=F64).requires_grad_()
    w = randn(2, 4, 2, 3, seed=28, dtype=F64)
    out = q(x)
    ((out.quantized * w).sum() + out.loss).backward()
    idx = out.indices.reshape(-1)

    norm = l2_normalize if cosine else (lambda t: t)
    lin_in = (lambda t, W: t @ W.T + q.project_in.bias) if codebook_dim else (lambda t, W: t)
    lin_out = (lambda t, W: t @ W.T + q.project_out.bias) if codebook_dim else (lambda t, W: t)
    W_in = q.project_in.weight.detach() if codebook_dim else None
    W_out = q.project_out.weight.detach() if codebook_dim else None
    E = q.embedding.weight.detach()
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 4)  # (b, c, h, w) -> (b h w, c)
    w_flat = flat(w)
    z_e = lambda t, W=W_in: norm(lin_in(flat(t), W))
    e = norm(E)[idx]
    with torch.no_grad():
        assert torch.equal(q.lookup(z_e(x)), idx)
        z_e_const = z_e(x)
        num_x = central_difference(
            lambda t: (lin_out(z_e(t), W_out) * w_flat).sum() + beta * (z_e(t) - e).pow(2).mean(), x.detach())
        num_E = central_difference(lambda t: (z_e_const - norm(t)[idx]).pow(2).mean(), E)
    # sums of O(1) terms, differences over 2h = 2e-6: rounding ~1e-16 * 10 / 1e-6 = 1e-9, truncation O(h^2)
    tol = dict(rtol=0, atol=1e-7)
    torch.testing.assert_close(x.grad, num_x, **tol)
    torch.testing.assert_close(q.embedding.weight.grad, num_E, **tol)
    if codebook_dim:
        with torch.no_grad():
            num_W_in = central_difference(
                lambda W: (lin_out(z_e(x, W), W_out) * w_flat).sum() + beta * (z_e(x, W) - e).pow(2).mean(), W_in)
            num_W_out = central_difference(lambda W: (lin_out(e, W) * w_flat).sum(), W_out)
        torch.testing.assert_close(q.project_in.weight.grad, num_W_in, **tol)
        torch.testing.assert_close(q.project_out.weight.grad, num_W_out, **tol)
    else:
        # no projection, no normalisation: the straight-through gradient of z_q is the identity
        x2 = x.detach().clone().requires_grad_()
        q(x2).quantized.backward(w)
        assert torch.equal(x2.grad, w)


def test_vector_quantizer_ema_training_closed_form():
    """In training with use_ema the codebook follows ema_codebook_update, the loss is beta * commitment only, and
    the codebook has no gradient."""
    torch.manual_seed(0)
    q = VectorQuantizer(num_embeddings=8, embedding_dim=3, use_cosine_sim=False, use_ema=True, decay=0.7).train()
    with torch.no_grad():
        q.embedding.weight.copy_(randn(8, 3, seed=29))
    q.reset_ema()
    x = randn(4, 5, 3, seed=30)
    N0, m0 = q.cluster_size.clone(), q.embed_sum.clone()
    out = q(x)
    flat = x.reshape(-1, 3)
    idx = nearest_code(flat, m0 / laplace_smoothing(N0, 1e-5)[:, None])
    assert torch.equal(out.indices.reshape(-1), idx)
    N1, m1, e1 = ema_codebook_update(N0, m0, flat, idx, decay=0.7)
    assert torch.equal(q.cluster_size, N1) and torch.equal(q.embed_sum, m1) and torch.equal(q.embedding.weight, e1)
    code = m0[idx] / laplace_smoothing(N0, 1e-5)[idx, None]
    # float32 mean of the same squares (measured 0); 1e-6 ~ 8 ulps allows another summation order
    torch.testing.assert_close(out.loss, 0.25 * (flat - code).pow(2).mean(), rtol=1e-6, atol=0)
    assert not q.embedding.weight.requires_grad
    # eval mode leaves the codebook alone
    q.eval()
    q(x)
    assert torch.equal(q.embedding.weight, e1)


def test_vector_quantizer_restarts_dead_codes_of_a_gradient_codebook():
    """Without EMA the counts are still tracked (N_k <- g N_k + (1 - g) n_k); codes no vector chose for long enough
    are restarted on batch vectors, the used ones are left to the optimiser."""
    K, d = 6, 2
    q = VectorQuantizer(num_embeddings=K, embedding_dim=d, use_cosine_sim=False, decay=0.5,
                        threshold_ema_dead_code=0.3).train()
    far = torch.tensor([[100.0, 100.0], [-100.0, 100.0], [100.0, -100.0], [-100.0, -100.0]])
    with torch.no_grad():
        q.embedding.weight.copy_(torch.cat([torch.tensor([[0.5, 0.0], [-0.5, 0.0]]), far]))
    q.reset_ema()
    x = randn(1, 8, d, seed=80) * 0.3
    q(x, generator=torch.Generator().manual_seed(0))
    # N = 0.5 * 1 + 0.5 * n_k: the far codes are at 0.5, not yet dead
    torch.testing.assert_close(q.cluster_size[2:], torch.full((4,), 0.5), rtol=0, atol=0)
    assert torch.equal(q.embedding.weight[2:], far)
    out = q(x, generator=torch.Generator().manual_seed(0))
    assert set(out.indices.reshape(-1).tolist()) <= {0, 1}
    # now at 0.25 < 0.3: restarted on vectors of the batch, with N = threshold
    rows = q.embedding.weight[2:]
    assert ((rows[:, None, :] == x[0][None, :, :]).all(-1).sum(1) == 1).all()
    torch.testing.assert_close(q.cluster_size[2:], torch.full((4,), 0.3), rtol=0, atol=0)
    assert torch.equal(q.embedding.weight[:2], torch.tensor([[0.5, 0.0], [-0.5, 0.0]]))
    assert q.embedding.weight.requires_grad


# --------------------------------------------------------------------------------------------
# Parity with the reference implementations
# --------------------------------------------------------------------------------------------

def _vqp():
    return pytest.importorskip("vector_quantize_pytorch")


def _copy_from_vqp(ours: VectorQuantizer, vq) -> None:
    with torch.no_grad():
        if ours.config.codebook_dim is not None:
            ours.project_in.load_state_dict(vq.project_in.state_dict())
            ours.project_out.load_state_dict(vq.project_out.state_dict())
        ours.embedding.weight.copy_(vq.codebook)
        if ours.tracks_counts:
            ours.cluster_size.copy_(vq._codebook.cluster_size[0])
            ours.embed_sum.copy_(vq._codebook.embed_avg[0])


@pytest.mark.parametrize("image_map", [False, True])
def test_factorized_cosine_lookup_matches_vector_quantize_pytorch(image_map):
    """project_in -> l2 -> argmax cosine -> project_out, against VectorQuantize(use_cosine_sim=True, codebook_dim=...)
    in eval mode: identical indices, outputs within 1e-6."""
    vqp = _vqp()
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=16, codebook_size=64, codebook_dim=8, use_cosine_sim=True, kmeans_init=False,
                            threshold_ema_dead_code=0, rotation_trick=False, accept_image_fmap=image_map).eval()
    ours = VectorQuantizer(num_embeddings=64, embedding_dim=16, codebook_dim=8, use_cosine_sim=True).eval()
    _copy_from_vqp(ours, vq)
    x = randn(3, 16, 6, 5, seed=31) if image_map else randn(3, 40, 16, seed=31)
    with torch.no_grad():
        ref_out, ref_idx, _ = vq(x)
        out = ours(x)
    assert out.indices.shape == ref_idx.shape and torch.equal(out.indices, ref_idx)
    # The reference looks up its stored unit codes, we re-normalise them: each entry moves by at most ~1 ulp of 1
    # (6e-8); project_out (8 inputs, |W| <= 1/sqrt(8)) sums 8 such errors plus its own rounding: < 1e-6.
    torch.testing.assert_close(out.quantized, ref_out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cosine,codebook_dim", [(True, 4), (False, None)])
def test_ema_update_matches_vector_quantize_pytorch(cosine, codebook_dim):
    """Three training steps with an EMA codebook (decay 0.8, no k-means, no restarts) against VectorQuantize:
    indices, outputs, loss, input gradients, N, m and the codebook.

    vector-quantize-pytorch computes exactly Eq. 6-8 of arXiv 1711.00937 Appendix A.1 with the same Laplace
    smoothing, (N + eps) / (n + K eps) n, and the same start N_k = 1, m_k = e_k; under cosine similarity it
    accumulates the l2-normalised projected vectors and re-normalises m_k / N_k', as we do."""
    vqp = _vqp()
    torch.manual_seed(1)
    K, dim, beta = 16, 6, 0.25
    vq = vqp.VectorQuantize(dim=dim, codebook_size=K, codebook_dim=codebook_dim, use_cosine_sim=cosine,
                            kmeans_init=False, decay=0.8, threshold_ema_dead_code=0, commitment_weight=beta,
                            rotation_trick=False).train()
    ours = VectorQuantizer(num_embeddings=K, embedding_dim=dim, codebook_dim=codebook_dim, use_cosine_sim=cosine,
                           use_ema=True, decay=0.8, beta=beta).train()
    _copy_from_vqp(ours, vq)
    for step in range(3):
        x = randn(2, 24, dim, seed=40 + step)
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref_out, ref_idx, ref_loss = vq(x_ref)
        out = ours(x_ours)
        assert torch.equal(out.indices, ref_idx)
        w = randn(2, 24, dim, seed=50 + step)
        ((ref_out * w).sum() + ref_loss).backward()
        ((out.quantized * w).sum() + out.loss).backward()
        # N (values <= ~5) and m (sums of <= ~10 vectors of entries <= ~3) are summed in another order and the
        # EMA is written as a lerp there: a few float32 roundings of quantities below 10, i.e. well under 1e-5.
        # The outputs and the loss use the codebook of the previous step, so inherit that; 1e-5 covers it.
        tol = dict(rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.cluster_size, vq._codebook.cluster_size[0], **tol)
        torch.testing.assert_close(ours.embed_sum, vq._codebook.embed_avg[0], **tol)
        torch.testing.assert_close(ours.embedding.weight, vq.codebook, **tol)
        torch.testing.assert_close(out.quantized, ref_out, **tol)
        torch.testing.assert_close(out.loss, ref_loss, **tol)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol)


def test_dead_code_restart_matches_vector_quantize_pytorch():
    """With the random draws aligned (same seed for its global generator and our generator), the restarted codes,
    counts and sums are those of VectorQuantize(threshold_ema_dead_code=...)."""
    vqp = _vqp()
    torch.manual_seed(2)
    K, dim = 32, 4
    vq = vqp.VectorQuantize(dim=dim, codebook_size=K, use_cosine_sim=False, kmeans_init=False, decay=0.8,
                            threshold_ema_dead_code=1.0, rotation_trick=False).train()
    ours = VectorQuantizer(num_embeddings=K, embedding_dim=dim, use_cosine_sim=False, use_ema=True, decay=0.8,
                           threshold_ema_dead_code=1.0).train()
    _copy_from_vqp(ours, vq)
    restarted_any = False
    for step in range(3):
        x = randn(1, 20, dim, seed=60 + step)
        torch.manual_seed(100 + step)
        with torch.no_grad():
            _, ref_idx, _ = vq(x)
            out = ours(x, generator=torch.Generator().manual_seed(100 + step))
        assert torch.equal(out.indices, ref_idx)
        restarted_any |= bool((vq._codebook.cluster_size[0] == 1.0).any())
        # as in the EMA test: a few float32 roundings of quantities below 10
        torch.testing.assert_close(ours.cluster_size, vq._codebook.cluster_size[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.embed_sum, vq._codebook.embed_avg[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.embedding.weight, vq.codebook, rtol=0, atol=1e-5)
    assert restarted_any


def _diffusers_quantizer(K, d, legacy):
    diffusers_vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    return diffusers_vae.VectorQuantizer(K, d, beta=0.25, legacy=legacy)


@pytest.mark.parametrize("legacy", [True, False])
def test_euclidean_lookup_and_loss_match_diffusers(legacy):
    """Against diffusers' VectorQuantizer (diffusers.models.autoencoders.vae, the `quantize` of VQModel): identical
    flat indices in (b, h, w) order, z_q, loss and gradients to z and the codebook. legacy=True is VQModel's default."""
    K, d = 32, 4
    ref = _diffusers_quantizer(K, d, legacy)
    ours = VectorQuantizer(num_embeddings=K, embedding_dim=d, use_cosine_sim=False, legacy=legacy)
    with torch.no_grad():
        ref.embedding.weight.copy_(randn(K, d, seed=70))
        ours.embedding.weight.copy_(ref.embedding.weight)
    z = randn(2, d, 5, 7, seed=71)
    z_ref, z_ours = z.clone().requires_grad_(), z.clone().requires_grad_()
    q_ref, loss_ref, (_, _, idx_ref) = ref(z_ref)
    out = ours(z_ours)
    assert out.indices.shape == (2, 5, 7) and torch.equal(out.indices.reshape(-1), idx_ref.reshape(-1))
    # ours is the code exactly; diffusers computes z + (e - z), two roundings: |error| <= (2|e| + |z|) u (1 + u)
    code = ours.embedding.weight.detach()[out.indices].permute(0, 3, 1, 2)
    assert torch.equal(out.quantized, code)
    bound = float((2 * code.abs() + z.abs()).max()) * U32 * (1 + U32)
    torch.testing.assert_close(out.quantized, q_ref, rtol=0, atol=bound)
    # the same float32 squares averaged in the same order: equal up to the summation of 280 terms (~1e-6 relative)
    torch.testing.assert_close(out.loss, loss_ref, rtol=1e-6, atol=0)
    w = randn(2, d, 5, 7, seed=72)
    g_ours = torch.autograd.grad((out.quantized * w).sum() + out.loss, (z_ours, ours.embedding.weight))
    g_ref = torch.autograd.grad((q_ref * w).sum() + loss_ref, (z_ref, ref.embedding.weight))
    # gradients are w + c (z - e) / n; the same arithmetic, so within a few float32 ulps of |w| <= ~4
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=4 * 4 * 2 * U32)
