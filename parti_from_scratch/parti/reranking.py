"""Reranking: draw several images per prompt, keep the one a contrastive model finds closest to the prompt.

Parti (Yu et al. 2022, arXiv 2206.10789, §2.3 and §5) samples 16 images per prompt and
reranks them by the similarity a contrastive image-text model (CoCa) gives each
(image, prompt) pair. Here the scorer is CLIP (Radford et al. 2021, arXiv 2103.00020,
§2.3): its two towers map the prompt and each candidate image onto the unit sphere of one
joint space, where the cosine is the similarity CLIP was trained to rank:

    s_j = <T_e, I_e,j> = cos(W_t f_text(prompt), W_i f_image(x_j))          (CLIP's logits / exp(t))
    best = argmax_j s_j

Images come out of the VQGAN in [-1, 1]; CLIP reads them resized to its image size
and normalised with the mean and standard deviation of its training images
(`clip_pixel_values`).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

# The per-channel mean and standard deviation of CLIP's training images (openai/CLIP's preprocessing).
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def rerank_by_clip_score(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """s_j = cos(T, I_j) for each prompt's candidates, and best = argmax_j s_j.

    text_embeds (n, D): one per prompt; image_embeds (n, c, D): its c candidates (not yet normalised).
    Returns (best (n,) int64, scores (n, c)). Ties go to the first candidate (torch.argmax).
    """
    # T_e, I_e on the unit sphere: (n, 1, D), (n, c, D)
    t = F.normalize(text_embeds.float(), dim=-1)[:, None, :]
    i = F.normalize(image_embeds.float(), dim=-1)
    # s_j = <T_e, I_e,j>: (n, c)
    scores = (t * i).sum(dim=-1)
    return scores.argmax(dim=-1), scores


def clip_pixel_values(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """VQGAN output (b, 3, H, W) in [-1, 1] -> CLIP's input (b, 3, s, s): [0, 1], bicubic resize, (x - mean) / std."""
    # [-1, 1] -> [0, 1]
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True)
    mean = x.new_tensor(CLIP_IMAGE_MEAN)[:, None, None]
    std = x.new_tensor(CLIP_IMAGE_STD)[:, None, None]
    return (x - mean) / std
