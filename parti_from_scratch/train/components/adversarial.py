"""The adversarial term of VQGAN (Esser et al. 2021, arXiv 2012.09841, §3.1), for the tokenizer's decoder stage.

A decoder trained on |x - x_hat| and (x - x_hat)^2 alone hedges where its
tokens leave a detail uncertain: it paints the expected image, and the corner
of a small object it cannot place comes back half lit, neither a square's
corner nor a circle's edge. A patch critic D that tells real patches from
decoded ones makes such in-between drawings cost something: no real image
has them. Per batch x (b, 3, H, W) in [-1, 1], x_hat = G(e_{k*(E(x))}):

    D(.)      (b, 1, h', w') one logit per overlapping patch         `PatchCritic`
    L_D       = 1/2 mean relu(1 - D(x)) + 1/2 mean relu(1 + D(sg(x_hat)))       `critic_hinge_loss`
    L_GAN     = -mean D(x_hat), D's weights held fixed                `generator_loss`
    lambda    = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta)  `adaptive_weight` (their Eq. 7)
    L         = L_rec + weight * lambda * L_GAN + L_D

G_L is the decoder's last layer; lambda scales the critic's pull on it to the
reconstruction's, so neither swamps the other. The hinge form of L_D is the
one the VQGAN code trains with. One loss and one optimiser serve both players:
L_GAN reaches only the decoder (D's weights enter it detached) and L_D only
the critic (x_hat enters it detached), so one backward gives each its own
gradient, and AdamW steps both (simultaneous gradient descent).

The critic is PatchGAN's (Isola et al. 2017, arXiv 1611.07004) with GroupNorm
in place of BatchNorm, so a sample's logit does not depend on the rest of its
batch or on how the batch is split over processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .common import seeded_init


@dataclass
class Adversarial:
    """The critic's size and the weight of L_GAN in the decoder stage."""
    width: int = 32               # channels of the critic's first convolution, doubled at each stride-2 layer
    layers: int = 3               # stride-2 convolutions: 64x64 images -> 8x8 patch logits (plus 2 stride-1)
    weight: float = 0.1           # L_GAN's weight on top of the adaptive lambda
    max_lambda: float = 1e4       # lambda is clamped to [0, max_lambda]


class PatchCritic(nn.Module):
    """PatchGAN: 4x4 convolutions, `layers` of stride 2, LeakyReLU(0.2), GroupNorm after all but the first, then a
    stride-1 4x4 convolution and one to a single logit per patch. (b, C, H, W) -> (b, 1, h', w')."""

    def __init__(self, in_channels: int = 3, width: int = 32, layers: int = 3, groups: int = 8):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers + 1):
            out = width * 2 ** min(i, 3)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(channels, out, 4, stride=stride, padding=1), nn.GroupNorm(groups, out),
                       nn.LeakyReLU(0.2)]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def critic_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D = 1/2 mean relu(1 - D(x)) + 1/2 mean relu(1 + D(x_hat)): zero once real patches score >= 1 and decoded
    ones <= -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_loss(critic: nn.Module, x_hat: torch.Tensor) -> torch.Tensor:
    """L_GAN = -mean D(x_hat) with D's weights detached: its gradient reaches x_hat (and the decoder), never D."""
    frozen = {name: p.detach() for name, p in critic.named_parameters()}
    return -functional_call(critic, frozen, (x_hat,)).mean()


def _global_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over processes (t itself in one process): the gradient of the global batch's mean loss."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / dist.get_world_size()
    return t


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor,
                    delta: float = 1e-6, max_lambda: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta), clamped to [0, max_lambda], no gradient.

    The two gradients are those of the global batch (averaged over processes), so
    lambda does not depend on how the batch is split.
    """
    g_rec, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    g_gan, = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    g_rec, g_gan = _global_mean(g_rec), _global_mean(g_gan)
    return (g_rec.norm() / (g_gan.norm() + delta)).clamp(0.0, max_lambda).detach()


class DecoderWithCritic(nn.Module):
    """The tokenizer and its critic as one module, so the training loop's optimiser, checkpoints and processes
    carry both."""

    def __init__(self, vq: nn.Module, critic: PatchCritic):
        super().__init__()
        self.vq, self.critic = vq, critic


def build_critic(adversarial: Adversarial, in_channels: int = 3, seed: int = 0) -> PatchCritic:
    """A PatchCritic with weights from torch's default init under `seed` (the same on every process)."""
    return seeded_init(lambda: PatchCritic(in_channels, adversarial.width, adversarial.layers), seed)


def adversarial_terms(model: DecoderWithCritic, x: torch.Tensor, x_hat: torch.Tensor, reconstruction: torch.Tensor,
                      adversarial: Adversarial, last_layer: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, dict]:
    """weight * lambda * L_GAN + L_D for the decoder stage, and the metrics to log."""
    g = generator_loss(model.critic, x_hat)
    if last_layer is None:
        last_layer = model.vq.decoder.conv_out.weight
    lam = adaptive_weight(reconstruction, g, last_layer, max_lambda=adversarial.max_lambda)
    d = critic_hinge_loss(model.critic(x), model.critic(x_hat.detach()))
    return adversarial.weight * lam * g + d, {"gan": g.item(), "critic": d.item(), "lambda": lam.item()}
