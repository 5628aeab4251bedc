"""Samplers: five ways to run the reverse process of tutorial §4.2 with a trained noise predictor.

    DDPMScheduler                ancestral sampling (Ho et al. 2020)
    DDIMScheduler                deterministic non-Markovian steps, eta for noise (Song et al. 2021)
    PNDMScheduler                pseudo Runge-Kutta / linear multistep, Stable Diffusion 1.x's default (Liu et al. 2022)
    EulerDiscreteScheduler       Euler steps of the probability-flow ODE in sigma (Karras et al. 2022)
    DPMSolverMultistepScheduler  DPM-Solver++ 2M (Lu et al. 2022)

Each reads a diffusers `scheduler_config.json` (`from_pretrained`, `from_config`) and
offers `set_timesteps`, `timesteps`, `init_noise_sigma`, `scale_model_input`, `step`
and `add_noise`. `SCHEDULERS` maps the short names a command line uses to the classes.
"""
from .base import DiffusionScheduler, SchedulerConfig, SchedulerOutput, SigmaScheduler, timestep_grid
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .pndm import PNDMScheduler

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}

__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "DiffusionScheduler",
           "EulerDiscreteScheduler", "PNDMScheduler", "SCHEDULERS", "SchedulerConfig", "SchedulerOutput",
           "SigmaScheduler", "timestep_grid"]
