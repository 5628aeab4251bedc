"""PartiPipeline folders: min-dalle's DALL·E mini / mega files, and the pipeline's own layout.

A min-dalle folder (`min_dalle.min_dalle_files`): encoder[_mini].pt + decoder[_mini].pt
(`min_dalle.load_min_dalle_transformer`), detoker.pt (`min_dalle_detoker`, decoded to
[-1, 1]), vocab.json + merges.txt (`PartiTextTokenizer`); sampling settings are min-dalle's
own defaults (guidance 16, top-k 256, temperature 1), since the folder carries none.

The pipeline's own layout, what `save_parti_pipeline` writes and a Parti trained here ships as:

    model_index.json         {"_class_name": "PartiPipeline", ...}
    text_tokenizer/          vocab.json, merges.txt, tokenizer_config.json
    transformer/             config.json (the PartiTransformerConfig fields), model.safetensors (our key names)
    vqvae/                   a diffusers VQModel folder (`diffusers_vq`)
    sampling_defaults.json   guidance_scale, temperature, top_k, top_p, num_candidates
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from parti_from_scratch.configuration import config_to_dict, read_json
from weights_convert.common import (CheckpointError, PathLike, Repeat, build_on_meta, check_repeats, load_into,
                                    read_state_dict)
from weights_convert.diffusers_vq import load_vq_model
from weights_convert.min_dalle import load_min_dalle_transformer, min_dalle_files
from weights_convert.min_dalle_detoker import load_min_dalle_detokenizer

CLASS_NAME = "PartiPipeline"
TRANSFORMER_WEIGHTS = "model.safetensors"
SUBFOLDERS = ("text_tokenizer", "transformer", "vqvae")


def is_parti_pipeline_folder(path: PathLike) -> bool:
    """True for a min-dalle folder or a folder in the pipeline's own layout (the CLI picks the family by this)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    if all((folder / sub).is_dir() for sub in SUBFOLDERS):
        return True
    try:
        return min_dalle_files(folder) is not None
    except CheckpointError:
        return True        # a min-dalle folder with a file missing: the loader names it


def transformer_repeats(config) -> Iterator[Repeat]:
    yield "encoder.layers", config.encoder_layers, "encoder_layers"
    yield "decoder.layers", config.decoder_layers, "decoder_layers"


def load_parti_transformer(folder: PathLike, dtype: Optional[torch.dtype] = torch.float32):
    """PartiTransformer from config.json + model.safetensors, strictly (layer counts checked before building)."""
    from parti_from_scratch.parti.transformer import PartiTransformer, PartiTransformerConfig
    folder = Path(folder)
    config = PartiTransformerConfig.from_dict(read_json(folder / "config.json"), source=str(folder / "config.json"))
    weights = folder / TRANSFORMER_WEIGHTS
    state = read_state_dict(weights)
    check_repeats(transformer_repeats(config), state, str(weights), str(folder / "config.json"))
    return load_into(build_on_meta(lambda: PartiTransformer(config)), state, source=str(weights), dtype=dtype)


def save_parti_transformer(model, folder: PathLike) -> None:
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_dict(model.config), indent=2) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / TRANSFORMER_WEIGHTS))


def load_parti_pipeline(cls, path: Optional[PathLike], dtype: Optional[torch.dtype] = torch.float32,
                        variant: Optional[str] = None):
    """`cls` (PartiPipeline) from a min-dalle folder or a folder of the pipeline's own layout (None: the shipped one)."""
    from parti_from_scratch.parti.text_tokenizer import PartiTextTokenizer
    from parti_from_scratch.parti_pipeline import MIN_DALLE_DEFAULTS, PartiSamplingDefaults, shipped_parti_folder

    folder = shipped_parti_folder() if path is None else Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = min_dalle_files(folder, variant)
    if files is not None:
        transformer = load_min_dalle_transformer(files["encoder"], files["decoder"], dtype=dtype)
        tokenizer = PartiTextTokenizer.from_files(files["vocab"], files["merges"],
                                                  transformer.config.max_text_positions)
        vqvae = load_min_dalle_detokenizer(files["detokenizer"], dtype=dtype)
        return cls(tokenizer, transformer, vqvae, sampling_defaults=MIN_DALLE_DEFAULTS)
    missing = [sub for sub in SUBFOLDERS if not (folder / sub).is_dir()]
    if missing:
        raise CheckpointError(f"{folder}: neither a min-dalle folder (encoder.pt + decoder.pt or encoder_mini.pt + "
                              f"decoder_mini.pt, detoker.pt, vocab.json, merges.txt) nor a Parti pipeline folder "
                              f"(no {', '.join(sub + '/' for sub in missing)})")
    return cls(PartiTextTokenizer.from_pretrained(folder, "text_tokenizer"),
               load_parti_transformer(folder / "transformer", dtype), load_vq_model(folder, "vqvae", dtype),
               sampling_defaults=PartiSamplingDefaults.read(folder))


def save_parti_pipeline(pipe, folder: PathLike) -> None:
    """Write the pipeline's own layout (see the module docstring). The reranker's CLIP is not part of it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.tokenizer.save_pretrained(folder / "text_tokenizer")
    save_parti_transformer(pipe.transformer, folder / "transformer")
    pipe.vqvae.save_pretrained(folder / "vqvae")
    pipe.sampling_defaults.save(folder)
    index = {"_class_name": CLASS_NAME,
             "text_tokenizer": ["parti_from_scratch.parti.text_tokenizer", "PartiTextTokenizer"],
             "transformer": ["parti_from_scratch.parti.transformer", "PartiTransformer"],
             "vqvae": ["diffusers", "VQModel"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
