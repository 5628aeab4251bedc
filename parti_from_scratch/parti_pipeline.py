"""Text -> text tokens -> encoder -> image tokens one at a time -> VQGAN decoder -> image: the real Parti's pipeline.

Parti (Yu et al. 2022, arXiv 2206.10789) in four steps, each a component of `PartiPipeline`:

1. tokenize the prompt (`tokenizer`, a byte-level BPE: `parti/text_tokenizer.py`);
2. write the image's tokens in raster order with the encoder-decoder (`transformer`,
   `parti/transformer.py`): y_i ~ p(y_i | y_<i, x), with classifier-free guidance on the logits
   l = l_uncond + lambda (l_cond - l_uncond) and temperature / top-k / top-p
   (`parti/sampling.py`), a preallocated KV cache, a progress bar over the tokens;
3. turn the token grid back into pixels with the image tokenizer's decoder (`vqvae`, a VQModel);
4. optionally draw `num_candidates` images per output and keep the one CLIP scores highest
   against the prompt (`parti/reranking.py`; Parti keeps the best of 16).

There is no noise schedule and no denoising loop: the tutorial's description of Parti as
a diffusion model is corrected in the README ("The real Parti").

`PartiPipeline.from_pretrained(folder)` reads min-dalle's DALL·E mini / mega files or a
folder in this pipeline's own layout (what `save_pretrained` writes):

    text_tokenizer/   vocab.json, merges.txt, tokenizer_config.json
    transformer/      config.json (PartiTransformerConfig), model.safetensors
    vqvae/            a diffusers VQModel folder, or a ValueChromaVQModel folder (parti/value_chroma.py)
    sampling_defaults.json   guidance_scale, temperature, top_k, top_p, num_candidates
    reranker/         optional: a transformers CLIPModel folder (both towers) and its tokenizer, the scorer
                      num_candidates > 1 uses when the call passes none

Calls follow `TextToImagePipeline`'s conventions where they apply: `pipe(prompt,
num_images_per_prompt=, guidance_scale=, generator=, output_type=)`, `.images`,
components as attributes, arguments checked before any work with errors naming them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import torch

from parti_from_scratch.configuration import ConfigError, read_json
from parti_from_scratch.outputs import ModelOutput
from parti_from_scratch.parti.reranking import clip_pixel_values, rerank_by_clip_score
from parti_from_scratch.parti.sampling import check_sampling_arguments, generate_image_tokens
from parti_from_scratch.pipeline import (PromptType, _as_list, _is_int, postprocess_image, to_arguments,
                                        warn_at_caller)

SAMPLING_FILE = "sampling_defaults.json"
# the Parti the package ships: a pipeline folder once trained (train/parti_recipe.py); its tokenizer is in vqvae/
PARTI_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "parti_model"
PARTI_MODEL_NAME = "parti"           # what the command line calls it: `generate "..." --model parti`
TRAIN_PARTI_COMMAND = "torchrun --nproc_per_node 2 -m parti_from_scratch.train.parti_recipe --out runs/parti"
NO_RERANKER = ("num_candidates={n} needs a scorer{where}: pass reranker=(CLIPModel, CLIPTokenizer), a full CLIP "
               "with both towers (e.g. one trained with `parti-from-scratch train clip`, saved in <out>/clip/model, or "
               "openai/clip-vit-base-patch32 via CLIPModel.from_pretrained); the package ships only a CLIP text "
               "encoder, which cannot score images; or save a pipeline with a reranker so its folder holds reranker/")


class ShippedPartiMissingError(FileNotFoundError):
    """The package's Parti folder holds no trained Transformer (yet)."""


def shipped_parti_folder() -> Path:
    """The shipped Parti's folder, or ShippedPartiMissingError saying it is not trained yet and how to train it."""
    folder = Path(PARTI_MODEL_DIR)
    if not (folder / "transformer" / "config.json").is_file():
        raise ShippedPartiMissingError(
            f"the shipped Parti is not trained yet: {folder} holds only its image tokenizer (vqvae/), no "
            f"transformer/. Train it with `{TRAIN_PARTI_COMMAND}` and load runs/parti/pipeline "
            f"(PartiPipeline.from_pretrained(\"runs/parti/pipeline\"), --model runs/parti/pipeline)")
    return folder


