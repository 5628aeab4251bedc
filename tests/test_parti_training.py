"""Training Parti's Transformer (stage 2): the shapes text tokenizer, the token cache, the teacher-forced loss with
caption dropout, a tiny run end to end (the folder loads and generates), resume, and the recipe's command line."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from test_parti_pipeline import tiny_clip_model

from parti_from_scratch import PartiPipeline, ValueChromaVQModel
from parti_from_scratch.clip.model import CLIPModel
from parti_from_scratch.clip.tokenizer import CLIPTokenizer
from parti_from_scratch.data import COLOURS, VOCABULARY, ShapesDataset
from parti_from_scratch.parti.sampling import empty_prompt_ids
from parti_from_scratch.parti.transformer import autoregressive_loss, preset_config
from parti_from_scratch.parti.vqgan import VQModel
from parti_from_scratch.train import StepRNG, TrainConfig, latest_checkpoint, read_safetensors
from parti_from_scratch.train.components import parti as stage2
from parti_from_scratch.train.components.parti import (ImageTokenDataset, build_parti, make_parti_loss, parti_config,
                                                       shapes_text_tokenizer, tokens_fingerprint,
                                                       train_parti_transformer)
from parti_from_scratch.train.components.vq import Codebook, build_vq, export_vq
from parti_from_scratch.train.errors import TrainError
from parti_from_scratch.train.parti_recipe import _vq_config, main, tiny_parti_recipe, train_parti
from weights_convert.value_chroma import load_image_tokenizer

TINY_VQ = _vq_config(block_out_channels=(8, 8, 8, 8), num_vq_embeddings=32, vq_embed_dim=4, groups=4)
SIZES = tiny_parti_recipe().transformer


@pytest.fixture(scope="module")
def vq_folder(tmp_path_factory):
    """A random tiny VQModel folder (8x8 tokens of 32 codes): stage 2 only needs its indices to be a function
    of the image."""
    folder = tmp_path_factory.mktemp("vqvae")
    export_vq(build_vq(TINY_VQ, Codebook(), seed=0)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_tokenizer():
    return shapes_text_tokenizer(24)


def _config(tmp_path, steps, batch_size=8, lr=3e-3, **kw):
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=None, log_every=1, seed=0,
                       out_dir=str(tmp_path), device="cpu", progress=False, **kw)


# ------------------------------------------------------------------------------------------- the text side

def test_every_grammar_word_is_one_token(text_tokenizer):
    caption = "a large red circle on the left and a small blue square on the right"
    assert text_tokenizer.tokenize(caption) == ["Ġ" + w for w in caption.split()]
    for word in VOCABULARY:
        assert text_tokenizer.tokenize(word) == ["Ġ" + word], word
    # a word the grammar never writes falls back to its letters; a letter no word has is <unk>
    assert text_tokenizer.tokenize("tired") == ["Ġt", "i", "r", "e", "d"]
    assert text_tokenizer.encode("zzz")[1:-1] == [text_tokenizer.get_vocab()["Ġ"]] + [text_tokenizer.unk_token_id] * 3
    assert text_tokenizer.decode(text_tokenizer.encode(caption), skip_special_tokens=True) == caption


def test_special_tokens_are_the_transformer_defaults(text_tokenizer, vq_folder):
    """<s>, <pad>, </s> get ids 0, 1, 2, so the empty prompt the sampler builds is the tokenizer's <s></s>."""
    config = parti_config(SIZES, VQModel.from_pretrained(vq_folder), text_tokenizer)
    assert (config.bos_token_id, config.pad_token_id, config.eos_token_id) == (0, 1, 2)
    ids = text_tokenizer([""], padding="max_length", max_length=24).input_ids
    assert torch.equal(ids, empty_prompt_ids(1, 24, config))
    assert config.codebook_size == 32 and config.decoder_start_token_id == 32 and config.image_grid_size == (8, 8)


