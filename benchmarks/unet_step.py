"""One denoising step of the full-size Stable Diffusion v1.5 UNet: ours against diffusers', fp32 on the CPU.

    python benchmarks/unet_step.py [--warmup 2] [--steps 7] [--runs 3] [--threads N]

What is measured:
* the SD v1.5 architecture (block_out_channels 320/640/1280/1280, 2 layers per
  block, 8 heads, text width 768; 860M parameters) with random weights: diffusers
  builds and initialises it, and ours receives the same tensors through the
  converter (weights_convert.diffusers_models.from_diffusers) from the in-memory
  state dict;
* one UNet call as a sampler with classifier-free guidance makes it: batch 2
  (unconditional + conditional), 32x32 latents (256x256 pixels), 77x768 text states;
* under torch.inference_mode(), `--warmup` untimed calls of each model, then
  `--steps` timed calls alternating ours / diffusers in the same process, so a
  slower or faster moment of the machine hits both alike; the median of each;
* the ratio median(ours) / median(diffusers) (target <= 0.9);
* achieved GFLOP/s of ours = FLOPs of one call (torch.utils.flop_counter.FlopCounterMode,
  which counts matmuls, convolutions and attention) / median time, next to the
  GFLOP/s of a 2048x2048 fp32 matmul measured the same way, the machine's practical peak.

`--runs N` repeats the timed part N times and reports the median ratio. The
machine's 1-minute load average is printed with each run. The benchmark itself
keeps about as many threads busy as torch uses; a load average well above that
means other processes compete for the cores, which slows both models unevenly
and makes the ratio noisy: compare runs made on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder, for common.py
from common import build_unet_pair, count_flops, matmul_gflops, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, reference = build_unet_pair()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 32, 32, generator=g)
    c = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor(500)
    run_ours = lambda: ours(z, t, encoder_hidden_states=c).sample  # noqa: E731
    run_reference = lambda: reference(z, t, encoder_hidden_states=c).sample  # noqa: E731

    with torch.inference_mode():
        diff = (run_ours() - run_reference()).abs().max().item()
        for _ in range(args.warmup - 1):
            run_ours(), run_reference()
        flops = count_flops(ours, z, t, c)
        ratios, medians_ours, medians_reference = [], [], []
        for run in range(args.runs):
            times_ours, times_reference = [], []
            for _ in range(args.steps):
                times_ours.append(timed(run_ours))
                times_reference.append(timed(run_reference))
            t_ours, t_reference = statistics.median(times_ours), statistics.median(times_reference)
            ratios.append(t_ours / t_reference)
            medians_ours.append(t_ours)
            medians_reference.append(t_reference)
            print(f"run {run + 1}: ours {t_ours:.3f} s, diffusers {t_reference:.3f} s (medians of {args.steps}), "
                  f"ratio {ratios[-1]:.3f}; load average {os.getloadavg()[0]:.1f}", flush=True)
        peak = matmul_gflops()

    print(f"threads: {torch.get_num_threads()}; max |ours - diffusers| = {diff:.2e}")
    print(f"median ratio ours/diffusers over {args.runs} run(s): {statistics.median(ratios):.3f} (target <= 0.9)")
    t_ours, t_reference = statistics.median(medians_ours), statistics.median(medians_reference)
    print(f"one UNet call: {flops / 1e9:.1f} GFLOP; ours achieves {flops / t_ours / 1e9:.1f} GFLOP/s, diffusers "
          f"{flops / t_reference / 1e9:.1f} GFLOP/s (median step times); fp32 2048x2048 matmul: {peak:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