def check_num_candidates(num_candidates: Any) -> None:
    if not _is_int(num_candidates) or num_candidates < 1:
        raise ValueError(f"num_candidates must be an integer >= 1, got {num_candidates!r}")


@dataclass(frozen=True)
class PartiSamplingDefaults:
    """What a Parti model folder recommends; the field names are the keys of its sampling_defaults.json."""
    guidance_scale: float = 1.2            # lambda of classifier-free guidance (Parti §2.3: 1.2)
    temperature: float = 1.0               # T of softmax(l / T)
    top_k: Optional[int] = None            # keep the k most likely tokens (None: no top-k filter)
    top_p: Optional[float] = None          # keep the nucleus of mass p (None: no top-p filter)
    num_candidates: int = 1                # images drawn per output and reranked by CLIP (Parti: 16)

    def __post_init__(self):
        try:
            check_sampling_arguments(self.temperature, self.top_k, self.top_p, self.guidance_scale)
            check_num_candidates(self.num_candidates)
        except ValueError as e:
            raise ConfigError(f"{SAMPLING_FILE}: {e}") from None

    @classmethod
    def read(cls, folder: Union[str, Path]) -> "PartiSamplingDefaults":
        """folder/sampling_defaults.json, or the defaults above when the folder has none."""
        path = Path(folder) / SAMPLING_FILE
        if not path.is_file():
            return cls()
        values = read_json(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {str(e).removeprefix(SAMPLING_FILE + ': ')}") from None

    def save(self, folder: Union[str, Path]) -> Path:
        path = Path(folder) / SAMPLING_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path


# min-dalle's `generate_image` defaults, used for its folders (it has no sampling_defaults.json)
MIN_DALLE_DEFAULTS = PartiSamplingDefaults(guidance_scale=16.0, temperature=1.0, top_k=256)


@dataclass
class PartiPipelineOutput(ModelOutput):
    """`images`: PIL images, an (N, H, W, 3) array in [0, 1] ("np"), an (N, 3, H, W) tensor ("pt"), or the token
    grids (N, rows, columns) ("tokens"); `clip_scores`: the kept candidates' CLIP similarity (None without reranking)."""
    images: Any
    clip_scores: Optional[torch.Tensor] = None


class PartiPipeline:
    """The Parti pipeline. Components are attributes: `tokenizer`, `transformer`, `vqvae` (and `reranker`,
    a (CLIPModel, CLIPTokenizer) pair or None, read from a folder's reranker/); `sampling_defaults`: what a call
    uses when it names nothing."""

    OUTPUT_TYPES = ("pil", "np", "pt", "tokens")

    def __init__(self, tokenizer, transformer, vqvae, sampling_defaults: Optional[PartiSamplingDefaults] = None,
                 reranker: Optional[Tuple[Any, Any]] = None, *, source: Union[str, Path, None] = None):
        """source: the folder the pipeline was loaded from (named by errors), None when built in memory."""
        config = transformer.config
        n_ids = max(tokenizer.get_vocab().values()) + 1
        if n_ids > config.vocab_size:
            # BART's vocab.json has <mask> (id 50264) beyond DALL·E mini's 50264 embeddings; only a
            # typed "<mask>" could reach it, and the tokenizer never produces special tokens from text
            ordinary = max(i for t, i in tokenizer.get_vocab().items() if t != "<mask>") + 1
            if ordinary > config.vocab_size:
                raise ValueError(f"the tokenizer has token ids up to {ordinary - 1}, beyond the encoder's "
                                 f"vocab_size {config.vocab_size}")
        if vqvae.codebook_size < config.codebook_size:
            raise ValueError(f"the transformer draws {config.codebook_size} image codes, the vqvae's codebook has "
                             f"{vqvae.codebook_size}")
        factors = getattr(vqvae, "codebook_factors", None)
        if config.codebook_factors is not None and tuple(config.codebook_factors) != factors:
            raise ValueError(f"the transformer's codes factor as {tuple(config.codebook_factors)}, the vqvae's "
                             f"as {factors}")
        # the encoder's learned positions bound the prompt's length
        tokenizer.model_max_length = min(tokenizer.model_max_length, config.max_text_positions)
        self.tokenizer, self.transformer, self.vqvae = tokenizer, transformer, vqvae
        self.sampling_defaults = sampling_defaults if sampling_defaults is not None else PartiSamplingDefaults()
        self.reranker = self._checked_reranker(reranker)
        self.source = None if source is None else Path(source)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: Union[str, Path, None] = None, *, dtype: Optional[torch.dtype] = torch.float32,
                        variant: Optional[str] = None) -> "PartiPipeline":
        """Load a min-dalle folder (encoder[_mini].pt, decoder[_mini].pt, detoker.pt, vocab.json, merges.txt;
        variant "mega" or "mini" when it holds both) or a folder written by `save_pretrained`; with no path,
        the Parti the package ships (`PARTI_MODEL_DIR`).
        (The documented upward edge to weights_convert, which knows the file layouts.)"""
        from weights_convert.parti_pipeline_loader import load_parti_pipeline
        return load_parti_pipeline(cls, path, dtype=dtype, variant=variant)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write text_tokenizer/, transformer/, vqvae/, sampling_defaults.json and, with a reranker, reranker/
        (the documented upward edge to weights_convert, which knows the layout)."""
        from weights_convert.parti_pipeline_loader import save_parti_pipeline
        save_parti_pipeline(self, folder)

    @property
    def components(self) -> dict:
        """`PartiPipeline(**pipe.components)` rebuilds the pipeline."""
        return {"tokenizer": self.tokenizer, "transformer": self.transformer, "vqvae": self.vqvae,
                "sampling_defaults": self.sampling_defaults, "reranker": self.reranker}

    def to(self, *args: Union[str, torch.device, torch.dtype], device: Union[str, torch.device, None] = None,
           dtype: Optional[torch.dtype] = None) -> "PartiPipeline":
        """Move the models (and the reranker's CLIP) to a device and/or floating-point dtype, as
        `TextToImagePipeline.to`: `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to(device=..., dtype=...)`."""
        device, dtype = to_arguments(args, device, dtype)
        models = [self.transformer, self.vqvae] + ([self.reranker[0]] if self.reranker else [])
        for m in models:
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # ------------------------------------------------------------------ steps
    def encode_prompt(self, prompts: List[str]):
        """(input_ids, attention_mask), each (n, max_text_positions): <s> ids </s> then padding, truncated with a
        warning when longer than the encoder's positions."""
        out = self.tokenizer(prompts, padding="max_length", max_length=self.transformer.config.max_text_positions,
                             truncation=True, return_tensors="pt")
        return out.input_ids.to(self.device), out.attention_mask.to(self.device)

    @torch.no_grad()
    def clip_scores(self, prompts: List[str], images: torch.Tensor, num_candidates: int,
                    reranker: Tuple[Any, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(best (n,), scores (n, c)): each prompt's c candidate images (n*c, 3, H, W) in [-1, 1] scored by CLIP."""
        clip, clip_tokenizer = reranker
        ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(clip.device)
        text_embeds = clip.get_text_features(ids)
        pixels = clip_pixel_values(images, clip.config.vision_config.image_size).to(clip.device, clip.dtype)
        # (n*c, D) -> (n, c, D)
        image_embeds = clip.get_image_features(pixels).view(len(prompts), num_candidates, -1)
        return rerank_by_clip_score(text_embeds, image_embeds)

    @torch.no_grad()
    def __call__(self, prompt: PromptType, num_images_per_prompt: int = 1, guidance_scale: Optional[float] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 num_candidates: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 output_type: str = "pil", reranker: Optional[Tuple[Any, Any]] = None, progress: bool = True,
                 return_dict: bool = True) -> Union[PartiPipelineOutput, tuple]:
        """Generate num_images_per_prompt images for each prompt.

        guidance_scale lambda (>= 0; 1 = no guidance, one row per image), temperature (> 0), top_k (>= 1),
        top_p (in (0, 1]), num_candidates (>= 1): None takes the folder's own (`self.sampling_defaults`;
        min-dalle folders: min-dalle's guidance 16, top-k 256). top_k / top_p of the defaults are switched off
        by passing top_k=self.transformer.config.codebook_size / top_p=1.0.
        num_candidates > 1: draw that many images per output and keep the one CLIP scores highest against
            the prompt (needs `reranker=(CLIPModel, CLIPTokenizer)`, here, at construction, or the folder's
            reranker/ read by from_pretrained).
        generator: one torch.Generator; the same seed gives the same tokens.
        output_type: "pil", "np", "pt" (pixels in [0, 1]) or "tokens" (the image-token grids, not decoded).
        """
        d = self.sampling_defaults
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
        temperature = d.temperature if temperature is None else temperature
        top_k = d.top_k if top_k is None else top_k
        top_p = d.top_p if top_p is None else top_p
        num_candidates = d.num_candidates if num_candidates is None else num_candidates
        prompts = self._checked_prompts(prompt)
        check_sampling_arguments(temperature, top_k, top_p, guidance_scale)
        check_num_candidates(num_candidates)
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in self.OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {self.OUTPUT_TYPES}, got {output_type!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        reranker = self._checked_reranker(reranker) if reranker is not None else self.reranker
        if num_candidates > 1 and reranker is None:
            where = f" ({self.source} has no {self.source / 'reranker'}/ and none was passed)" if self.source else ""
            raise ValueError(NO_RERANKER.format(n=num_candidates, where=where))

        # 1. text tokens, one row per drawn image: (n * m * c, T)
        ids, mask = self.encode_prompt(prompts)
        per_prompt = num_images_per_prompt * num_candidates
        ids, mask = ids.repeat_interleave(per_prompt, dim=0), mask.repeat_interleave(per_prompt, dim=0)
        # 2. image tokens y_i ~ p(y_i | y_<i, x) in raster order: (n * m * c, rows, columns)
        tokens = generate_image_tokens(self.transformer, ids, mask, guidance_scale=guidance_scale,
                                       temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                       progress=progress)
        scores = None
        if output_type == "tokens" and num_candidates == 1:
            out = PartiPipelineOutput(images=tokens)
            return out if return_dict else out.to_tuple()
        # 3. pixels: x = G(e_y), (N, 3, H, W) in [-1, 1]
        x = self.vqvae.decode_indices(tokens)
        if num_candidates > 1:
            # 4. keep the best of each output's c candidates
            outputs = [p for p in prompts for _ in range(num_images_per_prompt)]
            best, all_scores = self.clip_scores(outputs, x, num_candidates, reranker)
            keep = torch.arange(len(outputs), device=best.device) * num_candidates + best
            x, tokens = x[keep.to(x.device)], tokens[keep.to(tokens.device)]
            scores = all_scores.gather(1, best[:, None])[:, 0]
        images = tokens if output_type == "tokens" else postprocess_image(x, output_type)
        out = PartiPipelineOutput(images=images, clip_scores=scores)
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ checks
    def _checked_prompts(self, prompt: PromptType) -> List[str]:
        """The prompts as a list; an empty one is an error, one with no token this vocabulary reads a warning."""
        prompts = _as_list(prompt)
        for index, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompt {index} is empty: give some text (the unconditional prompt is used by "
                                 "guidance on its own)")
            if len(self.tokenizer.encode(p)) <= 2:
                warn_at_caller(f"prompt {p!r} has no token this tokenizer reads (it keeps ASCII characters only): "
                               "the images will not depend on it")
        return prompts

    @staticmethod
    def _checked_reranker(reranker: Any) -> Optional[Tuple[Any, Any]]:
        if reranker is None:
            return None
        if not (isinstance(reranker, (tuple, list)) and len(reranker) == 2):
            raise TypeError("reranker must be a (CLIPModel, CLIPTokenizer) pair")
        clip, clip_tokenizer = reranker
        if not (hasattr(clip, "get_image_features") and hasattr(clip, "get_text_features")):
            raise TypeError(f"reranker: {type(clip).__name__} is not a full CLIPModel (it needs both towers: "
                            "get_text_features and get_image_features)")
        if not callable(clip_tokenizer):
            raise TypeError("reranker: the second item must be the CLIP model's tokenizer")
        return clip, clip_tokenizer
