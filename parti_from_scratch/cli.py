"""Command line: `parti-from-scratch <command> ...` (also `python -m parti_from_scratch`).

    generate "PROMPT" [--model PATH] -o out.png   text -> image (the shipped model, SD weights, or a
                                                  min-dalle / Parti folder: PartiPipeline;
                                                  --model parti: the shipped Parti)
    tokenize "PROMPT"                             show CLIP's BPE tokens and ids (tutorial §3.1)
    schedules -o schedules.png                    plot beta_t, alpha_bar_t and SNR (tutorial §4.2)
    train [all|clip|vae|unet] --out DIR           retrain the shipped model, or one of its parts
    eval [--model PATH|parti] [--prompts SET|FILE]  grade generated images with the shapes checker

Bad arguments end with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from parti_from_scratch.train.cli_commands import (MAX_SEED, MAX_STEPS, PARTI_MODEL_HELP, CommandError,
                                                   add_eval_arguments, add_parti_arguments, add_train_arguments,
                                                   check_output_path, check_text, guidance_scale, is_parti_model,
                                                   load_parti, load_reranker, parti_model_path, positive_int,
                                                   refuse_other_family, sampler_steps, scheduler_names, seed)


class UsageError(Exception):
    """A bad argument or input file: reported as one line, exit code 2."""


# options of the diffusion family only: (flag, argparse dest); a Parti model's call refuses them
DIFFUSION_ONLY = (("--negative", "negative"), ("--steps", "steps"), ("--height", "height"), ("--width", "width"),
                  ("--scheduler", "scheduler"), ("--version", "version"))


def shipped_model_facts() -> dict:
    """The shipped model's sampler settings and VAE scale factor, read from its folder, and the settings of a
    folder without sampling_defaults.json: the help quotes these, so it never goes stale."""
    from parti_from_scratch.configuration import read_json
    from parti_from_scratch.pipeline import DEFAULT_MODEL_DIR
    from parti_from_scratch.sampling_defaults import SamplingDefaults

    defaults = SamplingDefaults.read(DEFAULT_MODEL_DIR)
    vae_blocks = len(read_json(DEFAULT_MODEL_DIR / "vae" / "config.json")["block_out_channels"])
    return {"steps": defaults.num_inference_steps, "guidance": defaults.guidance_scale,
            "scheduler": read_json(DEFAULT_MODEL_DIR / "model_index.json")["scheduler"][1],
            "vae_scale_factor": 2 ** (vae_blocks - 1),
            # what a folder without sampling_defaults.json (Stable Diffusion's) or a single file gets
            "plain_steps": SamplingDefaults().num_inference_steps, "plain_guidance": SamplingDefaults().guidance_scale}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parti-from-scratch",
                                     description="Text-to-image generation written from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)
    shipped = shipped_model_facts()
    defaults = (f"Steps, guidance and sampler default to the model's own: its sampling_defaults.json and "
                f"scheduler/ (shipped model: {shipped['steps']} steps, guidance {shipped['guidance']:g}, "
                f"{shipped['scheduler']}; a folder without sampling_defaults.json, or a single file: "
                f"{shipped['plain_steps']} steps, guidance {shipped['plain_guidance']:g}).")
    steps_help = (f"sampler steps, 1..{MAX_STEPS} (default: the model's own; shipped model: {shipped['steps']}, "
                  f"Stable Diffusion: {shipped['plain_steps']})")
    guidance_help = (f"classifier-free guidance scale, >= 0 (default: the model's own; shipped model: "
                     f"{shipped['guidance']:g}, Stable Diffusion: {shipped['plain_guidance']:g})")
    scheduler_help = f"sampler (default: the model's own scheduler/; shipped model: {shipped['scheduler']})"

    g = sub.add_parser("generate", help="generate images from a prompt", description=defaults + (
        " A min-dalle folder (encoder.pt + decoder.pt or encoder_mini.pt + decoder_mini.pt, detoker.pt, vocab.json, "
        "merges.txt) or a Parti pipeline folder (text_tokenizer/, transformer/, vqvae/) runs PartiPipeline: "
        "image tokens one at a time, with --guidance, --top-k, --temperature, --top-p and --candidates "
        "(min-dalle folders default to guidance 16, top-k 256, temperature 1)."))
    g.add_argument("prompt")
    g.add_argument("--model", default=None,
                   help="diffusers folder or single-file checkpoint (default: the shipped diffusion model), or a "
                        "min-dalle / Parti folder (PartiPipeline); " + PARTI_MODEL_HELP)
    g.add_argument("-o", "--output", default="out.png",
                   help="output image, .png/.jpg/.webp/.tif (image i of n is saved as out-i.png)")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--steps", type=sampler_steps, default=None, help=steps_help)
    g.add_argument("--guidance", type=guidance_scale, default=None, help=guidance_help)
    g.add_argument("--seed", type=seed, default=0, help="image i uses seed + i (0 .. 2**64 - 1); PartiPipeline: one generator seeded with it "
                                                                  "draws every image")
    g.add_argument("--height", type=positive_int, default=None,
                   help=f"a multiple of the model's VAE scale factor (shipped model: {shipped['vae_scale_factor']}, "
                        "Stable Diffusion: 8); default: the UNet's sample size times it")
    g.add_argument("--width", type=positive_int, default=None, help="likewise")
    g.add_argument("--scheduler", choices=scheduler_names(), default=None, help=scheduler_help)
    g.add_argument("--num-images", type=positive_int, default=1)
    g.add_argument("--grid", default=None, help="also save all images side by side to this image file")
    g.add_argument("--version", choices=("1", "2"), default=None, help="SD version of a single-file checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_parti_arguments(g)

    t = sub.add_parser("tokenize", help="show the CLIP BPE tokens of a prompt")
    t.add_argument("prompt")
    t.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the vendored CLIP vocabulary)")

    s = sub.add_parser("schedules", help="plot beta_t, alpha_bar_t and the SNR of the noise schedules")
    s.add_argument("-o", "--output", default="schedules.png")

    add_train_arguments(sub.add_parser("train", help="train the shipped model (or one part) from scratch"))
    add_eval_arguments(sub.add_parser("eval", help="grade generated images with the shapes checker",
                                      description=defaults), steps_help, guidance_help, scheduler_help)
    return parser


def save_grid(images, path: Path, columns: Optional[int] = None) -> None:
    """Paste PIL images side by side (rows of `columns`) into one image file."""
    from PIL import Image
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def output_paths(output: Path, n: int) -> List[Path]:
    """out.png for one image; out-0.png ... out-{n-1}.png for n."""
    return [output] if n == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def cmd_generate(args: argparse.Namespace) -> int:
    """Check every argument and path, load the model, check the sizes against it, then generate and save."""
    import torch

    from parti_from_scratch.pipeline import NonFiniteLatentsError, TextToImagePipeline

    check_text("prompt", args.prompt)
    if args.negative is not None:
        check_text("--negative", args.negative)
    if args.seed + args.num_images - 1 > MAX_SEED:
        raise UsageError(f"--seed {args.seed}: image i uses seed + i, which passes 2**64 - 1 "
                         f"for {args.num_images} images")
    output = check_output_path("-o/--output", args.output)
    paths = [check_output_path("-o/--output", str(p)) for p in output_paths(output, args.num_images)]
    grid = check_output_path("--grid", args.grid) if args.grid else None
    model = parti_model_path(args.model)
    if model is not None and not model.exists():
        raise UsageError(f"--model {args.model}: no such file or folder")
    parti = is_parti_model(model)
    refuse_other_family(args, parti, DIFFUSION_ONLY)
    if parti:
        return generate_parti(args, model, paths, grid)
    try:
        pipe = TextToImagePipeline.from_pretrained(model, version=args.version)
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot load model: {e}") from None
    f = pipe.vae_scale_factor
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % f:
            raise UsageError(f"{flag} {value}: must be a multiple of {f} for this model (its VAE's scale factor)")
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    try:
        out = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, height=args.height, width=args.width, generator=generators,
                   num_images_per_prompt=args.num_images, scheduler=args.scheduler, progress=not args.quiet)
    except (ValueError, TypeError, NonFiniteLatentsError) as e:
        raise UsageError(str(e)) from None
    save_images(out.images, paths, grid)
    return 0


def save_images(images, paths: List[Path], grid: Optional[Path]) -> None:
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for im, p in zip(images, paths):
        im.save(p)
        print(p)
    if grid is not None:
        save_grid(images, grid)
        print(grid)


def generate_parti(args: argparse.Namespace, model: Path, paths: List[Path], grid: Optional[Path]) -> int:
    """PartiPipeline on a min-dalle or Parti folder; one generator seeded with --seed draws every image."""
    import torch

    pipe = load_parti(model)
    reranker = load_reranker(args.reranker)
    try:
        out = pipe(args.prompt, num_images_per_prompt=args.num_images, guidance_scale=args.guidance,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_candidates=args.candidates,
                   generator=torch.Generator().manual_seed(args.seed), reranker=reranker, progress=not args.quiet)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    save_images(out.images, paths, grid)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Print each BPE token of the prompt with its id, BOS and EOS included (tutorial §3.1)."""
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    check_text("prompt", args.prompt)
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
    check_output_path("-o/--output", args.output)
    plot_schedules(args.output)
    print(args.output)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from parti_from_scratch.train.cli_commands import cmd_train as run
    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from parti_from_scratch.train.cli_commands import cmd_eval as run
    return run(args)


COMMANDS = {"generate": cmd_generate, "tokenize": cmd_tokenize, "schedules": cmd_schedules,
            "train": cmd_train, "eval": cmd_eval}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)          # argparse itself exits with code 2 and one usage line
    try:
        return COMMANDS[args.command](args)
    except (UsageError, CommandError) as e:
        print(f"parti-from-scratch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