def test_shapes_preset_matches_the_shipped_tokenizers():
    """The "shapes" preset's derived fields are those the recipe computes for the shipped tokenizer."""
    from parti_from_scratch.parti_pipeline import PARTI_MODEL_DIR
    vq = load_image_tokenizer(PARTI_MODEL_DIR / "vqvae")
    preset = preset_config("shapes")
    derived = parti_config(SIZES, vq, shapes_text_tokenizer(preset.max_text_positions))
    for key in ("vocab_size", "image_vocab_size", "codebook_size", "decoder_start_token_id", "codebook_factors",
                "image_grid_size"):
        assert getattr(derived, key) == getattr(preset, key), key
    assert preset.codebook_size == vq.codebook_size


# ------------------------------------------------------------------------------------------- the token cache

def test_token_cache_holds_each_images_indices_in_raster_order(vq_folder, text_tokenizer):
    vq = VQModel.from_pretrained(vq_folder)
    data = ShapesDataset("train", size=6, seed=0)
    tokens = ImageTokenDataset.build(data, vq, text_tokenizer, batch_size=4)
    x = torch.stack([data[i][0] for i in range(6)])
    expected = vq.tokenize(x)                                     # (6, 8, 8)
    assert torch.equal(tokens.image_tokens.long(), expected.flatten(1))
    y, ids, colourless = tokens[5]
    assert y.dtype == ids.dtype == colourless.dtype == torch.int64
    assert torch.equal(ids, text_tokenizer([data.captions[5]], padding="max_length").input_ids[0])
    # the same caption without its colour words
    words = [w for w in data.captions[5].split() if w not in COLOURS]
    assert len(words) < len(data.captions[5].split())
    assert torch.equal(colourless, text_tokenizer([" ".join(words)], padding="max_length").input_ids[0])


def test_token_cache_fingerprint_follows_weights_vocabulary_and_data(vq_folder, text_tokenizer, tmp_path):
    vq = VQModel.from_pretrained(vq_folder)
    data = ShapesDataset("train", size=4, seed=0)
    fingerprint = tokens_fingerprint(data, vq, text_tokenizer)
    tokens = ImageTokenDataset.build(data, vq, text_tokenizer)
    tokens.save(tmp_path / "tokens.safetensors", fingerprint)
    loaded = ImageTokenDataset.load(tmp_path / "tokens.safetensors", fingerprint)
    for name in ("image_tokens", "input_ids", "colourless_ids"):
        assert torch.equal(getattr(loaded, name), getattr(tokens, name)), name
    changed_codebook = VQModel.from_pretrained(vq_folder)
    with torch.no_grad():
        changed_codebook.quantize.embedding.weight[0, 0] += 1
    others = [tokens_fingerprint(ShapesDataset("train", size=4, seed=1), vq, text_tokenizer),
              tokens_fingerprint(data, changed_codebook, text_tokenizer),
              tokens_fingerprint(data, vq, shapes_text_tokenizer(32))]
    assert fingerprint not in others and len(set(others)) == 3
    assert ImageTokenDataset.load(tmp_path / "tokens.safetensors", others[0]) is None
    # the decoder does not choose the indices: changing it keeps the cache
    changed_decoder = VQModel.from_pretrained(vq_folder)
    with torch.no_grad():
        next(changed_decoder.decoder.parameters()).add_(1)
    assert tokens_fingerprint(data, changed_decoder, text_tokenizer) == fingerprint


# ------------------------------------------------------------------------------------------- the loss

def _tiny_batch(vq_folder, text_tokenizer, n=8):
    vq = VQModel.from_pretrained(vq_folder)
    config = parti_config(SIZES, vq, text_tokenizer)
    data = ImageTokenDataset.build(ShapesDataset("train", size=n, seed=0), vq, text_tokenizer)
    return config, data, (data.image_tokens.long(), data.input_ids.long(), data.colourless_ids.long())


@pytest.mark.parametrize("p_uncond, p_drop_colour, read", [(0.0, 0.0, "caption"), (1.0, 0.0, "empty"),
                                                           (0.0, 1.0, "colourless"), (1.0, 1.0, "empty")])
