"""What every sampler shares: the config keys, the noise schedule, timestep spacing, add_noise, load and save.

A scheduler turns a trained noise predictor into a sampler. All five in this
package sample from the same forward process (tutorial "Parti原理与代码实例讲解" §4.2,
Ho et al. 2020 Eq. 4), differing only in how they step x_t -> x_{t-1}; this file
holds the rest, so each scheduler file is its update rule and nothing else.

Configs use the key names of a diffusers `scheduler_config.json`, so a Stable
Diffusion folder's `scheduler/scheduler_config.json` loads directly and
`save_pretrained` writes a file the reference library reads back. Unknown keys are
ignored (a config written for one scheduler builds any other); a key that changes
the computation in a way we do not implement is refused with a ValueError.

Timestep spacing (Lin et al. 2023, arXiv 2305.08891, Table 2), for N inference steps
of a T-step schedule, as the reference computes it:

    linspace:  t_i = round(i (T - 1) / (N - 1))                       i = 0 .. N-1, in descending order
    leading:   t_i = i floor(T / N) + steps_offset
    trailing:  t_i = round(T - i T / N) - 1
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from ...configuration import (Config, ConfigError, PathLike, config_from_dict, config_to_dict, positive, read_json,
                              require)
from ...outputs import ModelOutput
from ..process import dynamic_threshold, expand_to, q_sample, signal_noise_scales, velocity
from ..schedule import (BETA_SCHEDULES, MAX_TRAIN_TIMESTEPS, alpha_bar_from_betas, alphas_from_betas,
                        check_betas, make_betas, sigma_from_alpha_bar)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
Timestep = Union[int, float, torch.Tensor]


@dataclass
class SchedulerConfig(Config):
    """The keys every scheduler reads (diffusers scheduler_config.json names)."""
    num_train_timesteps: int = 1000                  # T, the length of the training schedule
    beta_start: float = 0.0001                       # beta_1
    beta_end: float = 0.02                           # beta_T
    beta_schedule: str = "linear"                    # see schedule.BETA_SCHEDULES
    trained_betas: Optional[Tuple[float, ...]] = None  # explicit beta_1 .. beta_T, overrides the three above
    prediction_type: str = "epsilon"                 # what the network outputs: epsilon, v_prediction or sample
    timestep_spacing: str = "leading"                # how N inference timesteps are picked from T
    steps_offset: int = 0                            # added to "leading" timesteps (1 for Stable Diffusion)

    # allowed values of the string-valued keys
    choices: ClassVar[Mapping[str, Tuple[Any, ...]]] = {
        "beta_schedule": BETA_SCHEDULES,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": TIMESTEP_SPACINGS,
    }

    def check(self) -> None:
        T = self.num_train_timesteps
        require(2 <= T <= MAX_TRAIN_TIMESTEPS,
                f"num_train_timesteps={T}: must be an integer from 2 to {MAX_TRAIN_TIMESTEPS:,}")
        if self.trained_betas is not None:
            require(len(self.trained_betas) == T, f"trained_betas has {len(self.trained_betas)} values, "
                                                  f"num_train_timesteps={T}")
            check_betas(torch.tensor(self.trained_betas, dtype=torch.float64))
        elif self.beta_schedule in ("linear", "scaled_linear"):
            # every beta_t lies between beta_start and beta_end, so both ends in (0, 1) keep all of them there
            require(0 < self.beta_start < 1, f"beta_start={self.beta_start}: must be in (0, 1)")
            require(0 < self.beta_end < 1, f"beta_end={self.beta_end}: must be in (0, 1)")
            require(self.beta_start <= self.beta_end,
                    f"beta_end={self.beta_end} < beta_start={self.beta_start}: the noise must grow with t")

    # Besides its fields a config remembers which keys were given (the rest are this class's defaults) and
    # the keys it does not use, carried over from the config it was built from. Converting to another
    # scheduler passes on only those two, so a DDIM built from a PNDM config gets DDIM's own default for a
    # key the PNDM config left unset, and keeps a `clip_sample` the PNDM config carried (as the reference does).
    @property
    def given(self) -> frozenset:
        """Names of the fields that were set explicitly."""
        return self.__dict__.get("_given", frozenset())

    @property
    def carried(self) -> Dict[str, Any]:
        """Keys this scheduler does not use, kept from the config it was built from."""
        return self.__dict__.get("_carried", {})

    def option(self, name: str, default: Any) -> Any:
        """The field `name` if this config has it, else `default` (carried keys are never options)."""
        return getattr(self, name) if name in self.__dataclass_fields__ else default

    def __getattr__(self, name: str) -> Any:
        carried = self.__dict__.get("_carried", {})
        if name in carried:
            return carried[name]
        raise AttributeError(f"{type(self).__name__} has no key {name!r}")

    def to_dict(self) -> dict:
        """Every key, as save_pretrained writes it."""
        return {**json.loads(json.dumps(self.carried)), **config_to_dict(self)}

    def inherited_dict(self) -> dict:
        """What another scheduler's from_config takes from this one: the given keys and the carried ones."""
        fields = config_to_dict(self)
        return {**self.carried, **{k: v for k, v in fields.items() if k in self.given}}

    # read like the reference's FrozenDict: config["key"], dict(config), config.keys()
    def keys(self) -> List[str]:
        return [f.name for f in dataclasses.fields(self)] + [k for k in self.carried if k not in self.__dict__]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.keys() else default

    def items(self) -> Iterator[Tuple[str, Any]]:
        return ((k, self[k]) for k in self.keys())


