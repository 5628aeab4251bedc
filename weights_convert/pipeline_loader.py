"""Whole pipelines: a diffusers pipeline folder, or a single-file checkpoint, into our components.

A diffusers folder (what `StableDiffusionPipeline.save_pretrained` writes and
what the Stable Diffusion repositories contain) is

    model_index.json        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], ...}
    tokenizer/              vocab.json, merges.txt, tokenizer_config.json
    text_encoder/           config.json, model.safetensors (or pytorch_model.bin)
    unet/ vae/              config.json, diffusion_pytorch_model.safetensors (or .bin)
    scheduler/              scheduler_config.json

Each component is read by its own converter (transformers_clip, diffusers_models);
this module only dispatches and checks that the folder is a text-to-image pipeline.
Components a text-to-image run does not need (`safety_checker`, `feature_extractor`,
`image_encoder`) are ignored on purpose: no weights of theirs are read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from parti_from_scratch.configuration import ConfigError, read_json
from parti_from_scratch.sampling_defaults import SamplingDefaults

REQUIRED = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
IGNORED = {"safety_checker": "not part of generation", "feature_extractor": "only feeds the safety checker",
           "image_encoder": "IP-adapter image conditioning is not supported", "requires_safety_checker": "a flag"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
VOCABULARY_FILE = "vocabulary.txt"


class NotAPipelineError(ConfigError):
    """The path is neither a diffusers pipeline folder nor a single-file Stable Diffusion checkpoint."""


def load_pipeline(pipeline_cls: type, path: Union[str, Path], *, version: Optional[str] = None,
                  prediction_type: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                  vae: Union[str, Path, None] = None, configs: Optional[dict] = None,
                  torch_dtype: Optional[torch.dtype] = None):
    """`pipeline_cls` built from `path` (folder or single file): what `TextToImagePipeline.from_pretrained` returns.

    vae: optionally a standalone diffusers VAE folder that replaces the pipeline's own.
    dtype / torch_dtype: one name each for the same thing (diffusers says torch_dtype); default float32.
    The other arguments are those of `load_pipeline_components`.
    """
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: give one of them")
    dtype = next((d for d in (dtype, torch_dtype) if d is not None), torch.float32)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"torch_dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")
    parts = load_pipeline_components(path, version=version, prediction_type=prediction_type, dtype=dtype,
                                     configs=configs)
    if vae is not None:
        from parti_from_scratch.vae import AutoencoderKL
        parts["vae"] = AutoencoderKL.from_pretrained(vae, dtype=dtype)
    # the folder's sampling_defaults.json (50 steps, guidance 7.5 without one)
    defaults = SamplingDefaults.read(path)
    try:
        return pipeline_cls(**parts, sampling_defaults=defaults)
    except ValueError as e:           # components that do not fit together (tokenizer vs text encoder)
        raise ValueError(f"{path}: {e}") from None


def load_pipeline_components(path: Union[str, Path], version: Optional[str] = None,
                             prediction_type: Optional[str] = None,
                             dtype: torch.dtype = torch.float32, configs: Optional[dict] = None) -> Dict[str, Any]:
    """Our tokenizer, text_encoder, unet, vae and scheduler for `path` (folder or single file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise NotAPipelineError(f"{path}: not a Stable Diffusion checkpoint (expected one of "
                                    f"{', '.join(SINGLE_FILE_SUFFIXES)} or a diffusers folder)")
        from weights_convert.ldm_checkpoint import load_single_file_components
        return load_single_file_components(path, version=version, prediction_type=prediction_type, dtype=dtype,
                                           configs=configs)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise NotAPipelineError(f"{path}: not a Stable Diffusion pipeline folder (no model_index.json)")
    if version is not None or prediction_type is not None or configs is not None:
        raise ValueError(f"{path}: version, prediction_type and configs apply to single-file checkpoints only; "
                         "a diffusers folder states them in its config files")
    return load_diffusers_pipeline(path, dtype=dtype)


def load_diffusers_pipeline(folder: Path, dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    from parti_from_scratch.clip.model import CLIPTextModel
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    from parti_from_scratch.diffusion.schedulers import SCHEDULERS
    from parti_from_scratch.unet import UNet2DConditionModel
    from parti_from_scratch.vae import AutoencoderKL

    index_file = folder / "model_index.json"
    index = read_json(index_file)
    missing = [k for k in REQUIRED if k not in index]
    if missing:
        raise NotAPipelineError(f"{index_file}: not a text-to-image pipeline, missing components: "
                                f"{', '.join(missing)}")
    unknown = sorted(k for k in index if not k.startswith("_") and k not in REQUIRED and k not in IGNORED)
    if unknown:
        raise NotAPipelineError(f"{index_file}: components this pipeline does not support: {', '.join(unknown)}")
    scheduler_entry = index["scheduler"]
    if not (isinstance(scheduler_entry, list) and len(scheduler_entry) == 2):
        raise NotAPipelineError(f"{index_file}: 'scheduler' should be [library, class name], got {scheduler_entry!r}")
    by_class_name = {cls.__name__: cls for cls in SCHEDULERS.values()}
    if scheduler_entry[1] not in by_class_name:
        raise NotAPipelineError(f"{index_file}: scheduler {scheduler_entry[1]!r} is not supported; "
                                f"supported: {', '.join(sorted(by_class_name))}")
    scheduler_cls = by_class_name[scheduler_entry[1]]
    parts: Dict[str, Any] = {
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype),
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype),
        "scheduler": scheduler_cls.from_pretrained(folder, subfolder="scheduler"),
    }
    vocab_file = folder / VOCABULARY_FILE
    if vocab_file.is_file():
        parts["vocabulary"] = vocab_file.read_text(encoding="utf-8").split()
    return parts


def save_pipeline(pipe, folder: Union[str, Path]) -> None:
    """Write `pipe` as a diffusers pipeline folder that both this package and diffusers can load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.text_encoder.save_pretrained(folder / "text_encoder")
    pipe.unet.save_pretrained(folder / "unet")
    pipe.vae.save_pretrained(folder / "vae")
    pipe.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if pipe.vocabulary is not None:
        (folder / VOCABULARY_FILE).write_text("\n".join(sorted(pipe.vocabulary)) + "\n", encoding="utf-8")
    pipe.sampling_defaults.save(folder)