def test_parti_loss_is_the_teacher_forced_cross_entropy_of_the_caption_read(
        vq_folder, text_tokenizer, p_uncond, p_drop_colour, read):
    """L = autoregressive_loss(x', y) with x' the caption, the empty prompt <s></s> (caption dropout wins over
    colour dropout), or the caption without its colour words."""
    config, _, (y, x, x_plain) = _tiny_batch(vq_folder, text_tokenizer)
    model = build_parti(config, seed=1)
    empty = empty_prompt_ids(1, config.max_text_positions, config)[0]
    rng = StepRNG(0, 0, len(y), slice(0, len(y)))
    loss, metrics = make_parti_loss(empty, p_uncond, p_drop_colour)(model, (y, x, x_plain), rng)
    expected_ids = {"caption": x, "empty": empty.expand_as(x), "colourless": x_plain}[read]
    # the same float32 computation on the same inputs: equal to the last bit
    assert_close(loss, autoregressive_loss(model, expected_ids, y), rtol=0, atol=0)
    assert metrics["dropped"] == p_uncond and metrics["colourless"] == float(read == "colourless")


def test_caption_dropout_rate_and_rows(vq_folder, text_tokenizer):
    """Over a global batch of 4,000 rows the dropped fraction is p = 0.1 within 5 binomial standard deviations
    (sqrt(p (1 - p) / n) = 0.0047), and exactly the rows StepRNG's first draw marks are the empty prompt."""
    config, _, (y, x, x_plain) = _tiny_batch(vq_folder, text_tokenizer, n=2)
    n, p = 4000, 0.1
    y, x, x_plain = y[:1].expand(n, -1), x[:1].expand(n, -1), x_plain[:1].expand(n, -1)
    empty = empty_prompt_ids(1, config.max_text_positions, config)[0]
    seen = {}

    def spy(model, ids, tokens):
        seen["ids"] = ids
        return torch.zeros(())

    rng = StepRNG(0, 3, n, slice(0, n))
    original = stage2.autoregressive_loss
    stage2.autoregressive_loss = spy
    try:
        _, metrics = make_parti_loss(empty, p)(None, (y, x, x_plain), rng)
    finally:
        stage2.autoregressive_loss = original
    dropped = (seen["ids"] == empty).all(dim=1)
    assert torch.equal(dropped, StepRNG(0, 3, n, slice(0, n)).bernoulli(p))
    assert abs(metrics["dropped"] - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(seen["ids"][~dropped], x[~dropped])


def test_loss_falls_on_a_fixed_batch(vq_folder, text_tokenizer, tmp_path):
    """8 images, batch 8, 40 AdamW steps: the model memorises them. At initialisation the loss is about log K
    (3.47 nats for K = 32: no preference); measured 3.70 at the first step, 0.66 at the 40th. Asserting below half the
    first step's loss leaves a wide margin and still fails for a model that does not learn the pairs."""
    config, data, _ = _tiny_batch(vq_folder, text_tokenizer)
    _, result = train_parti_transformer(config, data, _config(tmp_path, 40, lr=1e-2), p_uncond=0.0)
    losses = [row["loss"] for row in result.history]
    assert abs(losses[0] - math.log(32)) < 0.5
    assert losses[-1] < 0.5 * losses[0], losses


def test_resumed_run_equals_the_uninterrupted_one(vq_folder, text_tokenizer, tmp_path):
    """6 steps straight == 3 steps, checkpoint, resume to 6: the same weights to the bit (the loop's guarantee on CPU,
    caption dropout included)."""
    config, data, _ = _tiny_batch(vq_folder, text_tokenizer)
    straight, _ = train_parti_transformer(config, data, _config(tmp_path / "s", 6, batch_size=4), p_uncond=0.5)
    train_parti_transformer(config, data, _config(tmp_path / "r", 3, batch_size=4), p_uncond=0.5)
    resumed, _ = train_parti_transformer(config, data, _config(tmp_path / "r", 6, batch_size=4), p_uncond=0.5,
                                         resume="latest")
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


# ------------------------------------------------------------------------------------------- a tiny run end to end

@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random full CLIP (both towers, 16x16 images) saved in float32 without tokenizer files, as `train clip`
    writes its <out>/clip/model."""
    folder = tmp_path_factory.mktemp("clip")
    tiny_clip_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_run(vq_folder, clip_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("parti-run")
    folder = train_parti(out, tiny_parti_recipe(), tokenizer_dir=vq_folder, device="cpu", progress=False,
                         reranker_dir=clip_folder)
    return out, folder


def test_tiny_run_writes_a_pipeline_folder_that_loads_and_generates(tiny_run, vq_folder):
    out, folder = tiny_run
    assert folder == out / "pipeline"
    pipe = PartiPipeline.from_pretrained(folder)
    images = pipe("a large red circle on the left", generator=torch.Generator().manual_seed(0), output_type="np",
                  progress=False).images
    assert images.shape == (1, 64, 64, 3) and 0 <= images.min() and images.max() <= 1
    # vqvae/ is the tokenizer folder, byte for byte
    for f in vq_folder.iterdir():
        assert (folder / "vqvae" / f.name).read_bytes() == f.read_bytes(), f.name
    # the Transformer is stored in float16 and the sampling defaults are the recipe's
    tensors, _ = read_safetensors(folder / "transformer" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    recipe = tiny_parti_recipe()
    defaults = json.loads((folder / "sampling_defaults.json").read_text())
    assert defaults == {"guidance_scale": recipe.guidance_scale, "temperature": recipe.temperature,
                        "top_k": recipe.top_k, "top_p": recipe.top_p, "num_candidates": recipe.num_candidates}
    record = json.loads((folder / "recipe.json").read_text())
    measured = record["run"]["measured"]
    assert set(measured["adherence"]) == {"single", "heldout_single", "pair", "heldout_pair"}
    assert measured["seconds_per_image"] > 0 and measured["heldout_loss"] > 0
    assert record["recipe"] == recipe.to_dict()
    assert "| heldout_pair | 2 |" in (folder / "RECIPE.md").read_text()


def test_tiny_run_copies_the_reranker_in_float16(tiny_run, clip_folder):
    """--reranker DIR: reranker/ holds the CLIP's tensors cast to float16 (the Transformer's dtype), the built-in
    vocabulary's note, and the loaded pipeline draws the best of 2 candidates with no reranker passed."""
    _, folder = tiny_run
    tensors, _ = read_safetensors(folder / "reranker" / "model.safetensors")
    source, _ = read_safetensors(clip_folder / "model.safetensors")
    assert tensors.keys() == source.keys() and {t.dtype for t in tensors.values()} == {torch.float16}
    for key, value in tensors.items():
        assert torch.equal(value, source[key].half()), key          # a cast, nothing else
    assert (folder / "reranker" / "builtin_tokenizer.json").is_file()
    pipe = PartiPipeline.from_pretrained(folder)
    assert isinstance(pipe.reranker[1], CLIPTokenizer)
    out = pipe("a large red circle on the left", num_candidates=2, generator=torch.Generator().manual_seed(0),
               output_type="pt", progress=False)
    assert out.images.shape == (1, 3, 64, 64) and out.clip_scores.shape == (1,)


