"""Run every notebook top to bottom, as a reader would, and fail on any cell error; check that the executed copies
in docs/notebooks/ are copies of the current notebooks.

Each notebook runs in a fresh `python3` kernel (ipykernel's own kernelspec) with PARTI_SMOKE=1 (smaller steps and
batches), one torch thread unless OMP_NUM_THREADS says otherwise, and a temporary working directory, through the
same function that renders docs/notebooks/ (docs/render_notebooks.py, at full size).
The executed copies, figures included, are written to $PARTI_NOTEBOOK_OUT
(default: a temporary folder) so a person can open them afterwards.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
COPY_DIR = ROOT / "docs" / "notebooks"
# the notebooks known to run top to bottom; a notebook not listed here is not yet checked
NOTEBOOKS = [
    "01_attention_and_positions.ipynb",
    "02_clip.ipynb",
    "03_forward_diffusion.ipynb",
    "04_reverse_diffusion_and_samplers.ipynb",
    "05_unet_and_vae.ipynb",
    "06_text_to_image.ipynb",
    "07_loading_pretrained_weights.ipynb",
    "08_training.ipynb",
    "09_image_tokens.ipynb",
    "10_writing_image_tokens.ipynb",
    "11_diffusion_vs_autoregression.ipynb",
]
CELL_TIMEOUT = 600  # seconds per cell


def _render_module():
    """docs/render_notebooks.py, a script rather than a package module, loaded from its path."""
    spec = importlib.util.spec_from_file_location("render_notebooks", ROOT / "docs" / "render_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def _out_dir() -> Path:
    out = os.environ.get("PARTI_NOTEBOOK_OUT") or os.path.join(tempfile.gettempdir(), "parti_notebooks")
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_every_notebook_is_listed():
    """A notebook added to notebooks/ must be added to NOTEBOOKS too (or it would silently go unchecked)."""
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    try:
        render.execute_notebook(nb, smoke=True, workdir=str(tmp_path), timeout=CELL_TIMEOUT)
    finally:
        nbformat.write(nb, _out_dir() / name)
    print(f"{name}: {nb.metadata['parti_seconds']} s, executed copy in {_out_dir() / name}")


# ---- the executed copies in docs/notebooks/ --------------------------------------------------------------------

def copy_problems(source: nbformat.NotebookNode, executed: nbformat.NotebookNode) -> list[str]:
    """What keeps `executed` from being an executed copy of `source`: cells whose type or source text differ
    (compared in order; markdown too, so the prose beside an output is the current one), a code cell that was not
    run, a cell that raised, a copy with no outputs at all."""
    problems = []
    a = [(c.cell_type, c.source) for c in source.cells]
    b = [(c.cell_type, c.source) for c in executed.cells]
    if len(a) != len(b):
        problems.append(f"{len(a)} cells in the source, {len(b)} in the copy")
    problems += [f"cell {i} ({x[0]}) differs" for i, (x, y) in enumerate(zip(a, b)) if x != y]
    code = [c for c in executed.cells if c.cell_type == "code"]
    # nbclient skips cells whose source is blank; every other code cell gets an execution count
    problems += [f"code cell {i} was not run" for i, c in enumerate(code)
                 if c.source.strip() and c.get("execution_count") is None]
    problems += [f"code cell {i} raised {o.ename}" for i, c in enumerate(code) for o in c.get("outputs", [])
                 if o.output_type == "error"]
    if not any(c.get("outputs") for c in code):
        problems.append("no outputs")
    return problems


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executed_copy_matches_source(name):
    """docs/notebooks/<name> exists, ran every code cell without error, and has the source's cells, in order.
    After editing a notebook: python docs/render_notebooks.py <name> (or --markdown-only for prose edits)."""
    path = COPY_DIR / name
    assert path.is_file(), f"{path}: no executed copy; run python docs/render_notebooks.py {name}"
    problems = copy_problems(nbformat.read(NOTEBOOK_DIR / name, as_version=4), nbformat.read(path, as_version=4))
    assert not problems, f"{path}: " + "; ".join(problems) + f"; rerun python docs/render_notebooks.py {name}"


def _fake_executed(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of `nb` that looks executed: every code cell counted, with one output."""
    done = copy.deepcopy(nb)
    for i, cell in enumerate(c for c in done.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="ok\n")]
    return done


def test_copy_problems_catches_a_drifted_copy():
    """The comparison itself: a faithful copy passes; a changed, a missing, a reordered or an unrun cell is named."""
    source = nbformat.read(NOTEBOOK_DIR / NOTEBOOKS[0], as_version=4)
    code_at = [i for i, c in enumerate(source.cells) if c.cell_type == "code"]
    assert len(code_at) >= 2
    assert copy_problems(source, _fake_executed(source)) == []

    changed = _fake_executed(source)
    changed.cells[code_at[1]].source += " "                      # one character is enough
    assert copy_problems(source, changed) == [f"cell {code_at[1]} (code) differs"]

    prose = _fake_executed(source)
    markdown_at = next(i for i, c in enumerate(source.cells) if c.cell_type == "markdown")
    prose.cells[markdown_at].source = prose.cells[markdown_at].source.replace("a", "o", 1)
    assert copy_problems(source, prose) == [f"cell {markdown_at} (markdown) differs"]

    missing = _fake_executed(source)
    del missing.cells[code_at[-1]]
    assert f"{len(source.cells)} cells in the source, {len(source.cells) - 1} in the copy" in copy_problems(source, missing)

    swapped = _fake_executed(source)
    i, j = code_at[0], code_at[1]
    swapped.cells[i], swapped.cells[j] = swapped.cells[j], swapped.cells[i]
    assert f"cell {i} (code) differs" in copy_problems(source, swapped)

    unrun = _fake_executed(source)
    unrun.cells[code_at[0]].execution_count = None
    assert copy_problems(source, unrun) == ["code cell 0 was not run"]

    assert "no outputs" in copy_problems(source, source)        # the stored notebooks have no outputs


def test_runtimes_cover_every_notebook():
    """docs/notebooks/runtimes.json has a wall time for every notebook at both sizes."""
    table = json.loads((COPY_DIR / render.RUNTIMES).read_text())
    for name in NOTEBOOKS:
        for size in ("full", "smoke"):
            assert table["notebooks"].get(name, {}).get(size, {}).get("seconds", 0) > 0, (name, size)
