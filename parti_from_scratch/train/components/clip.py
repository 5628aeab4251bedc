"""Training CLIP on the shapes dataset: the contrastive loss of tutorial §4.3.

Radford et al. 2021, arXiv 2103.00020, §2.3 and Figure 3. Each step draws B
(image, caption) pairs; the text tower encodes the B captions, the vision tower
the B images, and the symmetric cross-entropy of

    logits = exp(t) * I_e T_e^T          (B x B, true pairs on the diagonal)

pulls each image towards its own caption and away from the B - 1 others. Both
towers and the temperature t are trained together. Under torchrun every process
gathers the embeddings of the whole global batch first (`gather_global_batch`),
so the negatives are those of the global batch, as in one process.

The text tower alone becomes the pipeline's text encoder: its per-token states
(b, 77, d) are the UNet's cross-attention context.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch

from parti_from_scratch.clip.loss import clip_loss
from parti_from_scratch.clip.model import CLIPConfig, CLIPModel
from parti_from_scratch.clip.tokenizer import CLIPTokenizer

from ..distributed import gather_global_batch
from ..loop import StepRNG, TrainConfig, TrainResult, train
from .common import seeded_init

# CLIP clips exp(t) at 100 so the logits cannot grow without bound (Radford et al. 2021, §2.5)
MAX_LOGIT_SCALE = math.log(100.0)


def build_clip(config: Union[dict, CLIPConfig], seed: int = 0) -> CLIPModel:
    """A freshly initialised CLIPModel from a transformers-style config dict; weights depend on `seed` only."""
    if isinstance(config, dict):
        config = CLIPConfig(**config)
    return seeded_init(lambda: CLIPModel(config), seed)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], cache: Optional[dict] = None) -> torch.Tensor:
    """Captions -> (b, 77) token ids, padded as the pipeline pads them; `cache` remembers each caption's ids."""
    cache = {} if cache is None else cache
    missing = sorted({c for c in captions if c not in cache})
    if missing:
        ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        cache.update(zip(missing, ids))
    return torch.stack([cache[c] for c in captions])


def clip_collate(tokenizer: CLIPTokenizer) -> Callable[[list], tuple[torch.Tensor, torch.Tensor]]:
    """[(image (3, 64, 64), caption)] -> (pixel_values (b, 3, 64, 64), input_ids (b, 77))."""
    cache: dict[str, torch.Tensor] = {}

    def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in samples])
        return images, tokenize(tokenizer, [text for _, text in samples], cache)
    return collate


def clip_loss_fn(model: CLIPModel, batch: Any, rng: StepRNG) -> tuple[torch.Tensor, dict]:
    """The CLIP loss of the global batch: symmetric cross-entropy of exp(t) I_e T_e^T (tutorial §4.3)."""
    pixel_values, input_ids = batch
    out = model(input_ids=input_ids, pixel_values=pixel_values)
    # this process's (b, D) rows -> the global batch's (B, D): the negatives span all processes
    image_embeds = gather_global_batch(out.image_embeds)
    text_embeds = gather_global_batch(out.text_embeds)
    logit_scale = model.logit_scale.clamp(max=MAX_LOGIT_SCALE)
    loss = clip_loss(image_embeds, text_embeds, logit_scale)
    with torch.no_grad():
        # how often each text's best image is its own, within the batch
        logits_per_text = text_embeds @ image_embeds.t()
        accuracy = (logits_per_text.argmax(dim=1) == torch.arange(len(text_embeds), device=text_embeds.device))
    return loss, {"batch_top1": accuracy.float().mean().item(), "temperature": 1.0 / logit_scale.exp().item()}


def train_clip(config: Union[dict, CLIPConfig], dataset, train_config: TrainConfig,
               tokenizer: Optional[CLIPTokenizer] = None, resume: Union[str, None] = None
               ) -> tuple[CLIPModel, TrainResult]:
    """Train both towers on (image, caption) pairs; returns the EMA model (or the model without EMA)."""
    tokenizer = tokenizer or CLIPTokenizer()
    model = build_clip(config, train_config.seed)
    result = train(model, clip_loss_fn, dataset, train_config, collate=clip_collate(tokenizer), resume=resume)
    trained = result.ema_model if result.ema_model is not None else result.model
    return trained.eval(), result
