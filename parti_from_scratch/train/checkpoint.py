"""Training checkpoints and shipped weights: safetensors files, written atomically (tutorial §3.3).

A checkpoint holds everything needed to continue a run as if it had never
stopped: the model, the EMA weights, the AdamW moments (Loshchilov & Hutter
2019, arXiv 1711.05101) and, for fp16, the loss scale. Tensors are named so a
reader can open the file and see what is what:

    model/<name>                 model.state_dict()[name]
    ema/<name>                   EMA weights of the same name
    optimizer/<param>/<state>    AdamW state of parameter <param>: exp_avg, exp_avg_sq, step

and the safetensors header metadata (strings) carries

    format      "parti_from_scratch.train/1"
    step        optimiser steps taken when the file was written
    config      the TrainConfig as JSON
    history     the logged metrics as JSON
    optimizer   JSON of non-tensor optimiser state (usually {})
    scaler      JSON of GradScaler state, fp16 runs only
    extra       JSON the caller adds (the loop keeps its half-filled log window here)

Loading reads safetensors only (no pickle), checks every key and shape against
the model and optimiser before touching them, and raises a one-line TrainError
naming the file and the keys otherwise, so a failed load leaves the model as
it was.

Every file is written atomically: the bytes go to a temporary file in the same
folder, are flushed and fsync'd, and only then renamed over the target with
os.replace, which is atomic on POSIX and Windows. A crash at any moment leaves
either the old file or the new one, never a torn one, and the temporary file
is removed when the write fails.
"""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .errors import TrainError

PathLike = Union[str, Path]
CHECKPOINT_FORMAT = "parti_from_scratch.train/1"
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.safetensors$")
_CHUNK = 1 << 20  # bytes per os.write call
# what atomic_write_bytes names its temporary file: "." + target name + "." + mkstemp's random part + ".tmp"
_TEMPORARY_PREFIX, _TEMPORARY_SUFFIX = ".", ".tmp"
_TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")


# --------------------------------------------------------------------------- atomic files


def ensure_writable_dir(folder: PathLike) -> Path:
    """Create `folder` if needed and prove it writable by creating and removing a probe file."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise TrainError(f"{folder}: output folder is not writable ({e.strerror or e})") from None
    return folder


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Delete the temporary files that `atomic_write_bytes` left in `folder` when a process was killed mid-write.

    Only names of the form `.<target>.<random>.tmp` are touched; returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMPORARY_NAME.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _write_fully(fd: int, data: bytes) -> None:
    """os.write until every byte is out (os.write may write fewer bytes than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_CHUNK])
        view = view[written:]


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TEMPORARY_PREFIX}{path.name}.", suffix=_TEMPORARY_SUFFIX)
    try:
        try:
            _write_fully(fd, data)
            os.fsync(fd)                 # the bytes are on disk before the name points at them
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)            # the atomic step
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


# --------------------------------------------------------------------------- reading and checking


def read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a .safetensors file, or a TrainError naming it."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainError(f"{path}: not a readable safetensors file, truncated or corrupt ({reason})") from None
    return tensors, metadata


