"""The package's own code raises no DeprecationWarning or SyntaxWarning.

Two checks, because Python reports these at two different times:

* at compile time (an invalid escape such as "\\p" in a non-raw string: a DeprecationWarning on
  Python 3.11, a SyntaxWarning from 3.12, an error later). An installed module is usually loaded
  from its cached bytecode, so an import never shows it again: every source file is compiled here
  with warnings as errors.
* at run time (a call into a deprecated API of torch, numpy, ...): pyproject.toml's
  [tool.pytest.ini_options] filterwarnings turns a DeprecationWarning whose location is one of
  our modules into an error for the whole suite, and keeps ignoring third-party ones.
"""
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("parti_from_scratch", "weights_convert")
SOURCES = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def compile_with_warnings_as_errors(source: str, filename: str) -> None:
    """Compile `source` as a module; a compile-time warning becomes a SyntaxError naming file and line."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(source, filename, "exec", dont_inherit=True)


def test_the_check_catches_an_invalid_escape_sequence():
    with pytest.raises(SyntaxError, match="invalid escape sequence") as info:
        compile_with_warnings_as_errors('"""Letters: \\p{L}."""\n', "bad_escape.py")
    assert info.value.filename == "bad_escape.py" and info.value.lineno == 1
    compile_with_warnings_as_errors('"""Letters: \\\\p{L}."""\nPATTERN = r"\\p{L}"\n', "good_escape.py")


def test_sources_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in SOURCES}
    assert {"parti_from_scratch/__init__.py", "parti_from_scratch/clip/tokenizer.py",
            "weights_convert/__init__.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_source_compiles_without_warnings(path):
    compile_with_warnings_as_errors(path.read_text(encoding="utf-8"), str(path))


def test_deprecation_warnings_from_our_modules_are_errors():
    """The suite's filters: ours raise, third-party ones (e.g. a library warning about its own code) do not."""
    for module in ("parti_from_scratch", "parti_from_scratch.clip.tokenizer", "weights_convert.ldm"):
        for category in (DeprecationWarning, SyntaxWarning):
            with pytest.raises(category):
                warnings.warn_explicit("deprecated", category, f"{module}.py", 1, module=module)
    for module in ("torch.serialization", "transformers.utils", "parti_from_scratch_extra", "my.weights_convert"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit("deprecated", DeprecationWarning, f"{module}.py", 1, module=module)
        assert not [w for w in seen if issubclass(w.category, DeprecationWarning)], module
