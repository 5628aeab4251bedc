"""The sampler settings a model folder carries: `sampling_defaults.json`.

A pipeline folder in the diffusers layout (model_index.json, tokenizer/,
text_encoder/, unet/, vae/, scheduler/) may hold one more file beside
model_index.json:

    sampling_defaults.json    {"num_inference_steps": 20, "guidance_scale": 5.0, "training_resolution": 64}

the number of sampler steps and the classifier-free guidance weight w to use
when the caller names none (`pipe(prompt)`, `parti-from-scratch generate`,
`parti-from-scratch eval`), and, optionally, the side in pixels of the square
images the model was trained on: a call at another size then warns, naming it.
A folder that does not state it (Stable Diffusion's) never warns about sizes.
The sampler itself is the folder's `scheduler/` (model_index.json names its
class), so it is not repeated here. diffusers
ignores the file. A folder without it (Stable Diffusion's) and a single-file
checkpoint get Stable Diffusion's customary 50 steps and w = 7.5.

Training writes the recipe's `sampler_steps`, `guidance_scale` and image size
into this file of the pipeline folder it saves, so a retrained model carries its own.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

from parti_from_scratch.configuration import ConfigError

FILE_NAME = "sampling_defaults.json"


@dataclass(frozen=True)
class SamplingDefaults:
    """What a model folder recommends; the field names are the keys of sampling_defaults.json."""
    num_inference_steps: int = 50      # sampler steps (Stable Diffusion's customary 50)
    guidance_scale: float = 7.5        # classifier-free guidance weight w (w <= 1: no guidance)
    training_resolution: Optional[int] = None  # side of the square training images in pixels (None: not stated)

    def __post_init__(self):
        check_sampling_defaults(self.num_inference_steps, self.guidance_scale, FILE_NAME, self.training_resolution)

    @classmethod
    def read(cls, folder: Union[str, Path, None]) -> "SamplingDefaults":
        """folder/sampling_defaults.json, or the built-in defaults when `folder` is not a folder or has no such file."""
        if folder is None or not Path(folder).is_dir():
            return cls()
        path = Path(folder) / FILE_NAME
        if not path.is_file():
            return cls()
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a JSON file ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(known))}")
        check_sampling_defaults(values.get("num_inference_steps", cls.num_inference_steps),
                                values.get("guidance_scale", cls.guidance_scale), str(path),
                                values.get("training_resolution"))
        return cls(**values)

    def save(self, folder: Union[str, Path]) -> Path:
        """Write folder/sampling_defaults.json (a training_resolution of None is left out)."""
        path = Path(folder) / FILE_NAME
        values = {k: v for k, v in asdict(self).items() if v is not None}
        path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
        return path

    def describe(self) -> str:
        """'20 steps, guidance 5.0': for help texts and logs."""
        return f"{self.num_inference_steps} steps, guidance {self.guidance_scale:g}"


def check_sampling_defaults(num_inference_steps, guidance_scale, source: str, training_resolution=None) -> None:
    """Steps a positive int, guidance a finite number >= 0, training_resolution None or a positive int;
    the error names `source` and the key."""
    if training_resolution is not None and (isinstance(training_resolution, bool)
                                            or not isinstance(training_resolution, int) or training_resolution < 1):
        raise ConfigError(f"{source}: training_resolution must be an integer >= 1, got {training_resolution!r}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ConfigError(f"{source}: num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ConfigError(f"{source}: guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
