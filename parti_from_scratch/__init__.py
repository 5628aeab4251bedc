"""parti_from_scratch: text-to-image generation written from scratch, equation by equation.

Read beside the tutorial "Parti原理与代码实例讲解". The public names mirror the
ones its listing imports, so the listing runs with only its import lines changed:

    from parti_from_scratch import (CLIPTokenizer, CLIPTextModel, AutoencoderKL,
                                    UNet2DConditionModel, PNDMScheduler, TextToImagePipeline)

Names are resolved lazily, so `import parti_from_scratch` stays fast and a
reader can import one chapter's module without building the others.

This module is the package's facade: the top layer of docs/ARCHITECTURE.md.
It names every public class, so nothing inside the package imports it; modules
import each other by their full names (`from parti_from_scratch.unet import ...`).
tests/test_import_graph.py reads the table below as this module's imports.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "CLIPTokenizer": "parti_from_scratch.clip.tokenizer",
    "CLIPTextModel": "parti_from_scratch.clip.model",
    "CLIPVisionModel": "parti_from_scratch.clip.model",
    "CLIPModel": "parti_from_scratch.clip.model",
    "clip_loss": "parti_from_scratch.clip.loss",
    "AutoencoderKL": "parti_from_scratch.vae",
    "UNet2DConditionModel": "parti_from_scratch.unet",
    "DDPMScheduler": "parti_from_scratch.diffusion.schedulers",
    "DDIMScheduler": "parti_from_scratch.diffusion.schedulers",
    "PNDMScheduler": "parti_from_scratch.diffusion.schedulers",
    "EulerDiscreteScheduler": "parti_from_scratch.diffusion.schedulers",
    "DPMSolverMultistepScheduler": "parti_from_scratch.diffusion.schedulers",
    "TextToImagePipeline": "parti_from_scratch.pipeline",
    "VQModel": "parti_from_scratch.parti.vqgan",
    "ViTVQModel": "parti_from_scratch.parti.vit_vqgan",
    "ValueChromaVQModel": "parti_from_scratch.parti.value_chroma",
    "PartiPipeline": "parti_from_scratch.parti_pipeline",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'parti_from_scratch' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
