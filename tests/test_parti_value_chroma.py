"""The structure x colour tokenizer (parti/value_chroma.py): each equation of its module docstring, its files,
the colours fitted by k-means++, and a tiny run of the recipe end to end (tokenizer -> Parti -> image)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from parti_from_scratch import PartiPipeline
from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.data import COLOURS, ShapesDataset
from parti_from_scratch.parti.value_chroma import (ValueChromaConfig, ValueChromaVQModel, image_value,
                                                   token_colours)
from parti_from_scratch.parti.vqgan import VQModel
from parti_from_scratch.train.components.vq import (Codebook, ValueImages, build_vq, evaluate_tokenizer, export_vq,
                                                    fit_colours, kmeans)
from parti_from_scratch.train.errors import TrainError
from parti_from_scratch.train.parti_recipe import (_vq_config, tiny_parti_recipe, tiny_tokenizer_recipe,
                                                   train_parti, train_tokenizer)
from weights_convert.common import CheckpointError
from weights_convert.value_chroma import load_image_tokenizer

STRUCTURE = _vq_config(block_out_channels=(8, 8, 8, 8), num_vq_embeddings=32, vq_embed_dim=4, groups=4, channels=1)
PRIMARIES = torch.tensor([COLOURS[c] for c in COLOURS], dtype=torch.float32) / 255  # (6, 3)


@pytest.fixture(scope="module")
def model():
    """A random structure VQGAN (32 codes, 8x8 tokens of 8x8 pixels) and the six primaries plus white."""
    structure = export_vq(build_vq(STRUCTURE, Codebook(), seed=0))
    colours = torch.cat([PRIMARIES, torch.ones(1, 3)])
    return ValueChromaVQModel(structure, ValueChromaConfig(num_colours=7, min_value=0.5), colours).eval()


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2 - 1


# ------------------------------------------------------------------------------------------- the equations

def test_value_is_the_brightest_channel():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(image_value(x), x.max(dim=1, keepdim=True).values)


def test_token_colour_is_the_value_weighted_mean_of_x():
    """u_t = sum x / sum v: a flat colour at any brightness or coverage gives that colour over its brightest
    channel; two colours in one token mix by their value; a black token has s_t = 0."""
    x = torch.zeros(1, 3, 16, 16)
    x[0, :, :8, :8] = 0.6 * torch.tensor([1.0, 0.0, 1.0])[:, None, None]          # dim magenta, whole token
    coverage = torch.linspace(0.05, 1.0, 64).reshape(8, 8)                         # anti-aliased cyan edge
    x[0, :, :8, 8:] = coverage * torch.tensor([0.0, 1.0, 1.0])[:, None, None]
    x[0, 0, 8, :8], x[0, 0, 9, :2] = 1.0, 1.0                                      # 10 red pixels ...
    x[0, 2, 11, :5] = 1.0                                                          # ... and 5 blue ones
    u, s = token_colours(to_model_range(x), patch=8)
    # s_t sums 64 float32 values of up to ~1 (each mapped to [-1, 1] and back) in the pooling's order: the
    # rounding of such a sum is at most 64 eps times it
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(u[0, 0, 0], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(s[0, 0, 0], torch.tensor(0.6 * 64), rtol=64 * eps, atol=0)
    torch.testing.assert_close(u[0, 0, 1], torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(s[0, 0, 1], coverage.sum(), rtol=64 * eps, atol=0)
    torch.testing.assert_close(u[0, 1, 0], torch.tensor([10.0, 0.0, 5.0]) / 15)
    assert s[0, 1, 1] == 0


def test_colour_code_is_none_below_tau_else_one_plus_the_nearest_colour(model):
    x = torch.zeros(1, 3, 64, 64)
    x[0, :, :8, :8] = torch.tensor([0.0, 0.0, 0.9])[:, None, None]                # blue: colour 3 -> code 4
    x[0, :, :8, 8:16] = torch.tensor([0.8, 0.75, 0.0])[:, None, None]             # nearly yellow: code 5
    x[0, 1, 8, 16] = 0.4                                                           # one dim pixel: s = 0.4 < tau
    c = model.colour_codes(to_model_range(x))
    assert c.shape == (1, 8, 8)
    assert c[0, 0, 0] == 1 + 2 and c[0, 0, 1] == 1 + 3
    assert c[0, 1, 2] == 0 and int(c.count_nonzero()) == 2


def test_tokens_join_and_split_in_mixed_radix(model):
    """k = a K_c + c with K_c = J + 1 = 8; K_a K_c tokens."""
    assert model.codebook_factors == (32, 8) and model.codebook_size == 256
    a, c = torch.randint(0, 32, (2, 8, 8)), torch.randint(0, 8, (2, 8, 8))
    k = model.join_indices(a, c)
    assert torch.equal(k, a * 8 + c)
    assert all(torch.equal(p, q) for p, q in zip(model.split_indices(k), (a, c)))


def test_tokenize_is_the_structure_tokens_of_the_value_and_the_colour_codes(model):
    x = ShapesDataset("test", size=4, seed=0)
    images = torch.stack([x[i][0] for i in range(4)])
    with torch.no_grad():
        k = model.tokenize(images)
        a, c = model.split_indices(k)
        assert torch.equal(a, model.structure.tokenize(images.amax(dim=1, keepdim=True)))
    assert torch.equal(c, model.colour_codes(images))


def test_decode_is_the_value_times_the_tokens_colour(model):
    """x_hat = G(e_a) * upsample(m_c) on the [0, 1] scale; colour code 0 is black whatever the value."""
    g = torch.Generator().manual_seed(0)
    a, c = torch.randint(0, 32, (2, 8, 8), generator=g), torch.randint(0, 8, (2, 8, 8), generator=g)
    c[0, 0, 0] = 0
    with torch.no_grad():
        x_hat = model.decode_indices(model.join_indices(a, c))
        value = ((model.structure.decode_indices(a) + 1) / 2).clamp(0, 1)          # (2, 1, 64, 64)
    table = torch.cat([torch.zeros(1, 3), model.colours])
    colour = table[c].permute(0, 3, 1, 2).repeat_interleave(8, 2).repeat_interleave(8, 3)
    # one product and one affine map in float32 on both sides
    torch.testing.assert_close(x_hat, value * colour * 2 - 1, atol=1e-6, rtol=0)
    assert torch.equal(x_hat[0, :, :8, :8], torch.full((3, 8, 8), -1.0))


def test_bad_inputs_are_named(model):
    rgb = VQModel(**{**STRUCTURE, "in_channels": 3, "out_channels": 3})
    with pytest.raises(ValueError, match="one channel"):
        ValueChromaVQModel(rgb)
    with pytest.raises(ValueError, match=r"colours must be \(7, 3\)"):
        ValueChromaVQModel(model.structure, ValueChromaConfig(), torch.zeros(6, 3))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.decode_indices(torch.full((1, 8, 8), 256))
    with pytest.raises(ValueError, match="batch, h, w"):
        model.decode_indices(torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ConfigError, match="num_colours"):
        ValueChromaConfig(num_colours=0)


# ------------------------------------------------------------------------------------------------ files

def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "vc")
    assert json.loads((tmp_path / "vc" / "config.json").read_text())["_class_name"] == "ValueChromaVQModel"
    # the structure half is a plain VQModel folder
    assert VQModel.from_pretrained(tmp_path / "vc" / "structure").config.in_channels == 1
    for loaded in (ValueChromaVQModel.from_pretrained(tmp_path / "vc"), load_image_tokenizer(tmp_path / "vc")):
        assert isinstance(loaded, ValueChromaVQModel)
        assert torch.equal(loaded.colours, model.colours)
        k = torch.randint(0, 256, (1, 8, 8))
        with torch.no_grad():
            assert torch.equal(loaded.decode_indices(k), model.decode_indices(k))
    # a plain VQModel folder loads as a VQModel
    model.structure.save_pretrained(tmp_path / "plain")
    assert type(load_image_tokenizer(tmp_path / "plain")) is VQModel


@pytest.mark.parametrize("edit, message", [
    (lambda f: (f / "colour_codebook.safetensors").unlink(), "file not found"),
    (lambda f: save_file({"colours": torch.zeros(7, 3), "extra": torch.zeros(1)},
                         str(f / "colour_codebook.safetensors")), "extra: extra"),
    (lambda f: save_file({"colours": torch.zeros(6, 3)}, str(f / "colour_codebook.safetensors")),
     r"shape \(7, 3\)"),
    (lambda f: save_file({"palette": torch.zeros(7, 3)}, str(f / "colour_codebook.safetensors")), "missing it"),
])
def test_bad_colour_file_names_the_file(model, tmp_path, edit, message):
    folder = tmp_path / "vc"
    model.save_pretrained(folder)
    edit(folder)
    with pytest.raises(CheckpointError, match=message) as info:
        ValueChromaVQModel.from_pretrained(folder)
    assert "colour_codebook.safetensors" in str(info.value)


def test_a_plain_vqmodel_folder_is_not_a_value_chroma_one(model, tmp_path):
    model.structure.save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="ValueChromaVQModel"):
        ValueChromaVQModel.from_pretrained(tmp_path / "plain")


def test_structure_with_three_channels_is_refused_with_its_folder(model, tmp_path):
    model.save_pretrained(tmp_path / "vc")
    VQModel(**{**STRUCTURE, "in_channels": 3, "out_channels": 3}).save_pretrained(tmp_path / "vc" / "structure")
    with pytest.raises(CheckpointError, match="structure.*one channel"):
        ValueChromaVQModel.from_pretrained(tmp_path / "vc")


# ------------------------------------------------------------------------------------- fitting the colours

def test_kmeans_plus_plus_seeds_every_well_separated_cluster():
    """One large tight cluster and five small far ones: D^2 seeding gives each a centroid."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6, 3) * 0 + torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
                                                  [1, 0, 1.]])
    sizes = [1000, 5, 5, 5, 5, 5]
    z = torch.cat([c + 0.01 * torch.randn(n, 3, generator=g) for c, n in zip(centres, sizes)])
    found = kmeans(z, 6, iters=10, generator=torch.Generator().manual_seed(0), init="kmeans++")
    nearest = torch.cdist(centres, found).argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(6))
    torch.testing.assert_close(found[nearest], centres, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="init"):
        kmeans(z, 6, init="farthest")


