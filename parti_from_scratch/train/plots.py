"""Loss curves as a PNG (tutorial §3.3).

One panel per logged metric (the loss, the loss_fn's own metrics, the learning
rate, the gradient norm, the time per step) against the optimiser step. The
figure is drawn with matplotlib's Agg canvas directly (no pyplot, no display
needed) and written atomically, so a viewer never sees half a PNG.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint import atomic_write_bytes

# panels in this order first, then the loss_fn's metrics alphabetically
_FIRST = ("loss", "lr", "grad_norm", "step_time")
_UNITS = {"step_time": "s"}


def metric_names(history: Sequence[Mapping[str, float]]) -> list[str]:
    """The metrics present in `history`, loss first."""
    seen = {k for row in history for k in row if k != "step"}
    return [k for k in _FIRST if k in seen] + sorted(seen - set(_FIRST))


def plot_history(history: Sequence[Mapping[str, float]], path: Union[str, Path], title: str = "") -> Path:
    """Save one panel per metric of `history` (rows of {"step": s, name: value}) to `path` as PNG."""
    names = metric_names(history)
    if not names:
        raise ValueError("nothing to plot: the history has no metrics")
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.88, wspace=0.3, hspace=0.55)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        points = [(row["step"], row[name]) for row in history if name in row]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None, linewidth=1.2)
        # losses span decades early in training: a log axis shows the late progress
        if name.endswith("loss") and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.set_title(f"{name} ({_UNITS[name]})" if name in _UNITS else name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
