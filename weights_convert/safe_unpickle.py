"""A restricted unpickler for training checkpoints that `torch.load(weights_only=True)` refuses.

Why it is needed: a `.ckpt` written by a training framework (the original
Stable Diffusion releases were saved by PyTorch Lightning) pickles more than
tensors: callback objects (`pytorch_lightning.callbacks.model_checkpoint.
ModelCheckpoint`), numpy scalars, sets. `weights_only=True` refuses every such
global, so the tensors in the same file cannot be reached.

Why it is safe: a pickle is a small program. The only opcodes that can run
code are those that call something (REDUCE, INST, OBJ, NEWOBJ; BUILD calls
the new object's `__setstate__`), and the only way a pickle obtains something
to call is `find_class(module, name)`. Ours never imports and never returns a
real callable outside a short allow-list:

* tensor rebuilding: `torch._utils._rebuild_tensor_v2` (and its relatives),
  re-implemented here on the storages of the zip archive; the
  `torch.<Type>Storage` names only select a dtype;
* plain containers: `collections.OrderedDict`, `set`, `frozenset`, `torch.Size`;
* data-only constructors whose result we do not need (numpy scalars, dtypes
  and arrays, `_codecs.encode` for bytes): they return an inert record.

Every other global becomes a `Placeholder` subclass that records its name. A
pickle may *create* one the way classes are normally unpickled (NEWOBJ, then
BUILD with the instance's attributes), which runs only our own `__new__` and
`__setstate__`: this is how framework objects load as harmless stubs. But
*calling* a placeholder (REDUCE, INST, OBJ: what a `__reduce__` returning
`(os.system, ("...",))`, `eval`, `exec`, `subprocess.Popen`, `getattr` ...
compiles to) raises CheckpointError naming the file and the global, before
anything runs: the real `os.system` is never even looked up.

Only the zip format (PyTorch >= 1.6, what every Stable Diffusion `.ckpt` uses)
is read: `<archive>/data.pkl` holds the pickle and `<archive>/data/<key>` the
raw bytes of each storage.

Memory stays bounded by what the file declares: the pickle's nesting depth and
size are checked before it is unpickled (`pickle_scan`), a storage record is
read only if its size equals the numel x itemsize the pickle declares for it,
and a tensor view is checked against its storage's bytes before it is built
(`check_view`): `Tensor.set_` would otherwise grow the storage and fill the
tensor with leftover process memory.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Union

import torch

from weights_convert.common import CheckpointError
from weights_convert.pickle_scan import check_checkpoint_pickle

# `torch.FloatStorage` ... name the dtype of a storage in the pickle; we only read `.dtype` off them.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the typed-storage classes are deprecated; their dtype is all we use
    STORAGE_DTYPES: Dict[str, torch.dtype] = {
        name: getattr(torch, name).dtype for name in dir(torch)
        if name.endswith("Storage") and name not in ("Storage", "TypedStorage", "UntypedStorage")}

# Modules under which numpy's data-only reconstructors live (numpy 1.x and 2.x spellings).
NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")
NUMPY_DATA = ("scalar", "dtype", "_reconstruct")


class RefusedCall(pickle.UnpicklingError):
    """The pickle tried to call a global outside the allow-list."""

    def __init__(self, global_name: str):
        super().__init__(global_name)
        self.global_name = global_name


class Placeholder:
    """An object the file refers to, recorded by name; never imported, never run.

    `args` are the arguments of NEWOBJ, `state` what BUILD passed, `items` and
    `elements` what SETITEMS / APPENDS added (dict and list subclasses pickle so).
    """
    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.elements = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # reached only when the pickle *calls* the class (REDUCE / INST / OBJ), not on NEWOBJ
        raise RefusedCall(self.global_name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RefusedCall(self.global_name)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.global_name}>"


class DataRecord(Placeholder):
    """The result of a data-only constructor (a numpy scalar, bytes, ...): kept as a record, not rebuilt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # created by a call, and that is allowed
        pass


