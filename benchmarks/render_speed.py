"""Rendering speed of the captioned-shapes dataset: scenes drawn per second by `render_batch`.

The built-in dataset renders its images on the fly, so this rate bounds how fast a training
run can be fed. Each repetition draws the same `--n` training scenes; the best and the median
of `--repeats` runs are printed.

    python benchmarks/render_speed.py [--n 2000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from parti_from_scratch.data.shapes import IMAGE_SIZE, render_batch, sample_scenes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="scenes per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    scenes = sample_scenes("train", args.n, seed=0)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        images = render_batch(scenes)
        rates.append(args.n / (time.perf_counter() - start))
    assert images.shape == (args.n, IMAGE_SIZE, IMAGE_SIZE, 3)
    print(f"render_batch, {args.n} scenes of {IMAGE_SIZE}x{IMAGE_SIZE}: best {max(rates):,.0f} renders/s, "
          f"median {statistics.median(rates):,.0f} renders/s over {args.repeats} runs")


if __name__ == "__main__":
    main()
