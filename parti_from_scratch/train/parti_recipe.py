"""The recipe of the Parti model the package ships: stage 1, the image tokenizer (`train_tokenizer`), and stage 2,
the encoder-decoder Transformer over its tokens (`train_parti`).

Parti (Yu et al. 2022, arXiv 2206.10789) needs an image tokenizer before its
Transformer can learn anything: a VQGAN that writes each 64x64 shapes image
as a grid of codebook indices and draws it back. The shipped one is a
ValueChromaVQModel (parti/value_chroma.py): a VQGAN of the image's value (one
channel) gives each token its structure code, and k-means colours its colour
code, so colour and shape have codes of their own. `tokenizer_recipe()` is the
shipped one (parti_from_scratch/assets/parti_model/vqvae/), `tiny_tokenizer_recipe()`
a seconds-long version for tests. Retrain it with

    OMP_NUM_THREADS=2 python -m parti_from_scratch.train.parti_recipe --out runs/parti
    torchrun --nproc_per_node 2 -m parti_from_scratch.train.parti_recipe --out runs/parti

runs/parti/vqvae/ then holds the run (checkpoints, loss.png, history.json) and
runs/parti/vqvae/model/ the tokenizer as a ValueChromaVQModel folder (a diffusers
VQModel folder in structure/, and the colours), loadable by
`ValueChromaVQModel.from_pretrained`, with RECIPE.md and recipe.json: the command, the
time, and the gate figures measured by `evaluate_tokenizer` (the checker's
exact-scene rate of images -> indices -> images on 400 test images, and the
fraction of the codebook they use), for the fp32 weights and for the weights
as saved (fp16).

Stage 2 (`parti_recipe()`, `tiny_parti_recipe()` for tests) trains the
Transformer on the tokenizer's indices of the training images (computed once,
kept in runs/parti/transformer/tokens.safetensors) with the teacher-forced
cross-entropy and caption dropout (components/parti.py), and writes
runs/parti/pipeline/, a complete Parti pipeline folder that
`PartiPipeline.from_pretrained` loads: text_tokenizer/ (the word-level
vocabulary of the shapes grammar), transformer/, vqvae/ (the tokenizer folder,
copied), sampling_defaults.json, RECIPE.md and recipe.json (command, time,
held-out loss, checker adherence on the four prompt sets, seconds per image).

    python -m parti_from_scratch.train.parti_recipe --out runs/parti --stage transformer
    torchrun --nproc_per_node 2 -m parti_from_scratch.train.parti_recipe --out runs/parti --stage all

`--stage all` (the default) trains both; `--stage transformer` reads the
tokenizer from --tokenizer DIR, else runs/parti/vqvae/model, else the shipped one.
`--reranker DIR` (a full CLIP folder, e.g. `train clip`'s <out>/clip/model) is copied
into the pipeline folder as reranker/ (in the Transformer's dtype), the CLIP that
picks the best of num_candidates images; its tokenizer is the folder's files, or
the built-in CLIP vocabulary when it has none.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from parti_from_scratch.parti.value_chroma import ValueChromaConfig
from weights_convert.value_chroma import load_image_tokenizer

from .components.vq import (Codebook, ValueImages, evaluate_tokenizer, finetune_decoder, train_vq,
                            value_chroma_tokenizer)
from .default_recipe import Training
from .distributed import run_on_main, setup_distributed, teardown_distributed
from .errors import TrainError

GATE = 0.99  # the fraction of test images that must decode to exactly their scene


def _vq_config(block_out_channels: Sequence[int] = (16, 32, 64, 64), num_vq_embeddings: int = 512,
               vq_embed_dim: int = 8, groups: int = 8, channels: int = 3) -> dict:
    """A VQModel config (diffusers' keys) for 64x64 images: L levels give (64 / 2^(L-1))^2 tokens per image;
    channels 1 for the structure VQGAN of a ValueChromaVQModel (it reads and writes the value alone)."""
    n = len(block_out_channels)
    return {"in_channels": channels, "out_channels": channels,
            "block_out_channels": list(block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "layers_per_block": 1, "latent_channels": vq_embed_dim,
            "vq_embed_dim": vq_embed_dim, "num_vq_embeddings": num_vq_embeddings, "norm_num_groups": groups,
            "sample_size": 64, "mid_block_add_attention": False}


@dataclass
class TokenizerRecipe:
    """Everything that decides the shipped tokenizer. The model config uses diffusers VQModel key names."""
    seed: int = 0
    # the VQGAN of the value (one channel): structure codes; the colours come from `value_chroma` below
    vqvae: dict = field(default_factory=lambda: _vq_config(channels=1))
    codebook: Codebook = field(default_factory=lambda: Codebook(
        use_ema=True, decay=0.99, threshold_ema_dead_code=1.0, restart_rule="kmeans++", kmeans_images=256,
        kmeans_iters=10))
    training: Training = field(default_factory=lambda: Training(
        steps=1500, batch_size=16, lr=2e-3, warmup_steps=30, ema_decay=None))
    foreground_weight: float = 10.0       # pixels of the shapes weigh 1 + this in the reconstruction loss
    foreground_dilation: int = 0          # ... and so do the pixels up to this far around them (stage 1)
    # then the decoder alone, encoder and codebook frozen, tokens unchanged (None: no): on the value VQGAN, stage 1's
    # 99.0% of the gate's 400 test images became 100% (99.75% on each of three other sets of 400); on the rgb VQGAN
    # before it, 82.2% became 98.8% (RECIPE.md)
    decoder_finetune: Optional[Training] = field(default_factory=lambda: Training(
        steps=2500, batch_size=16, lr=5e-4, warmup_steps=20, ema_decay=None))
    finetune_dilation: int = 2            # the mask dilation of that decoder stage
    # ValueChromaConfig fields: tokens of structure x colour (parti/value_chroma.py), the VQGAN above then reads
    # the value alone (one channel); None: a plain VQGAN of the RGB image
    value_chroma: Optional[dict] = field(default_factory=lambda: {"num_colours": 7, "min_value": 0.5})
    eval_images: int = 400                # test images the gate is measured on
    weights_dtype: str = "float16"        # dtype of the shipped weights on disk

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def check(self) -> None:
        """TrainError when the VQGAN's channels do not fit the kind of tokenizer."""
        channels = 1 if self.value_chroma is not None else 3
        found = (self.vqvae.get("in_channels", 3), self.vqvae.get("out_channels", 3))
        if found != (channels, channels):
            kind = "a ValueChromaVQModel's structure VQGAN reads and writes the value" if channels == 1 else \
                "a plain VQGAN reads and writes RGB"
            raise TrainError(f"tokenizer recipe: vqvae in_channels, out_channels = {found}, but {kind} "
                             f"({channels} channel(s))")

    def with_overrides(self, steps: Optional[int] = None, batch_size: Optional[int] = None,
                       seed: Optional[int] = None) -> "TokenizerRecipe":
        """A copy with the steps, batch size or seed replaced."""
        return _with_overrides(self, steps, batch_size, seed)


def tokenizer_recipe() -> TokenizerRecipe:
    """The shipped tokenizer's recipe."""
    return TokenizerRecipe()


def tiny_tokenizer_recipe() -> TokenizerRecipe:
    """Trains in seconds (tests, smoke runs): the same tokenizer, far smaller and shorter."""
    return TokenizerRecipe(
        vqvae=_vq_config(block_out_channels=(8, 8, 8, 8), num_vq_embeddings=32, vq_embed_dim=4, groups=4, channels=1),
        codebook=Codebook(kmeans_images=8),
        training=Training(steps=4, batch_size=8, lr=1e-3, ema_decay=None, dataset_size=64),
        decoder_finetune=Training(steps=2, batch_size=8, lr=1e-3, ema_decay=None, dataset_size=64),
        eval_images=8)


# ----------------------------------------------------------------------------------------------- the run


def train_tokenizer(out_dir: Union[str, Path], recipe: Optional[TokenizerRecipe] = None, device: str = "auto",
                    precision: str = "fp32", progress: bool = True, resume: Optional[str] = None,
                    command: Optional[str] = None) -> Path:
    """Train the tokenizer, measure it, and write out_dir/vqvae/model (a diffusers VQModel folder, or a
    ValueChromaVQModel folder when recipe.value_chroma is set).

    Under torchrun every process trains; rank 0 measures and writes. Returns the model folder.
    """
    from parti_from_scratch.data import ShapesDataset

    recipe = recipe or tokenizer_recipe()
    recipe.check()
    t = recipe.training
    if t.batch_size > t.dataset_size:
        raise TrainError(f"vqvae: batch_size={t.batch_size} is larger than the dataset ({t.dataset_size} samples)")
    out = Path(out_dir) / "vqvae"
    folder = out / "model"
    # a ValueChromaVQModel's VQGAN trains on the value of each image; its colours are fitted afterwards
    images = ValueImages if recipe.value_chroma is not None else (lambda data: data)
    info = setup_distributed("cuda" if device.startswith("cuda") else "cpu")
    try:
        started = time.perf_counter()
        dataset = ShapesDataset("train", size=t.dataset_size, seed=recipe.seed)
        model, result = train_vq(recipe.vqvae, recipe.codebook, images(dataset),
                                 t.train_config(out, recipe.seed, device, precision, progress),
                                 recipe.foreground_weight, resume=resume, dilation=recipe.foreground_dilation)
        stage_seconds = {"tokenizer": round(time.perf_counter() - started, 1)}
        f = recipe.decoder_finetune
        if f is not None:
            started_decoder = time.perf_counter()
            model, decoder_result = finetune_decoder(
                model, images(ShapesDataset("train", size=f.dataset_size, seed=recipe.seed)),
                f.train_config(out / "decoder", recipe.seed, device, precision, progress),
                recipe.foreground_weight, recipe.finetune_dilation, resume=resume)
            stage_seconds["decoder"] = round(time.perf_counter() - started_decoder, 1)
        if recipe.value_chroma is not None:
            model = value_chroma_tokenizer(model, dataset, ValueChromaConfig(**recipe.value_chroma),
                                           max(recipe.codebook.kmeans_images, 256), recipe.seed)
        seconds = time.perf_counter() - started

        def measure_and_write() -> Path:
            measured = {"fp32": evaluate_tokenizer(model, n=recipe.eval_images)}
            dtype = getattr(torch, recipe.weights_dtype)
            copy.deepcopy(model).to(dtype).save_pretrained(folder)
            # the weights as shipped (rounded to weights_dtype), computed in float32
            measured[f"{recipe.weights_dtype} weights"] = evaluate_tokenizer(load_image_tokenizer(folder),
                                                                             n=recipe.eval_images)
            row = {"seconds": round(seconds, 1), "stage_seconds": stage_seconds, "steps": result.step,
                   "decoder_steps": decoder_result.step if f is not None else 0, "batch_size": t.batch_size,
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
    K = recipe.vqvae["num_vq_embeddings"]
    if recipe.value_chroma is not None:
        J = recipe.value_chroma["num_colours"]
        what = (f"A ValueChromaVQModel (parti_from_scratch.ValueChromaVQModel): 64x64 image <-> {grid}x{grid} tokens, "
                f"each a structure code (a VQGAN of the image's value, max over R, G, B: {K} codes of "
                f"{recipe.vqvae['vq_embed_dim']} dimensions) and a colour code ({J} colours by k-means, and none): "
                f"{K * (J + 1)} tokens. Retrain it with")
    else:
        what = (f"A VQGAN (parti_from_scratch.VQModel): 64x64 image <-> {grid}x{grid} tokens from a codebook of "
                f"{K} codes of {recipe.vqvae['vq_embed_dim']} dimensions. Retrain it with")
    lines = ["# How this tokenizer was trained", "", what,
             "", f"    {command}", "",
             f"seed {recipe.seed}; {row['steps']} steps of batch {row['batch_size']}"
             + (f", then {row['decoder_steps']} steps of the decoder alone (encoder and codebook frozen, mask "
                f"dilated by {recipe.finetune_dilation} px)" if row.get("decoder_steps") else "")
             + f" in {row['seconds']} s "
             f"({row['processes']} process(es) x {row['threads']} thread(s)); every setting is in recipe.json "
             "(parti_from_scratch/train/parti_recipe.py holds the same values).", "",
             f"## Measured: images -> indices -> images, {recipe.eval_images} test images, analytic checker", "",
             "| weights | exact scene | count | colour | shape | size | position | codebook usage | perplexity | mse |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in row["measured"].items():
        colours = f", {m['colour_codes_used']} colour codes" if "colour_codes_used" in m else ""
        lines.append(f"| {name} | {m['exact']:.1%} | {m['count']:.1%} | {m['colour']:.1%} | {m['shape']:.1%} "
                     f"| {m['size']:.1%} | {m['position']:.1%} | {m['usage']:.1%} ({m['codes_used']} codes{colours}) "
                     f"| {m['perplexity']:.1f} | {m['mse']:.4f} |")
    lines += ["", f"Gate: exact scene >= {GATE:.0%}."
              + (" Codebook usage and perplexity: the structure codes." if recipe.value_chroma is not None else "")]
    (folder / "RECIPE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------- stage 2


SHIPPED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "parti_model" / "vqvae"
ADHERENCE_SETS = ("single", "heldout_single", "pair", "heldout_pair")


def _shapes_sizes() -> dict:
    """The Transformer's sizes and layer style: the "shapes" preset without what the tokenizers decide."""
    from parti_from_scratch.parti.transformer import PRESETS
    derived = ("vocab_size", "image_vocab_size", "codebook_size", "decoder_start_token_id", "max_text_positions",
               "image_grid_size", "codebook_factors")
    return {k: v for k, v in PRESETS["shapes"].items() if k not in derived}


@dataclass
class PartiRecipe:
    """Everything that decides the shipped Parti Transformer and its sampling defaults (stage 2)."""
    seed: int = 0
    transformer: dict = field(default_factory=_shapes_sizes)   # PartiTransformerConfig fields (sizes, layer style)
    max_text_length: int = 24             # text positions: the longest caption has 21 tokens with <s> and </s>
    # lr 4e-3 over 1e-3 and 2e-3 (held-out loss 1.54 / 2.11 / 1.73 after 400 steps, RECIPE.md); 4000 steps
    # (about 0.3 s each) fit the 45-minute budget of both stages on 2 processes x 1 thread
    training: Training = field(default_factory=lambda: Training(
        steps=4000, batch_size=64, lr=4e-3, warmup_steps=100, ema_decay=0.999, dataset_size=50_000))
    p_uncond: float = 0.1                 # caption -> empty prompt with this probability (classifier-free guidance)
    p_drop_colour: float = 0.25           # a kept caption is read without its colour words with this probability
    # sampling_defaults.json of the pipeline folder, tuned after the 4000-step run on prompts outside the eval sets
    # (two-object prompts of seed 5, pairs and unseen pairs, 100 each; 70 of the 140 single-object prompts, which
    # the eval set shares; image seed 5, not 0): guidance 1.2 (Parti's lambda), top-k 4, temperature 0.5 gave
    # 100% / 99% / 100% exact; temperature 1, 97% / 91% / 98.6%; greedy (top-k 1) 100% / 100% / 100% but the
    # same image for every seed; guidance 3 lost single objects to extra blobs (65.7%); RECIPE.md has the sweep
    guidance_scale: float = 1.2           # lambda of l_uncond + lambda (l_cond - l_uncond); Parti's is 1.2
    temperature: float = 0.5
    top_k: Optional[int] = 4              # stray tokens draw extra blobs (the checker's count) without it
    top_p: Optional[float] = None
    num_candidates: int = 1               # > 1 needs a reranker in the folder (train_parti's reranker_dir)
    eval_prompts: Optional[int] = None    # prompts per adherence set measured after training (None: every prompt)
    heldout_images: int = 400             # test images of the held-out loss
    weights_dtype: str = "float16"        # dtype of the shipped Transformer weights on disk

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def with_overrides(self, steps: Optional[int] = None, batch_size: Optional[int] = None,
                       seed: Optional[int] = None) -> "PartiRecipe":
        """A copy with the steps, batch size or seed replaced."""
        return _with_overrides(self, steps, batch_size, seed)

    def sampling_defaults(self):
        from parti_from_scratch.parti_pipeline import PartiSamplingDefaults
        return PartiSamplingDefaults(guidance_scale=self.guidance_scale, temperature=self.temperature,
                                     top_k=self.top_k, top_p=self.top_p, num_candidates=self.num_candidates)


def _with_overrides(recipe, steps: Optional[int], batch_size: Optional[int], seed: Optional[int]):
    """A copy of a TokenizerRecipe or PartiRecipe with the steps, batch size or seed replaced."""
    recipe = copy.deepcopy(recipe)
    if seed is not None:
        recipe.seed = seed
    if steps is not None:
        recipe.training.steps = steps
        recipe.training.warmup_steps = min(recipe.training.warmup_steps, max(0, steps // 10))
    if batch_size is not None:
        recipe.training.batch_size = batch_size
    return recipe


def parti_recipe() -> PartiRecipe:
    """The shipped Parti Transformer's recipe."""
    return PartiRecipe()


def tiny_parti_recipe() -> PartiRecipe:
    """Trains in seconds (tests, smoke runs): the same pipeline with a one-layer Transformer of width 32."""
    return PartiRecipe(
        transformer={**_shapes_sizes(), "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                     "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                     "decoder_ffn_dim": 64},
        training=Training(steps=4, batch_size=8, lr=1e-3, ema_decay=None, dataset_size=64),
        eval_prompts=2, heldout_images=16)


def train_parti(out_dir: Union[str, Path], recipe: Optional[PartiRecipe] = None,
                tokenizer_dir: Union[str, Path, None] = None, device: str = "auto", precision: str = "fp32",
                progress: bool = True, resume: Optional[str] = None, command: Optional[str] = None,
                keep_checkpoints: int = 1, reranker_dir: Union[str, Path, None] = None) -> Path:
    """Train the Transformer on the tokenizer's indices and write out_dir/pipeline, a Parti pipeline folder.

    tokenizer_dir: a VQModel folder (default: out_dir/vqvae/model if it exists, else the shipped tokenizer).
    out_dir/transformer/ holds the run (checkpoints, loss.png, history.json, tokens.safetensors: the
    token cache, read back by a resumed run). Under torchrun every process trains; rank 0 measures and
    writes. reranker_dir: a full CLIP folder copied into the pipeline folder as reranker/ (`read_reranker`).
    Returns the pipeline folder.
    """
    from parti_from_scratch.data import ShapesDataset

    from .checkpoint import ensure_writable_dir
    from .components.parti import parti_config, shapes_text_tokenizer, train_parti_transformer

    recipe = recipe or parti_recipe()
    t = recipe.training
    if t.batch_size > t.dataset_size:
        raise TrainError(f"transformer: batch_size={t.batch_size} is larger than the dataset "
                         f"({t.dataset_size} samples)")
    reranker = read_reranker(reranker_dir) if reranker_dir is not None else None
    if recipe.num_candidates > 1 and reranker is None:
        raise TrainError(f"the recipe's num_candidates={recipe.num_candidates} needs a reranker: give a full CLIP "
                         f"folder (--reranker DIR)")
    out = Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else _default_tokenizer(out)
    if not (tokenizer_dir / "config.json").is_file():
        raise TrainError(f"{tokenizer_dir}: no image tokenizer here (a VQModel folder with config.json); "
                         f"train one with --stage tokenizer")
    info = setup_distributed("cuda" if device.startswith("cuda") else "cpu")
    try:
        run_on_main(lambda: ensure_writable_dir(out / "transformer"), info)
        started = time.perf_counter()
        vqvae = load_image_tokenizer(tokenizer_dir).eval().requires_grad_(False)
        text_tokenizer = shapes_text_tokenizer(recipe.max_text_length)
        config = parti_config(recipe.transformer, vqvae, text_tokenizer)
        data = _cached_tokens(out / "transformer", ShapesDataset("train", size=t.dataset_size, seed=recipe.seed),
                              vqvae, text_tokenizer, progress, info)
        precompute = time.perf_counter() - started
        model, result = train_parti_transformer(
            config, data, t.train_config(out / "transformer", recipe.seed, device, precision, progress,
                                         keep_checkpoints), recipe.p_uncond, resume=resume,
            p_drop_colour=recipe.p_drop_colour)
        seconds = time.perf_counter() - started
        row = {"seconds": round(seconds, 1), "token_cache_seconds": round(precompute, 1), "steps": result.step,
               "batch_size": t.batch_size, "processes": info.world_size, "threads": torch.get_num_threads(),
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "tokenizer": str(tokenizer_dir)}
        folder = out / "pipeline"
        run_on_main(lambda: write_parti_pipeline(folder, recipe, text_tokenizer, model.cpu(), tokenizer_dir,
                                                 row, command, reranker=reranker), info)
        return folder
    finally:
        teardown_distributed(info)


def _default_tokenizer(out: Path) -> Path:
    trained = out / "vqvae" / "model"
    return trained if (trained / "config.json").is_file() else SHIPPED_TOKENIZER


def read_reranker(folder: Union[str, Path]):
    """(CLIPModel, CLIPTokenizer) of a full CLIP folder (config.json with a vision_config, the weights); the
    tokenizer from its tokenizer.json or vocab.json + merges.txt, else the built-in CLIP vocabulary. TrainError
    naming the folder when it is not one."""
    from parti_from_scratch.clip.model import CLIPModel
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    from parti_from_scratch.configuration import read_json

    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise TrainError(f"--reranker {folder}: no config.json (a transformers CLIPModel folder)")
    try:
        if "vision_config" not in read_json(config):
            raise TrainError(f"--reranker {config}: not a full CLIP (no 'vision_config'); reranking scores images, "
                             f"it needs both towers")
        clip = CLIPModel.from_pretrained(folder, dtype=None).eval()
        has_files = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
        tokenizer = CLIPTokenizer.from_pretrained(folder) if has_files else CLIPTokenizer()
    except (ValueError, OSError) as e:
        raise TrainError(f"--reranker {folder}: cannot load CLIP: {e}") from None
    return clip, tokenizer


def _cached_tokens(run: Path, dataset, vqvae, text_tokenizer, progress: bool, info):
    """The training pairs (token grid, text ids): read from run/tokens.safetensors when it was made from this
    tokenizer, text vocabulary and data, else computed by ImageTokenDataset.build and written there (rank 0)."""
    from .components.parti import TOKENS_FILE, ImageTokenDataset, tokens_fingerprint

    path = run / TOKENS_FILE
    fingerprint = tokens_fingerprint(dataset, vqvae, text_tokenizer)
    cached = ImageTokenDataset.load(path, fingerprint)
    if cached is not None:
        return cached
    data = ImageTokenDataset.build(dataset, vqvae, text_tokenizer, progress=progress)
    run_on_main(lambda: data.save(path, fingerprint), info)
    return data


def write_parti_pipeline(folder: Union[str, Path], recipe: PartiRecipe, text_tokenizer, transformer,
                         tokenizer_dir: Union[str, Path], row: dict, command: Optional[str] = None,
                         reranker=None) -> Path:
    """Save the pipeline folder (Transformer and the reranker's CLIP, if any, in recipe.weights_dtype, vqvae/
    copied byte for byte from tokenizer_dir), measure it as saved (`measure_parti`), and write recipe.json and
    RECIPE.md."""
    from parti_from_scratch.parti_pipeline import PartiPipeline

    folder = Path(folder)
    dtype = getattr(torch, recipe.weights_dtype)
    pipe = PartiPipeline(text_tokenizer, copy.deepcopy(transformer).to(dtype),
                         load_image_tokenizer(tokenizer_dir), sampling_defaults=recipe.sampling_defaults(),
                         reranker=None if reranker is None else (copy.deepcopy(reranker[0]).to(dtype), reranker[1]))
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "vqvae")
    shutil.copytree(tokenizer_dir, folder / "vqvae")
    row = {**row, "parameters": sum(p.numel() for p in transformer.parameters()),
           "measured": measure_parti(PartiPipeline.from_pretrained(folder), recipe)}
    command = command or "python -m parti_from_scratch.train.parti_recipe --out runs/parti"
    (folder / "recipe.json").write_text(json.dumps({"command": command, "seed": recipe.seed, "run": row,
                                                    "recipe": recipe.to_dict()}, indent=2) + "\n", encoding="utf-8")
    (folder / "RECIPE.md").write_text(parti_recipe_text(recipe, row, command), encoding="utf-8")
    return folder


def measure_parti(pipe, recipe: PartiRecipe, seed: int = 0) -> dict:
    """What recipe.json records about a trained Parti: the held-out loss per token (test images), checker
    adherence on the four prompt sets with the folder's sampling defaults, and seconds per 64x64 image
    (one candidate, with the defaults' guidance; median of 7 on this machine's threads)."""
    import math

    from parti_from_scratch.data import ShapesDataset, eval_prompts
    from parti_from_scratch.parti.transformer import autoregressive_loss

    from .components.parti import ImageTokenDataset, evaluate_parti_adherence

    # run by rank 0 alone: no collective inside
    test = ImageTokenDataset.build(ShapesDataset("test", size=recipe.heldout_images, seed=seed), pipe.vqvae,
                                   pipe.tokenizer, sharded=False)
    with torch.no_grad():
        heldout = float(autoregressive_loss(pipe.transformer.eval(), test.input_ids.long(),
                                            test.image_tokens.long()))
    adherence = {}
    for name in ADHERENCE_SETS:
        prompts = eval_prompts(name, n=recipe.eval_prompts, seed=seed)
        summary, _ = evaluate_parti_adherence(pipe, prompts, seed=seed)
        adherence[name] = {**{k: v for k, v in summary.items()}, "n": len(prompts)}
    times = []
    for k in range(7):
        started = time.perf_counter()
        pipe("a large red circle on the left", generator=torch.Generator().manual_seed(k), progress=False)
        times.append(time.perf_counter() - started)
    return {"heldout_loss": round(heldout, 4), "log_K": round(math.log(pipe.transformer.config.codebook_size), 4),
            "adherence": adherence, "seconds_per_image": round(sorted(times)[3], 4)}


def parti_recipe_text(recipe: PartiRecipe, row: dict, command: str) -> str:
    """RECIPE.md of a Parti pipeline folder."""
    m = row["measured"]
    t = recipe.training
    lines = ["# How this Parti was trained", "",
             f"An encoder-decoder Transformer (parti_from_scratch.PartiPipeline; {row['parameters']:,} parameters) "
             "writing the image tokenizer's grid one token at a time. Retrain it with", "", f"    {command}", "",
             f"seed {recipe.seed}; {row['steps']} steps of batch {row['batch_size']}, lr {t.lr:g}, "
             f"caption dropout {recipe.p_uncond:g}, colour-word dropout {recipe.p_drop_colour:g}, "
             f"in {row['seconds']} s "
             f"({row['processes']} process(es) x {row['threads']} thread(s); the token cache took "
             f"{row['token_cache_seconds']} s of it); tokenizer: {row['tokenizer']} (copied to vqvae/). "
             "Every setting is in recipe.json (parti_from_scratch/train/parti_recipe.py holds the same values).", "",
             "## Measured (weights as saved)", "",
             f"Held-out loss per token: {m['heldout_loss']:.3f} nats (log K = {m['log_K']:.3f}: no preference). "
             f"One 64x64 image, one candidate, guidance {recipe.guidance_scale:g}: {m['seconds_per_image']:.2f} s "
             "(median of 7).", "",
             f"Checker adherence, one image per prompt (seed 0), guidance {recipe.guidance_scale:g}, "
             f"temperature {recipe.temperature:g}, top-k {recipe.top_k}, top-p {recipe.top_p}:", "",
             "| prompts | n | exact | count | colour | shape | size | position |", "|---|---|---|---|---|---|---|---|"]
    for name, a in m["adherence"].items():
        lines.append(f"| {name} | {a['n']} | {a['exact']:.1%} | {a['count']:.1%} | {a['colour']:.1%} "
                     f"| {a['shape']:.1%} | {a['size']:.1%} | {a['position']:.1%} |")
    return "\n".join(lines) + "\n"


STAGES = ("tokenizer", "transformer", "all")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: train the tokenizer, the Transformer, or both (under torchrun too)."""
    parser = argparse.ArgumentParser(prog="python -m parti_from_scratch.train.parti_recipe",
                                     description="Train Parti on the built-in shapes: the image tokenizer (a VQGAN), "
                                                 "then the encoder-decoder Transformer over its tokens.")
    parser.add_argument("--out", required=True, help="output folder: OUT/vqvae/model (the tokenizer), OUT/transformer "
                                                     "(the run) and OUT/pipeline (the Parti pipeline folder)")
    parser.add_argument("--stage", choices=STAGES, default="all",
                        help="what to train (default all: the tokenizer, then the Transformer on its tokens)")
    parser.add_argument("--tokenizer", default=None,
                        help="--stage transformer: a VQModel folder (default: OUT/vqvae/model if present, else the "
                             "shipped tokenizer)")
    parser.add_argument("--reranker", default=None,
                        help="a full CLIP folder (both towers; e.g. `train clip`'s <out>/clip/model) copied into "
                             "OUT/pipeline/reranker/ for num_candidates > 1 (its tokenizer files, else the built-in "
                             "CLIP vocabulary)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per stage (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch per stage (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the recipe's, 0)")
    parser.add_argument("--tiny", action="store_true", help="the seconds-long test recipes")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    parser.add_argument("--keep", type=int, default=1, help="checkpoints kept per run, the newest (0: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.tokenizer is not None and args.stage != "transformer":
        parser.error("--tokenizer is for --stage transformer (--stage all trains its own)")
    if args.reranker is not None and args.stage == "tokenizer":
        parser.error("--reranker is for the Transformer's pipeline folder (--stage transformer or all)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node {world_size}" if world_size > 1 else "python"
    words = sys.argv[1:] if argv is None else list(argv)
    command = " ".join([f"{launcher} -m parti_from_scratch.train.parti_recipe", *map(shlex.quote, words)])
    # one process group for both stages; each stage's setup_distributed joins it
    info = setup_distributed("cuda" if args.device.startswith("cuda") else "cpu")
    try:
        folder = None
        if args.reranker is not None:
            read_reranker(args.reranker)        # a bad folder fails before any training
        if args.stage in ("tokenizer", "all"):
            recipe = (tiny_tokenizer_recipe() if args.tiny else tokenizer_recipe()).with_overrides(
                args.steps, args.batch_size, args.seed)
            folder = train_tokenizer(args.out, recipe, device=args.device, progress=not args.no_progress,
                                     resume=args.resume, command=command)
        if args.stage in ("transformer", "all"):
            recipe = (tiny_parti_recipe() if args.tiny else parti_recipe()).with_overrides(
                args.steps, args.batch_size, args.seed)
            folder = train_parti(args.out, recipe, tokenizer_dir=args.tokenizer, device=args.device,
                                 progress=not args.no_progress, resume=args.resume, command=command,
                                 keep_checkpoints=args.keep, reranker_dir=args.reranker)
    except TrainError as e:
        if info.is_main:
            print(f"parti_recipe: error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed(info)
    if info.is_main:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
