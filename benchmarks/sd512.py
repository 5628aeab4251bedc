"""A 512x512 Stable Diffusion v1.5 image on the CPU, ours against diffusers: UNet step, VAE decode, whole image, memory.

    python benchmarks/sd512.py [--pairs 3] [--steps 20] [--threads N] [--quick] [--skip-image] [--skip-768]

What is measured (fp32, random weights, everything built offline, benchmarks/common.py):
* UNet step: the full-size SD v1.5 UNet (860M parameters), batch 2 as under classifier-free guidance,
  64x64 latents, 77x768 text states; diffusers builds it and ours holds the same tensors;
* VAE decode: SD's autoencoder decoder, one 64x64 latent -> one 512x512 image;
* whole image: 512x512, `--steps` DPM-Solver++ (2nd order multistep) steps with guidance 7.5, from the same
  initial latents: ours is TextToImagePipeline over our UNet and VAE above (converted in memory), our CLIP
  text encoder and tokenizer; diffusers' is StableDiffusionPipeline over its own components. The text
  encoder is the real-size CLIP ViT-L/14 text tower (123M parameters, 12 layers, width 768) with random
  weights and the real 49,408-token vocabulary;
* each timing: one untimed call of each, then `--pairs` calls alternating ours / diffusers in one process
  (a slower moment of the machine hits both alike); the medians and their ratio ours / diffusers
  (targets <= 0.8), and max |ours - diffusers| of the outputs;
* the UNet step's FLOPs (torch.utils.flop_counter), achieved GFLOP/s, and the fraction of an fp32
  2048x2048 matmul's GFLOP/s measured in the same process (target >= 70%);
* peak resident memory of one whole image, each pipeline alone in a child process that loads it from a
  saved folder (VmHWM of /proc/self/status; ru_maxrss where /proc is absent); the children run
  `--rss-steps` sampler steps (default 2: the peak is reached in the first UNet call under guidance and in
  the VAE decode; more steps repeat the same allocations);
* the 768x768 check: peak resident memory of one UNet step of an SD 2.x-sized UNet (heads 64 wide,
  text width 1024, linear projections) at 96x96 latents, batch 2 (self-attention over 9,216 tokens),
  ours alone in a child process.
`--quick` is a short check: 1 pair, 2 sampler steps, no 768 check.

The machine's 1-minute load average is printed with every timing. Other processes on the cores slow
both implementations, not always alike: compare runs made on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder, for common.py
from common import (SD15_UNET, alternate, build_unet_pair, build_vae_pair, count_flops, load_average,  # noqa: E402
                    matmul_gflops)

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
# SD v1.5's scheduler_config.json, as DPM-Solver++ reads it
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2)
# CLIP ViT-L/14's text tower, SD v1.x's text encoder
CLIP_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# an SD 2.x-sized UNet (stabilityai/stable-diffusion-2-1's unet/config.json)
SD2_UNET = dict(SD15_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                sample_size=96)


def compare(name: str, run_ours: Callable[[], torch.Tensor], run_reference: Callable[[], torch.Tensor],
            pairs: int, probe: Optional[Callable[[], float]] = None) -> Dict[str, float]:
    """One untimed call of each (their max abs difference), then `pairs` alternated timed calls; print and return.

    `probe`, if given, runs after every pair (e.g. the matmul speed, so it sees the same moments of the machine);
    the median of its values is returned as "probe"."""
    out_ours, out_reference = run_ours(), run_reference()
    if isinstance(out_ours, torch.Tensor):
        out_ours, out_reference = (out_ours,), (out_reference,)
    # the first output is the one compared in the summary; others (the whole image's final latents) are printed too
    diffs = [(a - b).abs().max().item() for a, b in zip(out_ours, out_reference)]
    diff, scale = diffs[0], out_reference[0].abs().max().item()
    times_ours, times_reference, probes = [], [], []
    for _ in range(pairs):
        t_ours, t_reference = alternate(run_ours, run_reference, 1)
        times_ours += t_ours
        times_reference += t_reference
        if probe is not None:
            probes.append(probe())
    t_ours, t_reference = statistics.median(times_ours), statistics.median(times_reference)
    print(f"{name}: ours {t_ours:.2f} s, diffusers {t_reference:.2f} s (medians of {pairs}), ratio "
          f"{t_ours / t_reference:.3f} (target <= 0.8); max |ours - diffusers| = {', '.join(f'{d:.2e}' for d in diffs)} "
          f"(max |out| = {scale:.2f}); "
          f"load average {load_average():.1f}", flush=True)
    return dict(ours=t_ours, diffusers=t_reference, ratio=t_ours / t_reference, diff=diff,
                probe=statistics.median(probes) if probes else float("nan"))


def unet_and_vae(pairs: int) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """Time the UNet step and the VAE decode; return the model pairs for the whole image."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 64, 64, generator=g)
    c = torch.randn(2, 77, 768, generator=g)
    unet_ours, unet_reference = build_unet_pair()
    with torch.inference_mode():
        step = compare("UNet step, batch 2, 64x64 latents", lambda: unet_ours(z, 500, encoder_hidden_states=c).sample,
                       lambda: unet_reference(z, 500, encoder_hidden_states=c).sample, pairs,
                       probe=lambda: matmul_gflops(repeats=5))
        flops = count_flops(unet_ours, z, 500, encoder_hidden_states=c)
    achieved, peak = flops / step["ours"] / 1e9, step["probe"]
    print(f"  one UNet call: {flops / 1e9:.0f} GFLOP; ours {achieved:.0f} GFLOP/s, diffusers "
          f"{flops / step['diffusers'] / 1e9:.0f} GFLOP/s; fp32 2048x2048 matmul {peak:.0f} GFLOP/s (median, "
          f"measured after each pair); "
          f"ours reaches {100 * achieved / peak:.0f}% of it (target >= 70%); load average {load_average():.1f}",
          flush=True)

    latent = torch.randn(1, 4, 64, 64, generator=g)
    vae_ours, vae_reference = build_vae_pair()
    with torch.inference_mode():
        compare("VAE decode, 64x64 latent -> 512x512", lambda: vae_ours.decode(latent).sample,
                lambda: vae_reference.decode(latent).sample, pairs)
    return unet_ours, unet_reference, vae_ours, vae_reference