@dataclass
class ThresholdingConfig(SchedulerConfig):
    """Dynamic thresholding of x0_theta (Saharia et al. 2022, §2.3); off for latent models such as Stable Diffusion."""
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995        # the quantile of |x0| used as the threshold s
    sample_max_value: float = 1.0                    # the largest s

    def check(self) -> None:
        super().check()
        require(0 < self.dynamic_thresholding_ratio <= 1,
                f"dynamic_thresholding_ratio={self.dynamic_thresholding_ratio}: must be in (0, 1]")
        positive(self, "sample_max_value")


@dataclass
class ClippingConfig(ThresholdingConfig):
    """Static clipping of x0_theta to [-clip_sample_range, clip_sample_range] (pixel-space DDPM/DDIM)."""
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def check(self) -> None:
        super().check()
        positive(self, "clip_sample_range")


@dataclass
class SchedulerOutput(ModelOutput):
    """What `step` returns: x_{t-1}, and the x_0 prediction where the sampler forms one."""
    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def _linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """num evenly spaced float64 values from start to stop inclusive: start + i * step, the last set to stop exactly."""
    if num == 1:
        return torch.full((1,), float(start), dtype=torch.float64)
    values = torch.arange(num, dtype=torch.float64) * ((stop - start) / (num - 1)) + start
    values[-1] = stop
    return values


