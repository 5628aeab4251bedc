"""A training run small enough to try: `train all --tiny`, its run folder, resuming without encoding again,
checkpoint pruning, and the commands RECIPE.md gives. The CLI runs here use smoke_recipe (seconds) in place
of the tiny preset (under two minutes), so only the wiring is tested; the preset itself is checked for shape."""
from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from parti_from_scratch.cli import build_parser, main
from parti_from_scratch.train import default_recipe
from parti_from_scratch.train.components import unet as unet_component
from parti_from_scratch.train.components.unet import LatentCaptionDataset, latents_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def smoke_preset(monkeypatch):
    """`--tiny` trains smoke_recipe() here, so the test takes seconds."""
    monkeypatch.setattr(default_recipe, "tiny_recipe", default_recipe.smoke_recipe)


@pytest.fixture
def count_encodings(monkeypatch):
    """Count the calls of the VAE pass that precomputes the UNet's latents."""
    calls = []
    original = unet_component.encode_latents

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(unet_component, "encode_latents", counting)
    return calls


def _checkpoints(run):
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("step-*.safetensors"))


RUNS = ("clip", "vae", "vae/decoder", "unet", "unet/finetune")


def test_train_all_tiny_then_generate_eval_and_resume_without_encoding_again(tmp_path, capsys, smoke_preset,
                                                                             count_encodings):
    run = tmp_path / "run"
    assert main(["train", "all", "--tiny", "--out", str(run), "--quiet"]) == 0
    pipeline = run / "pipeline"
    assert capsys.readouterr().out.strip() == str(pipeline)
    assert len(count_encodings) == 1
    cache = run / "unet" / "latents.safetensors"
    assert cache.is_file()
    # one checkpoint per run by default: the last one
    smoke = default_recipe.smoke_recipe()
    steps = [t.steps for name in default_recipe.COMPONENTS for t in smoke.trainings(name)]
    assert _checkpoints(run) == sorted(f"{r}/checkpoints/step-{s:07d}.safetensors" for r, s in zip(RUNS, steps))

    # RECIPE.md: the command that trains from scratch and the one that resumes differ
    recipe_md = (pipeline / "RECIPE.md").read_text()
    scratch = f"parti-from-scratch train all --out {run} --tiny"
    assert f"    {scratch}\n" in recipe_md and f"    {scratch} --resume latest\n" in recipe_md
    assert json.loads((pipeline / "recipe.json").read_text())["resume_command"] == f"{scratch} --resume latest"

    # generate and eval accept the pipeline
    assert main(["generate", "a red circle on the left", "--model", str(pipeline), "-o", str(tmp_path / "a.png"),
                 "--quiet"]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main(["eval", "--model", str(pipeline), "--n", "2", "--grid", str(tmp_path / "grid.png")]) == 0
    assert "2 prompts (heldout_single), 2 steps, guidance 2" in capsys.readouterr().out

    # resume: every run goes on from its checkpoint (all finished) and the latents come from the cache
    mtime = cache.stat().st_mtime_ns
    assert main(["train", "all", "--tiny", "--out", str(run), "--quiet", "--resume", "latest"]) == 0
    assert len(count_encodings) == 1 and cache.stat().st_mtime_ns == mtime
    assert (pipeline / "model_index.json").is_file()
    # without the cache the same resume encodes again: the counter does see encodings
    cache.unlink()
    assert main(["train", "all", "--tiny", "--out", str(run), "--quiet", "--resume", "latest"]) == 0
    assert len(count_encodings) == 2 and cache.is_file()


def test_keep_0_keeps_every_checkpoint(tmp_path, capsys, smoke_preset):
    run = tmp_path / "run"
    assert main(["train", "clip", "--tiny", "--out", str(run), "--quiet", "--keep", "0"]) == 0
    steps = default_recipe.smoke_recipe().clip_training.steps
    # a smoke run is shorter than 8 steps: a checkpoint after every step, all kept
    assert _checkpoints(run) == [f"clip/checkpoints/step-{s:07d}.safetensors" for s in range(1, steps + 1)]


def test_train_commands_repeat_the_settings_and_add_resume_latest():
    from parti_from_scratch.train.cli_commands import train_commands
    args = build_parser().parse_args(["train", "unet", "--out", "runs/my run", "--steps", "50", "--seed", "3",
                                      "--clip", "runs/a", "--resume", "latest", "--quiet"])
    scratch, resume = train_commands(args)
    assert scratch == "parti-from-scratch train unet --out 'runs/my run' --steps 50 --seed 3 --clip runs/a"
    assert resume == scratch + " --resume latest"


def test_latent_cache_is_read_only_for_the_same_encoder_and_data(tmp_path):
    from parti_from_scratch.data import ShapesDataset
    from parti_from_scratch.train.components import build_vae
    recipe = default_recipe.smoke_recipe()
    data = ShapesDataset("train", size=8, seed=0)
    vae = build_vae(recipe.vae)
    g = torch.Generator().manual_seed(0)
    saved = LatentCaptionDataset(torch.randn(8, 4, 16, 16, generator=g), torch.rand(8, 4, 16, 16, generator=g),
                                 torch.randint(0, 100, (3, 77)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    fingerprint = latents_fingerprint(data, vae)
    path = saved.save(tmp_path / "latents.safetensors", fingerprint)
    loaded = LatentCaptionDataset.load(path, fingerprint)
    for name in ("mean", "std", "text_states", "caption_index"):
        assert torch.equal(getattr(loaded, name), getattr(saved, name))
    # the decoder does not shape z: training it keeps the cache valid
    with torch.no_grad():
        vae.decoder.conv_in.weight.add_(1.0)
    assert latents_fingerprint(data, vae) == fingerprint
    # another encoder, other data, or a precomputed text encoder: another fingerprint, the cache is not read
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(1e-6)
    others = [latents_fingerprint(data, vae), latents_fingerprint(ShapesDataset("train", size=8, seed=1), build_vae(
        recipe.vae)), latents_fingerprint(data, build_vae(recipe.vae), build_clip_text(recipe))]
    assert len({fingerprint, *others}) == 4
    assert all(LatentCaptionDataset.load(path, f) is None for f in others)
    assert LatentCaptionDataset.load(tmp_path / "missing.safetensors", fingerprint) is None


def build_clip_text(recipe):
    from parti_from_scratch.train.components import build_clip
    return build_clip(recipe.clip).text_model


def test_tiny_preset_fits_its_data_and_builds():
    """The --tiny preset's batches fit its 2,000 images and its models build (training it is a manual check:
    see the README for its time)."""
    from parti_from_scratch.train.components import build_clip, build_unet, build_vae
    recipe = default_recipe.tiny_recipe()
    default_recipe._check_before_training(recipe, default_recipe.COMPONENTS)
    assert {t.dataset_size for name in default_recipe.COMPONENTS for t in recipe.trainings(name)} == {2000}
    sizes = [sum(p.numel() for p in m.parameters()) for m in (build_clip(recipe.clip), build_vae(recipe.vae),
                                                              build_unet(recipe.unet))]
    shipped = default_recipe.default_recipe()
    shipped_sizes = [sum(p.numel() for p in m.parameters()) for m in (build_clip(shipped.clip),
                                                                      build_vae(shipped.vae),
                                                                      build_unet(shipped.unet))]
    assert all(a < b for a, b in zip(sizes, shipped_sizes))


def test_grid_titles_of_two_object_prompts_do_not_overlap():
    """eval --grid: each title stays above its own image, inside its column, and touches no other title."""
    import matplotlib.pyplot as plt

    from parti_from_scratch.data import eval_prompts
    from parti_from_scratch.train.components.evaluate import image_grid_figure, wrap_label
    assert wrap_label("a small magenta triangle on the left and a large blue circle at the bottom", 40) == [
        "a small magenta triangle on the left", "and a large blue circle at the bottom"]
    prompts = [p for p, _ in eval_prompts("heldout_pair", n=10, seed=0)]
    labels = ["ok " + p for p in prompts]
    assert all(len(p) > 60 for p in labels)                  # each one far wider than its image
    fig = image_grid_figure(np.zeros((10, 64, 64, 3)), columns=8, labels=labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes[:10]]
    images = [ax.get_window_extent(renderer) for ax in fig.axes[:10]]
    figure_box = fig.bbox
    for k, (box, image) in enumerate(zip(boxes, images)):
        assert image.x0 - 10 <= box.x0 and box.x1 <= image.x1 + 10, (k, box, image)     # within its column
        assert box.y0 >= image.y1 - 1 and box.y1 <= figure_box.y1, (k, box, image)     # above it, on the page
        for j in range(k):
            assert not box.overlaps(boxes[j]), (j, k)
    plt.close(fig)
