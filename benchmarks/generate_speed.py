"""Seconds to generate one 64x64 image with the shipped model (the model's own steps and guidance).

    python benchmarks/generate_speed.py [--model PATH] [--runs 7] [--threads N]

Prints the median over `--runs` timed runs after one warm-up run. Classifier-free
guidance doubles the UNet batch (prompt and empty prompt), so a step is one UNet
call on 2 latents. The target for the shipped model is <= 2 s per image.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from common import seeded_times  # this folder is on the path when a script runs
from parti_from_scratch.pipeline import TextToImagePipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's own)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's own)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--prompt", default="a large red circle on the left")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    # the model's own sampler settings (its sampling_defaults.json) unless the flags name others
    steps = args.steps if args.steps is not None else pipe.sampling_defaults.num_inference_steps
    guidance = args.guidance if args.guidance is not None else pipe.sampling_defaults.guidance_scale

    times = seeded_times(lambda seed: pipe(args.prompt, num_inference_steps=steps, guidance_scale=guidance,
                                           generator=[torch.Generator().manual_seed(seed)], output_type="np",
                                           progress=False), args.runs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{statistics.median(times):.3f} s per image (median of {args.runs}; min {min(times):.3f}, "
          f"max {max(times):.3f}); {steps} steps, guidance {guidance}, "
          f"{torch.get_num_threads()} threads, load average {load:.1f}")


if __name__ == "__main__":
    main()