def save_reference_pipeline(folder: Path, unet_reference, vae_reference):
    """diffusers' StableDiffusionPipeline around the given UNet and VAE, a random real-size CLIP text encoder and
    CLIP's vocabulary (written by our tokenizer), saved to `folder`; returned with its DPM-Solver++ scheduler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from parti_from_scratch.clip.tokenizer import CLIPTokenizer as OurTokenizer
    OurTokenizer().save_pretrained(folder / "tokenizer")
    torch.manual_seed(1)
    pipe = StableDiffusionPipeline(
        vae=vae_reference, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=unet_reference,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def our_pipeline(folder: Path, unet=None, vae=None):
    """TextToImagePipeline from the saved folder, or around the given (in-memory converted) UNet and VAE."""
    from parti_from_scratch import TextToImagePipeline
    from parti_from_scratch.clip.model import CLIPTextModel
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    from parti_from_scratch.diffusion.schedulers import DPMSolverMultistepScheduler
    if unet is None:
        return TextToImagePipeline.from_pretrained(folder)
    return TextToImagePipeline(tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                               text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval(),
                               unet=unet, vae=vae,
                               scheduler=DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler"))


def image_runner(pipe, ours: bool, steps: int, size: int = 512) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """One image of PROMPT from fixed initial latents: the (1, size, size, 3) image in [0, 1] and the final
    latents z_0 (read by the step-end callback; with random weights many pixels saturate at 0 or 1, the
    latents show the sampler's drift)."""
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(2))
    final = {}

    def keep_latents(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    kw = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size, output_type="np",
              callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"])
    if ours:
        kw["progress"] = False

    def run() -> Tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(pipe(PROMPT, latents=latents.clone(), **kw).images)
        return image, final["latents"]
    return run


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB: VmHWM from /proc/self/status, else ru_maxrss (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def child(role: str, folder: Path, steps: int) -> None:
    """Run in a fresh process: one whole image (role "ours"/"diffusers") or one 96x96 UNet step ("ours768"),
    then print the peak resident memory as JSON."""
    with torch.inference_mode():
        if role == "ours":
            image_runner(our_pipeline(folder), True, steps)()
        elif role == "diffusers":
            from diffusers import StableDiffusionPipeline
            pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            image_runner(pipe, False, steps)()
        elif role == "ours768":
            from parti_from_scratch.unet import UNet2DConditionModel
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SD2_UNET).eval()
            g = torch.Generator().manual_seed(0)
            unet(torch.randn(2, 4, 96, 96, generator=g), 500,
                 encoder_hidden_states=torch.randn(2, 77, 1024, generator=g))
        else:
            raise ValueError(f"unknown child role {role!r}")
    print(json.dumps({"peak_rss_gib": peak_rss_gib()}))


def run_child(role: str, folder: Path, steps: int, threads: int) -> float:
    """Peak resident memory (GiB) of `child(role, ...)` in a fresh Python process."""
    command = [sys.executable, __file__, "--child", role, "--folder", str(folder), "--rss-steps", str(steps),
               "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"child {role} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_gib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="alternated timed calls of each (median)")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps of the whole image")
    parser.add_argument("--rss-steps", type=int, default=2, help="sampler steps of the memory children")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="1 pair, 2 sampler steps, no 768 check")
    parser.add_argument("--skip-image", action="store_true", help="only the UNet step and the VAE decode")
    parser.add_argument("--skip-768", action="store_true", help="no 96x96 memory check")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.folder, args.rss_steps)
        return
    if args.quick:
        args.pairs, args.steps, args.skip_768 = 1, 2, True
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, fp32; load average {load_average():.1f}", flush=True)

    unet_ours, unet_reference, vae_ours, vae_reference = unet_and_vae(args.pairs)
    if not args.skip_image:
        with tempfile.TemporaryDirectory(prefix="sd512_") as tmp:
            folder = Path(tmp)
            reference = save_reference_pipeline(folder, unet_reference, vae_reference)
            ours = our_pipeline(folder, unet_ours, vae_ours)
            with torch.inference_mode():
                compare(f"whole 512x512 image, {args.steps} DPM-Solver++ steps, guidance {GUIDANCE}",
                        image_runner(ours, True, args.steps), image_runner(reference, False, args.steps), args.pairs)
            del ours, reference, unet_ours, unet_reference, vae_ours, vae_reference
            rss = {role: run_child(role, folder, args.rss_steps, threads) for role in ("ours", "diffusers")}
            print(f"peak RSS of one whole image ({args.rss_steps} steps, each pipeline alone in a child process): "
                  f"ours {rss['ours']:.2f} GiB, diffusers {rss['diffusers']:.2f} GiB (target ours <= diffusers)",
                  flush=True)
    if not args.skip_768:
        print(f"768x768 check: one SD 2.x-sized UNet step at 96x96 latents, batch 2: ours peak RSS "
              f"{run_child('ours768', Path('.'), 1, threads):.2f} GiB (target <= 24 GiB); "
              f"load average {load_average():.1f}", flush=True)


if __name__ == "__main__":
    main()
