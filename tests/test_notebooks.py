"""Run every notebook top to bottom, as a reader would, and fail on any cell error.

Each notebook runs in a fresh `python3` kernel (ipykernel's own kernelspec) with
PARTI_SMOKE=1 (smaller steps and batches), one torch thread unless OMP_NUM_THREADS
says otherwise, and a temporary working directory.
The executed copies, figures included, are written to $PARTI_NOTEBOOK_OUT
(default: a temporary folder) so a person can open them afterwards.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
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
]
CELL_TIMEOUT = 600  # seconds per cell


def _out_dir() -> Path:
    out = os.environ.get("PARTI_NOTEBOOK_OUT") or os.path.join(tempfile.gettempdir(), "parti_notebooks")
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_every_notebook_is_listed():
    """A notebook added to notebooks/ must be added to NOTEBOOKS too (or it would silently go unchecked)."""
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    # the kernel inherits this process's environment
    monkeypatch.setenv("PARTI_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # the notebooks' models are small: one thread per kernel is as fast and does not oversubscribe a busy machine
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        nb.metadata["parti_seconds"] = round(time.perf_counter() - started, 1)
        nbformat.write(nb, _out_dir() / name)
    print(f"{name}: {nb.metadata['parti_seconds']} s, executed copy in {_out_dir() / name}")
