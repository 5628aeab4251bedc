"""The training pieces of the shipped model: each component's loss, caption dropout, train_default, CLI errors."""
from __future__ import annotations

import json

import pytest
import torch

from parti_from_scratch.data import ShapesDataset
from parti_from_scratch.train import StepRNG, TrainConfig, train
from parti_from_scratch.train.components import (LatentCaptionDataset, caption_dropout_mask, clip_collate,
                                                 clip_loss_fn, build_clip, build_unet, build_vae, make_unet_loss,
                                                 training_scheduler)
from parti_from_scratch.train.components.vae import finetune_decoder, image_collate, vae_loss_fn_with
from parti_from_scratch.train.default_recipe import smoke_recipe, train_default

pytestmark = pytest.mark.usefixtures("one_thread")


def _first_last(history, k=3):
    losses = [row["loss"] for row in history]
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def _config(tmp_path, steps, batch_size=16, lr=2e-3):
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=None, log_every=1, seed=0,
                       out_dir=str(tmp_path), device="cpu", progress=False)


def test_clip_contrastive_loss_decreases(tmp_path):
    from parti_from_scratch.clip.tokenizer import CLIPTokenizer
    recipe = smoke_recipe()
    data = ShapesDataset("train", size=16, seed=0)
    result = train(build_clip(recipe.clip), clip_loss_fn, data, _config(tmp_path, 30),
                   collate=clip_collate(CLIPTokenizer()))
    first, last = _first_last(result.history)
    # the loss starts near log(16) = 2.77 (chance) and must fall well below it on 16 pairs seen 30 times
    assert first > 2.0 and last < 0.8 * first, (first, last)


def test_vae_reconstruction_plus_kl_loss_decreases(tmp_path):
    data = ShapesDataset("train", size=16, seed=0)
    result = train(build_vae(smoke_recipe().vae), vae_loss_fn_with(1e-4), data, _config(tmp_path, 30, 8),
                   collate=image_collate)
    first, last = _first_last(result.history)
    assert last < 0.7 * first, (first, last)


def test_decoder_finetuning_of_a_frozen_vae_trains_the_decoder_only(tmp_path):
    """A trained VAE comes back frozen (an EMA copy); the second stage still trains its decoder, not its encoder."""
    data = ShapesDataset("train", size=16, seed=0)
    vae = build_vae(smoke_recipe().vae).eval().requires_grad_(False)
    vae.config.scaling_factor = 0.5
    tuned, _ = finetune_decoder(vae, data, _config(tmp_path, 3, 8))
    before, after = vae.state_dict(), tuned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("decoder.") for k in changed)
    assert tuned.config.scaling_factor == 0.5


def _latent_dataset(n=16, d=32):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 4, 8, 8, generator=g)
    states = torch.randn(n, 77, d, generator=g)
    return LatentCaptionDataset(mean, 0.01 * torch.ones_like(mean), states, torch.arange(n))


def test_unet_l_simple_decreases(tmp_path):
    recipe = smoke_recipe()
    data = _latent_dataset()
    loss_fn = make_unet_loss(training_scheduler(recipe.noise_schedule).alpha_bar, torch.zeros(77, 32), 1.0)
    result = train(build_unet(recipe.unet), loss_fn, data, _config(tmp_path, 40, 16, 3e-3))
    first, last = _first_last(result.history, 5)
    # an untrained net predicts eps with error ~1 per element; a few dozen steps must cut it clearly
    assert last < 0.8 * first, (first, last)


def test_caption_dropout_rate_is_ten_percent():
    drops = torch.cat([caption_dropout_mask(StepRNG(0, step, 1000, slice(None)), 0.1) for step in range(20)])
    # 20,000 Bernoulli(0.1) draws: standard error 0.002
    assert abs(drops.float().mean().item() - 0.1) < 0.01


