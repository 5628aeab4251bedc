"""Helpers the component files share."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

M = TypeVar("M")


def seeded_init(make: Callable[[], M], seed: int) -> M:
    """Build a model with torch's global generator seeded by `seed`, leaving the caller's generator untouched.

    The initial weights are then a function of the seed alone, whatever ran before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()