def _names(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_fits(saved: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse unless `saved` has exactly the keys of `expected`, each with the same shape."""
    missing, unexpected = set(expected) - set(saved), set(saved) - set(expected)
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + \
                ([f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise TrainError(f"{source}: does not fit this model: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(saved[k].shape)} vs {tuple(expected[k].shape)}"
             for k in sorted(expected) if saved[k].shape != expected[k].shape]
    if wrong:
        raise TrainError(f"{source}: shapes differ from this model: {', '.join(wrong[:4])}")


def _with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _for_file(tensor: torch.Tensor) -> torch.Tensor:
    # own, contiguous CPU storage: safetensors refuses tensors that share memory (tied weights)
    return tensor.detach().to("cpu").contiguous().clone()


# --------------------------------------------------------------------------- optimiser state


def _optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Name of each optimiser parameter, in the order optimizer.state_dict() numbers them."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise TrainError("the optimiser holds a parameter that is not in the model")
            names.append(name_of[id(p)])
    return names


def _flatten_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> tuple[dict, dict]:
    """optimizer.state_dict() -> ({"optimizer/<param>/<key>": tensor}, {"<param>/<key>": JSON value})."""
    names = _optimizer_param_names(optimizer, model)
    tensors, scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{names[index]}/{key}"] = _for_file(value)
            else:
                scalars[f"{names[index]}/{key}"] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any],
                         optimizer: torch.optim.Optimizer, model: nn.Module, source: str) -> dict:
    """The inverse of _flatten_optimizer, checked against this optimiser; hyper-parameters stay current."""
    names = _optimizer_param_names(optimizer, model)
    index_of = {n: i for i, n in enumerate(names)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    entries = [(k, v) for k, v in _with_prefix(tensors, "optimizer/").items()] + list(scalars.items())
    for key, value in entries:
        name, _, slot = key.rpartition("/")
        if name not in index_of:
            raise TrainError(f"{source}: optimiser state for {name!r}, which this model does not train")
        i = index_of[name]
        if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[i].shape:
            raise TrainError(f"{source}: optimiser state {key} has shape {tuple(value.shape)}, "
                             f"parameter has {tuple(params[i].shape)}")
        state.setdefault(i, {})[slot] = value
    current = optimizer.state_dict()
    return {"state": state, "param_groups": current["param_groups"]}


def _rehearse(action, what: str) -> None:
    """Run `action` on throwaway objects; any failure is a TrainError naming `what`, before anything real changes."""
    try:
        action()
    except Exception as e:  # noqa: BLE001 - a damaged state fails in many ways inside torch
        raise TrainError(f"{what} is damaged ({type(e).__name__}: {e})") from None


def _rehearse_optimizer_load(optimizer: torch.optim.Optimizer, state: dict, source: str) -> None:
    """Load `state` into a scratch copy of `optimizer` over cloned parameters and take one step with it.

    A state that loads but cannot be stepped with (a missing moment, a step count that is not a number)
    fails here, on the copies, instead of after the model was already overwritten.
    """
    def rehearse() -> None:
        groups = [{**g, "params": [p.detach().clone().requires_grad_(True) for p in g["params"]]}
                  for g in optimizer.param_groups]
        scratch = type(optimizer)(groups)
        scratch.load_state_dict(copy.deepcopy(state))  # a copy: the step below works in place
        for group in scratch.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        scratch.step()
    _rehearse(rehearse, f"{source}: optimiser state")


def _check_metadata_types(source: str, **values: Any) -> None:
    """The JSON entries of the header have the types the loop reads them as."""
    expected = {"config": dict, "history": list, "optimizer": dict, "extra": dict, "scaler": (dict, type(None))}
    for key, kind in expected.items():
        if not isinstance(values[key], kind):
            raise TrainError(f"{source}: checkpoint metadata {key!r} is a {type(values[key]).__name__}, "
                             f"expected {kind.__name__ if isinstance(kind, type) else 'a dict'}")
    if values["step"] < 0:
        raise TrainError(f"{source}: checkpoint metadata 'step' is {values['step']}, expected >= 0")
    for row in values["history"]:
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)
                and all(isinstance(v, (int, float)) for v in row.values())):
            raise TrainError(f"{source}: checkpoint metadata 'history' has a row that is not a dict of numbers "
                             f"with an integer 'step': {str(row)[:80]}")
    window = values["extra"].get("window")
    if window is not None and not (isinstance(window, dict) and isinstance(window.get("count", 0), int)
                                   and isinstance(window.get("sums", {}), dict)):
        raise TrainError(f"{source}: checkpoint metadata 'extra.window' is damaged: {str(window)[:80]}")


# --------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointInfo:
    """What a checkpoint says about the run that wrote it."""
    path: Path                                      # the file read
    step: int                                       # optimiser steps taken
    config: dict = field(default_factory=dict)      # the TrainConfig of that run, as a dict
    history: list = field(default_factory=list)     # its logged metrics, one dict per log line
    extra: dict = field(default_factory=dict)       # whatever the writer passed as `extra`


def save_checkpoint(path: PathLike, model: nn.Module, *, step: int,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    ema_model: Optional[nn.Module] = None,
                    scaler: Optional[torch.amp.GradScaler] = None,
                    config: Optional[dict] = None, history: Optional[list] = None,
                    extra: Optional[dict] = None) -> Path:
    """Write a training checkpoint atomically (see the module docstring for the layout)."""
    tensors = {f"model/{k}": _for_file(v) for k, v in model.state_dict().items()}
    if ema_model is not None:
        tensors.update({f"ema/{k}": _for_file(v) for k, v in ema_model.state_dict().items()})
    optimizer_scalars: dict = {}
    if optimizer is not None:
        optimizer_tensors, optimizer_scalars = _flatten_optimizer(optimizer, model)
        tensors.update(optimizer_tensors)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(int(step)),
        "config": json.dumps(config or {}),
        "history": json.dumps(history or []),
        "optimizer": json.dumps(optimizer_scalars),
        "extra": json.dumps(extra or {}),
    }
    if scaler is not None and scaler.is_enabled():
        metadata["scaler"] = json.dumps(scaler.state_dict())
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def load_checkpoint(path: PathLike, model: nn.Module, *,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    ema_model: Optional[nn.Module] = None,
                    scaler: Optional[torch.amp.GradScaler] = None) -> CheckpointInfo:
    """Restore what `save_checkpoint` wrote into the given objects; check everything first.

    The optimiser's moments are restored, its hyper-parameters (betas, weight
    decay) stay those it was built with; the loop sets the learning rate of
    every step from the schedule.
    """
    tensors, metadata = read_safetensors(path)
    source = str(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{source}: not a training checkpoint (format {metadata.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    try:
        step = int(metadata["step"])
        config, history = json.loads(metadata["config"]), json.loads(metadata["history"])
        optimizer_scalars = json.loads(metadata.get("optimizer", "{}"))
        extra = json.loads(metadata.get("extra", "{}"))
        scaler_state = json.loads(metadata["scaler"]) if "scaler" in metadata else None
    except (KeyError, ValueError) as e:
        raise TrainError(f"{source}: checkpoint metadata is damaged ({e})") from None
    _check_metadata_types(source, step=step, config=config, history=history, optimizer=optimizer_scalars,
                          extra=extra, scaler=scaler_state)

    model_state = _with_prefix(tensors, "model/")
    check_fits(model_state, model.state_dict(), f"{source} [model]")
    ema_state = _with_prefix(tensors, "ema/")
    if ema_model is not None:
        if not ema_state:
            raise TrainError(f"{source}: has no EMA weights (written with ema_decay=None)")
        check_fits(ema_state, ema_model.state_dict(), f"{source} [ema]")
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = _unflatten_optimizer(tensors, optimizer_scalars, optimizer, model, source)
        _rehearse_optimizer_load(optimizer, optimizer_state, source)
    if scaler is not None and scaler.is_enabled() and scaler_state is not None:
        _rehearse(lambda: torch.amp.GradScaler("cpu").load_state_dict(scaler_state), f"{source}: scaler state")

    # every check passed: now change the objects
    model.load_state_dict(model_state, strict=True)
    if ema_model is not None:
        ema_model.load_state_dict(ema_state, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    if scaler is not None and scaler.is_enabled() and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    return CheckpointInfo(Path(path), step, config, history, extra)


def checkpoint_path(out_dir: PathLike, step: int) -> Path:
    """out_dir/checkpoints/step-0000100.safetensors"""
    return Path(out_dir) / "checkpoints" / f"step-{step:07d}.safetensors"


def list_checkpoints(out_dir: PathLike) -> list[Path]:
    """The checkpoints in out_dir, oldest step first."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The checkpoint with the most steps in out_dir, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: PathLike, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (keep=0: delete none)."""
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------- shipped weights


def save_weights(model: nn.Module, path: PathLike, dtype: Optional[torch.dtype] = None,
                 metadata: Optional[dict[str, str]] = None) -> Path:
    """Only the model's state_dict, keys as the model names them, atomically; floats cast to `dtype` (e.g. fp16)."""
    state = {}
    for k, v in model.state_dict().items():
        v = _for_file(v)
        state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return atomic_write_bytes(path, safetensors_bytes(state, metadata={"format": "pt", **(metadata or {})}))


def load_weights(path: PathLike, model: nn.Module) -> nn.Module:
    """Load a `save_weights` file into `model`; every key and shape must match."""
    tensors, _ = read_safetensors(path)
    check_fits(tensors, model.state_dict(), str(path))
    model.load_state_dict(tensors, strict=True)
    return model
