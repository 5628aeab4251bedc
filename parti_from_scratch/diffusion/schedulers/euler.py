"""Euler: the probability-flow ODE in sigma, one Euler step per network call (Karras et al. 2022, arXiv 2206.00364).

Tutorial "Parti原理与代码实例讲解" §4.2 describes the reverse process as removing noise
step by step; Karras et al. write the same process for x = x_t / sqrt(alpha_bar_t), whose
noise level is sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), as the ODE (Karras Eq. 1, Algorithm 2)

    dx / dsigma = (x - D(x; sigma)) / sigma,     D = the denoised estimate of x_0

Update rule, from sigma_i to sigma_{i+1}:

    sigma_hat = sigma_i (1 + gamma_i)                      (gamma_i = 0 unless s_churn > 0: then noise is added first,
    x        <- x + sqrt(sigma_hat^2 - sigma_i^2) s_noise z   raising the noise level to sigma_hat; Karras Algorithm 2)
    D        =  x - sigma_hat eps_theta                                   (epsilon)
             =  x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v_theta      (v_prediction)
    x_{i+1}  =  x + (sigma_{i+1} - sigma_hat) (x - D) / sigma_hat

The network sees x_t = x / sqrt(sigma^2 + 1) (`scale_model_input`), and sampling starts
from x ~ N(0, sigma_0^2 I) (`init_noise_sigma`, with "leading" spacing sqrt(sigma_0^2 + 1)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ...configuration import Refused, positive
from ..process import randn
from ..schedule import karras_sigmas
from .base import SchedulerConfig, SchedulerOutput, SigmaScheduler, Timestep, interp_sigmas, sigma_to_t


@dataclass
class EulerConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    interpolation_type: str = "linear"               # sigma between training timesteps: linear in t, or log_linear
    use_karras_sigmas: bool = False                  # place sigmas by Karras Eq. 5 (rho = 7) instead of by timestep
    sigma_min: Optional[float] = None                # Karras range; default: the schedule's own
    sigma_max: Optional[float] = None
    final_sigmas_type: str = "zero"                  # the sigma after the last step: 0, or sigma at t = 0
    rescale_betas_zero_snr: bool = False             # make alpha_bar_T = 0 (Lin et al. 2023)

    choices: ClassVar[dict] = {**SchedulerConfig.choices, "interpolation_type": ("linear", "log_linear"),
                               "final_sigmas_type": ("zero", "sigma_min")}
    refused: ClassVar[dict] = {
        "use_exponential_sigmas": Refused((False,), "exponentially spaced sigmas"),
        "use_beta_sigmas": Refused((False,), "beta-distribution spaced sigmas"),
        "timestep_type": Refused(("discrete",), "continuous (EDM) timesteps"),
    }

    def check(self) -> None:
        super().check()
        positive(self, "sigma_min", "sigma_max")


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler sampling of the probability-flow ODE; `from_config` / `from_pretrained` take diffusers configs."""
    config_class: ClassVar[type] = EulerConfig
    timestep_dtype: ClassVar[torch.dtype] = torch.float32

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The standard deviation of the starting sample: sigma_0, or sqrt(sigma_0^2 + 1) with "leading" spacing."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma ** 2 + 1) ** 0.5

    def _make_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        c = self.config
        timesteps = self._spaced(num_inference_steps, round_linspace=False).to(torch.float32)
        train_sigmas = self.training_sigmas()
        if c.interpolation_type == "linear":
            sigmas = interp_sigmas(timesteps, train_sigmas)
        else:
            # log sigma evenly spaced from sigma_{T-1} down to sigma_0 (N + 1 values)
            log_range = torch.log(train_sigmas[[-1, 0]])
            sigmas = torch.linspace(float(log_range[0]), float(log_range[1]), num_inference_steps + 1).exp()
        if c.use_karras_sigmas:
            sigma_min = c.sigma_min if c.sigma_min is not None else float(sigmas[-1])
            sigma_max = c.sigma_max if c.sigma_max is not None else float(sigmas[0])
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
            timesteps = sigma_to_t(sigmas, torch.log(train_sigmas)).to(torch.float32)
        self._set_sigmas(sigmas)
        return timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: Timestep) -> torch.Tensor:
        """x_t = x / sqrt(sigma^2 + 1): the network was trained on the variance-preserving x_t."""
        self._check_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        """x at sigma_i -> x at sigma_{i+1} (module docstring); returns prev_sample and pred_original_sample."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"timestep={timestep!r} is an integer: pass one of scheduler.timesteps (floats), "
                             f"not a step index from enumerate()")
        i = self._start_step(timestep)
        # compute in at least float32 (half-precision inputs are upcast; float64 stays float64)
        sample = sample.to(torch.promote_types(sample.dtype, torch.float32))
        sigma = self.sigmas[i]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        # sigma_hat = sigma_i (1 + gamma_i)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn(model_output.shape, generator, model_output.dtype, model_output.device)
            # x + sqrt(sigma_hat^2 - sigma_i^2) s_noise z
            sample = sample + noise * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        if self.config.prediction_type == "epsilon":
            # D = x - sigma_hat eps_theta
            pred_x0 = sample - sigma_hat * model_output
        elif self.config.prediction_type == "v_prediction":
            # D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v_theta
            pred_x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + (sample / (sigma ** 2 + 1))
        else:
            pred_x0 = model_output
        # dx/dsigma = (x - D) / sigma_hat
        derivative = (sample - pred_x0) / sigma_hat
        # sigma_{i+1} - sigma_hat
        dt = self.sigmas[i + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).to(model_output.dtype)
        self._step_index += 1
        return self._output(prev_sample, pred_x0, return_dict)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        """x = x_0 + sigma eps: the forward process in the variance-exploding form this sampler walks."""
        sigma = self._sigmas_at(timesteps, original_samples)
        return original_samples + noise * sigma


__all__ = ["EulerConfig", "EulerDiscreteScheduler", "SchedulerOutput"]
