"""Seconds to generate one 64x64 image with a Parti pipeline folder (one candidate, the folder's own guidance).

    python benchmarks/parti_speed.py [--model PATH] [--runs 7] [--threads N]

Prints the median over `--runs` timed runs after one warm-up run. With guidance the
decoder runs 2 rows (prompt and empty prompt) for each of the grid's tokens (64 for
8x8), each step one cached decoder call; then the VQGAN decodes the grid. The target
for the shipped Parti is <= 1 s per image. --model defaults to the shipped Parti.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import seeded_times  # this folder is on the path when a script runs
from parti_from_scratch.parti_pipeline import PartiPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Parti pipeline folder (default: the shipped Parti)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the folder's own)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--prompt", default="a large red circle on the left")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = PartiPipeline.from_pretrained(args.model)

    times = seeded_times(lambda seed: pipe(args.prompt, guidance_scale=args.guidance, num_candidates=1,
                                           output_type="np", generator=torch.Generator().manual_seed(seed),
                                           progress=False), args.runs)
    config = pipe.transformer.config
    guidance = pipe.sampling_defaults.guidance_scale if args.guidance is None else args.guidance
    print(f"{config.image_token_count} tokens, guidance {guidance:g}, {torch.get_num_threads()} thread(s): "
          f"median {statistics.median(times):.3f} s per image over {args.runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
