"""Hostile pickles: views past their storage, size-lying records, deep nesting, and the one-line refusal.

Each file here is written byte by byte the way an attacker would (a torch zip
archive with a hand-made `data.pkl`), so the tests do not depend on what
`torch.save` is willing to produce.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from weights_convert.common import CheckpointError, read_state_dict
from weights_convert.ldm_checkpoint import load_single_file, read_ldm_checkpoint
from weights_convert.pickle_scan import MAX_DEPTH, PickleTooDeep, check_nesting_depth
from weights_convert.safe_unpickle import check_view, restricted_load


class _Storage:
    """Pickled as the persistent id ('storage', torch.<dtype>Storage, key, 'cpu', numel) torch writes."""

    def __init__(self, key: str, numel: int, storage_type: str = "FloatStorage"):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _TensorRecord:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _FrameworkObject:
    """An object torch.load(weights_only=True) refuses, as it refuses a Lightning callback: forces the fallback.

    Pickled as NEWOBJ + BUILD (a class and its attributes), which the restricted unpickler turns into an inert stub.
    """

    def __init__(self):
        self.monitor = "val/loss"


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return "storage", getattr(torch, obj.storage_type), obj.key, "cpu", obj.numel
        return None


def write_archive(path, obj, records, compression=zipfile.ZIP_STORED):
    """A torch zip checkpoint holding `obj` as data.pkl and `records` (key -> bytes) as its storages."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", sys.byteorder)
        archive.writestr("archive/version", "3\n")
        for key, data in records.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


# ------------------------------------------------------------------------- views past their storage

@pytest.mark.parametrize("offset, size, stride, problem", [
    (0, (1000,), (1,), "reads element 999 of a storage of 4 elements"),     # the 16-byte record backing 4,000 bytes
    (3, (2,), (1,), "reads element 4 of a storage of 4 elements"),           # one element past the end
    (0, (2, 2), (1, 3), "reads element 4 of a storage of 4 elements"),       # through a stride
    (5, (0,), (1,), "offset 5 lies past the end"),
    (-1, (2,), (1,), "negative tensor offset"),
    (2, (2,), (-1,), "negative tensor offset, size or stride"),
    (0, (8,), (0,), "stride-0 or overlapping view"),
    (0, (2,), (1, 1), "different lengths"),
])
def test_tensor_view_outside_its_storage_is_refused(tmp_path, offset, size, stride, problem):
    path = write_archive(tmp_path / "crafted.ckpt",
                         {"weight": _TensorRecord(_Storage("0", 4), offset, size, stride)}, {"0": bytes(16)})
    with pytest.raises(CheckpointError, match=rf"crafted\.ckpt: unreadable checkpoint .*{problem}"):
        restricted_load(path)


def test_views_inside_their_storage_load_as_torch_loads_them(tmp_path):
    """Offsets, transposes and two tensors sharing one storage: the same values and strides as torch.load."""
    data = torch.arange(12, dtype=torch.float32)
    storage = _Storage("0", 12)
    obj = {"whole": _TensorRecord(storage, 0, (3, 4), (4, 1)), "transposed": _TensorRecord(storage, 0, (4, 3), (1, 4)),
           "tail": _TensorRecord(storage, 8, (4,), (1,)), "empty": _TensorRecord(storage, 12, (0,), (1,)),
           "scalar": _TensorRecord(storage, 11, (), ())}
    path = write_archive(tmp_path / "views.ckpt", obj, {"0": data.numpy().tobytes()})
    ours, theirs = restricted_load(path), torch.load(path, weights_only=True)
    for name in obj:
        assert ours[name].stride() == theirs[name].stride() and torch.equal(ours[name], theirs[name]), name
    assert ours["whole"].untyped_storage().nbytes() == 48  # no storage grew


def test_crafted_checkpoint_on_the_restricted_path_is_refused_end_to_end(tmp_path):
    """A .ckpt that weights_only refuses (a framework object) with one weight reaching past its 16-byte record."""
    path = write_archive(tmp_path / "model.ckpt", {
        "callbacks": _FrameworkObject(),
        "state_dict": {"model.diffusion_model.input_blocks.0.0.weight": _TensorRecord(_Storage("0", 4), 0, (1000,),
                                                                                        (1,))}}, {"0": bytes(16)})
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # so the restricted unpickler is the one that reads it
    with pytest.raises(CheckpointError, match=r"model\.ckpt: unreadable checkpoint .*storage of 4 elements"):
        read_ldm_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"model\.ckpt"):
        load_single_file(path)


def test_cli_refuses_the_crafted_checkpoint_in_one_line(tmp_path):
    path = write_archive(tmp_path / "model.ckpt", {
        "callbacks": _FrameworkObject(), "state_dict": {"w": _TensorRecord(_Storage("0", 4), 0, (1000,), (1,))}},
        {"0": bytes(16)})
    result = subprocess.run([sys.executable, "-m", "parti_from_scratch", "generate", "a red circle", "--model",
                             str(path), "-o", str(tmp_path / "out.png")], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "model.ckpt" in result.stderr, result.stderr
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("nbytes, itemsize, offset, size, stride", [
    (16, 4, 0, (4,), (1,)), (16, 4, 0, (2, 2), (2, 1)), (16, 4, 0, (2, 2), (1, 2)), (16, 4, 4, (0, 3), (3, 1)),
    (16, 2, 7, (1,), (1,)), (0, 4, 0, (0,), (1,)), (8, 8, 0, (), ())])
def test_check_view_accepts_views_within_the_storage(nbytes, itemsize, offset, size, stride):
    check_view(nbytes, itemsize, offset, size, stride)
    storage = torch.UntypedStorage(nbytes)
    dtype = {2: torch.float16, 4: torch.float32, 8: torch.float64}[itemsize]
    torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)
    assert storage.nbytes() == nbytes  # set_ agreed: the view needed no growth


