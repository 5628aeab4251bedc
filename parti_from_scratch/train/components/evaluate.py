"""Measuring a trained model: CLIP retrieval, and the checker's grades of generated images.

* Text-to-image retrieval (Radford et al. 2021, §3): for each of n captions,
  rank n images by cos(text, image); top-1 is the fraction whose own image
  ranks first. The n images have distinct canonical captions, so every query
  has exactly one right answer.
* Adherence: one image per prompt, each from its own seeded generator, graded
  by `data.score`; `data.summarise` gives the fraction right per attribute
  (count, position, colour, shape, size, exact).
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from parti_from_scratch.clip.model import CLIPModel
from parti_from_scratch.clip.tokenizer import CLIPTokenizer
from parti_from_scratch.data import Score, ShapesDataset, caption, score, summarise
from parti_from_scratch.figures import save_figure

from .clip import tokenize


@torch.no_grad()
def clip_retrieval(model: CLIPModel, tokenizer: CLIPTokenizer, split: str = "test", n: int = 100,
                   seed: int = 0) -> dict:
    """Text-to-image (and image-to-text) top-1 among up to n images of `split` with distinct canonical captions.

    Returns {"text_to_image_top1", "image_to_text_top1", "n"}; n is smaller when the split
    has fewer distinct scenes (heldout_single has 40).
    """
    pool = ShapesDataset(split, size=max(20 * n, 1000), seed=seed, caption_variety=False)
    chosen, seen = [], set()
    for i, scene in enumerate(pool.scenes):
        text = caption(scene)
        if text not in seen:
            seen.add(text)
            chosen.append(i)
        if len(chosen) == n:
            break
    device = next(model.parameters()).device
    images = torch.stack([pool[i][0] for i in chosen]).to(device)
    ids = tokenize(tokenizer, [pool.captions[i] for i in chosen]).to(device)
    out = model(input_ids=ids, pixel_values=images)
    # (n_txt, n_img): row j ranks the images for caption j
    logits_per_text = out.logits_per_text
    target = torch.arange(len(chosen), device=device)
    return {"text_to_image_top1": (logits_per_text.argmax(1) == target).float().mean().item(),
            "image_to_text_top1": (logits_per_text.argmax(0) == target).float().mean().item(),
            "n": len(chosen)}


def generate_images(pipe, prompts: Sequence[str], steps: int, guidance: float, seed: int = 0,
                    scheduler: Optional[str] = None, batch_size: int = 32) -> np.ndarray:
    """(n, 64, 64, 3) float images in [0, 1]; image i comes from torch.Generator().manual_seed(seed + i)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   output_type="np", scheduler=scheduler, progress=False)
        images.append(out.images)
    return np.concatenate(images)


def evaluate_adherence(pipe, prompts: Sequence[tuple[str, list]], steps: int, guidance: float, seed: int = 0,
                       scheduler: Optional[str] = None, batch_size: int = 32) -> tuple[dict, np.ndarray]:
    """Generate one image per (prompt, scene) and grade it: ({attribute: fraction right}, images)."""
    images = generate_images(pipe, [p for p, _ in prompts], steps, guidance, seed, scheduler, batch_size)
    scores = [safe_score(image, scene) for image, (_, scene) in zip(images, prompts)]
    return summarise(scores), images


def safe_score(image: np.ndarray, scene: list) -> Score:
    """data.score, with an image the checker cannot read graded as wrong in every attribute.

    The checker's shape fit looks through a window padded by 16 px; a blob far
    larger than any true object near the border (a failed sample) falls outside
    it and numpy raises ValueError. Such an image is not the prompt's scene.
    """
    try:
        return score(image, scene)
    except ValueError:
        named_size = any(o.size is not None for o in scene)
        return Score(count=False, position=False, colour=False, shape=False,
                     size=False if named_size else None, exact=False)


def wrap_label(text: str, width: int) -> list[str]:
    """A grid title as lines of at most `width` characters; each object of a two-object prompt starts a
    line ("... on the left" / "and a blue square ...")."""
    parts = re.split(r" (?=and\b)", text)
    return [line for part in parts for line in textwrap.wrap(part, width, break_long_words=True)] or [""]


def image_grid_figure(images: np.ndarray, columns: int = 8, labels: Optional[list] = None, scale: int = 2,
                      colours: Optional[list] = None):
    """The matplotlib figure of `save_image_grid` (see there)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    fontsize = 5 + scale
    panel = 1.1 * scale                                    # inches per image
    # characters per line: a glyph of DejaVu Sans is about 0.6 em wide, 1 em = fontsize points, 72 points an inch
    width = max(8, int(panel * 72 / (0.6 * fontsize)))
    titles = [wrap_label(str(label), width) for label in labels] if labels is not None else []
    lines = max((len(t) for t in titles), default=0)
    title_height = lines * 1.25 * fontsize / 72            # inches of title above each image
    fig, axes = plt.subplots(rows, columns, figsize=(columns * (panel + 0.1), rows * (panel + title_height + 0.15)),
                             squeeze=False, layout="constrained")
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(np.clip(images[k], 0, 1), interpolation="nearest")
            if titles:
                ax.set_title("\n".join(titles[k]), fontsize=fontsize, linespacing=1.05,
                             color=colours[k] if colours is not None else "black")
    return fig


def save_image_grid(images: np.ndarray, path: Union[str, Path], columns: int = 8, labels: Optional[list] = None,
                    scale: int = 2, colours: Optional[list] = None) -> Path:
    """Images (n, H, W, 3) in [0, 1] -> one PNG, `columns` per row, each enlarged `scale` times, with titles
    wrapped to the width of their image (rows grow to hold the longest title) in `colours` (default black)."""
    return save_figure(image_grid_figure(images, columns, labels, scale, colours), path, dpi=100)
