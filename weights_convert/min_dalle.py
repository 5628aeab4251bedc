"""min-dalle's DALL·E mini / mega files -> our PartiTransformer (the encoder-decoder of `parti/transformer.py`).

min-dalle (the PyTorch port of DALL·E mini and mega) ships each half of the
BART-derived Transformer as a plain `torch.save` state dict, fp16:

    encoder.pt / decoder.pt             DALL·E mega: 24 layers, width 2048, GLU 4096, 32 heads
    encoder_mini.pt / decoder_mini.pt   DALL·E mini: 12 layers, width 1024, GLU 2730, 16 heads

(min-dalle's own `pretrained/dalle_bart_mini/` folder holds the mini files under the
names encoder.pt and decoder.pt; the sizes come from the tensors, not the names.)
Keys, i = layer:

    embed_tokens.weight (V, d)   embed_positions.weight (T, d)   layernorm_embedding.*   final_ln.*
    layers.i.pre_self_attn_layer_norm.*   layers.i.self_attn.{q,k,v,out}_proj.weight   layers.i.self_attn_layer_norm.*
    layers.i.glu.{ln0, ln1}.*   layers.i.glu.{fc0, fc1, fc2}.weight
    decoder only: layers.i.pre_encoder_attn_layer_norm.*, layers.i.encoder_attn.{q,k,v,out}_proj.weight,
                  layers.i.encoder_attn_layer_norm.*, lm_head.weight (V_img, d)

Our modules carry these names, except that the feed-forward is `ffn` where min-dalle
says `glu`: that is the only renaming rule (`GLU_RULE`). Every other key must be
one of the model's, with its shape: `load_into` refuses missing, unexpected and
misshapen tensors before anything is loaded, naming the file and the keys.

Sizes are read off the tensors (`infer_min_dalle_config`): d and the text vocabulary
from encoder embed_tokens, the text positions from encoder embed_positions, the image
vocabulary from decoder embed_tokens, the image grid from decoder embed_positions
(N = rows * columns, square), layers from the key indices, the GLU width from fc0.
The head count is the one size no tensor shows: DALL·E mini and mega both use heads of
width 64 (16 x 64 = 1024, 32 x 64 = 2048), so heads = d / 64 unless given.
min-dalle samples only the first 2**14 logits (the VQGAN's codes) and starts every
image with token 2**14 - 1; the config says so (codebook_size, decoder_start_token_id).

Files are read with `torch.load(weights_only=True)` (`read_state_dict`): a pickle
that would import or call anything is refused, never run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from weights_convert.common import (CheckpointError, PathLike, StateDict, build_on_meta, count_indices, load_into,
                                    read_state_dict, rename_keys, tensor_shape)

GLU_RULE = (r"(layers\.\d+)\.glu\.(.+)", r"\g<1>.ffn.\g<2>")
KEEP = (r"(.+)", r"\g<1>")           # every other key keeps its name (load_into then checks it is the model's)
HEAD_WIDTH = 64                      # d_model / heads in DALL·E mini (1024 / 16) and mega (2048 / 32)
CODEBOOK_SIZE = 2 ** 14              # min-dalle samples from the first 2**14 logits: the VQGAN's 16384 codes
START_TOKEN = 2 ** 14 - 1            # min-dalle's first decoder input
# (encoder, decoder, vocab, merges) file names per variant, in the HF repository's naming; mega first
VARIANTS: Dict[str, Tuple[str, str, str, str]] = {
    "mega": ("encoder.pt", "decoder.pt", "vocab.json", "merges.txt"),
    "mini": ("encoder_mini.pt", "decoder_mini.pt", "vocab_mini.json", "merges_mini.txt"),
}
DETOKENIZER = "detoker.pt"


def from_min_dalle_keys(state: Mapping[str, torch.Tensor], source: str) -> StateDict:
    """min-dalle's names -> ours: `layers.i.glu.*` -> `layers.i.ffn.*`, every other key unchanged."""
    return rename_keys(state, [GLU_RULE, KEEP], source=source)


