"""Diffusion, tutorial "Parti原理与代码实例讲解" §4.2: noise schedules, forward and reverse processes, samplers.

    schedule.py     beta_t, alpha_t, alpha_bar_t, SNR, the zero-terminal-SNR rescaling
    process.py      q(x_t | x_{t-1}), q(x_t | x_0), q(x_{t-1} | x_t, x_0), p_theta, L_simple
    schedulers/     DDPM, DDIM, PNDM, Euler, DPM-Solver++: one file each
    plot.py         beta_t, alpha_bar_t and log-SNR of the three schedules, as a PNG
"""
from .process import (l_simple, p_mean_variance, p_sample, posterior_variance, predict_eps, predict_x0,
                      q_mean_variance, q_posterior, q_sample, q_sample_step, q_step_mean_variance, velocity)
from .schedule import (BETA_SCHEDULES, alpha_bar_from_betas, log_snr, make_betas, rescale_zero_terminal_snr,
                       snr)
from .schedulers import (SCHEDULERS, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                         EulerDiscreteScheduler, PNDMScheduler)

__all__ = [
    "BETA_SCHEDULES", "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
    "PNDMScheduler", "SCHEDULERS", "alpha_bar_from_betas", "l_simple", "log_snr", "make_betas", "p_mean_variance",
    "p_sample", "posterior_variance", "predict_eps", "predict_x0", "q_mean_variance", "q_posterior", "q_sample",
    "q_sample_step", "q_step_mean_variance", "rescale_zero_terminal_snr", "snr", "velocity",
]
