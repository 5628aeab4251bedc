"""The recipe of the Parti model the package ships, stage 1: the image tokenizer, and `train_tokenizer`.

Parti (Yu et al. 2022, arXiv 2206.10789) needs an image tokenizer before its
Transformer can learn anything: a VQGAN that writes each 64x64 shapes image
as a grid of codebook indices and draws it back. `tokenizer_recipe()` is the
shipped one (parti_from_scratch/assets/parti_model/vqvae/), `tiny_tokenizer_recipe()`
a seconds-long version for tests. Retrain it with

    OMP_NUM_THREADS=2 python -m parti_from_scratch.train.parti_recipe --out runs/parti
    torchrun --nproc_per_node 2 -m parti_from_scratch.train.parti_recipe --out runs/parti

runs/parti/vqvae/ then holds the run (checkpoints, loss.png, history.json) and
runs/parti/vqvae/model/ the tokenizer as a diffusers VQModel folder, loadable
by `VQModel.from_pretrained`, with RECIPE.md and recipe.json: the command, the
time, and the gate figures measured by `evaluate_tokenizer` (the checker's
exact-scene rate of images -> indices -> images on 400 test images, and the
fraction of the codebook they use), for the fp32 weights and for the weights
as saved (fp16).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .components.vq import Codebook, evaluate_tokenizer, train_vq
from .default_recipe import Training
from .distributed import run_on_main, setup_distributed, teardown_distributed
from .errors import TrainError

GATE = 0.99  # the fraction of test images that must decode to exactly their scene


def _vq_config(block_out_channels: Sequence[int] = (16, 32, 64, 64), num_vq_embeddings: int = 512,
               vq_embed_dim: int = 8, groups: int = 8) -> dict:
    """A VQModel config (diffusers' keys) for 64x64 images: L levels give (64 / 2^(L-1))^2 tokens per image."""
    n = len(block_out_channels)
    return {"block_out_channels": list(block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "layers_per_block": 1, "latent_channels": vq_embed_dim,
            "vq_embed_dim": vq_embed_dim, "num_vq_embeddings": num_vq_embeddings, "norm_num_groups": groups,
            "sample_size": 64, "mid_block_add_attention": False}


@dataclass
class TokenizerRecipe:
    """Everything that decides the shipped tokenizer. The model config uses diffusers VQModel key names."""
    seed: int = 0
    vqvae: dict = field(default_factory=_vq_config)
    codebook: Codebook = field(default_factory=lambda: Codebook(
        use_ema=True, decay=0.99, threshold_ema_dead_code=0.05, kmeans_images=256, kmeans_iters=10))
    training: Training = field(default_factory=lambda: Training(
        steps=1500, batch_size=16, lr=2e-3, warmup_steps=30, ema_decay=None))
    foreground_weight: float = 10.0       # pixels of the shapes weigh 1 + this in the reconstruction loss
    eval_images: int = 400                # test images the gate is measured on
    weights_dtype: str = "float16"        # dtype of the shipped weights on disk

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def with_overrides(self, steps: Optional[int] = None, batch_size: Optional[int] = None,
                       seed: Optional[int] = None) -> "TokenizerRecipe":
        """A copy with the steps, batch size or seed replaced."""
        recipe = copy.deepcopy(self)
        if seed is not None:
            recipe.seed = seed
        if steps is not None:
            recipe.training.steps = steps
            recipe.training.warmup_steps = min(recipe.training.warmup_steps, max(0, steps // 10))
        if batch_size is not None:
            recipe.training.batch_size = batch_size
        return recipe


def tokenizer_recipe() -> TokenizerRecipe:
    """The shipped tokenizer's recipe."""
    return TokenizerRecipe()


def tiny_tokenizer_recipe() -> TokenizerRecipe:
    """Trains in seconds (tests, smoke runs): the same tokenizer, far smaller and shorter."""
    return TokenizerRecipe(
        vqvae=_vq_config(block_out_channels=(8, 8, 8, 8), num_vq_embeddings=32, vq_embed_dim=4, groups=4),
        codebook=Codebook(kmeans_images=8),
        training=Training(steps=4, batch_size=8, lr=1e-3, ema_decay=None, dataset_size=64),
        eval_images=8)


# ----------------------------------------------------------------------------------------------- the run


def train_tokenizer(out_dir: Union[str, Path], recipe: Optional[TokenizerRecipe] = None, device: str = "auto",
                    precision: str = "fp32", progress: bool = True, resume: Optional[str] = None,
                    command: Optional[str] = None) -> Path:
    """Train the tokenizer, measure it, and write out_dir/vqvae/model (a diffusers VQModel folder).

    Under torchrun every process trains; rank 0 measures and writes. Returns the model folder.
    """
    from parti_from_scratch.data import ShapesDataset
    from parti_from_scratch.parti.vqgan import VQModel

    recipe = recipe or tokenizer_recipe()
    t = recipe.training
    if t.batch_size > t.dataset_size:
        raise TrainError(f"vqvae: batch_size={t.batch_size} is larger than the dataset ({t.dataset_size} samples)")
    out = Path(out_dir) / "vqvae"
    folder = out / "model"
    info = setup_distributed("cuda" if device.startswith("cuda") else "cpu")
    try:
        started = time.perf_counter()
        model, result = train_vq(recipe.vqvae, recipe.codebook, ShapesDataset("train", size=t.dataset_size,
                                                                              seed=recipe.seed),
                                 t.train_config(out, recipe.seed, device, precision, progress),
                                 recipe.foreground_weight, resume=resume)
        seconds = time.perf_counter() - started

        def measure_and_write() -> Path:
            measured = {"fp32": evaluate_tokenizer(model, n=recipe.eval_images)}
            dtype = getattr(torch, recipe.weights_dtype)
            copy.deepcopy(model).to(dtype).save_pretrained(folder)
            # the weights as shipped (rounded to weights_dtype), computed in float32
            measured[f"{recipe.weights_dtype} weights"] = evaluate_tokenizer(VQModel.from_pretrained(folder),
                                                                             n=recipe.eval_images)
            row = {"seconds": round(seconds, 1), "steps": result.step, "batch_size": t.batch_size,
                   "processes": info.world_size, "threads": torch.get_num_threads(),
                   "final_loss": result.history[-1]["loss"] if result.history else None, "measured": measured}
            write_recipe_files(folder, recipe, row, command)
            return folder

        run_on_main(measure_and_write, info)
        return folder
    finally:
        teardown_distributed(info)


def write_recipe_files(folder: Union[str, Path], recipe: TokenizerRecipe, row: dict,
                       command: Optional[str] = None) -> None:
    """recipe.json (the training record) and RECIPE.md (how to retrain, what was measured) beside the weights."""
    folder = Path(folder)
    command = command or "OMP_NUM_THREADS=2 python -m parti_from_scratch.train.parti_recipe --out runs/parti"
    (folder / "recipe.json").write_text(json.dumps({"command": command, "seed": recipe.seed, "run": row,
                                                    "recipe": recipe.to_dict()}, indent=2) + "\n", encoding="utf-8")
    grid = recipe.vqvae["sample_size"] // 2 ** (len(recipe.vqvae["block_out_channels"]) - 1)
    lines = ["# How this tokenizer was trained", "",
             f"A VQGAN (parti_from_scratch.VQModel): 64x64 image <-> {grid}x{grid} tokens from a codebook of "
             f"{recipe.vqvae['num_vq_embeddings']} codes of {recipe.vqvae['vq_embed_dim']} dimensions. Retrain it with",
             "", f"    {command}", "",
             f"seed {recipe.seed}; {row['steps']} steps of batch {row['batch_size']} in {row['seconds']} s "
             f"({row['processes']} process(es) x {row['threads']} thread(s)); every setting is in recipe.json "
             "(parti_from_scratch/train/parti_recipe.py holds the same values).", "",
             f"## Measured: images -> indices -> images, {recipe.eval_images} test images, analytic checker", "",
             "| weights | exact scene | count | colour | shape | size | position | codebook usage | perplexity | mse |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in row["measured"].items():
        lines.append(f"| {name} | {m['exact']:.1%} | {m['count']:.1%} | {m['colour']:.1%} | {m['shape']:.1%} "
                     f"| {m['size']:.1%} | {m['position']:.1%} | {m['usage']:.1%} ({m['codes_used']} codes) "
                     f"| {m['perplexity']:.1f} | {m['mse']:.4f} |")
    lines += ["", f"Gate: exact scene >= {GATE:.0%}."]
    (folder / "RECIPE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: train the tokenizer (under torchrun too)."""
    parser = argparse.ArgumentParser(prog="python -m parti_from_scratch.train.parti_recipe",
                                     description="Train Parti's image tokenizer (a VQGAN) on the built-in shapes.")
    parser.add_argument("--out", required=True, help="output folder; the tokenizer goes to OUT/vqvae/model")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the recipe's, 0)")
    parser.add_argument("--tiny", action="store_true", help="the seconds-long test recipe")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    recipe = (tiny_tokenizer_recipe() if args.tiny else tokenizer_recipe()).with_overrides(
        args.steps, args.batch_size, args.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node {world_size}" if world_size > 1 else "python"
    command = " ".join([f"{launcher} -m parti_from_scratch.train.parti_recipe", *map(shlex.quote, sys.argv[1:])])
    folder = train_tokenizer(args.out, recipe, device=args.device, progress=not args.no_progress,
                             resume=args.resume, command=command)
    if int(os.environ.get("RANK", "0")) == 0:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
