"""Samplers: five ways to run the reverse process of tutorial §4.2 with a trained noise predictor.

    DDPMScheduler                ancestral sampling (Ho et al. 2020)
    DDIMScheduler                deterministic non-Markovian steps, eta for noise (Song et al. 2021)
    PNDMScheduler                pseudo Runge-Kutta / linear multistep, Stable Diffusion 1.x's default (Liu et al. 2022)
    EulerDiscreteScheduler       Euler steps of the probability-flow ODE in sigma (Karras et al. 2022)
    DPMSolverMultistepScheduler  DPM-Solver++ 2M (Lu et al. 2022)

Each reads a diffusers `scheduler_config.json` (`from_pretrained`, `from_config`) and
offers `set_timesteps`, `timesteps`, `init_noise_sigma`, `scale_model_input`, `step`
and `add_noise`. `SCHEDULERS` maps the short names a command line uses to the classes.

Numerics follow the reference, so trajectories agree with it to the bit in float32
(tests/test_diffusion_schedulers.py): the schedule is float32, as the models were
trained with it; a step's scalar coefficients are float32 0-dim tensors and the sample
keeps its dtype. Where we differ from the reference, on purpose:

* Euler and DPM-Solver compute in the sample's dtype (at least float32); the reference
  casts the sample to float32 inside `step`, so its float64 runs carry float32 rounding.
* "trailing" spacing gives exactly N timesteps; the reference's arange-based formula
  returns N + 1 (the last one -1) for some N (61, 103, ...).
* Errors instead of silent fallbacks: `step` before `set_timesteps` (the reference's DDPM
  then steps t -> t - 1), a timestep not in the schedule (its DPM-Solver then takes the
  last step), timesteps past T - 1 (e.g. 1000 "leading" steps with steps_offset=1), and
  `rescale_betas_zero_snr` for PNDM (its PNDM ignores the key).
* DPM-Solver's `add_noise` before `set_timesteps` uses sigma at t; the reference indexes
  its unflipped sigma table there (sigma at T - 1 - t).
* Karras-sigma Euler timesteps are fractional and can differ from the reference's in the
  last float32 bit (torch's and numpy's float32 log round differently); sigmas agree.
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