def test_reranker_that_is_not_a_full_clip_is_refused(tmp_path, clip_folder, capsys):
    CLIPModel.from_pretrained(clip_folder).text_model.save_pretrained(tmp_path / "text")
    args = ["--out", str(tmp_path / "run"), "--stage", "transformer", "--tiny", "--no-progress"]
    assert main([*args, "--reranker", str(tmp_path / "text")]) == 2
    assert "not a full CLIP (no 'vision_config')" in capsys.readouterr().err
    assert main([*args, "--reranker", str(tmp_path / "none")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()                          # refused before any training
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--stage", "tokenizer", "--reranker", str(clip_folder)])


def test_recipe_with_candidates_needs_a_reranker(tmp_path, vq_folder):
    recipe = tiny_parti_recipe()
    recipe.num_candidates = 4
    with pytest.raises(TrainError, match="num_candidates=4 needs a reranker"):
        train_parti(tmp_path, recipe, tokenizer_dir=vq_folder, device="cpu", progress=False)


def test_resumed_tiny_run_reads_the_token_cache(tiny_run, vq_folder, monkeypatch):
    out, _ = tiny_run
    cache = out / "transformer" / stage2.TOKENS_FILE
    assert cache.is_file()
    before = cache.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the token cache was computed again")

    monkeypatch.setattr(ImageTokenDataset, "build", refuse)
    monkeypatch.setattr("parti_from_scratch.train.parti_recipe.measure_parti", lambda pipe, recipe: {
        "heldout_loss": 0.0, "log_K": 0.0, "adherence": {}, "seconds_per_image": 0.0})
    recipe = tiny_parti_recipe().with_overrides(steps=6)
    with pytest.warns(UserWarning, match="different config"):   # the cosine schedule now ends at 6
        train_parti(out, recipe, tokenizer_dir=vq_folder, device="cpu", progress=False, resume="latest")
    assert cache.stat().st_mtime_ns == before
    assert latest_checkpoint(out / "transformer").name == "step-0000006.safetensors"


def test_cli_stage_transformer_needs_a_tokenizer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("parti_from_scratch.train.parti_recipe.SHIPPED_TOKENIZER", tmp_path / "none")
    assert main(["--out", str(tmp_path / "run"), "--stage", "transformer", "--tiny", "--no-progress"]) == 2
    assert "no image tokenizer here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--stage", "all", "--tokenizer", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["plain", "value_chroma"])
def test_two_processes_train_the_same_transformer_as_one(tmp_path, vq_folder, tokenizer):
    """torchrun, 2 gloo processes, --stage transformer: the run finishes (rank 0 measures alone, no collective
    inside) and every weight equals one process's up to float32 drift; with a ValueChromaVQModel the
    Transformer's codes are factorised (every parameter still gets a gradient, which DDP requires)."""
    from test_train_distributed import run_module_one_and_two_processes

    folder = vq_folder
    if tokenizer == "value_chroma":
        folder = tmp_path / "value_chroma"
        structure = export_vq(build_vq({**TINY_VQ, "in_channels": 1, "out_channels": 1}, Codebook(), seed=0))
        ValueChromaVQModel(structure, colours=torch.rand(7, 3, generator=torch.Generator().manual_seed(0))
                           ).save_pretrained(folder)
    args = ["-m", "parti_from_scratch.train.parti_recipe", "--tiny", "--no-progress", "--device", "cpu",
            "--stage", "transformer", "--tokenizer", str(folder)]
    run_module_one_and_two_processes(args, tmp_path)
    a = read_safetensors(latest_checkpoint(tmp_path / "ddp" / "transformer"))[0]
    b = read_safetensors(latest_checkpoint(tmp_path / "one" / "transformer"))[0]
    assert (tmp_path / "ddp" / "pipeline" / "RECIPE.md").is_file()
    lr, steps = tiny_parti_recipe().training.lr, tiny_parti_recipe().training.steps
    for key in [k for k in b if k.startswith("model/")]:
        if key.endswith("k_proj.bias"):
            # a key bias adds the same q.b to every logit of a softmax row: its true gradient is 0, so Adam's
            # normalised step follows the sign of rounding noise, which differs between the two splits (measured
            # 5.2e-6 apart); Adam moves a weight by at most lr (1 - beta1) / sqrt(1 - beta2) = 3.2 lr per step
            assert_close(a[key], b[key], rtol=0, atol=3.2 * lr * steps, msg=key)
        else:
            # 4 AdamW steps in float32 with the batch split in two (measured at most 5.1e-7); the VQ test's bound
            assert_close(a[key], b[key], rtol=0, atol=2e-6, msg=key)
