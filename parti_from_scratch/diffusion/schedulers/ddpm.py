"""DDPM: ancestral sampling, one draw from p_theta(x_{t-1} | x_t) per step (Ho et al. 2020, arXiv 2006.11239).

Tutorial "Parti原理与代码实例讲解" §4.2, the reverse process. Update rule (Ho Algorithm 2; Eq. 7, 11):

    x0_theta = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t)      (or from v or x_0: process.predict_x0)
    x_{t'}   = [sqrt(alpha_bar_{t'}) beta_t / (1 - alpha_bar_t)] x0_theta
             + [sqrt(alpha_t) (1 - alpha_bar_{t'}) / (1 - alpha_bar_t)] x_t  +  sigma_t z,   z ~ N(0, I), z = 0 at t = 0

where t' is the next timestep of the schedule (t - 1 when all T steps are taken),
alpha_t = alpha_bar_t / alpha_bar_{t'}, beta_t = 1 - alpha_t, alpha_bar_{t'} = 1 after the
last step, and sigma_t^2 is beta_tilde_t, beta_t or learned (process.reverse_variance).
All of it is `process.p_sample`; this class picks alpha_bar_t and alpha_bar_{t'}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..process import VARIANCE_TYPES, p_sample
from .base import ClippingConfig, DiffusionScheduler, SchedulerOutput, Timestep


@dataclass
class DDPMConfig(ClippingConfig):
    variance_type: str = "fixed_small"               # sigma_t^2: beta_tilde_t (fixed_small), beta_t (fixed_large), ...
    rescale_betas_zero_snr: bool = False             # make alpha_bar_T = 0 (Lin et al. 2023)

    choices: ClassVar[dict] = {**ClippingConfig.choices, "variance_type": VARIANCE_TYPES}


class DDPMScheduler(DiffusionScheduler):
    """Ancestral DDPM sampling; `from_config` / `from_pretrained` take diffusers DDPMScheduler configs."""
    config_class: ClassVar[type] = DDPMConfig

    def previous_timestep(self, timestep: Timestep) -> int:
        """t', the timestep after `timestep` in the schedule, or -1 after the last one."""
        index = int((self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()[0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             generator=None, return_dict: bool = True):
        """x_t -> x_{t'} by one draw from p_theta (module docstring); returns prev_sample and pred_original_sample."""
        self._require_timesteps()
        self._check_timestep(timestep)
        t, prev_t = int(timestep), self.previous_timestep(timestep)
        predicted_variance = None
        if self.config.variance_type in ("learned", "learned_range") and model_output.shape[1] == 2 * sample.shape[1]:
            # (B, 2C, H, W) -> eps_theta (B, C, H, W) and the variance output v (B, C, H, W)
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        # alpha_bar_t and alpha_bar_{t'} (1 after the last step)
        alpha_bar_t, alpha_bar_prev = self.alpha_bar[t], self.alpha_bar_prev(prev_t)
        prev_sample, pred_x0 = p_sample(model_output, sample, alpha_bar_t, alpha_bar_prev,
                                        self.config.prediction_type, self.config.variance_type, predicted_variance,
                                        x0_transform=self._clip_x0, add_noise=t > 0, generator=generator)
        return self._output(prev_sample, pred_x0, return_dict)


__all__ = ["DDPMConfig", "DDPMScheduler", "SchedulerOutput"]
