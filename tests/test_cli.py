"""The command line: bad arguments end with one line on stderr and exit code 2, no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from parti_from_scratch.cli import main


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:          # argparse exits by itself on bad syntax
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("args,message", [
    (["generate", "a red circle", "--height", "60"], "multiple of 8"),
    (["generate", "a red circle", "--width", "0"], "multiple of 8"),
    (["generate", "a red circle", "--steps", "0"], "must be >= 1"),
    (["generate", "a red circle", "--guidance", "-2"], "must be >= 0"),
    (["generate", "a red circle", "--scheduler", "heun"], "invalid choice"),
    (["generate", "a red circle", "--num-images", "0"], "must be >= 1"),
])
def test_bad_generate_arguments_exit_2(args, message, capsys):
    code, err = run_cli(args, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_model_path_exits_2(tmp_path, capsys):
    code, err = run_cli(["generate", "a red circle", "--model", str(tmp_path / "nope")], capsys)
    assert code == 2 and "no such file or folder" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("make", ["empty_folder", "text_file", "garbage_safetensors"])
def test_not_a_checkpoint_exits_2(make, tmp_path, capsys):
    if make == "empty_folder":
        path = tmp_path / "folder"
        path.mkdir()
    elif make == "text_file":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    else:
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"\x00" * 64)
    code, err = run_cli(["generate", "a red circle", "--model", str(path)], capsys)
    assert code == 2, err
    assert "cannot load model" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "parti_from_scratch", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout
