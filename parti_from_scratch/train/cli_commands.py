"""The `train` and `eval` commands of `parti-from-scratch` (see cli.py for the parser).

    train [all|clip|vae|unet] --out DIR [--tiny] [--steps N] [--batch-size B] [--seed S] [--keep N]
          [--resume latest|PATH] [--device cpu|cuda|auto] [--precision fp32|bf16|fp16] [--clip DIR] [--vae DIR]
    eval [--model PATH] [--prompts heldout_single|single|pair|heldout_pair|FILE] [--n N]
         [--steps S] [--guidance W] [--seed S] [--scheduler NAME] [--grid out.png]

`train` runs the same under `torchrun --nproc_per_node N -m parti_from_scratch train ...`:
the loop splits each global batch over the processes.

The argument types and the checks every command runs before any work (steps, guidance,
seed, output paths, prompt text) live here too; cli.py imports them, nothing here imports cli.py.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
from pathlib import Path
from typing import Callable, Optional

# sampler steps a command accepts: the training schedules here and Stable Diffusion's have 1000 timesteps,
# and a sampler visits each at most once
MAX_STEPS = 1000
# a torch.Generator seed is an unsigned 64-bit integer; image i of a run uses seed + i
MAX_SEED = 2 ** 64 - 1
# file types that both Pillow (generate) and matplotlib (grids) write
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")


class CommandError(Exception):
    """A failure to report as one line with exit code 2."""


# ----------------------------------------------------------------------------------------------- argument types
# argparse reports an ArgumentTypeError as one usage line and exit code 2

def int_range(low: int, high: Optional[int] = None, high_text: Optional[str] = None) -> Callable[[str], int]:
    """An argparse type: an int from `low` to `high` (no upper bound when None); `high_text` names the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"from {low} to {high_text or high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


positive_int = int_range(1)
sampler_steps = int_range(1, MAX_STEPS)
seed = int_range(0, MAX_SEED, "2**64 - 1")          # the range of torch.Generator.manual_seed


def float_type(ok: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    """An argparse type: a float for which ok(value) holds; `wanted` says which ("a number > 0")."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


guidance_scale = float_type(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
temperature = float_type(lambda v: math.isfinite(v) and v > 0, "a number > 0")
top_p = float_type(lambda v: 0 < v <= 1, "in (0, 1]")


def scheduler_names() -> tuple:
    """The samplers a command can name: the keys of the package's scheduler table."""
    from parti_from_scratch.diffusion.schedulers import SCHEDULERS
    return tuple(SCHEDULERS)


# ----------------------------------------------------------------------------------------------- checks before work

def check_text(flag: str, text: str) -> str:
    """A prompt from the command line must be valid UTF-8 (undecodable bytes arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CommandError(f"{flag}: not valid UTF-8 text (undecodable byte at character {e.start})") from None
    return text


def check_output_path(flag: str, path: str) -> Path:
    """An image file the command can write: a known image suffix, not a folder, under a writable folder.

    Missing folders are created when the file is saved; an existing file on the way is refused here.
    """
    out = Path(path)
    if out.is_dir():
        raise CommandError(f"{flag} {path}: is a folder; give a file name such as {out / 'out.png'}")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        what = f"unknown image type {out.suffix!r}" if out.suffix else "no file extension"
        raise CommandError(f"{flag} {path}: {what}; end the name in one of {', '.join(IMAGE_SUFFIXES)}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{flag} {path}: cannot write in {parent}")
    return out


# ----------------------------------------------------------------------------------------------- the commands

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("component", nargs="?", default="all", choices=("all", "clip", "vae", "unet"),
                   help="what to train (a UNet needs a trained CLIP and VAE: --clip/--vae or earlier runs in --out)")
    p.add_argument("--out", required=True, help="output folder: <component>/ runs and pipeline/")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny preset (train/default_recipe.py: tiny_recipe): narrow models, 2,000 training "
                        "images, a few hundred steps; under two minutes on one CPU core; too short to draw shapes")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimiser steps per component (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="global batch per component (default: the recipe's)")
    p.add_argument("--seed", type=seed, default=None, help="seed of data, initialisation and noise (default 0)")
    p.add_argument("--resume", default=None, help="'latest' (each component's newest checkpoint) or a checkpoint file")
    p.add_argument("--keep", type=int_range(0), default=1,
                   help="checkpoints kept per run, the newest (default 1; 0 keeps all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--clip", default=None, help="a trained CLIP (model folder or earlier --out) to reuse")
    p.add_argument("--vae", default=None, help="a trained VAE (model folder or earlier --out) to reuse")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------------------------- Parti models

PARTI_MODEL_HELP = ("`parti` names the Parti the package ships (parti_from_scratch/assets/parti_model; a folder "
                    "called parti is ./parti)")


def parti_model_path(model: Optional[str]) -> Optional[Path]:
    """--model as a path: the shipped Parti's folder for the name `parti` (checked to hold a trained
    Transformer, else a CommandError saying how to train it), the path itself otherwise (None: the default)."""
    from parti_from_scratch.parti_pipeline import PARTI_MODEL_NAME, ShippedPartiMissingError, shipped_parti_folder

    if model != PARTI_MODEL_NAME:
        return None if model is None else Path(model)
    try:
        return shipped_parti_folder()
    except ShippedPartiMissingError as e:
        raise CommandError(f"--model {PARTI_MODEL_NAME}: {e}") from None


def is_parti_model(path: Optional[Path]) -> bool:
    """True for a min-dalle folder or a Parti pipeline folder: the command runs PartiPipeline on it."""
    from weights_convert.parti_pipeline_loader import is_parti_pipeline_folder
    return path is not None and is_parti_pipeline_folder(path)


def load_parti(path: Path):
    from parti_from_scratch.parti_pipeline import PartiPipeline
    try:
        return PartiPipeline.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise CommandError(f"cannot load model: {e}") from None


def load_reranker(folder: Optional[str]):
    """(CLIPModel, CLIPTokenizer) from a full CLIP folder (its tokenizer files, else the built-in vocabulary),
    or None."""
    if folder is None:
        return None
    from .errors import TrainError
    from .parti_recipe import read_reranker
    try:
        return read_reranker(folder)
    except TrainError as e:
        raise CommandError(str(e)) from None


def add_parti_arguments(p: argparse.ArgumentParser) -> None:
    """--top-k, --temperature, --top-p, --candidates, --reranker: the options of PartiPipeline models."""
    g = p.add_argument_group("PartiPipeline (--model parti, a Parti or a min-dalle folder)")
    g.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely image tokens")
    g.add_argument("--temperature", type=temperature, default=None, help="softmax temperature, > 0")
    g.add_argument("--top-p", type=top_p, default=None, help="sample within the nucleus of probability p, in (0, 1]")
    g.add_argument("--candidates", type=positive_int, default=None,
                   help="draw N images per output and keep the one CLIP scores best (needs --reranker or the "
                        "folder's reranker/)")
    g.add_argument("--reranker", default=None,
                   help="a full CLIP folder (both towers and its tokenizer, e.g. `train clip`'s <out>/clip/model)")


# options of one model family only: (flag, argparse dest); the other family's call refuses them
PARTI_ONLY = (("--top-k", "top_k"), ("--temperature", "temperature"), ("--top-p", "top_p"),
              ("--candidates", "candidates"), ("--reranker", "reranker"))


def refuse_other_family(args: argparse.Namespace, parti: bool, diffusion_only: tuple) -> None:
    """A CommandError naming the flags given that the loaded model's family does not take."""
    family, other = ("a min-dalle / Parti folder", diffusion_only) if parti else ("a diffusion model", PARTI_ONLY)
    given = [flag for flag, dest in other if getattr(args, dest, None) is not None]
    if given:
        raise CommandError(f"{', '.join(given)}: not an option for {family} (--model {args.model})")


