"""Execute the notebooks and write readable copies, with their figures, to docs/notebooks/.

    python docs/render_notebooks.py                      # every notebook at full size: copies + runtimes
    python docs/render_notebooks.py 08_training.ipynb    # one notebook
    python docs/render_notebooks.py --smoke              # smoke size (PARTI_SMOKE=1): runtimes only
    python docs/render_notebooks.py --markdown-only      # prose edited, code unchanged: update the copies' text

Each notebook runs top to bottom in a fresh `python3` kernel, in a temporary working directory, with
OMP_NUM_THREADS=1 (unless set), exactly as tests/test_notebooks.py runs it. A full-size run writes
docs/notebooks/<name>.ipynb, kept lean: progress-bar redraws reduced to their last state, terminal colour codes
removed, long text outputs cut, figures re-encoded as palette PNGs when that is smaller. Both sizes record their
wall time in docs/notebooks/runtimes.json with the thread count, the date and the machine's load average (the
time depends on what else the machine was doing). The code cells of a copy are the source's, unchanged;
tests/test_notebooks.py checks that they stay so.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIR = ROOT / "notebooks"
OUT_DIR = ROOT / "docs" / "notebooks"
RUNTIMES = "runtimes.json"
CELL_TIMEOUT = 1800                    # seconds per cell: full-size training cells take minutes on a busy CPU
MAX_TEXT = 5_000                       # characters kept of one text output
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# tqdm.auto in a kernel without ipywidgets says so once, then draws a text bar: the note is about this machine
TQDM_NOTE = re.compile(r".*TqdmWarning: IProgress not found.*\n(\s*from \.autonotebook import .*\n)?")


def execute_notebook(nb: nbformat.NotebookNode, smoke: bool, workdir: str, timeout: int = CELL_TIMEOUT) -> float:
    """Run the notebook `nb` in a fresh kernel, filling in its outputs in place; return its wall time in seconds.

    The kernel inherits this process's environment, set here for the run: PARTI_SMOKE=1 (or unset), the inline
    matplotlib backend, OMP_NUM_THREADS (1 unless set). When a cell fails, `nb` keeps the outputs so far and
    `nb.metadata["parti_seconds"]` is set before the error propagates.
    """
    saved = {key: os.environ.get(key) for key in ("PARTI_SMOKE", "MPLBACKEND", "OMP_NUM_THREADS")}
    if smoke:
        os.environ["PARTI_SMOKE"] = "1"
    else:
        os.environ.pop("PARTI_SMOKE", None)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # the notebooks' models are small: one thread per kernel is as fast and does not oversubscribe a busy machine
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or "1"
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout, record_timing=False,
                                     resources={"metadata": {"path": workdir}})
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        nb.metadata["parti_seconds"] = round(time.perf_counter() - started, 1)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb.metadata["parti_seconds"]


def clean_text(text: str) -> str:
    """A terminal's view of `text`: colour codes removed, each line as its last carriage-return redraw left it,
    paths inside the checkout relative to it, tqdm's note about ipywidgets dropped, cut to MAX_TEXT characters."""
    text = TQDM_NOTE.sub("", ANSI.sub("", text)).replace(f"{ROOT}{os.sep}", "")
    lines = [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")]
    text = "\n".join(lines)
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + f"\n... [{len(text) - MAX_TEXT:,} more characters cut from this copy]\n"
    return text


def smaller_png(data: str) -> str:
    """The base64 PNG `data`, re-encoded as a 256-colour palette PNG if that is smaller (plots, flat colours and
    colour maps look the same; photographs and noise images are dithered to 256 colours)."""
    from PIL import Image

    raw = base64.b64decode(data)
    image = Image.open(io.BytesIO(raw))
    if image.mode not in ("RGB", "RGBA"):
        return data
    buffer = io.BytesIO()
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    small = buffer.getvalue()
    return base64.b64encode(small).decode("ascii") if len(small) < len(raw) else data


def merged_streams(outputs: list) -> list:
    """`outputs` with each run of consecutive stream outputs to the same stream joined into one (a progress bar
    arrives as one output per redraw, each starting with a carriage return)."""
    merged = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (output.output_type == "stream" and previous is not None and previous.output_type == "stream"
                and previous.name == output.name):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


def lean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Strip what a reader does not need from the executed notebook (in place): widget state, colour codes,
    progress-bar redraws (a bar's stream outputs merged, then its last state kept), long text; re-encode figures."""
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("parti_seconds", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = merged_streams(cell.outputs)
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                output.text = clean_text(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                data = output.data
                for key in [k for k in data if k.startswith("application/vnd.jupyter.widget")]:
                    del data[key]
                if "image/png" in data:
                    data["image/png"] = smaller_png(data["image/png"])
                if "text/plain" in data:
                    data["text/plain"] = clean_text(data["text/plain"])
            elif output.output_type == "error":
                output.traceback = [ANSI.sub("", line) for line in output.traceback]
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if o.output_type != "stream" or o.text.strip()]
    return nb


def record_runtime(out_dir: Path, name: str, size: str, seconds: float, load: tuple[float, float]) -> None:
    """Write one notebook's wall time at `size` ("full" or "smoke") into out_dir/runtimes.json."""
    path = out_dir / RUNTIMES
    table = json.loads(path.read_text()) if path.is_file() else {}
    table["threads"] = int(os.environ.get("OMP_NUM_THREADS") or 1)
    table["cpus"] = os.cpu_count()
    entry = table.setdefault("notebooks", {}).setdefault(name, {})
    entry[size] = {"seconds": seconds, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "load_average_1min": [round(x, 2) for x in load]}        # at the start and at the end of the run
    table["notebooks"] = dict(sorted(table["notebooks"].items()))
    path.write_text(json.dumps(table, indent=1) + "\n")


def sync_markdown(source: nbformat.NotebookNode, executed: nbformat.NotebookNode) -> int:
    """Copy the source's markdown cells into the executed copy (in place) when the code cells are the same, so an
    edit to the prose needs no rerun; return how many cells changed. Raises ValueError when code changed."""
    kinds = [(c.cell_type, c.source if c.cell_type == "code" else None) for c in source.cells]
    if kinds != [(c.cell_type, c.source if c.cell_type == "code" else None) for c in executed.cells]:
        raise ValueError("the code cells differ from the source's: the notebook must be run again")
    changed = 0
    for mine, theirs in zip(source.cells, executed.cells):
        if mine.cell_type == "markdown" and mine.source != theirs.source:
            theirs.source, changed = mine.source, changed + 1
    return changed


def runtime_table(out_dir: Path) -> str:
    """The runtimes in out_dir/runtimes.json as a markdown table (minutes:seconds at each size)."""
    table = json.loads((out_dir / RUNTIMES).read_text())

    def clock(entry):
        return f"{int(entry['seconds'] // 60)}:{int(round(entry['seconds'] % 60)):02d}" if entry else "-"

    def load(entry):
        return "-" if not entry else " → ".join(f"{x:.1f}" for x in entry["load_average_1min"])

    rows = ["| notebook | full size | smoke size (`PARTI_SMOKE=1`) | load average (full; smoke) |", "|---|---|---|---|"]
    for name, entry in table["notebooks"].items():
        full, smoke = entry.get("full"), entry.get("smoke")
        rows.append(f"| [{name}](docs/notebooks/{name}) | {clock(full)} | {clock(smoke)} | {load(full)}; {load(smoke)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: every notebook in notebooks/)")
    parser.add_argument("--smoke", action="store_true", help="run with PARTI_SMOKE=1; record the time only")
    parser.add_argument("--markdown-only", action="store_true",
                        help="copy edited markdown cells into the existing copies (and clean them again), "
                             "without running anything")
    parser.add_argument("--table", action="store_true", help="print runtimes.json as a markdown table and stop")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.name for p in SOURCE_DIR.glob("*.ipynb"))
    missing = [n for n in names if not (SOURCE_DIR / n).is_file()]
    if missing:
        parser.error(f"no such notebook in {SOURCE_DIR}: {', '.join(missing)}")
    if args.table:
        print(runtime_table(args.out))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.markdown_only:
        for name in names:
            if not (args.out / name).is_file():
                parser.error(f"{args.out / name}: no executed copy to update; run the notebook first")
            executed = nbformat.read(args.out / name, as_version=4)
            try:
                changed = sync_markdown(nbformat.read(SOURCE_DIR / name, as_version=4), executed)
            except ValueError as error:
                parser.error(f"{args.out / name}: {error}")
            nbformat.write(lean(executed), args.out / name)
            print(f"{name}: {changed} markdown cells updated")
        return 0
    failed = []
    for name in names:
        size = "smoke" if args.smoke else "full"
        load_before = os.getloadavg()[0]
        nb = nbformat.read(SOURCE_DIR / name, as_version=4)
        with tempfile.TemporaryDirectory() as workdir:
            try:
                seconds = execute_notebook(nb, args.smoke, workdir)
            except nbclient.exceptions.CellExecutionError as error:
                print(f"{name} ({size}): FAILED\n{ANSI.sub('', str(error))[-3000:]}", file=sys.stderr)
                failed.append(name)
                continue
        record_runtime(args.out, name, size, seconds, (load_before, os.getloadavg()[0]))
        if not args.smoke:
            nbformat.write(lean(nb), args.out / name)
        print(f"{name} ({size}): {seconds:.0f} s, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
