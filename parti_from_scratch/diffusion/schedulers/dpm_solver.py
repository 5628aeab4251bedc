"""DPM-Solver++ (2M): a multistep exponential integrator for the diffusion ODE (Lu et al. 2022, arXiv 2211.01095).

Tutorial "Parti原理与代码实例讲解" §4.2's reverse process, solved as an ODE in the
half-log-SNR lambda_t = log(alpha_t / sigma_t), where alpha_t = sqrt(alpha_bar_t) and
sigma_t = sqrt(1 - alpha_bar_t) (schedule.alpha_sigma_from_sigma). The network is turned
into a data prediction x0_theta (process.predict_x0); with h = lambda_t - lambda_s the
update from s to t is, to first order (Lu++ Eq. 9, the same as DDIM),

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0,                 D0 = x0_theta(x_s)

and with the previous step's prediction (multistep, "2M"; Lu++ Algorithm 2), h_0 = lambda_s - lambda_{s'},
r_0 = h_0 / h, D1 = (x0_theta(x_s) - x0_theta(x_{s'})) / r_0:

    midpoint: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0 - 1/2 alpha_t (e^{-h} - 1) D1
    heun:     x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0 + alpha_t ((e^{-h} - 1) / h + 1) D1

Also here: third order (Lu++ Appendix / Lu et al. 2022a, arXiv 2206.00927, Eq. for DPM-Solver-3),
the original noise-prediction DPM-Solver (algorithm_type "dpmsolver", x_t = (alpha_t / alpha_s) x_s
- sigma_t (e^h - 1) eps_theta ...) and the SDE variant "sde-dpmsolver++" (Lu++ §5, Eq. 21),

    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D0 [+ 1/2 alpha_t (1 - e^{-2h}) D1]
          + sigma_t sqrt(1 - e^{-2h}) z.

The first steps use lower orders while past predictions accumulate; with
`lower_order_final` and fewer than 15 steps the last steps drop back to orders 1 and 2
(which is stabler), and the last step is always first order when the final sigma is 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

import torch

from ...configuration import Refused, require
from ..process import predict_eps, predict_x0, randn
from ..schedule import alpha_sigma_from_sigma, karras_sigmas, log_snr
from .base import SigmaScheduler, SchedulerOutput, ThresholdingConfig, Timestep, interp_sigmas, sigma_to_t

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")


@dataclass
class DPMSolverConfig(ThresholdingConfig):
    timestep_spacing: str = "linspace"
    solver_order: int = 2                            # 1, 2 or 3 past predictions per step (2 = "2M")
    algorithm_type: str = "dpmsolver++"              # x0_theta ODE (++), eps_theta ODE (dpmsolver), or the SDE
    solver_type: str = "midpoint"                    # the second-order correction: midpoint or heun
    lower_order_final: bool = True                   # orders 1 and 2 for the last steps when there are fewer than 15
    euler_at_final: bool = False                     # always a first-order last step
    use_karras_sigmas: bool = False                  # place sigmas by Karras Eq. 5 (rho = 7)
    final_sigmas_type: str = "zero"                  # the sigma after the last step: 0, or sigma at t = 0
    lambda_min_clipped: float = -float("inf")        # drop timesteps whose log-SNR lambda_t is below this
    rescale_betas_zero_snr: bool = False             # make alpha_bar_T = 0 (Lin et al. 2023)
    variance_type: Optional[str] = None              # a DDPM config's key; learned variances are not supported here

    choices: ClassVar[dict] = {**ThresholdingConfig.choices, "solver_order": (1, 2, 3),
                               "algorithm_type": ALGORITHM_TYPES, "solver_type": ("midpoint", "heun"),
                               "final_sigmas_type": ("zero", "sigma_min")}
    refused: ClassVar[dict] = {
        "use_exponential_sigmas": Refused((False,), "exponentially spaced sigmas"),
        "use_beta_sigmas": Refused((False,), "beta-distribution spaced sigmas"),
        "use_lu_lambdas": Refused((False,), "log-SNR spaced timesteps"),
        "use_flow_sigmas": Refused((False,), "flow-matching sigmas"),
        "use_dynamic_shifting": Refused((False,), "resolution-dependent timestep shifting"),
    }

    def normalize(self) -> None:
        # configs written for DEIS / UniPC name their own variants; these map to the nearest DPM-Solver++ setting
        if self.algorithm_type == "deis":
            self.algorithm_type = "dpmsolver++"
        if self.solver_type in ("logrho", "bh1", "bh2"):
            self.solver_type = "midpoint"

    def check(self) -> None:
        super().check()
        require(self.variance_type not in ("learned", "learned_range"),
                f"variance_type={self.variance_type!r} (a network that also predicts its variance) is "
                f"not supported by DPMSolverMultistepScheduler; use None")
        require(not (self.algorithm_type == "dpmsolver" and self.final_sigmas_type == "zero"),
                "final_sigmas_type='zero' needs a data-prediction solver (algorithm_type 'dpmsolver++' "
                "or 'sde-dpmsolver++'); use final_sigmas_type='sigma_min' with 'dpmsolver'")


class DPMSolverMultistepScheduler(SigmaScheduler):
    """DPM-Solver++ 2M by default; `from_config` / `from_pretrained` take diffusers configs of the same name."""
    config_class: ClassVar[type] = DPMSolverConfig
    timestep_dtype: ClassVar[torch.dtype] = torch.int64

    def __init__(self, **config):
        super().__init__(**config)
        self.model_outputs: List[Optional[torch.Tensor]] = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _make_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        c = self.config
        # timesteps with lambda_t < lambda_min_clipped are cut from the top of the schedule
        lambdas = log_snr(self.alpha_bar) / 2
        last = c.num_train_timesteps - int(torch.searchsorted(lambdas.flip(0), torch.tensor(c.lambda_min_clipped)))
        if c.timestep_spacing == "trailing":
            timesteps = self._spaced(num_inference_steps, last_timestep=last)
        else:
            # N + 1 points from the top down, dropping the last (t = 0)
            timesteps = self._spaced(num_inference_steps + 1, last_timestep=last)[:-1]
        train_sigmas = self.training_sigmas()
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), num_inference_steps)
            timesteps = sigma_to_t(sigmas, torch.log(train_sigmas))
            if c.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = interp_sigmas(timesteps, train_sigmas)
        self._set_sigmas(sigmas)
        return timesteps.to(torch.int64)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _alpha_sigma_lambda(self, index: int):
        """(alpha_t, sigma_t, lambda_t) at sigmas[index]."""
        alpha_t, sigma_t = alpha_sigma_from_sigma(self.sigmas[index])
        # lambda_t = log alpha_t - log sigma_t
        return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0_theta for the ++ solvers, eps_theta for "dpmsolver", from whatever the network predicts."""
        alpha_t, sigma_t = alpha_sigma_from_sigma(self.sigmas[self._step_index])
        if self.config.algorithm_type == "dpmsolver":
            eps = predict_eps(model_output, sample, alpha_t, sigma_t, self.config.prediction_type)
            if self.config.thresholding:
                x0 = self._clip_x0(predict_x0(eps, sample, alpha_t, sigma_t, "epsilon"))
                eps = (sample - alpha_t * x0) / sigma_t
            return eps
        return self._clip_x0(predict_x0(model_output, sample, alpha_t, sigma_t, self.config.prediction_type))

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor, generator=None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True):
        """One multistep update from sigmas[i] to sigmas[i+1] (module docstring); returns prev_sample."""
        i = self._start_step(timestep)
        c, n = self.config, len(self.timesteps)
        first_order_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                            or c.final_sigmas_type == "zero")
        second_last = i == n - 2 and c.lower_order_final and n < 15
        model_output = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]
        # compute in at least float32 (half-precision inputs are upcast; float64 stays float64)
        sample = sample.to(torch.promote_types(sample.dtype, torch.float32))
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":
            noise = variance_noise if variance_noise is not None else \
                randn(model_output.shape, generator, torch.float32, model_output.device)
            noise = noise.to(device=model_output.device, dtype=torch.float32)
        if c.solver_order == 1 or self.lower_order_nums < 1 or first_order_final:
            order = 1
        elif c.solver_order == 2 or self.lower_order_nums < 2 or second_last:
            order = 2
        else:
            order = 3
        prev_sample = self._update(order, sample, noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return self._output(prev_sample.to(model_output.dtype), None, return_dict)

    def _update(self, order: int, sample: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """x at sigmas[i] -> x at sigmas[i+1] using the last `order` converted outputs (the equations above)."""
        i, algorithm = self._step_index, self.config.algorithm_type
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(i)
        m0 = self.model_outputs[-1]
        # h = lambda_t - lambda_s
        h = lambda_t - lambda_s0
        D0, D1, D2 = m0, None, None
        if order >= 2:
            _, _, lambda_s1 = self._alpha_sigma_lambda(i - 1)
            m1 = self.model_outputs[-2]
            # r0 = h_0 / h, h_0 = lambda_s - lambda_{s'}
            r0 = (lambda_s0 - lambda_s1) / h
            # D1 = (m0 - m1) / r0
            D1 = (1.0 / r0) * (m0 - m1)
        if order == 3:
            _, _, lambda_s2 = self._alpha_sigma_lambda(i - 2)
            m2 = self.model_outputs[-3]
            r1 = (lambda_s1 - lambda_s2) / h
            D1_0, D1_1 = D1, (1.0 / r1) * (m1 - m2)
            # second differences: D1 extrapolated to s, D2 = (D1_0 - D1_1) / (r0 + r1)
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        if algorithm == "dpmsolver++":
            # phi_1 = e^{-h} - 1
            phi_1 = torch.exp(-h) - 1.0
            x_t = (sigma_t / sigma_s0) * sample - (alpha_t * phi_1) * D0
            if order == 2 and self.config.solver_type == "midpoint":
                x_t = x_t - 0.5 * (alpha_t * phi_1) * D1
            elif order >= 2:
                x_t = x_t + (alpha_t * (phi_1 / h + 1.0)) * D1
            if order == 3:
                x_t = x_t - (alpha_t * ((phi_1 + h) / h ** 2 - 0.5)) * D2
            return x_t
        if algorithm == "dpmsolver":
            # phi_1 = e^{h} - 1
            phi_1 = torch.exp(h) - 1.0
            x_t = (alpha_t / alpha_s0) * sample - (sigma_t * phi_1) * D0
            if order == 2 and self.config.solver_type == "midpoint":
                x_t = x_t - 0.5 * (sigma_t * phi_1) * D1
            elif order >= 2:
                x_t = x_t - (sigma_t * (phi_1 / h - 1.0)) * D1
            if order == 3:
                x_t = x_t - (sigma_t * ((phi_1 - h) / h ** 2 - 0.5)) * D2
            return x_t
        # sde-dpmsolver++: 1 - e^{-2h}
        one_minus = 1.0 - torch.exp(-2.0 * h)
        x_t = (sigma_t / sigma_s0 * torch.exp(-h)) * sample + (alpha_t * one_minus) * D0
        if order == 2 and self.config.solver_type == "midpoint":
            x_t = x_t + 0.5 * (alpha_t * one_minus) * D1
        elif order >= 2:
            x_t = x_t + (alpha_t * (one_minus / (-2.0 * h) + 1.0)) * D1
        if order == 3:
            x_t = x_t + (alpha_t * ((one_minus - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
        # + sigma_t sqrt(1 - e^{-2h}) z
        return x_t + sigma_t * torch.sqrt(one_minus) * noise

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps at each sample's sigma (Ho Eq. 4 in DPM-Solver's notation)."""
        alpha_t, sigma_t = alpha_sigma_from_sigma(self._sigmas_at(timesteps, original_samples))
        return alpha_t * original_samples + sigma_t * noise


__all__ = ["DPMSolverConfig", "DPMSolverMultistepScheduler", "SchedulerOutput"]
