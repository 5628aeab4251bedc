"""DDIM: a non-Markovian sampler with the same marginals, deterministic at eta = 0 (Song et al. 2021, arXiv 2010.02502).

Tutorial "Parti原理与代码实例讲解" §4.2, the reverse process with fewer steps. Update rule (Song Eq. 12, 16):

    x0_theta = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t)
    sigma_t  = eta sqrt((1 - alpha_bar_{t'}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t'})
             = eta sqrt(beta_tilde_t)
    x_{t'}   = sqrt(alpha_bar_{t'}) x0_theta  +  sqrt(1 - alpha_bar_{t'} - sigma_t^2) eps_theta  +  sigma_t z

with t' = t - floor(T / N) (a uniform stride, whatever the spacing, as the reference
steps) and alpha_bar_{t'} for t' < 0 equal to 1 (`set_alpha_to_one`) or alpha_bar_0.
The three terms: the predicted x_0 scaled to the noise level of t', the "direction
pointing to x_t", and fresh noise. eta = 1 gives DDPM's posterior variance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..process import posterior_variance, predict_eps, predict_x0, randn, signal_noise_scales
from .base import ClippingConfig, DiffusionScheduler, SchedulerOutput, Timestep


@dataclass
class DDIMConfig(ClippingConfig):
    set_alpha_to_one: bool = True                    # alpha_bar before the first training step: 1, or else alpha_bar_0
    rescale_betas_zero_snr: bool = False             # make alpha_bar_T = 0 (Lin et al. 2023)


class DDIMScheduler(DiffusionScheduler):
    """DDIM sampling (eta = 0 deterministic); `from_config` / `from_pretrained` take diffusers DDIMScheduler configs."""
    config_class: ClassVar[type] = DDIMConfig

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True):
        """x_t -> x_{t'} by Song Eq. 12 (module docstring); returns prev_sample and pred_original_sample."""
        self._require_timesteps()
        self._check_timestep(timestep)
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_bar_t, alpha_bar_prev = self.alpha_bar[t], self.alpha_bar_prev(prev_t)
        signal, noise_scale = signal_noise_scales(alpha_bar_t)
        pred_x0 = predict_x0(model_output, sample, signal, noise_scale, self.config.prediction_type)
        pred_eps = predict_eps(model_output, sample, signal, noise_scale, self.config.prediction_type)
        pred_x0 = self._clip_x0(pred_x0)
        # sigma_t = eta sqrt(beta_tilde_t)  (Song Eq. 16)
        std_dev_t = eta * posterior_variance(alpha_bar_t, alpha_bar_prev) ** 0.5
        if use_clipped_model_output:
            # eps re-derived from the clipped x_0, as GLIDE does
            pred_eps = (sample - signal * pred_x0) / noise_scale
        # sqrt(1 - alpha_bar_{t'} - sigma_t^2) eps_theta: the direction pointing to x_t
        direction = (1 - alpha_bar_prev - std_dev_t ** 2) ** 0.5 * pred_eps
        # sqrt(alpha_bar_{t'}) x0_theta + direction
        prev_sample = alpha_bar_prev ** 0.5 * pred_x0 + direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn(model_output.shape, generator, model_output.dtype, model_output.device)
            # + sigma_t z
            prev_sample = prev_sample + std_dev_t * variance_noise
        return self._output(prev_sample, pred_x0, return_dict)


__all__ = ["DDIMConfig", "DDIMScheduler", "SchedulerOutput"]