def test_fitted_colours_are_the_six_primaries():
    """Tokens of one flat colour give exactly it (u = x / v); the seventh centroid takes the few mixed tokens."""
    data = ShapesDataset("train", size=128, seed=0)
    images = torch.stack([data[i][0] for i in range(128)])
    colours = fit_colours(images, ValueChromaConfig(num_colours=7), patch=8)
    distance = torch.cdist(PRIMARIES, colours)                                     # (6, 7)
    # mixed tokens (two objects in one 8x8 patch) are rare and pull a centroid by a little at most
    assert distance.min(dim=1).values.max() < 0.05


def test_value_images_are_the_brightest_channel():
    data = ShapesDataset("train", size=2, seed=0)
    v, caption = ValueImages(data)[1]
    assert v.shape == (1, 64, 64) and caption == data[1][1]
    assert torch.equal(v, data[1][0].amax(dim=0, keepdim=True))


# ------------------------------------------------------------------------------------------- the recipe

def value_chroma_recipe():
    recipe = tiny_tokenizer_recipe()
    recipe.vqvae = {**recipe.vqvae, "in_channels": 1, "out_channels": 1}
    recipe.value_chroma = {"num_colours": 7, "min_value": 0.5}
    return recipe


def test_recipe_channels_must_fit_the_kind_of_tokenizer(tmp_path):
    """A value x colour recipe whose VQGAN reads RGB, and a plain one whose VQGAN reads one channel, are refused
    before any training."""
    recipe = tiny_tokenizer_recipe()
    assert recipe.value_chroma is not None
    recipe.vqvae = {**recipe.vqvae, "in_channels": 3, "out_channels": 3}
    with pytest.raises(TrainError, match=r"reads and writes the value \(1 channel"):
        train_tokenizer(tmp_path / "a", recipe, progress=False)
    recipe = tiny_tokenizer_recipe()
    recipe.value_chroma = None
    with pytest.raises(TrainError, match=r"reads and writes RGB \(3 channel"):
        train_tokenizer(tmp_path / "b", recipe, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tiny_value_chroma_run_trains_a_parti_that_draws(tmp_path):
    """Tokenizer (structure VQGAN on the value, colours by k-means) -> Transformer with factorised codes -> a
    pipeline folder that loads and draws."""
    folder = train_tokenizer(tmp_path, value_chroma_recipe(), progress=False)
    measured = json.loads((folder / "recipe.json").read_text())["run"]["measured"]
    assert set(measured) == {"fp32", "float16 weights"}
    assert measured["fp32"]["colour_codes_used"] >= 2
    tokenizer = load_image_tokenizer(folder)
    assert isinstance(tokenizer, ValueChromaVQModel) and tokenizer.codebook_factors == (32, 8)
    assert evaluate_tokenizer(tokenizer, n=8)["tokens_per_image"] == 64
    pipe = PartiPipeline.from_pretrained(train_parti(tmp_path, tiny_parti_recipe(), progress=False))
    assert isinstance(pipe.vqvae, ValueChromaVQModel)
    assert pipe.transformer.config.codebook_factors == (32, 8) and pipe.transformer.config.codebook_size == 256
    out = pipe("a red triangle on the left", generator=torch.Generator().manual_seed(0), output_type="np",
               progress=False)
    assert out.images.shape == (1, 64, 64, 3)
    tokens = pipe("a red triangle on the left", generator=torch.Generator().manual_seed(0),
                  output_type="tokens", progress=False).images
    assert int(tokens.max()) < 256


def test_pipeline_refuses_a_factorised_transformer_over_other_codes(model):
    """A Transformer whose codes factor as (32, 8) draws structure x colour pairs; over a plain VQModel of 256
    codes its tokens would be read as other codes: refused, naming both factorisations."""
    from parti_from_scratch.parti.transformer import PartiTransformer, preset_config
    from parti_from_scratch.train.components.parti import shapes_text_tokenizer

    text = shapes_text_tokenizer(24)
    config = preset_config("shapes", vocab_size=text.vocab_size, max_text_positions=24, image_vocab_size=257,
                           codebook_size=256, decoder_start_token_id=256, codebook_factors=(32, 8), d_model=32,
                           encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_ffn_dim=64)
    transformer = PartiTransformer(config).eval()
    assert PartiPipeline(text, transformer, model).vqvae is model             # (32, 8): the same factorisation
    plain = VQModel(**{**STRUCTURE, "in_channels": 3, "out_channels": 3, "num_vq_embeddings": 256})
    with pytest.raises(ValueError, match=r"factor as \(32, 8\).*as None"):
        PartiPipeline(text, transformer, plain)