def add_eval_arguments(p: argparse.ArgumentParser, steps_help: str = "sampler steps (default: the model's own)",
                       guidance_help: str = "classifier-free guidance scale (default: the model's own)",
                       scheduler_help: str = "sampler (default: the model's own scheduler/)") -> None:
    """The help texts of --steps/--guidance/--scheduler come from cli.py, which reads the shipped model's."""
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped diffusion model); "
                                                 + PARTI_MODEL_HELP + "; a Parti or min-dalle folder runs "
                                                 "PartiPipeline with its own sampling defaults")
    p.add_argument("--prompts", default="heldout_single",
                   help="single, heldout_single, pair, heldout_pair, or a text file with one prompt a line")
    p.add_argument("--n", type=positive_int, default=None, help="use only n prompts of a built-in set")
    p.add_argument("--steps", type=sampler_steps, default=None, help=steps_help)
    p.add_argument("--guidance", type=guidance_scale, default=None, help=guidance_help)
    p.add_argument("--seed", type=seed, default=0, help="image i uses seed + i")
    p.add_argument("--scheduler", choices=scheduler_names(), default=None, help=scheduler_help)
    p.add_argument("--grid", default=None, help="save the images with their prompts to this image file")
    add_parti_arguments(p)


def cmd_train(args: argparse.Namespace) -> int:
    from .default_recipe import COMPONENTS, default_recipe, tiny_recipe, train_default
    from .errors import TrainError

    components = COMPONENTS if args.component == "all" else (args.component,)
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
        base = tiny_recipe() if args.tiny else default_recipe()
        recipe = base.with_overrides(args.steps, args.batch_size, args.seed, components)
        command, resume_command = train_commands(args)
        folder = train_default(args.out, recipe, components, clip_dir=args.clip, vae_dir=args.vae, resume=resume,
                               device=args.device, precision=args.precision, progress=not args.quiet,
                               command=command, resume_command=resume_command, keep_checkpoints=args.keep)
    except TrainError as e:
        raise CommandError(str(e)) from None
    except (OSError, ValueError) as e:
        raise CommandError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(folder if folder is not None else Path(args.out))
    return 0