def infer_min_dalle_config(encoder: Mapping[str, torch.Tensor], decoder: Mapping[str, torch.Tensor],
                           encoder_source: str, decoder_source: str, attention_heads: Optional[int] = None):
    """The PartiTransformerConfig (DALL·E mini/mega layer style) that the two state dicts fill, from their shapes."""
    from parti_from_scratch.parti.transformer import PartiTransformerConfig

    vocab_size, d_model = tensor_shape(encoder, "embed_tokens.weight", encoder_source, 2)
    text_positions, d_positions = tensor_shape(encoder, "embed_positions.weight", encoder_source, 2)
    encoder_ffn, _ = tensor_shape(encoder, "layers.0.glu.fc0.weight", encoder_source, 2)
    image_vocab_size, d_decoder = tensor_shape(decoder, "embed_tokens.weight", decoder_source, 2)
    image_tokens, _ = tensor_shape(decoder, "embed_positions.weight", decoder_source, 2)
    decoder_ffn, _ = tensor_shape(decoder, "layers.0.glu.fc0.weight", decoder_source, 2)
    if d_positions != d_model:
        raise CheckpointError(f"{encoder_source}: embed_positions.weight has width {d_positions}, embed_tokens.weight "
                              f"{d_model}")
    if d_decoder != d_model:
        raise CheckpointError(f"{decoder_source}: embed_tokens.weight has width {d_decoder}, the encoder "
                              f"({encoder_source}) {d_model}: not the two halves of one model")
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise CheckpointError(f"{decoder_source}: embed_positions.weight has {image_tokens} rows; an image is a "
                              f"square grid of tokens, so this must be a square number")
    if image_vocab_size <= CODEBOOK_SIZE:
        raise CheckpointError(f"{decoder_source}: embed_tokens.weight has {image_vocab_size} rows; DALL·E mini/mega "
                              f"have {CODEBOOK_SIZE} image codes plus the start token {START_TOKEN}")
    heads = attention_heads if attention_heads is not None else max(d_model // HEAD_WIDTH, 1)
    if d_model % heads:
        raise CheckpointError(f"{encoder_source}: width {d_model} is not a multiple of {heads} heads "
                              f"(pass attention_heads=)")
    return PartiTransformerConfig(
        vocab_size=vocab_size, image_vocab_size=image_vocab_size, codebook_size=CODEBOOK_SIZE,
        decoder_start_token_id=START_TOKEN, d_model=d_model,
        encoder_layers=count_indices(encoder, r"layers\.(\d+)\.", encoder_source),
        decoder_layers=count_indices(decoder, r"layers\.(\d+)\.", decoder_source),
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=encoder_ffn, decoder_ffn_dim=decoder_ffn, max_text_positions=text_positions,
        image_grid_size=(side, side), ffn_type="glu", sublayer_post_norm=True, bias=False,
        layernorm_embedding=True, final_layer_norm=True, scale_embedding=False,
        pad_token_id=1, bos_token_id=0, eos_token_id=2)


def load_min_dalle_transformer(encoder_path: PathLike, decoder_path: PathLike,
                               dtype: Optional[torch.dtype] = torch.float32, attention_heads: Optional[int] = None):
    """Our PartiTransformer holding min-dalle's encoder and decoder files, loaded strictly.

    dtype: the weights' dtype in memory (the files are fp16; None keeps it).
    attention_heads: heads per layer (default d_model / 64, DALL·E mini's and mega's).
    """
    from parti_from_scratch.parti.transformer import PartiTransformer

    encoder_source, decoder_source = str(encoder_path), str(decoder_path)
    encoder = read_state_dict(encoder_path)
    decoder = read_state_dict(decoder_path)
    config = infer_min_dalle_config(encoder, decoder, encoder_source, decoder_source, attention_heads)
    model = build_on_meta(lambda: PartiTransformer(config))
    load_into(model.encoder, from_min_dalle_keys(encoder, encoder_source), source=encoder_source, dtype=dtype)
    load_into(model.decoder, from_min_dalle_keys(decoder, decoder_source), source=decoder_source, dtype=dtype)
    return model.eval()


def min_dalle_files(folder: PathLike, variant: Optional[str] = None) -> Optional[Dict[str, Path]]:
    """The files of a min-dalle folder, or None when `folder` is not one.

    A folder holds the mega files (encoder.pt, decoder.pt) or the mini files (encoder_mini.pt,
    decoder_mini.pt, the repository's names), or both (then `variant`, default "mega" as in
    min-dalle). The tokenizer is vocab[_mini].json + merges[_mini].txt, falling back to vocab.json +
    merges.txt; the detokenizer is detoker.pt beside them or in ../vqgan/ (min-dalle's `pretrained/` layout).
    Returned keys: encoder, decoder, vocab, merges, detokenizer (each an existing file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    present = [v for v, (enc, dec, _, _) in VARIANTS.items() if (folder / enc).is_file() and (folder / dec).is_file()]
    if not present:
        return None
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    chosen = variant or present[0]
    if chosen not in present:
        raise CheckpointError(f"{folder}: no {VARIANTS[chosen][0]} and {VARIANTS[chosen][1]} (variant={chosen!r})")
    encoder, decoder, vocab, merges = VARIANTS[chosen]
    files = {"encoder": folder / encoder, "decoder": folder / decoder}
    for key, name, plain in (("vocab", vocab, "vocab.json"), ("merges", merges, "merges.txt")):
        files[key] = folder / name if (folder / name).is_file() else folder / plain
    detokenizers = [folder / DETOKENIZER, folder.parent / "vqgan" / DETOKENIZER]
    files["detokenizer"] = next((p for p in detokenizers if p.is_file()), detokenizers[0])
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: a min-dalle folder ({encoder}, {decoder}) also needs "
                              f"{', '.join(missing)}")
    return files
