"""Command line: `parti-from-scratch <command> ...` (also `python -m parti_from_scratch`).

    generate "PROMPT" [--model PATH] -o out.png   text -> image (the shipped model, or SD weights)
    tokenize "PROMPT"                             show CLIP's BPE tokens and ids (tutorial §3.1)
    schedules -o schedules.png                    plot beta_t, alpha_bar_t and SNR (tutorial §4.2)
    train [all|clip|vae|unet] --out DIR           retrain the shipped model, or one of its parts
    eval [--model PATH] [--prompts SET|FILE]      grade generated images with the shapes checker

Bad arguments end with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

SCHEDULER_NAMES = ("pndm", "ddim", "ddpm", "euler", "dpm")
# sampler steps and guidance scale for the shipped model (measured: see its RECIPE.md)
SHIPPED_STEPS = 20
SHIPPED_GUIDANCE = 5.0


class UsageError(Exception):
    """A bad argument or input file: reported as one line, exit code 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _multiple_of_8(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parti-from-scratch",
                                     description="Text-to-image generation written from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="diffusers folder or single-file checkpoint (default: shipped model)")
    g.add_argument("-o", "--output", default="out.png", help="output PNG (image i of n is saved as out-i.png)")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: 25 shipped, 50 SD)")
    g.add_argument("--guidance", type=_non_negative_float, default=None, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--height", type=_multiple_of_8, default=None)
    g.add_argument("--width", type=_multiple_of_8, default=None)
    g.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None)
    g.add_argument("--num-images", type=_positive_int, default=1)
    g.add_argument("--grid", default=None, help="also save all images side by side to this PNG")
    g.add_argument("--version", choices=("1", "2"), default=None, help="SD version of a single-file checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("tokenize", help="show the CLIP BPE tokens of a prompt")
    t.add_argument("prompt")
    t.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the vendored CLIP vocabulary)")

    s = sub.add_parser("schedules", help="plot beta_t, alpha_bar_t and the SNR of the noise schedules")
    s.add_argument("-o", "--output", default="schedules.png")

    from parti_from_scratch.train.cli_commands import add_eval_arguments, add_train_arguments
    add_train_arguments(sub.add_parser("train", help="train the shipped model (or one part) from scratch"))
    add_eval_arguments(sub.add_parser("eval", help="grade generated images with the shapes checker"))
    return parser


def save_grid(images, path: Path, columns: Optional[int] = None) -> None:
    """Paste PIL images side by side (rows of `columns`) into one PNG."""
    from PIL import Image
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    grid.save(path)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from parti_from_scratch.pipeline import TextToImagePipeline
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: no such file or folder")
    try:
        pipe = TextToImagePipeline.from_pretrained(args.model, version=args.version)
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot load model: {e}") from None
    shipped = args.model is None
    steps = args.steps or (SHIPPED_STEPS if shipped else 50)
    guidance = args.guidance if args.guidance is not None else (SHIPPED_GUIDANCE if shipped else 7.5)
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    out = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=steps, guidance_scale=guidance,
               height=args.height, width=args.width, generator=generators, num_images_per_prompt=args.num_images,
               scheduler=args.scheduler, progress=not args.quiet)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = [output] if len(out.images) == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}")
                                                   for i in range(len(out.images))]
    for im, p in zip(out.images, paths):
        im.save(p)
        print(p)
    if args.grid:
        save_grid(out.images, Path(args.grid))
        print(args.grid)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Print each BPE token of the prompt with its id, BOS and EOS included (tutorial §3.1)."""
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    try:
        tok = CLIPTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else CLIPTokenizer()
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot load tokenizer: {e}") from None
    ids = tok.encode(args.prompt)
    for i, token in zip(ids, tok.convert_ids_to_tokens(ids)):
        print(f"{i:>6}  {token}")
    print(f"{len(ids)} tokens (model_max_length {tok.model_max_length})")
    return 0


def cmd_schedules(args: argparse.Namespace) -> int:
    from parti_from_scratch.diffusion.plot import plot_schedules
    plot_schedules(args.output)
    print(args.output)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from parti_from_scratch.train.cli_commands import CommandError, cmd_train as run
    try:
        return run(args)
    except CommandError as e:
        raise UsageError(str(e)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    from parti_from_scratch.train.cli_commands import CommandError, cmd_eval as run
    try:
        return run(args)
    except CommandError as e:
        raise UsageError(str(e)) from None


COMMANDS = {"generate": cmd_generate, "tokenize": cmd_tokenize, "schedules": cmd_schedules,
            "train": cmd_train, "eval": cmd_eval}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)          # argparse itself exits with code 2 and one usage line
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"parti-from-scratch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
