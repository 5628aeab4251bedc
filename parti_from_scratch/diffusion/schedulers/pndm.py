"""PNDM: pseudo numerical methods on the DDIM transfer (Liu et al. 2022, arXiv 2202.09778).

Tutorial "Parti原理与代码实例讲解" §4.2 / §5.3: the listing builds
`PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)`,
and Stable Diffusion 1.x ships it with `skip_prk_steps=True`.

The transfer phi moves x_t to x_{t-delta} given a noise estimate e (Liu Eq. 9; it equals a DDIM step):

    phi(x_t, e, t, t-delta) = sqrt(alpha_bar_{t-delta} / alpha_bar_t) x_t
        - (alpha_bar_{t-delta} - alpha_bar_t) e
          / (alpha_bar_t sqrt(1 - alpha_bar_{t-delta}) + sqrt(alpha_bar_t (1 - alpha_bar_t) alpha_bar_{t-delta}))

and the sampler feeds phi a better e than one network call (delta = floor(T / N)):

* warm-up, the pseudo Runge-Kutta method (Liu Eq. 13), for the first three steps:
      e1 = eps(x_t, t)                      x1 = phi(x_t, e1, t, t - delta/2)
      e2 = eps(x1, t - delta/2)             x2 = phi(x_t, e2, t, t - delta/2)
      e3 = eps(x2, t - delta/2)             x3 = phi(x_t, e3, t, t - delta)
      e4 = eps(x3, t - delta)               x_{t-delta} = phi(x_t, (e1 + 2 e2 + 2 e3 + e4) / 6, t, t - delta)
* then the linear multistep method (Liu Eq. 12, 4th-order Adams-Bashforth on e):
      e' = (55 e_t - 59 e_{t+delta} + 37 e_{t+2 delta} - 9 e_{t+3 delta}) / 24
  with orders 1, 2, 3 while fewer past values exist.
* `skip_prk_steps=True` (PLMS, as Stable Diffusion uses it) replaces the warm-up by
  one Euler step, x' = phi(x_t, e_t, t, t - delta), and its Heun correction, which
  evaluates the network again at t - delta and redoes the step with (e_t + e(x', t - delta)) / 2;
  the schedule lists t - delta twice for that.

For t - delta < 0, alpha_bar_{t-delta} is 1 (`set_alpha_to_one`) or alpha_bar_0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

import torch

from ...configuration import Refused
from ..process import predict_eps, signal_noise_scales
from .base import DiffusionScheduler, SchedulerConfig, SchedulerOutput, Timestep


@dataclass
class PNDMConfig(SchedulerConfig):
    skip_prk_steps: bool = False                     # True: PLMS (Euler + Heun start); False: Runge-Kutta warm-up
    set_alpha_to_one: bool = False                   # alpha_bar before the first training step: 1, or else alpha_bar_0

    choices: ClassVar[dict] = {**SchedulerConfig.choices, "prediction_type": ("epsilon", "v_prediction")}
    refused: ClassVar[dict] = {"rescale_betas_zero_snr": Refused((False,), "a zero-terminal-SNR schedule")}


class PNDMScheduler(DiffusionScheduler):
    """PNDM / PLMS sampling; `from_config` / `from_pretrained` take diffusers PNDMScheduler configs."""
    config_class: ClassVar[type] = PNDMConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.timesteps = None
        self._reset()

    def _reset(self) -> None:
        self.counter = 0                             # network calls so far
        self.ets: List[torch.Tensor] = []           # past noise estimates e, oldest first
        self.cur_sample: Optional[torch.Tensor] = None   # x_t at the start of the current step
        self.cur_model_output = 0                   # Runge-Kutta: running (e1 + 2 e2 + 2 e3) / 6
        self.prk_timesteps = torch.zeros(0, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self._reset()
        super().set_timesteps(num_inference_steps, device)

    def _make_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        if not self.config.skip_prk_steps and num_inference_steps < 4:
            raise ValueError(f"num_inference_steps must be at least 4 with skip_prk_steps=False (the Runge-Kutta "
                             f"warm-up takes 3 steps), got {num_inference_steps}")
        ascending = self._spaced(num_inference_steps).flip(0).to(torch.int64)      # t_0 < t_1 < ... < t_{N-1}
        if self.config.skip_prk_steps:
            # t_{N-1}, t_{N-2}, t_{N-2} (the Heun correction), t_{N-3}, ..., t_0
            plms = torch.cat([ascending[:-1], ascending[-2:-1], ascending[-1:]]).flip(0)
            return plms
        half = self.config.num_train_timesteps // num_inference_steps // 2
        # the three Runge-Kutta steps over the four largest timesteps a < b < c < d: d, c+h, c+h, c, c, b+h, b+h, b, ...
        top = ascending[-4:]
        with_half = torch.stack([top, top + half], dim=1).reshape(-1)[:-1]          # a, a+h, b, b+h, c, c+h, d
        prk = with_half.repeat_interleave(2)[1:-1].flip(0)
        self.prk_timesteps = prk
        # then t_{N-4}, ..., t_0 by the multistep method
        plms = ascending[:-3].flip(0)
        return torch.cat([prk, plms])

    def _transfer(self, sample: torch.Tensor, t: int, prev_t: int, eps: torch.Tensor) -> torch.Tensor:
        """phi(x_t, e, t, t') of Liu Eq. 9 (module docstring)."""
        alpha_bar_t, alpha_bar_prev = self.alpha_bar[t], self.alpha_bar_prev(prev_t)
        if self.config.prediction_type == "v_prediction":
            eps = predict_eps(eps, sample, *signal_noise_scales(alpha_bar_t), "v_prediction")
        # sqrt(alpha_bar_{t'} / alpha_bar_t)
        sample_coeff = (alpha_bar_prev / alpha_bar_t) ** 0.5
        # alpha_bar_t sqrt(1 - alpha_bar_{t'}) + sqrt(alpha_bar_t (1 - alpha_bar_t) alpha_bar_{t'})
        eps_denominator = alpha_bar_t * (1 - alpha_bar_prev) ** 0.5 + \
            (alpha_bar_t * (1 - alpha_bar_t) * alpha_bar_prev) ** 0.5
        return sample_coeff * sample - (alpha_bar_prev - alpha_bar_t) * eps / eps_denominator

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             generator=None, return_dict: bool = True):
        """One network evaluation's worth of PNDM (module docstring); `generator` is unused (deterministic)."""
        self._require_timesteps()
        self._check_timestep(timestep)
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            prev_sample = self._step_runge_kutta(model_output, int(timestep), sample)
        else:
            prev_sample = self._step_multistep(model_output, int(timestep), sample)
        self.counter += 1
        return self._output(prev_sample, None, return_dict)

    def _step_runge_kutta(self, eps: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """Stage counter % 4 of a pseudo Runge-Kutta step from t = prk_timesteps[4k] (Liu Eq. 13)."""
        stage = self.counter % 4
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        # stages 0 and 2 go half a stride further than the timestep they were called at
        prev_t = timestep - (half if stage % 2 == 0 else 0)
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        if stage == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * eps
            self.ets.append(eps)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * eps
        else:
            # (e1 + 2 e2 + 2 e3 + e4) / 6
            eps = self.cur_model_output + 1 / 6 * eps
            self.cur_model_output = 0
        return self._transfer(self.cur_sample, t, prev_t, eps)

    def _step_multistep(self, eps: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """The linear multistep update (Liu Eq. 12), with PLMS's Euler + Heun start."""
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("the multistep phase needs the 3 Runge-Kutta steps first")
        stride = self.config.num_train_timesteps // self.num_inference_steps
        t, prev_t = timestep, timestep - stride
        if self.counter == 1 and self.config.skip_prk_steps:
            # Heun correction of the first step: redo t + stride -> t from the saved x with the mean of both estimates
            t, prev_t = timestep + stride, timestep
            return self._transfer(self.cur_sample, t, prev_t, (eps + self.ets[-1]) / 2)
        self.ets = self.ets[-3:] + [eps]
        if self.counter == 0:
            # first Euler step; keep x_t for the Heun correction
            self.cur_sample = sample
            return self._transfer(sample, t, prev_t, eps)
        e = self.ets
        if len(e) == 2:
            # (3 e_t - e_{t+delta}) / 2
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            # (23 e_t - 16 e_{t+delta} + 5 e_{t+2 delta}) / 12
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            # (55 e_t - 59 e_{t+delta} + 37 e_{t+2 delta} - 9 e_{t+3 delta}) / 24
            eps = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        return self._transfer(sample, t, prev_t, eps)


__all__ = ["PNDMConfig", "PNDMScheduler", "SchedulerOutput"]
