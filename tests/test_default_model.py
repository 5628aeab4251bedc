"""The model the package ships: it loads, it draws what it is asked for, it warns about words it never saw."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from parti_from_scratch.cli import main
from parti_from_scratch.data import VOCABULARY, eval_prompts
from parti_from_scratch.pipeline import DEFAULT_MODEL_DIR, TextToImagePipeline
from parti_from_scratch.sampling_defaults import FILE_NAME, SamplingDefaults
from parti_from_scratch.train.components import evaluate_adherence

# Measured on the shipped model at its settings (20 DPM-Solver++ steps, guidance 5.0, seed 0): 12 of these
# 12 prompts exact (100%), 100% on all 140 single-object training prompts (RECIPE.md in its folder).
# This floor only catches a broken model (an untrained one scores 0), not a slightly worse one.
MIN_EXACT_SINGLE = 0.5


@pytest.fixture(scope="module")
def pipe():
    return TextToImagePipeline.from_pretrained()


def test_shipped_folder_is_complete_and_small():
    for name in ("model_index.json", "vocabulary.txt", "recipe.json", "RECIPE.md", FILE_NAME, "tokenizer",
                 "text_encoder", "unet", "vae", "scheduler"):
        assert (DEFAULT_MODEL_DIR / name).exists(), name
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 30e6, f"{size / 1e6:.1f} MB"
    assert (DEFAULT_MODEL_DIR / "vocabulary.txt").read_text().split() == sorted(VOCABULARY)
    info = json.loads((DEFAULT_MODEL_DIR / "recipe.json").read_text())
    assert {"clip", "vae", "unet"} <= set(info["components"])


def test_shipped_model_draws_single_objects(pipe):
    prompts = eval_prompts("single", n=12, seed=0)
    defaults = pipe.sampling_defaults
    summary, images = evaluate_adherence(pipe, prompts, defaults.num_inference_steps, defaults.guidance_scale, seed=0)
    assert images.shape == (12, 64, 64, 3)
    assert summary["exact"] >= MIN_EXACT_SINGLE, summary


def test_unknown_words_warn_with_their_names(pipe):
    with pytest.warns(UserWarning, match="never saw these words.*(dragon.*purple|purple.*dragon)"):
        pipe("a purple dragon on the left", num_inference_steps=1, guidance_scale=1.0,
             generator=[torch.Generator().manual_seed(0)], output_type="np", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a large red circle on the left", num_inference_steps=1, guidance_scale=1.0,
             generator=[torch.Generator().manual_seed(0)], output_type="np", progress=False)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "pndm", "euler", "dpm"])
def test_every_sampler_runs_on_the_shipped_model(pipe, name):
    # the shipped config is DPM-Solver++'s (variance_type: null); DDPM built from it keeps its own default
    out = pipe("a large red circle on the left", num_inference_steps=4,
               generator=[torch.Generator().manual_seed(0)], output_type="np", scheduler=name, progress=False)
    assert out.images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(out.images)).all())
    if name == "ddpm":
        from parti_from_scratch.diffusion.schedulers import DDPMScheduler
        assert DDPMScheduler.from_config(pipe.scheduler.config).config.variance_type == "fixed_small"


def test_shipped_recipe_is_the_default_recipe():
    # `train all` with no options retrains exactly the shipped settings
    from parti_from_scratch.train.default_recipe import default_recipe
    info = json.loads((DEFAULT_MODEL_DIR / "recipe.json").read_text())
    assert info["recipe"] == default_recipe().to_dict()


def test_shipped_sampling_defaults_are_the_recipes():
    # the folder's sampling_defaults.json is what training wrote from the recipe's sampler settings
    from parti_from_scratch.train.default_recipe import default_recipe
    recipe = default_recipe()
    defaults = SamplingDefaults.read(DEFAULT_MODEL_DIR)
    assert (defaults.num_inference_steps, defaults.guidance_scale) == (recipe.sampler_steps, recipe.guidance_scale)
    # and differs from the fallback, so the tests below would notice the file not being read
    assert defaults != SamplingDefaults()


def test_pipeline_reads_the_folders_sampling_defaults(pipe):
    assert pipe.sampling_defaults == SamplingDefaults.read(DEFAULT_MODEL_DIR)


def test_python_call_and_generate_command_draw_the_same_image(pipe, tmp_path, capsys):
    """pipe(prompt) with no sampler arguments and `parti-from-scratch generate PROMPT` use the same
    defaults, so the same seed gives the same pixels (both save 8-bit RGB from the same float image)."""
    prompt = "a large red circle on the left"
    python = np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(3), progress=False).images[0])
    out = tmp_path / "cli.png"
    assert main(["generate", prompt, "--seed", "3", "-o", str(out), "--quiet"]) == 0
    command = np.asarray(Image.open(out).convert("RGB"))
    assert python.shape == command.shape == (64, 64, 3)
    assert np.array_equal(python, command)
    # the defaults matter: another step count gives another image
    other = np.asarray(pipe(prompt, num_inference_steps=pipe.sampling_defaults.num_inference_steps + 5,
                            generator=torch.Generator().manual_seed(3), progress=False).images[0])
    assert not np.array_equal(python, other)


def test_trained_pipeline_folder_carries_the_recipes_sampling_defaults(tmp_path):
    """write_pipeline (the end of `train`) saves the recipe's sampler_steps and guidance_scale in the folder,
    and loading the folder brings them back; recipe.json stays the training record."""
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    from parti_from_scratch.train.components import build_clip, build_unet, build_vae
    from parti_from_scratch.train.default_recipe import tiny_recipe, write_pipeline
    recipe = tiny_recipe()
    torch.manual_seed(0)
    folder = write_pipeline(tmp_path / "pipeline", recipe, CLIPTokenizer(), build_clip(recipe.clip).text_model,
                            build_unet(recipe.unet), build_vae(recipe.vae), results={})
    expected = {"num_inference_steps": recipe.sampler_steps, "guidance_scale": recipe.guidance_scale,
                "training_resolution": 64}
    assert json.loads((folder / FILE_NAME).read_text()) == expected
    assert json.loads((folder / "recipe.json").read_text())["recipe"]["sampler_steps"] == recipe.sampler_steps
    loaded = TextToImagePipeline.from_pretrained(folder)
    assert loaded.sampling_defaults == SamplingDefaults(**expected)
