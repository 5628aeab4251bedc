"""examples/tutorial_5_3.py, the tutorial's listing corrected, gives the pipeline's image."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from parti_from_scratch import TextToImagePipeline

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_listing_equals_pipeline(tmp_path, clip_vocab_dir):
    from test_pipeline import SD1, build_reference_pipeline
    folder = tmp_path / "tiny"
    build_reference_pipeline(folder, SD1, clip_vocab_dir)
    out = tmp_path / "listing.png"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "tutorial_5_3.py"), "--model", str(folder),
                          "--prompt", "a red circle", "--steps", "5", "--guidance", "7.5", "--seed", "3",
                          "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    listing = np.asarray(Image.open(out)).astype(int)
    pipe = TextToImagePipeline.from_pretrained(folder)
    expected = pipe("a red circle", num_inference_steps=5, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(3), progress=False).images[0]
    # 8-bit pixels: the two float32 images differ by < 1/255 (measured 0; each 9.5e-7 from float64), so a rounded
    # pixel can move by at most one level, where its value sits at a rounding midpoint
    assert np.abs(listing - np.asarray(expected).astype(int)).max() <= 1