# ------------------------------------------------------------------------------------- memory bombs

def test_record_larger_than_declared_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    """A 64 MiB record of zeros deflates to about 64 KiB; the pickle declares 4 floats. It is never read."""
    path = write_archive(tmp_path / "bomb.ckpt", {"x": _FrameworkObject(),
                                                  "w": _TensorRecord(_Storage("0", 4), 0, (4,), (1,))},
                         {"0": bytes(64 << 20)}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    read_names = []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read",
                        lambda self, name, pwd=None: read_names.append(getattr(name, "filename", name))
                        or real_read(self, name, pwd))
    with pytest.raises(CheckpointError, match=r"storage '0' is declared as 4 x 4 bytes, its record holds 67108864"):
        restricted_load(path)
    assert "archive/data/0" not in read_names


def test_record_smaller_than_declared_is_refused(tmp_path):
    path = write_archive(tmp_path / "short.ckpt", {"w": _TensorRecord(_Storage("0", 1000), 0, (4,), (1,))},
                         {"0": bytes(16)})
    with pytest.raises(CheckpointError, match=r"declared as 1000 x 4 bytes, its record holds 16"):
        restricted_load(path)


# ------------------------------------------------------------------------------------------ nesting

def _deep_tuple_key(depth: int) -> bytes:
    """{((...((),)...),): None}: a tuple nested `depth` deep as a dict key, in about `depth` bytes."""
    return (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth + pickle.NONE
            + pickle.SETITEM + pickle.STOP)


def _raw_archive(path, data_pkl: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", sys.byteorder)
        archive.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("loader", ["read_state_dict", "restricted_load"])
@pytest.mark.parametrize("depth", [5_000, 300_000])
def test_deeply_nested_pickle_is_refused_before_it_is_unpickled(tmp_path, loader, depth):
    """300,000 levels crashed the process (segmentation fault) on both paths; run in a child to see its exit code."""
    path = _raw_archive(tmp_path / "deep.ckpt", _deep_tuple_key(depth))
    script = textwrap.dedent(f"""
        from weights_convert.common import CheckpointError, read_state_dict
        from weights_convert.safe_unpickle import restricted_load
        try:
            {loader}({str(path)!r})
        except CheckpointError as e:
            print(e)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-500:])
    assert result.stdout.strip() == f"{path}: refused: the pickle nests objects more than {MAX_DEPTH} levels deep"


def test_nesting_depth_counts_containers_filled_after_they_were_shared():
    """Lists created first, memoized, then put into one another: the depth is passed up to every holder."""
    n = 3 * MAX_DEPTH
    ops = pickle.PROTO + b"\x02" + pickle.MARK
    for k in range(n):
        ops += pickle.EMPTY_LIST + pickle.LONG_BINPUT + k.to_bytes(4, "little")
    ops += pickle.POP_MARK
    for k in range(n - 1):  # list k .append(list k + 1), in increasing k: each append only deepens an old holder
        ops += (pickle.LONG_BINGET + k.to_bytes(4, "little") + pickle.LONG_BINGET + (k + 1).to_bytes(4, "little")
                + pickle.APPEND + pickle.POP)
    ops += pickle.LONG_BINGET + (0).to_bytes(4, "little") + pickle.STOP
    nested = pickle.loads(ops)
    for _ in range(n - 1):
        nested = nested[0]
    assert nested == []  # the pickle really nests n deep
    with pytest.raises(PickleTooDeep):
        check_nesting_depth(io.BytesIO(ops))


@pytest.mark.parametrize("obj, depth", [(1, 0), ([1, 2], 1), ({"a": {"b": (1, (2,))}}, 4), ([[[[]]]], 4)])
def test_nesting_depth_of_plain_objects(obj, depth):
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert check_nesting_depth(io.BytesIO(pickle.dumps(obj, protocol=protocol))) == depth, protocol


def test_real_checkpoints_nest_shallowly(tmp_path):
    """A state dict with optimizer state, saved by torch.save (zip and legacy formats), loads unchanged."""
    state = {f"block.{i}.weight": torch.randn(3, 2) for i in range(4)}
    checkpoint = {"state_dict": state, "optimizer": {"state": {i: {"exp_avg": torch.zeros(2), "step": 3}
                                                               for i in range(4)},
                                                     "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}}
    for legacy in (False, True):
        path = tmp_path / f"legacy{legacy}.ckpt"
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
        loaded = read_state_dict(path)  # the state_dict entry, unwrapped
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


# ------------------------------------------------------------------------------- the refusal message

def test_refused_pickle_is_one_line_naming_the_global(tmp_path):
    """torch's refusal spans lines and advises weights_only=False; ours names the file and the global, once."""

    class Payload:
        def __reduce__(self):
            return os.system, ("true",)

    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"w": Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message == (f"{path}: refused: the pickle refers to {os.system.__module__}.system, which is not a "
                       f"tensor type; nothing in the file was run")
    assert "\n" not in message and "\x1b" not in message and "weights_only" not in message



def test_cli_reports_a_refused_pickle_in_a_model_folder_in_one_line(tmp_path, capsys):
    """The shipped model's folder with its UNet weights replaced by a pickle that calls os.system."""
    import shutil

    from parti_from_scratch.cli import main
    from parti_from_scratch.pipeline import DEFAULT_MODEL_DIR

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": Payload()}, folder / "unet" / "diffusion_pytorch_model.bin")
    assert main(["generate", "a red circle", "--model", str(folder), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "\x1b" not in err and "weights_only" not in err, err
    assert "diffusion_pytorch_model.bin: refused: the pickle refers to" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.png").exists()
