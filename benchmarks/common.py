"""What the side-by-side benchmarks share: full-size reference models with random weights, ours holding the
same tensors, and the timing helpers (a stopwatch, alternated pairs, FLOP counts, the machine's matmul speed).

Every model pair is built offline: diffusers builds and initialises its model from a config, and ours receives
the very same tensors through the converter (weights_convert.diffusers_models.from_diffusers) from the
in-memory state dict.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sd_configs import SD15_UNET, SD15_VAE  # noqa: E402  (this folder is on the path when a script runs)


def mirror(reference: torch.nn.Module, config_cls, model_cls) -> torch.nn.Module:
    """Our model with the reference's config (read as a diffusers config.json) and the reference's tensors."""
    from weights_convert.common import build_on_meta, load_into
    from weights_convert.diffusers_models import from_diffusers

    config = config_cls.from_dict(dict(reference.config), source="diffusers config")
    ours = build_on_meta(lambda: model_cls(config))
    load_into(ours, from_diffusers(reference.state_dict(), source="diffusers state dict"), dtype=None)
    return ours.eval()


def build_unet_pair(config: dict = SD15_UNET, seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, diffusers') UNet2DConditionModel with the same random weights."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from parti_from_scratch.unet import UNet2DConditionConfig, UNet2DConditionModel
    torch.manual_seed(seed)
    reference = DiffusersUNet(**config).eval()
    return mirror(reference, UNet2DConditionConfig, UNet2DConditionModel), reference


def build_vae_pair(config: dict = SD15_VAE, seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, diffusers') AutoencoderKL with the same random weights."""
    from diffusers import AutoencoderKL as DiffusersVAE

    from parti_from_scratch.vae import AutoencoderKL, AutoencoderKLConfig
    torch.manual_seed(seed)
    reference = DiffusersVAE(**config).eval()
    return mirror(reference, AutoencoderKLConfig, AutoencoderKL), reference


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def seeded_times(call: Callable[[int], object], runs: int = 7) -> List[float]:
    """Seconds of call(seed) for seeds 1..runs, after one warm-up call(0): the first call allocates and picks
    kernels."""
    call(0)
    return [timed(lambda: call(seed)) for seed in range(1, runs + 1)]


def alternate(run_ours: Callable[[], object], run_reference: Callable[[], object], pairs: int
              ) -> Tuple[List[float], List[float]]:
    """Times of `pairs` calls of each, ours then the reference in turn, so a slower moment hits both alike."""
    times_ours, times_reference = [], []
    for _ in range(pairs):
        times_ours.append(timed(run_ours))
        times_reference.append(timed(run_reference))
    return times_ours, times_reference


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n fp32 matrix product (2 n^3 FLOPs), the median of `repeats`: the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    return 2 * n ** 3 / statistics.median(timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def count_flops(model, *args, **kwargs) -> int:
    """FLOPs of one call (torch.utils.flop_counter counts matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        model(*args, **kwargs)
    return counter.get_total_flops()
