"""PartiPipeline folders: min-dalle's DALL·E mini / mega files, and the pipeline's own layout.

A min-dalle folder (`min_dalle.min_dalle_files`): encoder[_mini].pt + decoder[_mini].pt
(`min_dalle.load_min_dalle_transformer`), detoker.pt (`min_dalle_detoker`, decoded to
[-1, 1]), vocab.json + merges.txt (`PartiTextTokenizer`); sampling settings are min-dalle's
own defaults (guidance 16, top-k 256, temperature 1), since the folder carries none.

The pipeline's own layout, what `save_parti_pipeline` writes and a Parti trained here ships as:

    model_index.json         {"_class_name": "PartiPipeline", ...}
    text_tokenizer/          vocab.json, merges.txt, tokenizer_config.json
    transformer/             config.json (the PartiTransformerConfig fields), model.safetensors (our key names)
    vqvae/                   a diffusers VQModel folder (`diffusers_vq`) or a ValueChromaVQModel folder
                             (`value_chroma`), told apart by its config.json's _class_name
    sampling_defaults.json   guidance_scale, temperature, top_k, top_p, num_candidates
    reranker/                optional: the CLIP that picks the best of num_candidates images, a transformers
                             CLIPModel folder (config.json, model.safetensors, both towers) plus either its
                             tokenizer files or builtin_tokenizer.json (the package's built-in CLIP vocabulary)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from parti_from_scratch.configuration import config_to_dict, read_json
from weights_convert.common import (CheckpointError, PathLike, Repeat, build_on_meta, check_repeats, load_into,
                                    read_state_dict)
from weights_convert.value_chroma import load_image_tokenizer
from weights_convert.min_dalle import load_min_dalle_transformer, min_dalle_files
from weights_convert.min_dalle_detoker import load_min_dalle_detokenizer

CLASS_NAME = "PartiPipeline"
TRANSFORMER_WEIGHTS = "model.safetensors"
SUBFOLDERS = ("text_tokenizer", "transformer", "vqvae")
RERANKER = "reranker"
# in reranker/ instead of vocab.json + merges.txt: the tokenizer is CLIPTokenizer() (bpe_simple_vocab_16e6.txt.gz)
BUILTIN_TOKENIZER_NOTE = "builtin_tokenizer.json"


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


def load_reranker(folder: PathLike, dtype: Optional[torch.dtype] = torch.float32):
    """(CLIPModel, CLIPTokenizer) from a reranker/ folder: the CLIP strictly (a missing or misshapen tensor names
    model.safetensors), the tokenizer from its files or, with builtin_tokenizer.json, the built-in vocabulary."""
    from parti_from_scratch.clip.model import CLIPModel
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    folder = Path(folder)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if config is not None and "vision_config" not in config:
        raise CheckpointError(f"{folder / 'config.json'}: a reranker needs a full CLIPModel (text and vision "
                              f"towers), this config has no 'vision_config'")
    clip = CLIPModel.from_pretrained(folder, dtype=dtype).eval()
    note = folder / BUILTIN_TOKENIZER_NOTE
    if note.is_file():
        max_length = read_json(note).get("model_max_length")
        try:
            tokenizer = CLIPTokenizer(model_max_length=max_length)
        except ValueError as error:
            raise CheckpointError(f"{note}: key 'model_max_length': {error}") from None
    else:
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    return clip, tokenizer


def is_builtin_clip_tokenizer(tokenizer) -> bool:
    """True when `tokenizer` reads text as CLIPTokenizer() does (same vocabulary, merges and special tokens)."""
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    builtin = CLIPTokenizer(model_max_length=tokenizer.model_max_length)
    names = ("bos_token", "eos_token", "pad_token", "unk_token", "added_tokens")
    return (all(getattr(tokenizer, n, None) == getattr(builtin, n) for n in names)
            and getattr(tokenizer, "vocab", None) == builtin.vocab
            and getattr(tokenizer, "bpe_ranks", None) == builtin.bpe_ranks)


def save_reranker(reranker, folder: PathLike) -> None:
    """Write a (CLIPModel, CLIPTokenizer) pair as reranker/: the CLIP's transformers folder, and the tokenizer's
    files, or builtin_tokenizer.json when it is the built-in vocabulary (1.6 MB of vocab.json saved)."""
    clip, tokenizer = reranker
    folder = Path(folder)
    clip.save_pretrained(folder)
    if is_builtin_clip_tokenizer(tokenizer):
        note = {"vocabulary": "built-in: parti_from_scratch/assets/bpe_simple_vocab_16e6.txt.gz (CLIPTokenizer())",
                "model_max_length": tokenizer.model_max_length}
        (folder / BUILTIN_TOKENIZER_NOTE).write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    else:
        tokenizer.save_pretrained(folder)


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
        return cls(tokenizer, transformer, vqvae, sampling_defaults=MIN_DALLE_DEFAULTS, source=folder)
    missing = [sub for sub in SUBFOLDERS if not (folder / sub).is_dir()]
    if missing:
        raise CheckpointError(f"{folder}: neither a min-dalle folder (encoder.pt + decoder.pt or encoder_mini.pt + "
                              f"decoder_mini.pt, detoker.pt, vocab.json, merges.txt) nor a Parti pipeline folder "
                              f"(no {', '.join(sub + '/' for sub in missing)})")
    reranker = load_reranker(folder / RERANKER, dtype) if (folder / RERANKER).is_dir() else None
    return cls(PartiTextTokenizer.from_pretrained(folder, "text_tokenizer"),
               load_parti_transformer(folder / "transformer", dtype), load_image_tokenizer(folder, "vqvae", dtype),
               sampling_defaults=PartiSamplingDefaults.read(folder), reranker=reranker, source=folder)


def save_parti_pipeline(pipe, folder: PathLike) -> None:
    """Write the pipeline's own layout (see the module docstring), with reranker/ when the pipeline has one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.tokenizer.save_pretrained(folder / "text_tokenizer")
    save_parti_transformer(pipe.transformer, folder / "transformer")
    pipe.vqvae.save_pretrained(folder / "vqvae")
    pipe.sampling_defaults.save(folder)
    if pipe.reranker is not None:
        save_reranker(pipe.reranker, folder / RERANKER)
    index = {"_class_name": CLASS_NAME,
             "text_tokenizer": ["parti_from_scratch.parti.text_tokenizer", "PartiTextTokenizer"],
             "transformer": ["parti_from_scratch.parti.transformer", "PartiTransformer"],
             "vqvae": (["parti_from_scratch.parti.value_chroma", "ValueChromaVQModel"]
                       if hasattr(pipe.vqvae, "codebook_factors") else ["diffusers", "VQModel"])}
    if pipe.reranker is not None:
        index[RERANKER] = ["transformers", "CLIPModel"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
