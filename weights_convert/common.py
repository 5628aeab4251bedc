"""Reading checkpoint files safely and loading them strictly.

* `read_state_dict` opens `.safetensors` with the safetensors package and
  pickled `.bin/.pt/.ckpt` files with `torch.load(weights_only=True)`, which
  refuses any global outside PyTorch's tensor-rebuilding allow-list: a file
  can never run code while it is read.
* `rename_keys` applies ordered regex rules to every key and accounts for all
  of them: each source key is renamed by exactly one rule or ignored with a
  stated reason; any other key is an error. `block_rules` writes those rules
  for a layout given as blocks (their prefix, our prefix, leaf renames), and
  `check_blocks` checks that every block received tensors.
* `tensor_shape` and `count_indices` read a configuration off a file's
  tensor shapes and key indices, naming the file and key when they cannot.
* `check_repeats` compares the config's repeat counts (levels, layers) with
  the file's key indices before a model is built, so building costs what the
  file holds, whatever the config claims.
* `load_into` builds nothing half-way: it compares the converted keys,
  shapes and dtypes (floating point where the model has floating point) with
  the model's parameters and raises before touching the model.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import (Callable, Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar,
                    Union)

import torch
from torch import nn

from weights_convert.pickle_scan import check_checkpoint_pickle, describe_refusal

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, Path]
M = TypeVar("M", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: unreadable, or its keys/shapes do not fit the model."""


def _list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_state_dict(path: PathLike, fallback: Optional[Callable[[Path], object]] = None) -> StateDict:
    """All tensors of one checkpoint file, on the CPU, without executing any code in the file.

    fallback: called with the path when `torch.load(weights_only=True)` refuses
        the pickle (a global outside its allow-list, e.g. a training framework's
        callback object); it must itself be a restricted loader such as
        `safe_unpickle.restricted_load`. Without one, the refusal is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    try:
        check_checkpoint_pickle(path)  # nesting depth and pickle size, before anything is unpickled
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: refused: {e}") from None
    refused = False
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # mmap needs the zip format; legacy (pre-1.6) pickles load without it, still weights_only
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - reported with the file name
            raise CheckpointError(f"{path}: {describe_refusal(e)}") from None
    except pickle.UnpicklingError as e:
        if fallback is None:
            raise CheckpointError(f"{path}: {describe_refusal(e)}") from None
        refused = True  # the fallback runs below, outside this handler, so its own errors stand alone
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{path}: {describe_refusal(e)}") from None
    if refused:
        obj = fallback(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # a training checkpoint: the weights next to optimizer and framework state
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors, found {type(obj).__name__}")
    bad = [repr(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: entries that are not named tensors: {_list(bad)}")
    return dict(obj)


def find_weights_file(folder: PathLike, stems: Sequence[str]) -> Path:
    """The weights file of a transformers/diffusers model folder: `<stem>.safetensors` first, then `<stem>.bin`."""
    folder = Path(folder)
    candidates = [folder / f"{stem}{ext}" for ext in (".safetensors", ".bin") for stem in stems]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(f"{folder}: no weights file found (looked for {', '.join(c.name for c in candidates)})")


Rule = Tuple[str, str]


def rename_keys(state: Mapping[str, torch.Tensor], rules: Sequence[Rule], ignore: Sequence[Tuple[str, str]] = (),
                source: str = "checkpoint") -> StateDict:
    """Rename every key of `state` by the first matching rule; account for all of them.

    rules: (pattern, replacement) pairs for `re.fullmatch`/`re.sub`; the first
        pattern that fully matches a key renames it.
    ignore: (pattern, reason) pairs; a key matching one is dropped on purpose
        (the reason documents why, e.g. a buffer we recompute).
    Raises CheckpointError naming `source` if a key matches no rule and no
    ignore pattern, or if two source keys map to the same target.
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    ignored = [re.compile(p) for p, _ in ignore]
    out: StateDict = {}
    origin: Dict[str, str] = {}
    unknown: List[str] = []
    for key, tensor in state.items():
        if any(p.fullmatch(key) for p in ignored):
            continue
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                target = pattern.sub(repl, key)
                if target in out:
                    raise CheckpointError(f"{source}: keys {origin[target]!r} and {key!r} both map to {target!r}")
                out[target] = tensor
                origin[target] = key
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys (not part of this architecture): {_list(unknown)}")
    return out


# Renaming by blocks: a layout maps whole sub-modules (a resnet, an attention) onto ours, and inside
# each a few leaf names. Leaves: (their leaf, our leaf) pairs; SAME keeps every name below the block.
Leaves = Tuple[Tuple[str, str], ...]
SAME: Leaves = (("", ""),)
# A block: (their prefix, our prefix, leaves).
Block = Tuple[str, str, Leaves]


def block_rules(blocks: Sequence[Block], reverse: bool = False) -> List[Rule]:
    """rename_keys rules: a key `<block>.<leaf>[.rest]` becomes `<other block>.<other leaf>[.rest]`.

    reverse: our names -> theirs (for writing their layout) instead of theirs -> ours.
    """
    rules = []
    for theirs, ours, leaves in blocks:
        for their_leaf, our_leaf in leaves:
            source, target = f"{theirs}.{their_leaf}".rstrip("."), f"{ours}.{our_leaf}".rstrip(".")
            if reverse:
                source, target = target, source
            rules.append((re.escape(source) + r"((?:\..+)?)", target + r"\g<1>"))
    return rules


