"""Saving matplotlib figures as PNG files (schedules, image grids): one place for the file handling."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union


def save_figure(fig: Any, path: Union[str, Path], dpi: int = 100) -> Path:
    """Write `fig` to the PNG `path` (creating its folder), close the figure, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
