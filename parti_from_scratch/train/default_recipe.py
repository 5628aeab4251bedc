"""The recipe of the model the package ships, and `train_default`, which retrains it from scratch.

Three models are trained one after the other on the captioned shapes dataset
(tutorial §3.3), each with the shared loop of train/loop.py:

1. CLIP (text and vision towers, contrastive loss of tutorial §4.3): its text
   tower becomes the pipeline's text encoder;
2. the VAE (reconstruction + beta * KL): 64x64x3 images <-> 16x16x4 latents;
3. the UNet eps_theta(z_t, t, c) on the frozen VAE's latents and the text
   encoder's states (L_simple, caption dropped 10% of the time); with
   `finetune_text_encoder` (the default) the text encoder trains with it.
   A short second stage goes on with a quarter of the captions stripped of
   their colour words, so that shape words alone decide the shape (this is
   what draws colour x shape combinations never seen in training).

Every size and training setting lives in `Recipe` below; `default_recipe()` is
the shipped model, `tiny_recipe()` a two-minute version to try (`train all --tiny`),
`smoke_recipe()` a seconds-long one for tests. Run

    parti-from-scratch train all --out runs/default

(or `python -m parti_from_scratch train all --out runs/default`) to retrain it;
the pipeline folder appears in runs/default/pipeline with RECIPE.md, recipe.json and
sampling_defaults.json (the recipe's sampler steps and guidance scale, which `pipe(prompt)`,
`generate` and `eval` use by default).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .checkpoint import ensure_writable_dir
from .distributed import run_on_main, setup_distributed, teardown_distributed
from .errors import TrainError
from .loop import TrainConfig

COMPONENTS = ("clip", "vae", "unet")


@dataclass
class Training:
    """How one component is trained (the fields of TrainConfig that a recipe sets, plus its data)."""
    steps: int                        # optimiser steps
    batch_size: int                   # global batch
    lr: float                         # peak learning rate after warm-up
    warmup_steps: int = 0             # linear warm-up
    lr_schedule: str = "cosine"       # "cosine" decay to lr * min_lr_ratio at the last step, or "constant"
    min_lr_ratio: float = 0.1         # floor of the cosine decay
    weight_decay: float = 0.01        # AdamW decoupled weight decay
    ema_decay: Optional[float] = 0.999  # EMA of the weights, used for the shipped model (None: last weights)
    dataset_size: int = 30_000        # images of the training split (scenes are drawn once, images rendered on access)
    checkpoints: int = 8              # checkpoints (and loss.png updates) spread over the run; the last at its end

    def train_config(self, out_dir: Union[str, Path], seed: int, device: str = "auto", precision: str = "fp32",
                     progress: bool = True, keep_checkpoints: int = 1) -> TrainConfig:
        """The loop's config; `checkpoints` checkpoints over the run, the newest `keep_checkpoints` kept (0: all)."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           lr_schedule=self.lr_schedule, min_lr_ratio=self.min_lr_ratio,
                           weight_decay=self.weight_decay, ema_decay=self.ema_decay, seed=seed,
                           log_every=max(1, min(50, self.steps // 10)),
                           checkpoint_every=max(1, self.steps // self.checkpoints),
                           keep_checkpoints=keep_checkpoints,
                           out_dir=str(out_dir), device=device, precision=precision, progress=progress)


def _clip_config(text_width: int = 64, text_layers: int = 2, vision_width: int = 96, vision_layers: int = 3,
                 heads: int = 4, projection_dim: int = 64) -> dict:
    return {
        "text_config": {"hidden_size": text_width, "intermediate_size": 4 * text_width, "projection_dim": projection_dim,
                        "num_hidden_layers": text_layers, "num_attention_heads": heads,
                        "max_position_embeddings": 77},
        "vision_config": {"hidden_size": vision_width, "intermediate_size": 4 * vision_width,
                          "projection_dim": projection_dim, "num_hidden_layers": vision_layers,
                          "num_attention_heads": heads, "image_size": 64, "patch_size": 8},
        "projection_dim": projection_dim,
    }


def _vae_config(block_out_channels: Sequence[int] = (16, 32, 64), groups: int = 8) -> dict:
    n = len(block_out_channels)
    return {"block_out_channels": list(block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": groups, "sample_size": 64, "mid_block_add_attention": False}


def _unet_config(block_out_channels: Sequence[int] = (32, 64, 128), cross_attention_dim: int = 64,
                 sample_size: int = 16, heads: int = 4, groups: int = 8, layers_per_block: int = 1,
                 attention_levels: Sequence[int] = (1, 2)) -> dict:
    n = len(block_out_channels)
    return {"sample_size": sample_size, "in_channels": 4, "out_channels": 4,
            "block_out_channels": list(block_out_channels),
            # cross-attention at the listed levels (0 = the finest); the mid block attends too
            "down_block_types": ["CrossAttnDownBlock2D" if i in attention_levels else "DownBlock2D"
                                 for i in range(n)],
            "up_block_types": ["CrossAttnUpBlock2D" if n - 1 - i in attention_levels else "UpBlock2D"
                               for i in range(n)],
            "layers_per_block": layers_per_block, "cross_attention_dim": cross_attention_dim,
            "attention_head_dim": heads, "norm_num_groups": groups}


@dataclass
class Recipe:
    """Everything that decides the shipped model. Model configs use transformers/diffusers key names."""
    seed: int = 0
    clip: dict = field(default_factory=_clip_config)
    clip_training: Training = field(default_factory=lambda: Training(
        steps=800, batch_size=64, lr=1e-3, warmup_steps=80, ema_decay=0.995))
    vae: dict = field(default_factory=_vae_config)
    vae_training: Training = field(default_factory=lambda: Training(
        steps=1000, batch_size=16, lr=2e-3, warmup_steps=50, ema_decay=0.99))
    vae_decoder_training: Training = field(default_factory=lambda: Training(
        steps=500, batch_size=16, lr=1e-3, warmup_steps=50, ema_decay=0.99))   # stage 2: decoder only
    kl_beta: float = 1e-4                 # beta of L_rec + beta * KL (LDM's kl_weight convention)
    foreground_weight: float = 10.0       # pixels of the shapes weigh 1 + this in L_rec (the background 1)
    unet: dict = field(default_factory=_unet_config)
    unet_training: Training = field(default_factory=lambda: Training(
        steps=4000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999))
    unet_finetune_training: Training = field(default_factory=lambda: Training(
        steps=600, batch_size=64, lr=2e-4, warmup_steps=20, lr_schedule="constant", ema_decay=0.995))
    p_drop_colour: float = 0.25           # stage 2 of the UNet: a caption loses its colour words with this probability
    p_uncond: float = 0.1                 # caption -> "" with this probability (classifier-free guidance)
    finetune_text_encoder: bool = True    # the UNet's loss also trains the text encoder (from CLIP's text tower)
    # the training noise schedule (diffusers scheduler_config keys); samplers reuse it
    noise_schedule: dict = field(default_factory=lambda: {
        "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
        "prediction_type": "epsilon", "timestep_spacing": "trailing",
        "clip_sample": False})                # DDIM/DDPM built from the saved config must not clip latents to [-1, 1]
    sampler: str = "dpm"                  # the scheduler saved in the pipeline (a key of SCHEDULERS)
    sampler_steps: int = 20               # saved in the pipeline's sampling_defaults.json: pipe(prompt)'s default steps
    guidance_scale: float = 5.0           # likewise (swept 1.5..10: 5.0 best on held-out combinations, see RECIPE.md)
    weights_dtype: str = "float16"        # dtype of the shipped weights on disk

    def training(self, component: str) -> Training:
        return getattr(self, f"{component}_training")

    def trainings(self, component: str) -> list[Training]:
        """The training stages of a component (the VAE: all of it, then its decoder; the UNet: then colour dropout)."""
        if component == "vae":
            return [self.vae_training, self.vae_decoder_training]
        if component == "unet":
            return [self.unet_training, self.unet_finetune_training]
        return [self.training(component)]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def with_overrides(self, steps: Optional[int] = None, batch_size: Optional[int] = None,
                       seed: Optional[int] = None, components: Sequence[str] = COMPONENTS) -> "Recipe":
        """A copy with steps / batch size replaced for `components` and the seed replaced."""
        recipe = copy.deepcopy(self)
        if seed is not None:
            recipe.seed = seed
        for name in components:
            for t in recipe.trainings(name):
                if steps is not None:
                    t.steps = steps
                    t.warmup_steps = min(t.warmup_steps, max(0, steps // 10))
                if batch_size is not None:
                    t.batch_size = batch_size
        return recipe


def default_recipe() -> Recipe:
    """The shipped model's recipe."""
    return Recipe()


def tiny_recipe() -> Recipe:
    """The preset of `train all --tiny`: the same pipeline with narrow models, 2,000 training images and a few
    hundred steps per model: under two minutes on one CPU core (about 90 CPU-seconds in all). It is for seeing
    every stage run, every file appear and the losses fall; it is far too short to draw shapes (its images are
    coloured noise-like textures; the shipped model took the default recipe's thousands of steps).
    Two checkpoints per run: each also redraws loss.png, which costs more than a tiny step."""
    images = 2_000
    return Recipe(
        clip=_clip_config(text_width=32, text_layers=1, vision_width=32, vision_layers=1, heads=2, projection_dim=32),
        clip_training=Training(steps=200, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=None,
                               dataset_size=images, checkpoints=2),
        vae=_vae_config(block_out_channels=(8, 8, 8), groups=4),
        vae_training=Training(steps=150, batch_size=16, lr=3e-3, warmup_steps=10, ema_decay=None,
                              dataset_size=images, checkpoints=2),
        vae_decoder_training=Training(steps=20, batch_size=16, lr=1e-3, ema_decay=None, dataset_size=images, checkpoints=2),
        unet=_unet_config(block_out_channels=(16, 32), cross_attention_dim=32, heads=2, groups=4,
                          attention_levels=(1,)),
        unet_training=Training(steps=250, batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=None,
                               dataset_size=images, checkpoints=2),
        unet_finetune_training=Training(steps=30, batch_size=32, lr=5e-4, lr_schedule="constant", ema_decay=None,
                                        dataset_size=images, checkpoints=2),
        sampler_steps=20, guidance_scale=5.0)


def smoke_recipe() -> Recipe:
    """A recipe that trains in seconds (tests): the same pipeline, far smaller and shorter than even tiny_recipe."""
    return Recipe(
        clip=_clip_config(text_width=32, text_layers=1, vision_width=32, vision_layers=1, heads=2, projection_dim=16),
        clip_training=Training(steps=4, batch_size=8, lr=1e-3, ema_decay=None, dataset_size=64),
        vae=_vae_config(block_out_channels=(8, 8, 8), groups=4),
        vae_training=Training(steps=3, batch_size=8, lr=1e-3, ema_decay=None, dataset_size=64),
        vae_decoder_training=Training(steps=2, batch_size=8, lr=1e-3, ema_decay=None, dataset_size=64),
        unet=_unet_config(block_out_channels=(8, 16), cross_attention_dim=32, heads=2, groups=4),
        unet_training=Training(steps=4, batch_size=8, lr=1e-3, ema_decay=None, dataset_size=64),
        unet_finetune_training=Training(steps=2, batch_size=8, lr=1e-3, ema_decay=None, dataset_size=64),
        sampler_steps=2, guidance_scale=2.0)


# ----------------------------------------------------------------------------------------------- the run


def _dataset(recipe: Recipe, component: str):
    from parti_from_scratch.data import ShapesDataset
    return ShapesDataset("train", size=recipe.training(component).dataset_size, seed=recipe.seed)


def _model_folder(path: Union[str, Path], component: str) -> Path:
    """`path` is a saved model folder itself, or a training output folder holding <component>/model."""
    path = Path(path)
    for candidate in (path, path / component / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise TrainError(f"{path}: no trained {component} here (expected config.json in it or in {component}/model)")


def _result_file(out: Path, component: str) -> Path:
    """Where a run's result.json goes: out/<component>/, second stages in out/vae/decoder/ and out/unet/finetune/."""
    return out / _STAGE_DIRS.get(component, component) / "result.json"


_STAGE_DIRS = {"vae_decoder": "vae/decoder", "unet_finetune": "unet/finetune"}


def _check_before_training(recipe: Recipe, components: Sequence[str]) -> None:
    for name in components:
        for t in recipe.trainings(name):
            if t.batch_size > t.dataset_size:
                raise TrainError(f"{name}: batch_size={t.batch_size} is larger than the dataset ({t.dataset_size} samples)")


def train_default(out_dir: Union[str, Path], recipe: Optional[Recipe] = None,
                  components: Sequence[str] = COMPONENTS, clip_dir: Union[str, Path, None] = None,
                  vae_dir: Union[str, Path, None] = None, resume: Optional[str] = None, device: str = "auto",
                  precision: str = "fp32", progress: bool = True, command: Optional[str] = None,
                  keep_checkpoints: int = 1, resume_command: Optional[str] = None) -> Optional[Path]:
    """Train CLIP -> VAE -> UNet (or some of them) and, once a UNet is trained, write the pipeline folder.

    out_dir/<component>/ holds each run (checkpoints, loss.png, history.json, result.json) and
    out_dir/<component>/model/ the trained model; out_dir/pipeline/ the diffusers-layout pipeline
    with vocabulary.txt, sampling_defaults.json, RECIPE.md and recipe.json. A component not trained here comes from
    clip_dir / vae_dir (a model folder or an earlier out_dir), or from out_dir itself.
    Each run keeps its newest `keep_checkpoints` checkpoints (0: all). The VAE's latents of the UNet's
    training images are kept in out_dir/unet/latents.safetensors and read again by a resumed run.
    command / resume_command: the command lines RECIPE.md gives for training from scratch and for resuming.
    Returns the pipeline folder (None when no UNet was trained).
    """
    recipe = recipe or default_recipe()
    # under torchrun one process group serves all three runs; rank 0 writes the files
    info = setup_distributed("cuda" if device.startswith("cuda") else "cpu")
    try:
        return _train_components(out_dir, recipe, components, clip_dir, vae_dir, resume, device, precision,
                                 progress, (command, resume_command), info, keep_checkpoints)
    finally:
        teardown_distributed(info)


def _train_components(out_dir, recipe: Recipe, components, clip_dir, vae_dir, resume, device, precision, progress,
                      commands, info, keep_checkpoints) -> Optional[Path]:
    from parti_from_scratch.clip.model import CLIPModel
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    from parti_from_scratch.vae import AutoencoderKL

    from .components import (clip_retrieval, encode_texts, finetune_decoder, train_clip, train_unet, train_vae,
                             training_scheduler)
    from .components.unet import finetune_with_colour_dropout
    from .components.clip import tokenize

    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise TrainError(f"unknown component(s) {unknown}; choose from {COMPONENTS}")
    components = [c for c in COMPONENTS if c in components]
    _check_before_training(recipe, components)
    out = Path(out_dir)
    run_on_main(lambda: ensure_writable_dir(out), info)
    is_main = info.is_main
    tokenizer = CLIPTokenizer()
    results: dict[str, dict] = {}

    def finish(name: str, started: float, train_result, extra: Optional[dict] = None) -> None:
        row = {"seconds": round(time.perf_counter() - started, 1), "steps": train_result.step,
               "batch_size": recipe.training(name).batch_size, "threads": torch.get_num_threads(),
               "final_loss": train_result.history[-1]["loss"] if train_result.history else None, **(extra or {})}
        results[name] = row
        if is_main:
            _result_file(out, name).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")

    # 1. CLIP
    if "clip" in components:
        started = time.perf_counter()
        clip, res = train_clip(recipe.clip, _dataset(recipe, "clip"),
                               recipe.clip_training.train_config(out / "clip", recipe.seed, device, precision,
                                                                 progress, keep_checkpoints), tokenizer, resume=resume)
        clip = clip.cpu()
        if is_main:
            clip.save_pretrained(out / "clip" / "model")
        finish("clip", started, res, {"retrieval_test": clip_retrieval(clip, tokenizer, "test"),
                                      "retrieval_heldout_single": clip_retrieval(clip, tokenizer, "heldout_single")})
    elif "unet" in components:
        source = _model_folder(clip_dir or out, "clip")
        clip = CLIPModel.from_pretrained(source)
        results["clip"] = _read_result(source, "clip")
    # 2. VAE
    if "vae" in components:
        started = time.perf_counter()
        vae, res = train_vae(recipe.vae, _dataset(recipe, "vae"),
                             recipe.vae_training.train_config(out / "vae", recipe.seed, device, precision, progress,
                                                              keep_checkpoints),
                             beta=recipe.kl_beta,
                             foreground_weight=recipe.foreground_weight, resume=resume)
        finish("vae", started, res, {"scaling_factor": vae.config.scaling_factor})
        # stage 2: the decoder alone, encoder frozen (the latents, hence the UNet's data, do not change)
        started = time.perf_counter()
        vae, res = finetune_decoder(vae, _dataset(recipe, "vae"),
                                    recipe.vae_decoder_training.train_config(out / "vae" / "decoder", recipe.seed,
                                                                             device, precision, progress,
                                                                             keep_checkpoints),
                                    beta=recipe.kl_beta, foreground_weight=recipe.foreground_weight, resume=resume)
        if is_main:
            vae.cpu().save_pretrained(out / "vae" / "model")
        finish("vae_decoder", started, res, {"scaling_factor": vae.config.scaling_factor})
    elif "unet" in components:
        source = _model_folder(vae_dir or out, "vae")
        vae = AutoencoderKL.from_pretrained(source)
        results["vae"] = _read_result(source, "vae")
        decoder = source.parent / "decoder" / "result.json"
        if decoder.is_file():
            results["vae_decoder"] = json.loads(decoder.read_text(encoding="utf-8"))
    if "unet" not in components:
        return None
    # 3. UNet on the frozen encoders' outputs
    started = time.perf_counter()
    text_encoder = clip.text_model.cpu().eval().requires_grad_(False)
    vae = vae.cpu().eval().requires_grad_(False)
    joint = recipe.finetune_text_encoder        # then captions stay token ids and the text encoder trains too
    unet_data = _dataset(recipe, "unet")
    latents = _cached_latents(out / "unet" / LATENTS_FILE, unet_data, vae, None if joint else text_encoder,
                              tokenizer, progress, info)
    empty_state = tokenize(tokenizer, [""])[0] if joint else encode_texts(text_encoder, tokenizer, [""])[0]
    scheduler = training_scheduler(recipe.noise_schedule)
    precompute_seconds = round(time.perf_counter() - started, 1)
    unet, res = train_unet(recipe.unet, latents, empty_state, vae.config.scaling_factor, scheduler,
                           recipe.unet_training.train_config(out / "unet", recipe.seed, device, precision, progress,
                                                             keep_checkpoints),
                           recipe.p_uncond, resume=resume, text_encoder=text_encoder if joint else None)
    finish("unet", started, res, {"precompute_seconds": precompute_seconds})
    # stage 2: the same images, some captions without their colour words (see finetune_with_colour_dropout)
    if recipe.unet_finetune_training.steps > 0:
        started = time.perf_counter()
        unet, res = finetune_with_colour_dropout(
            unet, latents, list(unet_data.captions), tokenizer, empty_state,
            vae.config.scaling_factor, scheduler, recipe.p_drop_colour, recipe.seed,
            recipe.unet_finetune_training.train_config(out / "unet" / "finetune", recipe.seed, device, precision,
                                                       progress, keep_checkpoints), recipe.p_uncond, resume=resume,
            text_encoder=None if joint else text_encoder)
        finish("unet_finetune", started, res, {"p_drop_colour": recipe.p_drop_colour})
    if joint:
        unet, text_encoder = unet.unet, unet.text_encoder.cpu().eval().requires_grad_(False)
        if is_main:
            text_encoder.save_pretrained(out / "unet" / "text_encoder")
    unet = unet.cpu()
    if is_main:
        unet.save_pretrained(out / "unet" / "model")
    if not is_main:
        return out / "pipeline"
    return write_pipeline(out / "pipeline", recipe, tokenizer, text_encoder, unet.cpu(), vae, results, *commands)


LATENTS_FILE = "latents.safetensors"


def _cached_latents(path: Path, dataset, vae, text_encoder, tokenizer, progress: bool, info):
    """The UNet's training data (VAE posteriors, caption states or ids): read from `path` when it was made from
    these weights and data, else computed by LatentCaptionDataset.build and written there (rank 0)."""
    from .components import LatentCaptionDataset
    from .components.unet import latents_fingerprint

    fingerprint = latents_fingerprint(dataset, vae, text_encoder)
    cached = LatentCaptionDataset.load(path, fingerprint)
    if cached is not None:
        return cached
    latents = LatentCaptionDataset.build(dataset, vae, text_encoder, tokenizer, progress)
    run_on_main(lambda: (ensure_writable_dir(path.parent), latents.save(path, fingerprint)), info)
    return latents


def _read_result(model_folder: Path, component: str) -> dict:
    """The result.json of the run that produced a reused model (empty when there is none)."""
    for candidate in (model_folder.parent / "result.json", model_folder / component / "result.json"):
        if candidate.is_file():
            return {**json.loads(candidate.read_text(encoding="utf-8")), "reused_from": str(model_folder)}
    return {"reused_from": str(model_folder)}


def build_pipeline(recipe: Recipe, tokenizer, text_encoder, unet, vae):
    """The TextToImagePipeline of trained parts, with the recipe's sampler on the training noise schedule
    and the recipe's sampler steps and guidance scale as its sampling defaults, and the training images'
    size as its training resolution (calls at other sizes warn)."""
    from parti_from_scratch.data import VOCABULARY
    from parti_from_scratch.data.shapes import IMAGE_SIZE
    from parti_from_scratch.diffusion.schedulers import SCHEDULERS
    from parti_from_scratch.pipeline import TextToImagePipeline
    from parti_from_scratch.sampling_defaults import SamplingDefaults

    scheduler = SCHEDULERS[recipe.sampler].from_config(recipe.noise_schedule)   # keeps keys other samplers read
    defaults = SamplingDefaults(num_inference_steps=recipe.sampler_steps, guidance_scale=recipe.guidance_scale,
                                training_resolution=IMAGE_SIZE)
    return TextToImagePipeline(tokenizer, text_encoder, unet, vae, scheduler, vocabulary=VOCABULARY,
                               sampling_defaults=defaults)


def write_pipeline(folder: Union[str, Path], recipe: Recipe, tokenizer, text_encoder, unet, vae,
                   results: dict, command: Optional[str] = None, resume_command: Optional[str] = None) -> Path:
    """Save the pipeline folder (weights in recipe.weights_dtype) with vocabulary.txt, sampling_defaults.json
    (the recipe's sampler_steps and guidance_scale), recipe.json (the training record) and RECIPE.md.

    command: the command line that trains this recipe from scratch; resume_command: the one that continues
    its run (default: command with --resume latest).
    """
    dtype = getattr(torch, recipe.weights_dtype)
    parts = [copy.deepcopy(m).to(dtype) for m in (text_encoder, unet, vae)]
    pipe = build_pipeline(recipe, tokenizer, *parts)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    command = command or "parti-from-scratch train all --out runs/default"
    resume_command = resume_command or f"{command} --resume latest"
    info = {"command": command, "resume_command": resume_command, "seed": recipe.seed, "components": results,
            "recipe": recipe.to_dict()}
    (folder / "recipe.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    lines = ["# How this model was trained", "", "Retrain it from scratch (the seconds per component are below) with", "",
             f"    {command}", "",
             "or, if that run stopped, continue it from each component's newest checkpoint in its run folder "
             "(the encoded latents are read back from unet/latents.safetensors, not computed again) with", "",
             f"    {resume_command}", "",
             f"seed {recipe.seed}; every size and setting is in recipe.json "
             "(parti_from_scratch/train/default_recipe.py holds the same values).", "",
             "| component | steps | batch | seconds | threads |", "|---|---|---|---|---|"]
    for name in ("clip", "vae", "vae_decoder", "unet", "unet_finetune"):
        r = results.get(name, {})
        lines.append(f"| {name} | {r.get('steps', '?')} | {r.get('batch_size', '?')} | {r.get('seconds', '?')} "
                     f"| {r.get('threads', '?')} |")
    (folder / "RECIPE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