def test_caption_dropout_feeds_the_empty_prompt_states():
    """Where a caption is dropped the UNet sees exactly c_empty, elsewhere its own caption's states."""
    seen = {}

    def fake_unet(x_t, t, encoder_hidden_states):
        seen["c"] = encoder_hidden_states
        return torch.zeros_like(x_t)

    batch_size = 200
    c = torch.randn(batch_size, 77, 8)
    empty = torch.full((77, 8), 7.0)
    alpha_bar = training_scheduler(smoke_recipe().noise_schedule).alpha_bar
    loss_fn = make_unet_loss(alpha_bar, empty, 1.0, p_uncond=0.1)
    mean = torch.zeros(batch_size, 4, 8, 8)
    _, metrics = loss_fn(fake_unet, (mean, torch.zeros_like(mean), c), StepRNG(3, 0, batch_size, slice(None)))
    dropped = (seen["c"] == 7.0).all(dim=2).all(dim=1)
    kept = (seen["c"] == c).all(dim=2).all(dim=1)
    assert (dropped ^ kept).all()
    # the fraction k/200 computed twice, each within one float32 rounding (6e-8 relative): approx's default rel 1e-6
    assert dropped.float().mean().item() == pytest.approx(metrics["dropped"])
    assert 0.04 < metrics["dropped"] < 0.18


def test_caption_dropout_feeds_the_empty_prompt_ids_to_a_trained_text_encoder():
    """With the text encoder in the model, dropped captions become the ids of "" before it runs."""
    from parti_from_scratch.train.components.unet import TextConditionedUNet

    class FakeText(torch.nn.Module):
        def forward(self, ids):
            self.ids = ids
            return (ids[..., None].float().expand(*ids.shape, 8),)

    class FakeUNet(torch.nn.Module):
        def forward(self, x_t, t, encoder_hidden_states):
            self.c = encoder_hidden_states
            return torch.zeros_like(x_t)

    model = TextConditionedUNet(FakeUNet(), FakeText())
    batch_size = 200
    ids = torch.randint(10, 100, (batch_size, 77))
    empty = torch.full((77,), 7)
    loss_fn = make_unet_loss(training_scheduler(smoke_recipe().noise_schedule).alpha_bar, empty, 1.0, p_uncond=0.1)
    mean = torch.zeros(batch_size, 4, 8, 8)
    _, metrics = loss_fn(model, (mean, torch.zeros_like(mean), ids), StepRNG(3, 0, batch_size, slice(None)))
    dropped = (model.text_encoder.ids == 7).all(dim=1)
    kept = (model.text_encoder.ids == ids).all(dim=1)
    assert (dropped ^ kept).all() and 0.04 < metrics["dropped"] < 0.18
    assert torch.equal(model.unet.c[..., 0], model.text_encoder.ids.float())   # the UNet saw the encoder's states


def test_train_default_with_text_encoder_finetuning_ships_the_finetuned_encoder(tmp_path):
    from parti_from_scratch.clip.model import CLIPModel, CLIPTextModel

    recipe = smoke_recipe()
    recipe.finetune_text_encoder = True
    recipe.unet_training.lr = 1e-2
    folder = train_default(tmp_path / "run", recipe, device="cpu", progress=False)
    shipped = CLIPTextModel.from_pretrained(folder / "text_encoder").float()
    clip_text = CLIPModel.from_pretrained(tmp_path / "run" / "clip" / "model").text_model
    saved = CLIPTextModel.from_pretrained(tmp_path / "run" / "unet" / "text_encoder")
    a, b, c = shipped.state_dict(), clip_text.state_dict(), saved.state_dict()
    assert set(a) == set(b) == set(c)
    # the shipped encoder is the fine-tuned one (fp16 on disk), no longer CLIP's text tower
    # fp16 values on both sides: the same float32 weights round to the same fp16 bits, and any other difference
    # is at least one fp16 ulp (a real change), so exact comparisons instead of allclose's defaults
    assert all(torch.allclose(a[k], c[k].half().float(), rtol=0, atol=0) for k in a)
    assert any(not torch.allclose(a[k], b[k].half().float(), rtol=0, atol=0) for k in a)