class _StorageType:
    """What `torch.FloatStorage` & co. stand for inside the pickle: a dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def check_view(nbytes: int, itemsize: int, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]) -> None:
    """Refuse a tensor view that reads outside its storage's bytes (or more elements than the storage holds).

    The elements a view reads lie at offset + sum_d i_d * stride_d, 0 <= i_d < size_d, the last one at
    offset + sum_d (size_d - 1) * stride_d. `Tensor.set_` does not refuse a view past the end: it GROWS a
    resizable storage, and the new bytes are whatever the allocator hands back (leftover process memory).
    So the bounds are checked here, before any view exists.
    """
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} have different lengths")
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"negative tensor offset, size or stride (offset {offset}, size {size}, "
                                     f"stride {stride})")
    elements = nbytes // itemsize
    numel = 1
    for n in size:
        numel *= n
    if numel == 0:
        if offset > elements:
            raise pickle.UnpicklingError(f"tensor offset {offset} lies past the end of its storage ({elements} "
                                         f"elements)")
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= elements:
        raise pickle.UnpicklingError(f"tensor (offset {offset}, size {size}, stride {stride}) reads element {last} "
                                     f"of a storage of {elements} elements ({nbytes} bytes)")
    if numel > elements:
        # a stride-0 or overlapping view: memory stays bounded by the bytes the file declares
        raise pickle.UnpicklingError(f"tensor of size {size} views {numel} elements of a storage of {elements} "
                                     f"(a stride-0 or overlapping view); save it with .contiguous()")


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """A tensor viewing `storage` (untyped bytes, dtype) at offset/size/stride; hooks and metadata are dropped."""
    if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[0], torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not from a storage record")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
        raise pickle.UnpicklingError("tensor size and stride must be tuples of integers")
    if not (_is_int(storage_offset) and all(_is_int(n) for n in (*size, *stride))):
        raise pickle.UnpicklingError("tensor offset, size and stride must be integers")
    untyped, dtype = storage
    nbytes = untyped.nbytes()
    check_view(nbytes, torch.empty((), dtype=dtype).element_size(), storage_offset, tuple(size), tuple(stride))
    tensor = torch.empty(0, dtype=dtype).set_(untyped, storage_offset, tuple(size), tuple(stride))
    if untyped.nbytes() != nbytes:  # check_view makes this unreachable; a storage must never grow
        raise pickle.UnpicklingError("tensor view grew its storage")
    return tensor


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    """nn.Parameter(data): the values are what we need, requires_grad/hooks/state are dropped."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"parameter rebuilt from {type(data).__name__}, not from a tensor")
    return data


def _allowed(module: str, name: str) -> Union[Callable[..., Any], _StorageType, None]:
    """A fresh object standing for an allow-listed global; None for any other.

    Fresh per lookup, so that whatever a BUILD opcode does to it cannot reach shared state.
    """
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        return lambda *args: _rebuild_tensor(*args)
    if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        return lambda *args: _rebuild_parameter(*args)
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(name)
    if module == "torch" and name == "Size":
        return lambda *args: torch.Size(*args)
    if (module, name) == ("collections", "OrderedDict"):
        return lambda *args: collections.OrderedDict(*args)
    if module == "builtins" and name in ("set", "frozenset"):
        container = set if name == "set" else frozenset
        return lambda *args: container(*args)
    return None


def _is_data_constructor(module: str, name: str) -> bool:
    return (module in NUMPY_MODULES and name in NUMPY_DATA) or (module, name) == ("_codecs", "encode")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` of a torch zip archive; see the module docstring for what it allows."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")), encoding="utf-8")
        self.archive, self.prefix = archive, prefix
        self.storages: Dict[str, torch.UntypedStorage] = {}
        self.placeholders: Dict[Tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles spell some names the Python 2 way (__builtin__.eval, commands.Popen)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _allowed(module, name)
        if allowed is not None:
            return allowed
        key = (module, name)
        if key not in self.placeholders:
            base = DataRecord if _is_data_constructor(module, name) else Placeholder
            self.placeholders[key] = type(name, (base,), {"global_name": f"{module}.{name}", "__module__": __name__})
        return self.placeholders[key]

    def persistent_load(self, pid: Any) -> Tuple[torch.UntypedStorage, torch.dtype]:
        # ('storage', <Type>Storage, key, location, numel): the bytes live in <archive>/data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive") from None
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            # the record's size is checked before it is read (or inflated): memory stays bounded by what the
            # pickle declares, numel x itemsize, whatever the record's compressed size
            if numel < 0 or info.file_size != numel * itemsize:
                raise pickle.UnpicklingError(f"storage {key!r} is declared as {numel} x {itemsize} bytes, its record "
                                             f"holds {info.file_size} bytes")
            data = self.archive.read(info)
            self.storages[key] = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data \
                else torch.UntypedStorage(0)
        return self.storages[key], storage_type.dtype


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (expected one <archive>/data.pkl, "
                              f"found {len(pickles)})")
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "byteorder" in archive.namelist():
        order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if order != sys.byteorder:
            raise CheckpointError(f"{path}: tensors stored {order}-endian, this machine is {sys.byteorder}-endian")
    return prefix


def restricted_load(path: Union[str, Path]) -> Any:
    """The object pickled in the torch zip checkpoint `path`, loaded without importing or running anything.

    Tensors come back as tensors, framework objects as `Placeholder`s. A pickle
    that calls anything outside the allow-list raises CheckpointError naming
    the file and the global; nothing in it has run.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: the restricted unpickler reads PyTorch's zip format only (PyTorch >= 1.6); "
                              f"this file is in the legacy format")
    try:
        check_checkpoint_pickle(path)  # nesting depth and pickle size, before anything is unpickled
    except (ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: refused: {e}") from None
    with zipfile.ZipFile(path) as archive:
        unpickler = RestrictedUnpickler(archive, _archive_prefix(archive, path))
        try:
            return unpickler.load()
        except RefusedCall as e:
            raise CheckpointError(
                f"{path}: refused: the pickle calls {e.global_name} while loading, which could run arbitrary "
                f"code; only tensors and inert training-state objects are accepted (nothing was executed)") from None
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
                RuntimeError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
