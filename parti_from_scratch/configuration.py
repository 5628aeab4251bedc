"""Model configs as dataclasses whose field names are the keys of the matching config.json.

A transformers or diffusers folder stores a model's hyper-parameters in
`config.json`; our `@dataclass` configs use the same key names, so
`from_pretrained` reads that file directly. Keys we do not model (bookkeeping
such as `_diffusers_version`, or options that do not change the computation)
are ignored; a key that changes the computation and that we do not support is
refused with an error rather than silently dropped (see `unsupported`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Type, TypeVar, Union

T = TypeVar("T")
PathLike = Union[str, Path]


class ConfigError(ValueError):
    """A config file is missing, unreadable or describes another architecture."""


def resolve_folder(path: PathLike, subfolder: Optional[str] = None) -> Path:
    """`path/subfolder` as a Path, with a clear error if it does not exist."""
    folder = Path(path)
    if subfolder:
        folder = folder / subfolder
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such file or folder")
    return folder


def read_json(path: PathLike) -> dict:
    """Read a JSON object from `path`, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_from_dict(cls: Type[T], values: Mapping[str, Any], source: str = "config",
                     unsupported: Optional[Mapping[str, Any]] = None) -> T:
    """Build dataclass `cls` from the keys of `values` that it declares; ignore the rest.

    `unsupported` maps key -> the only value we support; a config that sets such a
    key to anything else raises ConfigError naming `source` and the key.
    """
    for key, allowed in (unsupported or {}).items():
        if key in values and values[key] is not None and values[key] != allowed:
            raise ConfigError(f"{source}: {key}={values[key]!r} is not supported (only {allowed!r})")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict:
    """The dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
