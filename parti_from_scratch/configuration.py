"""Model configs as dataclasses whose field names are the keys of the matching config.json.

A transformers or diffusers folder stores a model's hyper-parameters in
`config.json`; our `@dataclass` configs use the same key names, so
`from_pretrained` reads that file directly. A config class declares only the
keys its model uses. Every other key of the file falls in one of two groups:

* keys that select a part of the reference architecture we do not build
  (a class embedding, another mid block, a shifted latent space): each config
  class lists them in ONE table, `refused`, key -> `Refused(accepted values,
  what the part is)`. A file that sets such a key to anything but an accepted
  value (the reference's "absent") is refused with ConfigError naming the file
  and the key;
* bookkeeping and training-only keys (`_class_name`, `_diffusers_version`,
  `initializer_range`, ...), which do not change what the model computes: ignored.

Every value is checked against its field's type hint (`int` is an integer and
not a bool, `float` any number but NaN, `Tuple[int, ...]` a list of integers,
`Optional[...]` also null), then against the class's `choices` (the allowed
values of string keys) and its own rules in `check()` (positive widths, widths
divisible by the GroupNorm groups, heads dividing the width, ...). Any failure is a
ConfigError "<file>: <key>=<value> ..."; the command line prints it as one line.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, ClassVar, Dict, Mapping, Optional, Tuple, Type, TypeVar, Union, get_args, get_origin,
                    get_type_hints)

T = TypeVar("T")
PathLike = Union[str, Path]


class ConfigError(ValueError):
    """A config file is missing, unreadable, badly typed or describes another architecture."""


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------- the refused keys

@dataclass(frozen=True)
class Refused:
    """A config key selecting a part we do not build: only the values in `accepted` ("absent") load."""
    accepted: Tuple[Any, ...]
    why: str                                    # what the part is, for the error message


def _same(a: Any, b: Any) -> bool:
    """JSON equality that tells 0 from False and 1.0 from True."""
    return a is b or (type(a) is type(b) and a == b)


def refuse(values: Mapping[str, Any], table: Mapping[str, Refused]) -> None:
    """ConfigError for the first key of `table` that `values` sets to a value outside its `accepted`."""
    for key, rule in table.items():
        if key in values and not any(_same(values[key], a) for a in rule.accepted):
            shown = " or ".join(json.dumps(a) for a in rule.accepted)
            raise ConfigError(f"{key}={values[key]!r} is not supported ({rule.why}; only {shown} loads)")


# ------------------------------------------------------------------------------------------ typed fields

class _Mismatch(Exception):
    pass


def describe(tp: Any) -> str:
    """A type hint in words, for error messages."""
    if tp is Any:
        return "anything"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        return " or ".join(describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({describe(args[0])})"
        return f"a list [{', '.join(describe(a) for a in args)}]"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(tp, f"a {getattr(tp, '__name__', tp)} object")


def conform(value: Any, tp: Any) -> Any:
    """`value` as type hint `tp` says (lists become tuples, mappings nested configs), or raise _Mismatch."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        for arg in args:
            try:
                return conform(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(conform(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(conform(v, a) for v, a in zip(value, args))
    if tp is type(None):
        ok = value is None
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch
        return config_from_dict(tp, value, strict=False)
    else:
        raise TypeError(f"no rule for type hint {tp!r}")
    if not ok:
        raise _Mismatch
    return value


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> Dict[str, Any]:
    """The resolved type hint of every dataclass field of `cls` (ClassVars excluded)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


class Config:
    """Base of the config dataclasses: typed fields, `choices`, the `refused` table and `check()` rules.

    Construction validates: `__post_init__` runs `normalize()` (spellings the
    reference also reads, e.g. a square size as [s, s]), converts each field to
    its type hint or raises, checks `choices`, then the class's `check()`.
    """
    # key -> the values it may take (for a tuple field: each entry)
    choices: ClassVar[Mapping[str, Tuple[Any, ...]]] = {}
    # keys of the reference's config that select parts we do not build (never fields of ours)
    refused: ClassVar[Mapping[str, Refused]] = {}

    def __post_init__(self) -> None:
        self.normalize()
        for name, tp in field_types(type(self)).items():
            value = getattr(self, name)
            try:
                setattr(self, name, conform(value, tp))
            except _Mismatch:
                raise ConfigError(f"{name}={value!r} should be {describe(tp)}") from None
            except ConfigError as e:  # inside a nested config: name the key by its path
                raise ConfigError(f"{name}.{e}") from None
        for name, allowed in self.choices.items():
            value = getattr(self, name)
            for v in (value if isinstance(value, tuple) else (value,)):
                if not any(_same(v, a) for a in allowed):
                    entry = f"{name}={v!r}" if v is value else f"{name} entry {v!r}"
                    raise ConfigError(f"{entry} is not supported; choose one of {allowed}")
        self.check()

    def normalize(self) -> None:
        """Rewrite accepted alternative spellings in place; runs before the type check."""

    def check(self) -> None:
        """The model's own rules; raise ConfigError("<key>=<value>: <why>")."""

    @classmethod
    def from_dict(cls: Type[T], values: Mapping[str, Any], source: str = "config") -> T:
        """The config for a parsed config.json; errors are ConfigError "<source>: <key>=...". Unknown keys ignored."""
        return config_from_dict(cls, values, source)


def config_from_dict(cls: Type[T], values: Mapping[str, Any], source: Optional[str] = None,
                     strict: bool = False) -> T:
    """Build config class `cls` from `values`: refused keys first, then the typed, checked fields.

    strict: an unknown key is a TypeError (keyword arguments in Python); otherwise
        it is ignored (a config.json's bookkeeping keys).
    source: prefixed to every error message (the file's path).
    """
    try:
        if not isinstance(values, Mapping):
            raise ConfigError(f"expected a JSON object, got {type(values).__name__}")
        refuse(values, getattr(cls, "refused", {}))
        names = set(field_types(cls))
        if strict:
            unknown = sorted(set(values) - names - set(getattr(cls, "refused", {})))
            if unknown:
                raise TypeError(f"{cls.__name__}: unexpected keys {unknown}")
        return cls(**{k: v for k, v in values.items() if k in names})
    except ConfigError as e:
        if source is None:
            raise
        raise ConfigError(f"{source}: {e}") from None


def config_to_dict(config: Any) -> dict:
    """The dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


# -------------------------------------------------------------------------------------- rules for check()

def positive(config: Any, *names: str) -> None:
    """Each named field (each entry of a tuple field) is > 0; None (unset) passes."""
    for name in names:
        value = getattr(config, name)
        for v in (value if isinstance(value, tuple) else (value,)):
            if v is not None and not v > 0:
                raise ConfigError(f"{name}={value!r}: must be positive")


def require(condition: bool, message: str) -> None:
    """ConfigError(message) unless `condition`."""
    if not condition:
        raise ConfigError(message)


def check_levels(config: Any) -> int:
    """The number of levels n = len(block_out_channels) >= 1, with one down and one up block type per level."""
    n = len(config.block_out_channels)
    require(n >= 1, "block_out_channels=(): needs at least one level")
    for key in ("down_block_types", "up_block_types"):
        require(len(getattr(config, key)) == n, f"{key} has {len(getattr(config, key))} entries, "
                                                f"block_out_channels has {n}")
    return n


def check_groups_divide_widths(config: Any) -> None:
    """GroupNorm splits each level's channels into norm_num_groups groups: every width must be a multiple."""
    for c in config.block_out_channels:
        require(c % config.norm_num_groups == 0, f"norm_num_groups={config.norm_num_groups} does not divide "
                                                 f"block_out_channels entry {c}")
