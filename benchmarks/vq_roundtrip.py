"""A VQGAN round trip, image -> latents -> indices -> image: our VQModel against diffusers', fp32 on the CPU.

    python benchmarks/vq_roundtrip.py [--steps 5] [--runs 3] [--size 64] [--threads N]

What is measured:
* a mid-size VQGAN shaped like aMUSEd's tokenizer at half width: block_out_channels
  64/128/128/256 (8x downsampling), 2 resnets per level, self-attention in the
  mid block and in the deepest level (as taming's f16 models), 32 latent channels,
  an 8192-entry codebook of 32-dimensional codes (17.3M parameters);
  diffusers builds it with random weights and ours receives the same tensors
  through the converter (weights_convert.diffusers_models.from_diffusers);
* one round trip: encode, quantise (nearest of the 8192 codes for every latent pixel),
  decode, for a batch of 2 images of `--size` pixels (8x8 tokens at 64);
* under torch.inference_mode(), one untimed call of each, then `--steps` timed calls
  alternating ours / diffusers in the same process, the median of each; `--runs`
  repeats that and reports the median ratio median(ours) / median(diffusers) (target <= 1.0);
* max |ours - diffusers| over the decoded images, and whether the indices agree.
The 1-minute load average is printed with each run: other processes on the cores slow
both models unevenly, so compare runs made on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder, for common.py
from common import mirror, timed  # noqa: E402  (this folder is on the path when the script runs)

MID = dict(block_out_channels=(64, 128, 128, 256), layers_per_block=2, latent_channels=32, vq_embed_dim=32,
           num_vq_embeddings=8192, norm_num_groups=32, sample_size=128,
           down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
           up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3)


def build_models():
    """diffusers' VQModel with random weights (codebook spread at the latents' scale), and ours with the same tensors."""
    from diffusers import VQModel as DiffusersVQModel

    from parti_from_scratch.parti.vqgan import VQModel, VQModelConfig

    torch.manual_seed(0)
    reference = DiffusersVQModel(**MID).eval()
    with torch.no_grad():  # diffusers initialises codes in [-1/K, 1/K]; spread them like the latents
        reference.quantize.embedding.weight.normal_(0.0, 0.5)
    return mirror(reference, VQModelConfig, VQModel), reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, reference = build_models()
    x = torch.rand(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run_ours():
        z = ours.encode(x).latents
        q = ours.quantize(z)
        return ours.decode(q.quantized, force_not_quantize=True).sample, q.indices

    def run_reference():
        z = reference.encode(x).latents
        z_q, _, (_, _, indices) = reference.quantize(z)
        return reference.decode(z_q, force_not_quantize=True).sample, indices

    with torch.inference_mode():
        (x_ours, k_ours), (x_ref, k_ref) = run_ours(), run_reference()
        diff = (x_ours - x_ref).abs().max().item()
        same = torch.equal(k_ours.reshape(-1), k_ref.reshape(-1))
        ratios = []
        for run in range(args.runs):
            times_ours, times_reference = [], []
            for _ in range(args.steps):
                times_ours.append(timed(run_ours))
                times_reference.append(timed(run_reference))
            t_ours, t_reference = statistics.median(times_ours), statistics.median(times_reference)
            ratios.append(t_ours / t_reference)
            print(f"run {run + 1}: ours {t_ours:.3f} s, diffusers {t_reference:.3f} s (medians of {args.steps}), "
                  f"ratio {ratios[-1]:.3f}; load average {os.getloadavg()[0]:.1f}", flush=True)

    params = sum(p.numel() for p in ours.parameters())
    print(f"config: {MID['block_out_channels']}, {params / 1e6:.1f}M parameters, batch 2 x {args.size}^2 px, "
          f"{k_ours.shape[1]}x{k_ours.shape[2]} tokens; threads {torch.get_num_threads()}")
    print(f"max |ours - diffusers| (decoded images) = {diff:.2e} (max |x| = {x_ref.abs().max().item():.1f}); "
          f"indices identical: {same}")
    print(f"ratio ours / diffusers (median of {args.runs} runs) = {statistics.median(ratios):.3f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
