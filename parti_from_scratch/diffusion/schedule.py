"""Noise schedules: beta_t, alpha_t, alpha_bar_t and the signal-to-noise ratio.

Tutorial "Parti原理与代码实例讲解" §4.2 writes the forward process as a chain of
small Gaussian steps, each adding noise of variance beta_t:

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)            (Ho et al. 2020, arXiv 2006.11239, Eq. 2)

A schedule is the sequence beta_1 .. beta_T. From it (Ho et al. §2, Eq. 4):

    alpha_t     = 1 - beta_t
    alpha_bar_t = prod_{s <= t} alpha_s          so that  q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    SNR(t)      = alpha_bar_t / (1 - alpha_bar_t)                        (Kingma et al. 2021, arXiv 2107.00630, Eq. 2)

The schedules Stable Diffusion and its relatives use, by their scheduler_config.json names:

* "linear":            beta_t evenly spaced from beta_start to beta_end            (Ho et al. §4)
* "scaled_linear":     sqrt(beta_t) evenly spaced (latent diffusion, Stable Diffusion 1.x/2.x)
* "squaredcos_cap_v2": the cosine schedule, alpha_bar(t) = f(t) / f(0),
                       f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2, s = 0.008, beta_t capped at 0.999
                       (Nichol & Dhariwal 2021, arXiv 2102.09672, Eq. 17)

and the zero-terminal-SNR rescaling of Lin et al. 2023 (arXiv 2305.08891, Algorithm 1),
which shifts and scales sqrt(alpha_bar_t) so that alpha_bar_T = 0 exactly.

Time is 0-based in code: index t = 0 .. T-1 holds beta_{t+1} of the papers.
Stable Diffusion was trained with these schedules computed in float32, so that
is the default dtype; pass dtype=torch.float64 for exact-arithmetic checks.

The samplers of `schedulers/` think in the variance-exploding parameterisation of
Karras et al. 2022 (arXiv 2206.00364): x = x_t / sqrt(alpha_bar_t) has noise level

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) = 1 / sqrt(SNR(t))

and the two functions at the end convert between the two views.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..configuration import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# The longest schedule a config or checkpoint may declare: 100x Stable Diffusion's T = 1000. Every
# per-timestep table (beta, alpha_bar, sigma) is T long, so T bounds the memory a schedule can claim.
MAX_TRAIN_TIMESTEPS = 100_000


def check_betas(betas: torch.Tensor, name: str = "trained_betas") -> None:
    """ConfigError unless `betas` is a schedule: 1-D, 2 .. MAX_TRAIN_TIMESTEPS values, each finite and in (0, 1).

    Rank and length are read before any value, so a huge (e.g. stride-0 expanded)
    tensor is refused without being copied. beta_t in (0, 1) keeps every alpha_t
    = 1 - beta_t in (0, 1), hence alpha_bar_t > 0 and every sigma_t finite.
    """
    if not torch.is_tensor(betas):
        raise ConfigError(f"{name}: expected a tensor, got {type(betas).__name__}")
    if betas.ndim != 1:
        raise ConfigError(f"{name}: expected one value per timestep (1-D), got shape {tuple(betas.shape)}")
    if not 2 <= betas.numel() <= MAX_TRAIN_TIMESTEPS:
        raise ConfigError(f"{name}: {betas.numel()} timesteps; expected 2 to {MAX_TRAIN_TIMESTEPS:,}")
    if not betas.is_floating_point():
        raise ConfigError(f"{name}: expected floating-point values, got {betas.dtype}")
    values = betas.double()
    bad = ~(torch.isfinite(values) & (values > 0) & (values < 1))
    if bad.any():
        t = int(bad.nonzero()[0])
        raise ConfigError(f"{name}[{t}]={values[t].item()!r}: every beta_t must be a finite number in (0, 1)")


def linear_betas(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """beta_t = beta_start + (beta_end - beta_start) * t / (T - 1), t = 0 .. T-1 (Ho et al. 2020 §4)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=dtype)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """beta_t = (sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) * t / (T - 1))^2: linear in sqrt(beta).

    The schedule of latent diffusion (Rombach et al. 2022, arXiv 2112.10752) and so of Stable Diffusion.
    """
    # sqrt(beta_t), evenly spaced
    sqrt_beta = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=dtype)
    return sqrt_beta ** 2


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """f(t) = cos(((t + s) / (1 + s)) * pi/2)^2 for t in [0, 1] (Nichol & Dhariwal 2021, Eq. 17).

    alpha_bar(t) = f(t) / f(0); the small offset s keeps beta near t = 0 from being too small.
    """
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """beta_t = min(1 - alpha_bar(t+1) / alpha_bar(t), max_beta), the "squaredcos_cap_v2" schedule.

    (Nichol & Dhariwal 2021, Eq. 17 and the clipping to 0.999 below it.) Computed
    in float64 and rounded once to `dtype`.
    """
    steps = torch.arange(num_train_timesteps, dtype=torch.float64)
    t1 = steps / num_train_timesteps
    t2 = (steps + 1) / num_train_timesteps
    # beta_t = 1 - alpha_bar(t2) / alpha_bar(t1); the f(0) normalisation cancels in the ratio
    betas = 1 - cosine_alpha_bar(t2) / cosine_alpha_bar(t1)
    return betas.clamp(max=max_beta).to(dtype)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule so that SNR(T) = 0 (Lin et al. 2023, arXiv 2305.08891, Algorithm 1).

        sqrt(alpha_bar)' = (sqrt(alpha_bar) - sqrt(alpha_bar_T)) * sqrt(alpha_bar_1)
                           / (sqrt(alpha_bar_1) - sqrt(alpha_bar_T))

    keeps sqrt(alpha_bar_1) and makes sqrt(alpha_bar_T) = 0, so the last step is
    pure noise, as it is at sampling time; then beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}.
    """
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    # shift so the last value is 0, then scale so the first value is unchanged
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar ** 2
    # alpha_t = alpha_bar_t / alpha_bar_{t-1}, with alpha_1 = alpha_bar_1
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, trained_betas: Optional[Sequence[float]] = None,
               rescale_betas_zero_snr: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """beta_1 .. beta_T from the keys of a diffusers scheduler_config.json.

    `trained_betas`, when given, is used as is and `beta_schedule` is ignored.
    """
    if trained_betas is not None:
        betas = torch.tensor(list(trained_betas), dtype=dtype)
    elif beta_schedule == "linear":
        betas = linear_betas(num_train_timesteps, beta_start, beta_end, dtype)
    elif beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end, dtype)
    elif beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(num_train_timesteps, dtype=dtype)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_t = 1 - beta_t."""
    return 1.0 - betas


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, the notation above Eq. 4)."""
    return torch.cumprod(1.0 - betas, dim=0)


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), the signal-to-noise ratio of q(x_t | x_0) (Kingma et al., Eq. 2)."""
    return alpha_bar / (1 - alpha_bar)


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log SNR(t) = log(alpha_bar_t) - log(1 - alpha_bar_t), written to stay finite in float32 near 0 and 1."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level of x_t / sqrt(alpha_bar_t).

    Karras et al. 2022, Table 1 (the variance-preserving row).
    """
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def alpha_sigma_from_sigma(sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) = (1 / sqrt(sigma^2 + 1), sigma / sqrt(sigma^2 + 1)).

    The inverse of `sigma_from_alpha_bar`: DPM-Solver (Lu et al. 2022, arXiv 2206.00927)
    writes these as alpha_t and sigma_t, with lambda_t = log(alpha_t / sigma_t).
    """
    # alpha_t = sqrt(alpha_bar_t) = 1 / sqrt(sigma^2 + 1)
    alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
    # sigma_t = sqrt(1 - alpha_bar_t) = sigma * alpha_t
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0 .. N-1.

    The noise levels of Karras et al. 2022 (arXiv 2206.00364, Eq. 5), rho = 7: more
    steps at low noise. Float64, descending.
    """
    # ramp_i = i * (1 / (N - 1)), ending exactly at 1
    ramp = torch.arange(num_steps, dtype=torch.float64) * (1.0 / (num_steps - 1)) if num_steps > 1 \
        else torch.zeros(1, dtype=torch.float64)
    ramp[-1] = 1.0 if num_steps > 1 else 0.0
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
