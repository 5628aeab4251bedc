"""VQGAN's adversarial term for the tokenizer's decoder stage: the hinge losses, the detached paths, the adaptive
weight lambda, and a tiny decoder stage that trains with it."""
from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

from parti_from_scratch.data import ShapesDataset
from parti_from_scratch.train import TrainConfig
from parti_from_scratch.train.components.adversarial import (Adversarial, PatchCritic, adaptive_weight,
                                                             critic_hinge_loss, generator_loss)
from parti_from_scratch.train.components.vae import image_collate
from parti_from_scratch.train.components.vq import Codebook, finetune_decoder, train_vq
from parti_from_scratch.train.parti_recipe import _vq_config

TINY = _vq_config(block_out_channels=(8, 8, 8, 8), num_vq_embeddings=32, vq_embed_dim=4, groups=4)


def test_critic_hinge_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])       # relu(1 - real) = 0, 0.5, 2
    fake = torch.tensor([-3.0, 0.0])            # relu(1 + fake) = 0, 1
    # float32 means of exact values: within an ulp or two of the float64 value
    assert_close(critic_hinge_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 1.0 / 2)), rtol=2.4e-7, atol=0)
    # zero once real patches score >= 1 and decoded ones <= -1
    assert critic_hinge_loss(torch.tensor([1.0, 4.0]), torch.tensor([-1.0, -2.0])).item() == 0.0


def test_patch_critic_gives_one_logit_per_patch():
    critic = PatchCritic(3, width=8, layers=3)
    assert critic(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_generator_loss_reaches_the_image_and_never_the_critic():
    critic = PatchCritic(3, width=8, layers=2)
    x_hat = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss = generator_loss(critic, x_hat)
    # the value is -mean D(x_hat) with the critic's own weights
    assert_close(loss, -critic(x_hat).mean(), rtol=0, atol=0)
    loss.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())


def test_adaptive_weight_is_the_ratio_of_the_two_gradient_norms():
    """L_rec = sum(a * w), L_GAN = sum(b * w): the gradients at w are a and b, so lambda = ||a|| / (||b|| + delta)."""
    w = nn.Parameter(torch.randn(3, 4))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    lam = adaptive_weight((a * w).sum(), (b * w).sum(), w, delta=1e-6)
    assert_close(lam, a.norm() / (b.norm() + 1e-6), rtol=1e-6, atol=0)
    assert not lam.requires_grad
    # clamped: a vanishing adversarial gradient gives max_lambda, not infinity
    assert adaptive_weight((a * w).sum(), (0 * w).sum(), w, max_lambda=7.0).item() == 7.0


def test_decoder_stage_with_the_critic_trains_the_decoder_and_keeps_the_tokens(tmp_path):
    data = ShapesDataset("train", size=32, seed=0)
    config = dict(batch_size=8, lr=3e-3, ema_decay=None, log_every=1, seed=0, device="cpu", progress=False)
    model, _ = train_vq(TINY, Codebook(kmeans_images=8), data, TrainConfig(steps=4, out_dir=str(tmp_path / "s1"),
                                                                           **config))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, result = finetune_decoder(model, data, TrainConfig(steps=3, out_dir=str(tmp_path / "s2"), **config),
                                     dilation=2, adversarial=Adversarial(width=8, layers=2))
    after = tuned.state_dict()
    # the critic is dropped: the same keys as the tokenizer alone
    assert set(after) == set(before)
    frozen = [k for k in before if not k.startswith(("decoder.", "post_quant_conv."))]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    x = image_collate([data[i] for i in range(8)])
    assert torch.equal(tuned.tokenize(x), model.tokenize(x))
    row = result.history[-1]
    assert {"l1", "l2", "gan", "critic", "lambda"} <= set(row) and row["lambda"] > 0
