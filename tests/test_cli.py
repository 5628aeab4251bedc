"""The command line: bad arguments end with one line on stderr and exit code 2, no traceback."""
from __future__ import annotations

import json
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


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if the pipeline is ever called: every check must come before generating."""
    from parti_from_scratch.pipeline import TextToImagePipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was called although an argument was bad")
    monkeypatch.setattr(TextToImagePipeline, "__call__", refuse)


def assert_one_line_exit_2(code, err, message):
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 or err.lstrip().startswith("usage:"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--width", "0"], "must be >= 1"),
    (["--height", "-8"], "must be >= 1"),
    (["--steps", "0"], "must be from 1 to 1000"),
    (["--steps", "5000"], "must be from 1 to 1000"),
    (["--guidance", "-2"], "finite number >= 0"),
    (["--guidance", "inf"], "finite number >= 0"),
    (["--guidance", "nan"], "finite number >= 0"),
    (["--seed", str(2 ** 70)], "must be from 0 to 2**64 - 1"),
    (["--seed", "-1"], "must be from 0 to 2**64 - 1"),
    (["--seed", str(2 ** 64 - 1), "--num-images", "2"], "passes 2**64 - 1"),
    (["--scheduler", "heun"], "invalid choice"),
    (["--num-images", "0"], "must be >= 1"),
    (["-o", "out.xyz"], "unknown image type '.xyz'"),
    (["-o", "out"], "no file extension"),
])
def test_bad_generate_arguments_exit_2(args, message, capsys, no_generation, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["generate", "a red circle"] + args, capsys)
    assert_one_line_exit_2(code, err, message)
    assert list(tmp_path.iterdir()) == []            # nothing written


def test_output_paths_are_checked_before_generating(tmp_path, capsys, no_generation):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    for args, message in [(["-o", str(tmp_path)], "is a folder"),
                          (["-o", str(a_file / "out.png")], "is a file, not a folder"),
                          (["-o", str(tmp_path / "a.png"), "--grid", str(a_file / "sub" / "g.png")],
                           "is a file, not a folder"),
                          (["-o", str(tmp_path / "a.png"), "--grid", str(tmp_path / "g.pdf")], "unknown image type")]:
        code, err = run_cli(["generate", "a red circle"] + args, capsys)
        assert_one_line_exit_2(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_prompt_that_is_not_utf8_exits_2(tmp_path):
    # bytes that do not decode reach Python as lone surrogates; a real process shows the whole path
    out = subprocess.run([sys.executable, "-m", "parti_from_scratch", "generate", b"a red \xff circle",
                          "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "not valid UTF-8" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("size", ["--height", "--width"])
def test_size_must_be_a_multiple_of_the_shipped_vae_scale_factor(size, capsys, no_generation, tmp_path):
    # the shipped VAE halves the size twice: multiples of 4 (checked after loading, before generating)
    code, err = run_cli(["generate", "a red circle", size, "62", "-o", str(tmp_path / "x.png")], capsys)
    assert_one_line_exit_2(code, err, f"{size} 62: must be a multiple of 4")


def test_size_must_be_a_multiple_of_the_sd_vae_scale_factor(tmp_path, clip_vocab_dir, capsys, no_generation):
    from test_pipeline import SD1, build_reference_pipeline
    build_reference_pipeline(tmp_path / "sd", SD1, clip_vocab_dir)
    capsys.readouterr()                                   # diffusers' and transformers' own messages
    code, err = run_cli(["generate", "a red circle", "--model", str(tmp_path / "sd"), "--height", "36",
                         "-o", str(tmp_path / "x.png")], capsys)
    assert_one_line_exit_2(code, err, "--height 36: must be a multiple of 8")


def test_size_that_fits_the_shipped_model_generates(tmp_path, capsys):
    """A multiple of the VAE's scale factor is drawn, with a warning naming the size the model was trained at."""
    out = tmp_path / "new" / "x.png"
    grid = tmp_path / "other" / "g.png"
    with pytest.warns(UserWarning, match="trained on 64x64 images only; at 36x28"):
        code = main(["generate", "a red circle", "--height", "36", "--width", "28", "--steps", "2", "-o", str(out),
                     "--grid", str(grid), "--quiet"])
    assert code == 0, capsys.readouterr().err
    from PIL import Image
    assert Image.open(out).size == (28, 36) and grid.is_file()


@pytest.mark.parametrize("args,message", [
    (["--guidance", "inf"], "finite number >= 0"),
    (["--steps", "5000"], "must be from 1 to 1000"),
    (["--n", "0"], "must be >= 1"),
    (["--scheduler", "heun"], "invalid choice"),
    (["--seed", str(2 ** 70)], "must be from 0 to 2**64 - 1"),
])
def test_bad_eval_arguments_exit_2(args, message, capsys, no_generation):
    code, err = run_cli(["eval"] + args, capsys)
    assert_one_line_exit_2(code, err, message)


def test_eval_grid_path_is_checked_before_generating(tmp_path, capsys, no_generation):
    code, err = run_cli(["eval", "--n", "1", "--grid", str(tmp_path / "grid")], capsys)
    assert_one_line_exit_2(code, err, "no file extension")


def test_eval_uses_the_models_own_sampling_defaults(tmp_path, capsys):
    from parti_from_scratch.pipeline import TextToImagePipeline
    from parti_from_scratch.sampling_defaults import SamplingDefaults
    pipe = TextToImagePipeline.from_pretrained()
    pipe.sampling_defaults = SamplingDefaults(num_inference_steps=3, guidance_scale=2.5)
    pipe.save_pretrained(tmp_path / "model")
    code = main(["eval", "--model", str(tmp_path / "model"), "--n", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 steps, guidance 2.5," in out


def test_help_states_the_shipped_models_defaults(capsys):
    from parti_from_scratch.pipeline import DEFAULT_MODEL_DIR
    from parti_from_scratch.sampling_defaults import SamplingDefaults
    defaults = SamplingDefaults.read(DEFAULT_MODEL_DIR)
    for command in ("generate", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"shipped model: {defaults.num_inference_steps} steps, guidance {defaults.guidance_scale:g}" in text
        assert json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())["scheduler"][1] in text


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
