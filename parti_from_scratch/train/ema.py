"""Exponential moving average of the weights (tutorial §3.3).

Diffusion models are sampled with an average of their recent weights rather
than the last ones (Ho et al. 2020, arXiv 2006.11239, Appendix B: decay
0.9999); the average smooths out the noise of the last optimiser steps. After
optimiser step t the shadow weights move towards the current ones:

    theta_ema <- d_t * theta_ema + (1 - d_t) * theta,

with the decay warmed up so that the first steps, where theta_ema still holds
the random initialisation, are forgotten quickly:

    d_t = min(decay, (1 + t) / (10 + t))      (t = optimiser steps taken so far)

(the `num_updates` rule of TensorFlow's ExponentialMovingAverage). With the
warm-up off, d_t = decay from the first step. Buffers (e.g. normalisation
statistics) are copied, not averaged; frozen parameters (requires_grad False)
never change, so they are left alone.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """The shadow copy `module` of a model, updated after each optimiser step."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        # a frozen copy in eval mode: same architecture, own storage, never trained directly
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    def decay_at(self, step: int) -> float:
        """d_t for the update made after optimiser step `step` (1-based)."""
        if not self.warmup:
            return self.decay
        # d_t = min(decay, (1 + t) / (10 + t))
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """theta_ema <- d_t theta_ema + (1 - d_t) theta for every trainable parameter of `model`."""
        d_t = self.decay_at(step)
        for p_ema, p in zip(self.module.parameters(), model.parameters()):
            if p.requires_grad:
                # theta_ema + (1 - d_t)(theta - theta_ema) = d_t theta_ema + (1 - d_t) theta
                p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - d_t)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
