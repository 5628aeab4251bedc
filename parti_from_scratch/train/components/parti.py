"""Training Parti's Transformer (stage 2): teacher-forced cross-entropy over image tokens, caption dropout.

Parti (Yu et al. 2022, arXiv 2206.10789, §2) learns p(y | x) = prod_i p(y_i | y_<i, x), y the
image's tokens in raster order (the frozen stage-1 tokenizer's indices, train/components/vq.py),
x the caption's text tokens. Per batch:

    L = -(1 / (b N)) sum_b sum_i log p_theta(y_i | y_<i, x_b')            (autoregressive_loss)

    x_b' = x_empty   with probability p_uncond                          (caption dropout, §2.3)
         = x_b       otherwise

so that the same network also learns p(y | x_empty), the unconditional model that
classifier-free guidance l = l_uncond + lambda (l_cond - l_uncond) extrapolates from
(parti/sampling.py). x_empty is `empty_prompt_ids`: <s></s> then padding, what
`generate_image_tokens` feeds the unconditional rows.

Colour-word dropout (`p_drop_colour`, as the diffusion recipe's second UNet stage does it):
a kept caption is read without its colour words with this probability ("a large red
circle on the left" -> "a large circle on the left"), redrawn at every step, so that
a shape word alone has to decide the shape; a colour and a shape never seen together
("a red triangle") can then be drawn.

The frozen tokenizer runs once, before training: the token grid of every training
image, and the caption's text ids, are kept in the run folder
(transformer/tokens.safetensors, with a fingerprint of the tokenizer's encoder and
codebook, the text tokenizer and the data) and read back by a resumed run, as the
UNet keeps its latents (components/unet.py).

The text side is a word-level vocabulary for the shapes grammar (`shapes_text_tokenizer`):
BART-style vocab.json + merges.txt read by `PartiTextTokenizer`, one token per word of
`data.VOCABULARY` (merges that spell each word from its first letter), letters as the
fall-back for a word the grammar never writes.

`evaluate_parti_adherence` grades a PartiPipeline's images with the analytic checker,
like `evaluate_adherence` does for the diffusion pipeline.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from parti_from_scratch.data import VOCABULARY, summarise
from parti_from_scratch.parti.sampling import empty_prompt_ids
from parti_from_scratch.parti.text_tokenizer import PartiTextTokenizer
from parti_from_scratch.parti.transformer import PartiTransformer, PartiTransformerConfig, autoregressive_loss
from parti_from_scratch.parti.vqgan import VQModel

from ..checkpoint import atomic_write_bytes, read_safetensors, safetensors_bytes
from ..distributed import map_sharded
from ..loop import StepRNG, TrainConfig, TrainResult, train
from .common import seeded_init
from .evaluate import safe_score
from .unet import caption_dropout_mask, drop_colour_words

TOKENS_FILE = "tokens.safetensors"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")     # ids 0-3: PartiTransformerConfig's bos/pad/eos defaults
SPACE = "Ġ"                                             # the byte-level alphabet's space before a word


# --------------------------------------------------------------------------------------------- text side


def word_level_vocabulary(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BART-style (vocab, merges) in which each of `words` is one token "Ġ" + word.

    Ids 0-3 are <s>, <pad>, </s>, <unk>; then "Ġ", every letter alone and word-initial ("r",
    "Ġr"); then each word's prefixes. The merges spell a word from its first letter,
    ("Ġ", "r") -> "Ġr", ("Ġr", "e") -> "Ġre", ("Ġre", "d") -> "Ġred", so a known word
    becomes one token and any other falls back to its letters (a letter no word has is <unk>).
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, SPACE))}
    merges: list[tuple[str, str]] = []
    for c in sorted(set("".join(words)) | {","}):
        for token in (c, SPACE + c):
            vocab.setdefault(token, len(vocab))
        merges.append((SPACE, c))
    for word in words:
        prefix = SPACE + word[0]
        for c in word[1:]:
            merges.append((prefix, c))
            prefix += c
            vocab.setdefault(prefix, len(vocab))
    # words sharing a prefix ("the", "there") share its merges: keep the first of each
    return vocab, list(dict.fromkeys(merges))


def shapes_text_tokenizer(max_length: int = 32, words: Sequence[str] = VOCABULARY) -> PartiTextTokenizer:
    """The PartiTextTokenizer of the shapes grammar: one token per word of `words`, prompts of at most
    `max_length` tokens (<s> and </s> included; the longest caption has 21)."""
    vocab, merges = word_level_vocabulary(words)
    with tempfile.TemporaryDirectory() as folder:
        # through the files, so the tokenizer is exactly what its saved folder loads back as
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                                 encoding="utf-8")
        return PartiTextTokenizer.from_pretrained(folder, model_max_length=max_length)


# --------------------------------------------------------------------------------------------- the model


def parti_config(sizes: dict, vqvae: VQModel, tokenizer: PartiTextTokenizer) -> PartiTransformerConfig:
    """The Transformer's config: `sizes` (PartiTransformerConfig fields, e.g. a PRESETS entry) completed
    by what the two tokenizers decide: the text vocabulary and length, the image codebook (K codes, the
    start token K; a ValueChromaVQModel's K = K_a K_c codes also set codebook_factors, so the Transformer
    embeds and predicts the two factors apart) and the token grid (64 / 2^(levels-1) a side)."""
    K = vqvae.codebook_size
    vq_config = getattr(vqvae, "structure", vqvae).config
    side = vq_config.sample_size // vq_config.downsampling
    factors = getattr(vqvae, "codebook_factors", None)
    special = dict(vocab_size=tokenizer.vocab_size, max_text_positions=tokenizer.model_max_length,
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, image_vocab_size=K + 1, codebook_size=K,
                   decoder_start_token_id=K, image_grid_size=(side, side),
                   codebook_factors=None if factors is None else tuple(factors))
    return PartiTransformerConfig(**{**sizes, **special})


def build_parti(config: PartiTransformerConfig, seed: int = 0) -> PartiTransformer:
    """A freshly initialised PartiTransformer; weights depend on `seed` only."""
    return seeded_init(lambda: PartiTransformer(config), seed)


# --------------------------------------------------------------------------------------------- token cache


class ImageTokenDataset(torch.utils.data.Dataset):
    """Item i: (y_i, x_i, x~_i) = the image's token grid in raster order (N,), its caption's text ids (T,),
    and the ids of the caption without its colour words (T,), int64."""

    def __init__(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, colourless_ids: torch.Tensor):
        if not len(image_tokens) == len(input_ids) == len(colourless_ids):
            raise ValueError(f"{len(image_tokens)} token grids but {len(input_ids)} / {len(colourless_ids)} captions")
        self.image_tokens, self.input_ids, self.colourless_ids = image_tokens, input_ids, colourless_ids

    @classmethod
    @torch.no_grad()
    def build(cls, dataset, vqvae: VQModel, tokenizer: PartiTextTokenizer, batch_size: int = 250,
              progress: bool = False, sharded: bool = True) -> "ImageTokenDataset":
        """Tokenize every image of `dataset` (items (image, caption)) with the frozen VQModel, once;
        under torchrun each process tokenizes 1/N of the images (map_sharded), unless `sharded` is False
        (a call made by one process only, e.g. rank 0 measuring)."""
        from tqdm.auto import tqdm

        vqvae = vqvae.eval()

        def tokens(start: int, stop: int) -> torch.Tensor:
            grids = []
            for i in tqdm(range(start, stop, batch_size), desc="image tokens", disable=not progress, leave=False):
                x = torch.stack([dataset[j][0] for j in range(i, min(i + batch_size, stop))])
                # (b, h, w) -> (b, h*w): raster order, the order the decoder writes them in
                grids.append(vqvae.tokenize(x.to(vqvae.device, vqvae.dtype)).flatten(1).cpu().to(torch.int32))
            return torch.cat(grids)

        captions = list(dataset.captions) if hasattr(dataset, "captions") else \
            [dataset[i][1] for i in range(len(dataset))]
        ids, colourless = (tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
                           for texts in (captions, drop_colour_words(captions, 1.0)))
        grids = map_sharded(tokens, len(dataset)) if sharded else tokens(0, len(dataset))
        return cls(grids, ids.to(torch.int32), colourless.to(torch.int32))

    def __len__(self) -> int:
        return len(self.image_tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.image_tokens[i].long(), self.input_ids[i].long(), self.colourless_ids[i].long()

    def save(self, path: Union[str, Path], fingerprint: str) -> Path:
        """Write the three tensors to a safetensors file (atomically), with `fingerprint` in its metadata."""
        data = safetensors_bytes({"image_tokens": self.image_tokens.contiguous(),
                                  "input_ids": self.input_ids.contiguous(),
                                  "colourless_ids": self.colourless_ids.contiguous()},
                                 metadata={"format": "pt", "fingerprint": fingerprint})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: Union[str, Path], fingerprint: str) -> Optional["ImageTokenDataset"]:
        """The dataset saved in `path`, or None when there is none or it came from other weights or data."""
        if not Path(path).is_file():
            return None
        tensors, metadata = read_safetensors(path)
        if metadata.get("fingerprint") != fingerprint:
            return None
        return cls(tensors["image_tokens"], tensors["input_ids"], tensors["colourless_ids"])


def tokens_fingerprint(dataset, vqvae: VQModel, tokenizer: PartiTextTokenizer) -> str:
    """sha256 of what `ImageTokenDataset.build` reads: the weights that choose the indices (encoder,
    quant_conv, codebook; not the decoder), the text tokenizer (vocabulary, merges, length), and the
    data (scenes and captions: images are drawn from the scenes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(vqvae.state_dict().items()):
        # a ValueChromaVQModel's VQGAN is vqvae.structure; its colours choose the colour codes
        if name.removeprefix("structure.").startswith(("encoder.", "quant_conv.", "quantize.")) or name == "colours":
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.merges,
                         tokenizer.model_max_length]).encode())
    h.update(repr((len(dataset), getattr(dataset, "scenes", None), getattr(dataset, "captions", None))).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- the loss


def make_parti_loss(empty_ids: torch.Tensor, p_uncond: float = 0.1, p_drop_colour: float = 0.0):
    """The loss_fn for `train`: the teacher-forced cross-entropy with caption dropout and colour-word
    dropout (module docstring).

    empty_ids: (T,) the text ids of the empty prompt (<s></s> then padding).
    """
    def loss_fn(model: PartiTransformer, batch: Any, rng: StepRNG) -> tuple[torch.Tensor, dict]:
        image_tokens, input_ids, colourless_ids = batch         # (b, N), (b, T), (b, T)
        # classifier-free guidance training: x -> x_empty with probability p_uncond (the step's first draw)
        drop = caption_dropout_mask(rng, p_uncond)              # (b,)
        # a kept caption loses its colour words with probability p_drop_colour (the second draw)
        plain = rng.bernoulli(p_drop_colour) & ~drop            # (b,)
        input_ids = torch.where(plain[:, None], colourless_ids, input_ids)
        input_ids = torch.where(drop[:, None], empty_ids.to(input_ids), input_ids)
        # L = -(1 / bN) sum_b sum_i log p(y_i | y_<i, x')
        loss = autoregressive_loss(model, input_ids, image_tokens)
        return loss, {"dropped": drop.float().mean().item(), "colourless": plain.float().mean().item()}
    return loss_fn


def train_parti_transformer(config: PartiTransformerConfig, data: ImageTokenDataset, train_config: TrainConfig,
                            p_uncond: float = 0.1, resume: Optional[str] = None, p_drop_colour: float = 0.0
                            ) -> tuple[PartiTransformer, TrainResult]:
    """Train the encoder-decoder on cached token grids; return the EMA model (or the model) in eval mode."""
    model = build_parti(config, train_config.seed)
    empty = empty_prompt_ids(1, config.max_text_positions, config)[0]
    result = train(model, make_parti_loss(empty, p_uncond, p_drop_colour), data, train_config, resume=resume)
    trained = result.ema_model if result.ema_model is not None else result.model
    return trained.eval(), result


# --------------------------------------------------------------------------------------------- evaluation


def generate_parti_images(pipe, prompts: Sequence[str], seed: int = 0, batch_size: int = 50,
                          **sampling: Any) -> np.ndarray:
    """(n, H, W, 3) float images in [0, 1] from a PartiPipeline; the chunk of prompts starting at
    index s is drawn by one torch.Generator().manual_seed(seed + s). `sampling`: guidance_scale,
    temperature, top_k, top_p, num_candidates, reranker (None: the pipeline's defaults)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        out = pipe(chunk, generator=torch.Generator().manual_seed(seed + start), output_type="np",
                   progress=False, **sampling)
        images.append(out.images)
    return np.concatenate(images)


def evaluate_parti_adherence(pipe, prompts: Sequence[tuple[str, list]], seed: int = 0, batch_size: int = 50,
                             **sampling: Any) -> tuple[dict, np.ndarray]:
    """Generate one image per (prompt, scene) with a PartiPipeline and grade it: ({attribute: fraction}, images)."""
    images = generate_parti_images(pipe, [p for p, _ in prompts], seed, batch_size, **sampling)
    scores = [safe_score(image, scene) for image, (_, scene) in zip(images, prompts)]
    return summarise(scores), images


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