def train_commands(args: argparse.Namespace) -> tuple[str, str]:
    """The `train` command lines that redo this run from scratch and that resume it (RECIPE.md quotes both):
    the same settings, without --resume, then with --resume latest."""
    words = ["parti-from-scratch", "train", args.component, "--out", args.out]
    words += ["--tiny"] if args.tiny else []
    for flag, value, default in (("--steps", args.steps, None), ("--batch-size", args.batch_size, None),
                                 ("--seed", args.seed, None), ("--keep", args.keep, 1),
                                 ("--device", args.device, "auto"), ("--precision", args.precision, "fp32"),
                                 ("--clip", args.clip, None), ("--vae", args.vae, None)):
        if value != default:
            words += [flag, str(value)]
    command = " ".join(shlex.quote(w) for w in words)
    return command, f"{command} --resume latest"


def _read_prompts(spec: str, n, seed: int):
    from parti_from_scratch.data import eval_prompts, parse_caption
    from parti_from_scratch.data.shapes import PROMPT_SETS

    if spec in PROMPT_SETS:
        return eval_prompts(spec, n=n, seed=seed)
    path = Path(spec)
    if not path.is_file():
        raise CommandError(f"--prompts {spec}: not a prompt set {PROMPT_SETS} nor a file")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise CommandError(f"--prompts {spec}: not UTF-8 text (byte {e.start})") from None
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
    """Generate one image per prompt with the model's own sampler settings (or the flags') and grade them."""
    import time

    from parti_from_scratch.pipeline import NonFiniteLatentsError, TextToImagePipeline

    from .components import evaluate_adherence, save_image_grid

    model = parti_model_path(args.model)
    if model is not None and not model.exists():
        raise CommandError(f"--model {args.model}: no such folder")
    parti = is_parti_model(model)
    refuse_other_family(args, parti, (("--steps", "steps"), ("--scheduler", "scheduler")))
    if args.grid is not None:
        check_output_path("--grid", args.grid)
    prompts = _read_prompts(args.prompts, args.n, args.seed)
    if args.seed + len(prompts) - 1 > MAX_SEED:
        raise CommandError(f"--seed {args.seed}: image i uses seed + i, which passes 2**64 - 1 "
                           f"for {len(prompts)} prompts")
    started = time.perf_counter()
    if parti:
        summary, images, settings = _eval_parti(args, model, prompts)
    else:
        try:
            pipe = TextToImagePipeline.from_pretrained(model)
        except (ValueError, OSError) as e:
            raise CommandError(f"cannot load model: {e}") from None
        steps = args.steps if args.steps is not None else pipe.sampling_defaults.num_inference_steps
        guidance = args.guidance if args.guidance is not None else pipe.sampling_defaults.guidance_scale
        try:
            summary, images = evaluate_adherence(pipe, prompts, steps, guidance, args.seed, args.scheduler)
        except (ValueError, TypeError, NonFiniteLatentsError) as e:
            raise CommandError(str(e)) from None
        settings = f"{steps} steps, guidance {guidance:g}"
    seconds = time.perf_counter() - started
    print(f"{len(prompts)} prompts ({args.prompts}), {settings}, seed {args.seed}, "
          f"{seconds / len(prompts):.2f} s/image")
    for name in ("count", "colour", "shape", "size", "position", "exact"):
        print(f"  {name:<9} {100 * summary[name]:5.1f}%")
    if args.grid:
        from .components.evaluate import safe_score
        exact = [safe_score(im, scene).exact for im, (_, scene) in zip(images, prompts)]
        # "ok"/"x" for the checker's verdict (exact scene or not), also as green/red titles
        labels = [("ok " if ok else "x ") + p for ok, (p, _) in zip(exact, prompts)]
        colours = ["darkgreen" if ok else "firebrick" for ok in exact]
        print(save_image_grid(images, args.grid, columns=min(8, len(images)), labels=labels, colours=colours))
    return 0


def _eval_parti(args: argparse.Namespace, model: Path, prompts: list) -> tuple[dict, object, str]:
    """Adherence of a PartiPipeline with its sampling defaults, or the flags': (summary, images, settings text)."""
    from .components.parti import evaluate_parti_adherence

    pipe = load_parti(model)
    d = pipe.sampling_defaults
    sampling = {"guidance_scale": args.guidance, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "num_candidates": args.candidates}
    used = {k: d.__getattribute__(k) if v is None else v for k, v in sampling.items()}
    try:
        summary, images = evaluate_parti_adherence(pipe, prompts, seed=args.seed, reranker=load_reranker(args.reranker),
                                                   **sampling)
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None
    settings = (f"guidance {used['guidance_scale']:g}, temperature {used['temperature']:g}, top-k {used['top_k']}, "
                f"top-p {used['top_p']}, best of {used['num_candidates']}")
    return summary, images, settings
