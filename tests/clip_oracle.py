"""Tiny random transformers CLIP models saved as folders: the reference the CLIP tests compare against.

Shared by tests/test_clip_model.py and tests/test_weights_convert_clip.py. transformers is imported
here only, as a test-time oracle; the library never imports it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch

from parti_from_scratch.clip import model as clip_model

transformers = pytest.importorskip("transformers")

# Three text towers: quick_gelu / gelu / the legacy eos_token_id=2 configs (pooling by argmax of the ids).
TEXT = {
    "quick_gelu-h32-l2-a2": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu",
                                 bos_token_id=998, eos_token_id=999, pad_token_id=0),
    "gelu-h64-l3-a4": dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, max_position_embeddings=20, hidden_act="gelu"),
    "eos2-h48-l2-a3": dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=3, max_position_embeddings=12, hidden_act="gelu_new",
                           bos_token_id=0, eos_token_id=2, pad_token_id=1),
}
VISION = {
    "quick_gelu-h32-l2-a2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=16, patch_size=4, hidden_act="quick_gelu"),
    "gelu-h64-l3-a4": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=24, patch_size=8, hidden_act="gelu"),
}
# CLIP model configs: (text tower, vision tower, projection_dim of the joint space)
PAIRS: Dict[str, Tuple[str, str, int]] = {
    "quick_gelu": ("quick_gelu-h32-l2-a2", "quick_gelu-h32-l2-a2", 24),
    "gelu": ("gelu-h64-l3-a4", "gelu-h64-l3-a4", 40),
    "legacy_eos": ("eos2-h48-l2-a3", "quick_gelu-h32-l2-a2", 16),
}
CLASSES = ("CLIPModel", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel",
           "CLIPVisionModelWithProjection")


def transformers_config(class_name: str, pair: str):
    text_name, vision_name, projection_dim = PAIRS[pair]
    text = transformers.CLIPTextConfig(**TEXT[text_name], projection_dim=projection_dim)
    vision = transformers.CLIPVisionConfig(**VISION[vision_name], projection_dim=projection_dim)
    if class_name == "CLIPModel":
        return transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       projection_dim=projection_dim)
    return text if "Text" in class_name else vision


def reference_model(class_name: str, pair: str, seed: int = 0) -> torch.nn.Module:
    """A transformers model with every parameter random (no zero biases, no unit LayerNorms), in eval mode."""
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(transformers_config(class_name, pair)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save_reference(class_name: str, pair: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    model = reference_model(class_name, pair, seed)
    model.save_pretrained(str(folder))
    return model


def token_batch(pair: str, seq_len: int = 10, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [bos, words..., eos, pad...] of three lengths, and the matching 1/0 attention_mask."""
    cfg = TEXT[PAIRS[pair][0]]
    vocab = cfg["vocab_size"]
    legacy = cfg.get("eos_token_id", 49407) == 2
    # legacy configs: the real end-of-text id is the vocabulary's last, and Stable Diffusion 1.x pads with it
    eos = vocab - 1 if legacy else cfg.get("eos_token_id", 49407)
    pad = vocab - 1 if legacy else cfg.get("pad_token_id", 1)
    bos = cfg.get("bos_token_id", 49406)
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((3, seq_len), pad)
    mask = torch.zeros(3, seq_len, dtype=torch.long)
    for row, n in enumerate((seq_len, seq_len - 3, 3)):
        words = torch.randint(3, vocab - 3, (n - 2,), generator=g)
        ids[row, :n] = torch.cat([torch.tensor([bos]), words, torch.tensor([eos])])
        mask[row, :n] = 1
    return ids, mask


def pixel_batch(pair: str, batch: int = 3, seed: int = 0) -> torch.Tensor:
    size = VISION[PAIRS[pair][1]]["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Case:
    """One CLIP config: a transformers folder per class, the reference model, and inputs."""

    def __init__(self, pair, root):
        self.pair = pair
        self.folder = {name: root / name for name in CLASSES}
        self.ref = {name: save_reference(name, pair, self.folder[name], seed=i) for i, name in enumerate(CLASSES)}
        self.ids, self.mask = token_batch(pair)
        self.pixels = pixel_batch(pair)

    def ours(self, name: str, folder_of: Optional[str] = None):
        """Our `name` class loaded from the transformers folder of `folder_of` (default: its own)."""
        return getattr(clip_model, name).from_pretrained(self.folder[folder_of or name])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().double() - b.detach().double()).abs().max().item()
