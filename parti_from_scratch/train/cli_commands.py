"""The `train` and `eval` commands of `parti-from-scratch` (see cli.py for the parser).

    train [all|clip|vae|unet] --out DIR [--steps N] [--batch-size B] [--seed S] [--resume latest|PATH]
          [--device cpu|cuda|auto] [--precision fp32|bf16|fp16] [--clip DIR] [--vae DIR]
    eval [--model PATH] [--prompts heldout_single|single|pair|heldout_pair|FILE] [--n N]
         [--steps S] [--guidance W] [--seed S] [--scheduler NAME] [--grid out.png]

`train` runs the same under `torchrun --nproc_per_node N -m parti_from_scratch train ...`:
the loop splits each global batch over the processes.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


class CommandError(Exception):
    """A failure to report as one line with exit code 2."""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("component", nargs="?", default="all", choices=("all", "clip", "vae", "unet"),
                   help="what to train (a UNet needs a trained CLIP and VAE: --clip/--vae or earlier runs in --out)")
    p.add_argument("--out", required=True, help="output folder: <component>/ runs and pipeline/")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per component (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch per component (default: the recipe's)")
    p.add_argument("--seed", type=int, default=None, help="seed of data, initialisation and noise (default 0)")
    p.add_argument("--resume", default=None, help="'latest' (each component's newest checkpoint) or a checkpoint file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--clip", default=None, help="a trained CLIP (model folder or earlier --out) to reuse")
    p.add_argument("--vae", default=None, help="a trained VAE (model folder or earlier --out) to reuse")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    p.add_argument("--prompts", default="heldout_single",
                   help="single, heldout_single, pair, heldout_pair, or a text file with one prompt a line")
    p.add_argument("--n", type=int, default=None, help="use only n prompts of a built-in set")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the shipped model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--scheduler", default=None, help="sampler for this run (pndm, ddim, ddpm, euler, dpm)")
    p.add_argument("--grid", default=None, help="save the images with their prompts to this PNG")


def cmd_train(args: argparse.Namespace) -> int:
    from .default_recipe import COMPONENTS, default_recipe, train_default
    from .errors import TrainError

    components = COMPONENTS if args.component == "all" else (args.component,)
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise CommandError(f"{name} must be >= 1, got {value}")
    if args.seed is not None and args.seed < 0:
        raise CommandError(f"--seed must be >= 0, got {args.seed}")
    resume = args.resume
    try:
        if resume is not None and resume != "latest":
            if len(components) > 1:
                raise CommandError("--resume PATH names one checkpoint: train one component with it "
                                   "(or use --resume latest)")
            from .checkpoint import read_safetensors
            read_safetensors(resume)                       # a corrupt file fails here, before anything is written
        for flag, folder in (("--clip", args.clip), ("--vae", args.vae)):
            if folder is not None and not Path(folder).is_dir():
                raise CommandError(f"{flag} {folder}: no such folder")
        recipe = default_recipe().with_overrides(args.steps, args.batch_size, args.seed, components)
        command = "parti-from-scratch train " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
            if len(sys.argv) > 2 else None
        folder = train_default(args.out, recipe, components, clip_dir=args.clip, vae_dir=args.vae, resume=resume,
                               device=args.device, precision=args.precision, progress=not args.quiet,
                               command=command)
    except TrainError as e:
        raise CommandError(str(e)) from None
    except (OSError, ValueError) as e:
        raise CommandError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        print(folder if folder is not None else Path(args.out))
    return 0


def _read_prompts(spec: str, n, seed: int):
    from parti_from_scratch.data import eval_prompts, parse_caption
    from parti_from_scratch.data.shapes import PROMPT_SETS

    if spec in PROMPT_SETS:
        return eval_prompts(spec, n=n, seed=seed)
    path = Path(spec)
    if not path.is_file():
        raise CommandError(f"--prompts {spec}: not a prompt set {PROMPT_SETS} nor a file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CommandError(f"--prompts {spec}: the file holds no prompts")
    out = []
    for p in prompts:
        try:
            out.append((p, parse_caption(p)))
        except ValueError as e:
            raise CommandError(f"--prompts {spec}: cannot grade {p!r}: {e}") from None
    return out[:n] if n else out


def cmd_eval(args: argparse.Namespace) -> int:
    import time

    from parti_from_scratch.cli import SHIPPED_GUIDANCE, SHIPPED_STEPS
    from parti_from_scratch.pipeline import TextToImagePipeline

    from .components import evaluate_adherence, save_image_grid

    if args.model is not None and not Path(args.model).exists():
        raise CommandError(f"--model {args.model}: no such folder")
    if args.steps is not None and args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and not args.guidance >= 0:
        raise CommandError(f"--guidance must be >= 0, got {args.guidance}")
    prompts = _read_prompts(args.prompts, args.n, args.seed)
    try:
        pipe = TextToImagePipeline.from_pretrained(args.model)
    except (ValueError, OSError) as e:
        raise CommandError(f"cannot load model: {e}") from None
    steps = args.steps or SHIPPED_STEPS
    guidance = args.guidance if args.guidance is not None else SHIPPED_GUIDANCE
    started = time.perf_counter()
    summary, images = evaluate_adherence(pipe, prompts, steps, guidance, args.seed, args.scheduler)
    seconds = time.perf_counter() - started
    print(f"{len(prompts)} prompts ({args.prompts}), {steps} steps, guidance {guidance}, seed {args.seed}, "
          f"{seconds / len(prompts):.2f} s/image")
    for name in ("count", "colour", "shape", "size", "position", "exact"):
        print(f"  {name:<9} {100 * summary[name]:5.1f}%")
    if args.grid:
        from .components.evaluate import safe_score
        labels = [("ok " if safe_score(im, scene).exact else "x ") + p for im, (p, scene) in zip(images, prompts)]
        print(save_image_grid(images, args.grid, columns=min(8, len(images)), labels=labels))
    return 0