def timestep_grid(spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int = 0,
                  last_timestep: Optional[int] = None, round_linspace: bool = True) -> torch.Tensor:
    """N timesteps out of T in descending order (float64), by the rules in the module docstring.

    `last_timestep` (default T) truncates the schedule from above; "linspace" values
    are left fractional when `round_linspace` is False (the Euler sampler interpolates sigma).
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose one of {TIMESTEP_SPACINGS}")
    last = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        # t_i = i (T - 1) / (N - 1)
        grid = _linspace(0, last - 1, num_steps)
        grid = grid.round() if round_linspace else grid
        return grid.flip(0)
    if spacing == "leading":
        # t_i = i floor(T / N) + steps_offset
        grid = torch.arange(num_steps, dtype=torch.float64) * (last // num_steps) + steps_offset
        return grid.flip(0)
    # trailing: t_i = round(T - i T / N) - 1, the stride taken as the difference (T - T/N) - T, as an arange computes it
    step = num_train_timesteps / num_steps
    stride = (last - step) - last
    count = min(num_steps, math.ceil(-last / -step))
    grid = last + torch.arange(count, dtype=torch.float64) * stride
    return grid.round() - 1


class DiffusionScheduler:
    """The shared part of every sampler; subclasses set `config_class` and implement `_make_timesteps` and `step`."""
    config_class: ClassVar[type] = SchedulerConfig
    order: ClassVar[int] = 1
    timestep_dtype: ClassVar[torch.dtype] = torch.int64
    init_noise_sigma: ClassVar[float] = 1.0           # the standard deviation of x_T ~ N(0, I)

    def __init__(self, **config: Any):
        names = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(config) - names - set(self.config_class.refused))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected config keys {unknown}; known keys: {sorted(names)} "
                            f"(from_config ignores unknown keys)")
        self.config = config_from_dict(self.config_class, config, source=type(self).__name__)
        self.config._given = frozenset(k for k in config if k in names)
        c = self.config
        self.betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.trained_betas,
                                c.option("rescale_betas_zero_snr", False))
        self.alphas = alphas_from_betas(self.betas)
        self.alpha_bar = alpha_bar_from_betas(self.betas)
        # alpha_bar "before" t = 0, used when a step lands below t = 0: 1, or alpha_bar_0 if set_alpha_to_one is False
        self.final_alpha_cumprod = torch.tensor(1.0) if c.option("set_alpha_to_one", True) else self.alpha_bar[0]
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[torch.Tensor] = torch.arange(c.num_train_timesteps - 1, -1, -1,
                                                              dtype=self.timestep_dtype)

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], SchedulerConfig], **overrides: Any) -> "DiffusionScheduler":
        """Build from a config dict (or another scheduler's `.config`); keys this scheduler lacks are ignored.

        Keys a reference config lists in `_use_default_values` were defaults of its class and are
        not inherited; likewise only the explicitly set keys of one of our configs are.
        """
        if isinstance(config, SchedulerConfig):
            values = config.inherited_dict()
        else:
            values = dict(config)
            defaults = set(values.pop("_use_default_values", None) or ())
            values = {k: v for k, v in values.items() if k not in defaults}
        values.update(overrides)
        # null for a key whose default is not None means "not set" (a DPM-Solver config's variance_type: null
        # handed to DDPM keeps DDPM's own default, as diffusers' DDPM treats it like fixed_small)
        values = {k: v for k, v in values.items() if v is not None or cls._default_is_none(k)}
        names = {f.name for f in dataclasses.fields(cls.config_class)} | set(cls.config_class.refused)
        scheduler = cls(**{k: v for k, v in values.items() if k in names})
        scheduler.config._carried = {k: v for k, v in values.items() if k not in names and not k.startswith("_")}
        return scheduler

    @classmethod
    def _default_is_none(cls, key: str) -> bool:
        for f in dataclasses.fields(cls.config_class):
            if f.name == key:
                return f.default is None
        return True

    @classmethod
    def from_pretrained(cls, path: PathLike, subfolder: Optional[str] = None) -> "DiffusionScheduler":
        """Read `path[/subfolder]/scheduler_config.json`; a pipeline folder's "scheduler" subfolder is found."""
        path = Path(path)
        folder = path / subfolder if subfolder else path
        if subfolder is None and not (folder / SCHEDULER_CONFIG_NAME).is_file() \
                and (path / "scheduler" / SCHEDULER_CONFIG_NAME).is_file():
            folder = path / "scheduler"
        if not path.is_file() and not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        file = path if path.is_file() else folder / SCHEDULER_CONFIG_NAME
        try:
            return cls.from_config(read_json(file))
        except ConfigError as e:
            raise ConfigError(e if str(e).startswith(str(file)) else f"{file}: {e}") from None

    def save_pretrained(self, folder: PathLike) -> Path:
        """Write `folder/scheduler_config.json`, with `_class_name` naming the matching diffusers class."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"_class_name": type(self).__name__, **self.config.to_dict()}
        path = folder / SCHEDULER_CONFIG_NAME
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    # -- the schedule -------------------------------------------------------------------------------

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t under the reference's name, for code written against it."""
        return self.alpha_bar

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device: Optional[Union[str, torch.device]] = None) -> None:
        """Choose the N timesteps to sample at (by `timestep_spacing`) and reset the sampler's state."""
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an integer from 1 to num_train_timesteps={T}, "
                             f"got {num_inference_steps!r}")
        timesteps = self._make_timesteps(num_inference_steps)
        if len(timesteps) and (timesteps.max() > T - 1 or timesteps.min() < 0):
            raise ValueError(f"num_inference_steps={num_inference_steps} with timestep_spacing="
                             f"{self.config.timestep_spacing!r} and steps_offset={self.config.steps_offset} gives "
                             f"timesteps outside [0, {T - 1}]: {_short(timesteps)}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps.to(device)

    def _make_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return self._spaced(num_inference_steps).to(self.timestep_dtype)

    def alpha_bar_prev(self, prev_t: int) -> torch.Tensor:
        """alpha_bar at the timestep a step lands on; `final_alpha_cumprod` below t = 0."""
        return self.alpha_bar[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

    def _spaced(self, num_steps: int, **kwargs: Any) -> torch.Tensor:
        c = self.config
        return timestep_grid(c.timestep_spacing, num_steps, c.num_train_timesteps, c.steps_offset, **kwargs)

    # -- helpers for step() ----------------------------------------------------------------------

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step() called before set_timesteps(num_inference_steps)")

    def _check_timestep(self, timestep: Timestep) -> None:
        if not bool((self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).any()):
            raise ValueError(f"timestep={_number(timestep)} is not in this scheduler's timesteps "
                             f"{_short(self.timesteps)}; pass one of scheduler.timesteps")

    def _clip_x0(self, pred_x0: torch.Tensor) -> torch.Tensor:
        """Threshold or clip x0_theta as the config asks (no-op for Stable Diffusion configs)."""
        c = self.config
        if c.option("thresholding", False):
            return dynamic_threshold(pred_x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        if c.option("clip_sample", False):
            return pred_x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        return pred_x0

    @staticmethod
    def _output(prev_sample: torch.Tensor, pred_original_sample: Optional[torch.Tensor], return_dict: bool):
        out = SchedulerOutput(prev_sample, pred_original_sample)
        return out if return_dict else out.to_tuple()

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[Timestep] = None) -> torch.Tensor:
        """The network's input at `timestep`; x_t itself for samplers in the variance-preserving form."""
        return sample

    # -- the forward process, for training and img2img --------------------------------------------

    def _alpha_bar_at(self, timesteps: Timestep, like: torch.Tensor) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=like.device)
        if timesteps.is_floating_point() or timesteps.min() < 0 or timesteps.max() >= len(self):
            raise ValueError(f"timesteps must be integers in [0, {len(self) - 1}], got {_short(timesteps)}")
        return self.alpha_bar.to(device=like.device, dtype=like.dtype)[timesteps].flatten()

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, one t per sample (Ho Eq. 4)."""
        return q_sample(original_samples, self._alpha_bar_at(timesteps, original_samples), noise=noise)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, §4)."""
        return velocity(sample, noise, *signal_noise_scales(expand_to(self._alpha_bar_at(timesteps, sample), sample)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class SigmaScheduler(DiffusionScheduler):
    """Shared part of the samplers that walk a list of noise levels sigma_i (Euler, DPM-Solver).

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (schedule.sigma_from_alpha_bar); an
    inference schedule is sigma at the chosen timesteps, interpolated linearly in t,
    followed by a final sigma (0, or sigma at t = 0). These samplers keep a step
    counter: the first `step` finds its timestep in the schedule, each call advances by one.
    """
    timestep_dtype: ClassVar[torch.dtype] = torch.float32

    def __init__(self, **config: Any):
        super().__init__(**config)
        if self.config.option("rescale_betas_zero_snr", False):
            # alpha_bar_T = 0 would make sigma_T infinite; use the smallest float32 step above 0 instead
            self.alpha_bar[-1] = 2 ** -24
        self.sigmas = torch.cat([sigma_from_alpha_bar(self.alpha_bar).flip(0), torch.zeros(1)])
        self.timesteps = torch.arange(len(self) - 1, -1, -1, dtype=torch.float32).to(self.timestep_dtype)
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    @property
    def step_index(self) -> Optional[int]:
        """The index into `timesteps` of the next step, or None before the first one."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at timesteps[begin_index] (img2img starts part way along the schedule)."""
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device: Optional[Union[str, torch.device]] = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self._step_index = None
        self._begin_index = None

    def _set_sigmas(self, sigmas: torch.Tensor) -> None:
        """sigmas of the chosen timesteps followed by the final one (0, or sigma at t = 0), stored in float32."""
        final = 0.0 if self.config.final_sigmas_type == "zero" else float(sigma_from_alpha_bar(self.alpha_bar[0]))
        self.sigmas = torch.cat([sigmas.to(torch.float64), torch.tensor([final], dtype=torch.float64)]).float()

    def training_sigmas(self) -> torch.Tensor:
        """sigma_t for t = 0 .. T-1 (float32, ascending)."""
        return sigma_from_alpha_bar(self.alpha_bar)

    def index_for_timestep(self, timestep: Timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Position of `timestep` in the schedule; where it occurs twice, the second (so a restart skips no sigma)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        matches = (schedule == torch.as_tensor(timestep, device=schedule.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep={_number(timestep)} is not in this scheduler's timesteps "
                             f"{_short(schedule)}; pass one of scheduler.timesteps")
        return int(matches[1 if len(matches) > 1 else 0])

    def _init_step_index(self, timestep: Timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _start_step(self, timestep: Timestep) -> int:
        """Validate `timestep`, set the counter on the first call, and return the current index."""
        self._require_timesteps()
        self._check_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"all {len(self.timesteps)} steps have been taken; call set_timesteps again")
        return self._step_index

    def _sigmas_at(self, timesteps: Timestep, like: torch.Tensor) -> torch.Tensor:
        """sigma_i for each sample's timestep (its position in the schedule, or the current step)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in timesteps]
        elif self._step_index is not None:
            indices = [self._step_index] * len(timesteps)
        else:
            indices = [self._begin_index] * len(timesteps)
        return expand_to(self.sigmas.to(device=like.device, dtype=like.dtype)[indices].flatten(), like)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        indices = torch.tensor([self.index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1)])
        train_t = self.timesteps[indices].round().long()
        return super().get_velocity(sample, noise, train_t)


def interp_sigmas(timesteps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """sigma(t) for fractional t by linear interpolation in t of the per-timestep table `sigmas` (float64).

        sigma(t) = sigma[j] + (t - j) (sigma[j+1] - sigma[j]),  j = floor(t)
    """
    t = timesteps.to(torch.float64).clamp(0, len(sigmas) - 1)
    table = sigmas.to(torch.float64)
    j = t.floor().long().clamp(max=len(sigmas) - 2)
    # sigma[j] + slope * (t - j)
    out = (table[j + 1] - table[j]) * (t - j) + table[j]
    return torch.where(t == t.floor(), table[t.long()], out)


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep whose sigma is `sigma`, by linear interpolation in log sigma.

    `log_sigmas` is log sigma_t for t = 0 .. T-1 (ascending). Float64 result.
    """
    log_sigma = torch.log(sigma.to(torch.float64).clamp(min=1e-10))
    # dists[j, i] = log sigma_i - log sigma_j: the last j with a non-negative gap brackets sigma_i from below
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low_idx = (dists >= 0).long().cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    # w: how far log sigma lies from low towards high
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return (1 - w) * low_idx + w * high_idx


def _number(t: Timestep) -> Any:
    return t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 else t


def _short(values: torch.Tensor, keep: int = 6) -> str:
    items = [_number(v) for v in values.reshape(-1)]
    if len(items) <= 2 * keep:
        return str(items)
    return f"[{', '.join(map(str, items[:keep]))}, ..., {', '.join(map(str, items[-keep:]))}] ({len(items)} values)"