def test_drop_colour_words_removes_only_colours_with_probability_p():
    from parti_from_scratch.data import COLOURS
    from parti_from_scratch.data.shapes import caption_words
    from parti_from_scratch.train.components.unet import drop_colour_words

    captions = ShapesDataset("train", size=400, seed=0).captions
    assert drop_colour_words(captions, 0.0) == captions
    dropped = drop_colour_words(captions, 1.0)
    for before, after in zip(captions, dropped):
        assert not set(caption_words(after)) & set(COLOURS)
        assert [w for w in caption_words(before) if w not in COLOURS] == caption_words(after)
    assert drop_colour_words(["a large red circle on the left"], 1.0) == ["a large circle on the left"]
    some = drop_colour_words(captions, 0.25, seed=3)
    assert some == drop_colour_words(captions, 0.25, seed=3)               # a function of the seed
    assert 0.18 < sum(a != b for a, b in zip(some, captions)) / len(captions) < 0.32


def test_train_default_smoke_recipe_writes_a_loadable_pipeline(tmp_path):
    from parti_from_scratch.data import VOCABULARY
    from parti_from_scratch.pipeline import TextToImagePipeline

    folder = train_default(tmp_path / "run", smoke_recipe(), device="cpu", progress=False)
    for name in ("model_index.json", "vocabulary.txt", "recipe.json", "RECIPE.md", "unet", "vae", "text_encoder",
                 "tokenizer", "scheduler"):
        assert (folder / name).exists(), name
    info = json.loads((folder / "recipe.json").read_text())
    assert set(info["components"]) == {"clip", "vae", "vae_decoder", "unet", "unet_finetune"}
    assert all(row["seconds"] > 0 for row in info["components"].values())
    assert (folder / "vocabulary.txt").read_text().split() == sorted(VOCABULARY)
    pipe = TextToImagePipeline.from_pretrained(folder)
    image = pipe("a red circle on the left", num_inference_steps=2, guidance_scale=2.0,
                 generator=[torch.Generator().manual_seed(0)], output_type="np", progress=False).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()

    # the UNet alone, reusing the CLIP and VAE trained above
    again = train_default(tmp_path / "unet_only", smoke_recipe(), components=("unet",), clip_dir=tmp_path / "run",
                          vae_dir=tmp_path / "run" / "vae" / "model", device="cpu", progress=False)
    assert (again / "model_index.json").is_file()


def _cli(argv, capsys):
    from parti_from_scratch.cli import main
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_cli_train_unwritable_output_folder_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = _cli(["train", "clip", "--out", str(blocker / "out"), "--steps", "1", "--quiet"], capsys)
    assert code == 2 and err.startswith("parti-from-scratch train: error:") and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_cli_train_corrupt_checkpoint_exits_2(tmp_path, capsys):
    bad = tmp_path / "step-0000001.safetensors"
    bad.write_bytes(b"\x00\x01 definitely not safetensors")
    out = tmp_path / "out"
    code, err = _cli(["train", "vae", "--out", str(out), "--resume", str(bad), "--quiet"], capsys)
    assert code == 2 and err.startswith("parti-from-scratch train: error:") and len(err.splitlines()) == 1
    assert "corrupt" in err or "not a readable" in err
    assert not out.exists()


def test_cli_train_batch_larger_than_dataset_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli(["train", "all", "--out", str(out), "--batch-size", "10000000", "--quiet"], capsys)
    assert code == 2 and "larger than the dataset" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_eval_unknown_prompt_set_exits_2(capsys):
    code, err = _cli(["eval", "--prompts", "no_such_set_or_file"], capsys)
    assert code == 2 and err.startswith("parti-from-scratch eval: error:")