def check_blocks(blocks: Sequence[Block], out: Mapping[str, torch.Tensor], reverse: bool, source: str) -> None:
    """Every block must have received tensors in the renamed `out` (catches a file missing a whole layer).

    reverse: `out` is in their names (written by `block_rules(blocks, reverse=True)`), not ours.
    """
    present = set()
    for key in out:
        parts = key.split(".")
        present.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    missing = [(ours if reverse else theirs) for theirs, ours, _ in blocks
               if (theirs if reverse else ours) not in present]
    if missing:
        raise CheckpointError(f"{source}: no tensors for these parts of the model: {_list(missing)}")


def tensor_shape(state: Mapping[str, torch.Tensor], key: str, source: str, *ranks: int) -> Tuple[int, ...]:
    """The shape of `state[key]`, which must have one of `ranks` dimensions (4 for a conv, 2 for a linear).

    For reading a configuration off a file's tensors: a missing key or another rank names the file and the key.
    """
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r}, needed to infer the model's configuration")
    shape = tuple(state[key].shape)
    if len(shape) not in ranks:
        raise CheckpointError(f"{source}: {key} has shape {shape}; expected {' or '.join(map(str, ranks))} "
                              f"dimensions")
    return shape


def count_indices(keys: Iterable[str], pattern: str, source: str) -> int:
    """How many indices i the keys matching `pattern` (one group: i) use; they must be 0..n-1."""
    compiled = re.compile(pattern)
    found = sorted({int(m[1]) for k in keys if (m := compiled.match(k))})
    if found != list(range(len(found))):
        raise CheckpointError(f"{source}: keys matching {pattern!r} use indices {found}, expected 0..{len(found) - 1}")
    return len(found)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError unless `state` has exactly the model's keys, shapes and kinds of dtype."""
    tensors = model.state_dict()
    check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, state, source,
                 floating={k for k, v in tensors.items() if v.is_floating_point()})


def check_shapes(expected: Mapping[str, Tuple[int, ...]], state: Mapping[str, torch.Tensor],
                 source: str = "checkpoint", floating: Optional[Collection[str]] = None) -> None:
    """Raise CheckpointError unless `state` has exactly the keys of `expected`, with those shapes.

    floating: the keys whose tensors must hold floating-point values (default: all);
        an integer, bool or complex tensor there cannot become a weight.
    """
    missing = expected.keys() - state.keys()
    extra = state.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_list(extra)}")
    common = sorted(expected.keys() & state.keys())
    wrong = [f"{k} (file {tuple(state[k].shape)}, model {expected[k]})"
             for k in common if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        problems.append(f"wrong shapes: {_list(wrong)}")
    must_float = set(common) if floating is None else set(common) & set(floating)
    wrong_dtype = [f"{k} (file {state[k].dtype}, model floating point)"
                   for k in sorted(must_float) if not state[k].is_floating_point()]
    if wrong_dtype:
        problems.append(f"wrong dtypes: {_list(wrong_dtype)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


# (ModuleList path, entries the config asks for, the config key that says so)
Repeat = Tuple[str, int, str]


def list_indices(keys: Iterable[str]) -> Dict[str, Set[int]]:
    """For each `<path>.<i>.` inside the keys, the set of indices i found under <path> (a ModuleList's entries)."""
    found: Dict[str, Set[int]] = {}
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part.isascii() and part.isdigit():
                found.setdefault(".".join(parts[:i]), set()).add(int(part))
    return found


def check_repeats(repeats: Iterable[Repeat], keys: Iterable[str], source: str, config_source: str) -> None:
    """Before anything is built: every entry 0 .. count-1 of each ModuleList the config asks for is in the file.

    A model's size grows with its repeat counts (levels, layers per level,
    Transformer blocks), so this check, run first, makes the cost of building
    proportional to the weights file: a config asking for 3000 layers of a
    2-layer file is refused here, not after building 3000 layers. `repeats`
    may be a generator, consumed in order (outer lists first), so an absurd
    count stops it before its inner lists are listed.
    """
    found = list_indices(keys)
    for path, count, config_key in repeats:
        indices = found.get(path, set())
        if sum(1 for i in indices if i < count) < count:  # entries beyond `count` are unexpected keys, named later
            shown = f"indices {', '.join(map(str, sorted(indices)[:8]))}{', ...' if len(indices) > 8 else ''}" \
                if indices else "none"
            raise CheckpointError(f"{source}: {config_source} ({config_key}) asks for {count} entries of "
                                  f"{path}, the weights file has {len(indices)} ({shown})")


def build_on_meta(factory: Callable[[], M]) -> M:
    """Construct a model without allocating its weights (they are filled by `load_into`)."""
    with torch.device("meta"):
        return factory()


def load_into(model: M, state: Mapping[str, torch.Tensor], source: str = "checkpoint",
              dtype: Optional[torch.dtype] = torch.float32) -> M:
    """Check `state` against `model` strictly, then load it (assigning the tensors, no copies).

    Floating-point tensors are cast to `dtype` (None keeps the file's dtype).
    The model may live on the meta device; afterwards no meta tensor remains.
    """
    check_state_dict(model, state, source)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # anything check_state_dict did not foresee still names the file
        raise CheckpointError(f"{source}: {e}") from None
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{source}: tensors not filled by the checkpoint: {_list(leftovers)}")
    return model.eval()
