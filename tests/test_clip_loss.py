"""Tutorial §4.3: the CLIP loss, symmetric cross-entropy over exp(t) * norm(I) norm(T)^T."""
import math

import pytest
import torch

from parti_from_scratch import clip_loss
from parti_from_scratch.clip.loss import similarity_logits, symmetric_cross_entropy

# Three (image, text) pairs in 2-D, row i of each describing pair i, and t = log(2) so exp(t) = 2.
IMAGES = [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]
TEXTS = [[1.0, 1.0], [2.0, -1.0], [-1.0, 3.0]]
T = math.log(2.0)


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def by_hand_logits():
    return [[2.0 * sum(a * b for a, b in zip(unit(i), unit(t))) for t in TEXTS] for i in IMAGES]


def test_clip_loss_3x3_by_hand():
    s = by_hand_logits()
    # image i picks its text among the row; text i picks its image among the column
    image_terms = [-math.log(math.exp(s[i][i]) / sum(math.exp(s[i][j]) for j in range(3))) for i in range(3)]
    text_terms = [-math.log(math.exp(s[i][i]) / sum(math.exp(s[j][i]) for j in range(3))) for i in range(3)]
    expected = (sum(image_terms) / 3 + sum(text_terms) / 3) / 2
    images, texts = torch.tensor(IMAGES, dtype=torch.float64), torch.tensor(TEXTS, dtype=torch.float64)
    logits = similarity_logits(images, texts, torch.tensor(T, dtype=torch.float64))
    # float64, |s| <= 2, loss 0.51: a few dozen roundings and exp/log calls (<= 1 ulp each) on each side, a few
    # 1e-15 at most (measured 0); 1e-12 is > 100x that, and far below any error in the formula
    torch.testing.assert_close(logits, torch.tensor(s, dtype=torch.float64), atol=1e-12, rtol=0)
    got = clip_loss(images, texts, torch.tensor(T, dtype=torch.float64))
    assert abs(got.item() - expected) < 1e-12


def test_clip_loss_equals_log_softmax_formula_term_by_term():
    g = torch.Generator().manual_seed(0)
    n, d = 6, 5
    images = torch.randn(n, d, generator=g, dtype=torch.float64)
    texts = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.tensor(1.3, dtype=torch.float64)
    s = t.exp() * (images / images.norm(dim=1, keepdim=True)) @ (texts / texts.norm(dim=1, keepdim=True)).T
    # L = -1/(2N) sum_i [ log softmax_row(s)_ii + log softmax_column(s)_ii ]
    total = 0.0
    for i in range(n):
        total += s[i, i] - torch.logsumexp(s[i, :], dim=0)
        total += s[i, i] - torch.logsumexp(s[:, i], dim=0)
    expected = -total / (2 * n)
    # float64, loss 3.2, two orders of the same sums (a few 1e-15 at most; measured 0): 1e-12 as above
    torch.testing.assert_close(clip_loss(images, texts, t), expected, atol=1e-12, rtol=0)


def test_clip_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(clip_loss, (images, texts, t))


def test_clip_loss_falls_as_matching_pairs_become_more_similar():
    g = torch.Generator().manual_seed(2)
    images, noise = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    t = torch.tensor(math.log(1 / 0.07))
    losses = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        texts = alpha * images + (1 - alpha) * noise  # alpha = 1: every text equals its image
        losses.append(clip_loss(images, texts, t).item())
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def test_symmetric_cross_entropy_averages_both_directions():
    logits = torch.tensor([[2.0, 0.0], [5.0, 1.0]])
    labels = torch.arange(2)
    expected = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    # the same two F.cross_entropy calls on the same tensors: equal bit for bit (measured 0), not the float32
    # defaults (rtol 1.3e-6, atol 1e-5)
    torch.testing.assert_close(symmetric_cross_entropy(logits), expected, rtol=0, atol=0)


def test_clip_loss_matches_transformers_clip_model_loss():
    transformers = pytest.importorskip("transformers")
    from clip_oracle import pixel_batch, reference_model, token_batch

    model = reference_model("CLIPModel", "quick_gelu")
    ids, mask = token_batch("quick_gelu")
    pixels = pixel_batch("quick_gelu")
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True)
        images = model.get_image_features(pixel_values=pixels).pooler_output
        texts = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        ours = clip_loss(images, texts, model.logit_scale)
    assert isinstance(model, transformers.CLIPModel)
    # fp32 parity (tests/tolerances.py FP32_PARITY): the reference's loss drifts 6.1e-7 from float64 (ours 6.1e-7)
    assert abs(ours.item() - out.loss.item()) <= 1e-5
