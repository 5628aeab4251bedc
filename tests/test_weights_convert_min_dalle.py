"""Loading min-dalle's encoder/decoder files (DALL·E mini and mega) into our PartiTransformer.

The files are written with min-dalle's own classes (tests/min_dalle_oracle.py builds tiny random
DalleBartEncoder/DalleBartDecoder; their state dicts are saved with torch.save in fp16, as min-dalle
ships them). Our loader reads them back; the loaded model must compute what min-dalle's modules
compute from the same fp16-rounded weights, and every damaged or hostile file must be refused,
naming the file and the keys.
"""
from __future__ import annotations

import copy
import os
import re

import pytest
import torch

from min_dalle_oracle import one_thread  # noqa: F401  (autouse fixture)
from min_dalle_oracle import (MIN_DALLE_START, import_min_dalle, min_dalle_config, min_dalle_models,
                              min_dalle_sample, min_dalle_text_rows)
from parti_from_scratch.parti.sampling import generate_image_tokens
from parti_from_scratch.parti.transformer import PartiTransformer, preset_config
from weights_convert.common import CheckpointError, check_state_dict
from weights_convert.min_dalle import (from_min_dalle_keys, infer_min_dalle_config, load_min_dalle_transformer,
                                       min_dalle_files)

# Width 128 with 2 heads: heads of width 64, as in DALL·E mini and mega, so the loader's default head count
# (d / 64) is the one exercised. A 4x4 grid of image tokens.
SIZES = dict(d_model=128, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=96,
             decoder_ffn_dim=96, image_grid_size=(4, 4))
# The same bound as the transformer parity tests (tests/test_parti_transformer.py): both sides run float32 on
# identical weights and differ only in the order of the attention's sums; the oracle's weights (std 0.15) keep
# logits within ~4, where a few ulps of accumulated reordering stay a factor ~4 under 1e-5.
TOL = 1e-5


def fp16_round_(module: torch.nn.Module) -> torch.nn.Module:
    """Round every weight to fp16 and back: min-dalle's files are fp16, so both sides then hold the same values."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def write_min_dalle_pair(folder, config, seed=0, suffix=""):
    """encoder{suffix}.pt / decoder{suffix}.pt from min-dalle's classes; returns (encoder, decoder) modules."""
    encoder, decoder = min_dalle_models(config, seed)
    fp16_round_(encoder), fp16_round_(decoder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in encoder.state_dict().items()}, folder / f"encoder{suffix}.pt")
    torch.save({k: v.half() for k, v in decoder.state_dict().items()}, folder / f"decoder{suffix}.pt")
    return encoder, decoder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    config = min_dalle_config(**SIZES)
    folder = tmp_path_factory.mktemp("min-dalle")
    encoder, decoder = write_min_dalle_pair(folder, config)
    return config, encoder, decoder, folder


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_sizes_are_read_from_the_tensors(pair):
    config, _, _, folder = pair
    model = load_min_dalle_transformer(folder / "encoder.pt", folder / "decoder.pt")
    got = model.config
    for key in ("vocab_size", "image_vocab_size", "codebook_size", "decoder_start_token_id", "d_model",
                "encoder_layers", "decoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                "max_text_positions", "image_grid_size", "ffn_type", "sublayer_post_norm", "bias"):
        assert getattr(got, key) == getattr(config, key), key
    assert model.decoder.lm_head.weight.dtype == torch.float32      # fp16 on disk, float32 in memory


@torch.no_grad()
def stepwise_logits(config, text_rows, encoder=None, decoder=None, ours=None, dtype=torch.float32):
    """Logits (N, 2, 1, V) of the guided decoder fed one token per step over its cache (1 image: rows [uncond;
    cond]), the inputs after the start token drawn at random; min-dalle's modules, or ours if given."""
    g = torch.Generator().manual_seed(7)
    previous = torch.tensor([[MIN_DALLE_START]])
    if ours is None:
        states = encoder(text_rows)
        mask = text_rows.not_equal(1)[:, None, None, :]
        attention_state = torch.zeros(config.decoder_layers, 4, config.image_token_count, config.d_model, dtype=dtype)
    else:
        cache = ours.decoder.new_cache(ours.encoder(text_rows), text_rows != 1)
    out = []
    for i in range(config.image_token_count):
        if ours is None:
            logits, attention_state = decoder.forward(mask, states, attention_state, previous, torch.tensor([i]))
        else:
            logits = ours.decoder(previous.repeat(2, 1), cache=cache)
        out.append(logits.double())
        previous = torch.randint(0, 2 ** 14, (1, 1), generator=g)
    return torch.stack(out)


def test_loaded_model_matches_min_dalle_encoder_and_decoder_logits(pair):
    """Encoder states of min-dalle's two text rows, and the guided decoder's logits at every cached step."""
    config, encoder, decoder, folder = pair
    ours = load_min_dalle_transformer(folder / "encoder.pt", folder / "decoder.pt")
    text_rows = min_dalle_text_rows(config)
    with torch.no_grad():
        assert max_diff(ours.encoder(text_rows), encoder(text_rows)) <= TOL
    # At width 128 the logits reach |l| ~ 9 (ulp 9.5e-7) and min-dalle's own float32 logits drift ~1.7e-5 from
    # its float64 ones, over the 1e-5 bound, so the bound is the reference's own drift, measured here: ours
    # must be as close to min-dalle's float64 logits as min-dalle's float32 logits are, up to a factor 2
    # (measured: 2.0e-5 vs 1.7e-5; a wrong weight moves logits by O(1)).
    exact = stepwise_logits(config, text_rows.clone(), copy.deepcopy(encoder).double(),
                            copy.deepcopy(decoder).double(), dtype=torch.float64)
    reference_drift = max_diff(stepwise_logits(config, text_rows, encoder, decoder), exact)
    our_drift = max_diff(stepwise_logits(config, text_rows, ours=ours), exact)
    assert our_drift <= 2 * reference_drift, (our_drift, reference_drift)
    assert reference_drift < 1e-4


def test_loaded_model_samples_min_dalle_tokens(pair):
    """Guided top-k sampling from the loaded files gives min-dalle's token sequence for the same seed."""
    config, encoder, decoder, folder = pair
    ours = load_min_dalle_transformer(folder / "encoder.pt", folder / "decoder.pt")
    text_rows = min_dalle_text_rows(config)
    expected = min_dalle_sample(encoder, decoder, text_rows, image_count=2, image_token_count=config.image_token_count,
                                seed=3, temperature=1.0, top_k=64, supercondition_factor=16.0)
    got = generate_image_tokens(ours, text_rows[1:].repeat(2, 1), uncond_input_ids=text_rows[:1].repeat(2, 1),
                                guidance_scale=16.0, top_k=64, generator=torch.Generator().manual_seed(3),
                                progress=False)
    assert torch.equal(got.flatten(1), expected)


@pytest.mark.parametrize("preset, variant", [("dalle-mini", "mini"), ("dalle-mega", "mega")])
def test_full_size_layouts_are_accepted(preset, variant):
    """min-dalle's full-size modules, built on the meta device (no memory): every key and shape fits ours,
    and the sizes read off them are the published ones (heads included)."""
    models = import_min_dalle()
    mega = variant == "mega"
    sizes = dict(layer_count=24 if mega else 12, embed_count=2048 if mega else 1024,
                 attention_head_count=32 if mega else 16, glu_embed_count=4096 if mega else 2730)
    with torch.device("meta"):
        encoder = models.DalleBartEncoder(text_vocab_count=50272 if mega else 50264, text_token_count=64,
                                          device="cpu", **sizes)
        decoder = models.DalleBartDecoder(image_vocab_count=16415 if mega else 16384, device="cpu", **sizes)
    config = infer_min_dalle_config(encoder.state_dict(), decoder.state_dict(), "encoder.pt", "decoder.pt")
    assert config == preset_config(preset)
    with torch.device("meta"):
        model = PartiTransformer(config)
    check_state_dict(model.encoder, from_min_dalle_keys(encoder.state_dict(), "encoder.pt"), "encoder.pt")
    check_state_dict(model.decoder, from_min_dalle_keys(decoder.state_dict(), "decoder.pt"), "decoder.pt")


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"missing keys: layers\.1\.ffn\.fc1\.weight"),
    ("extra", r"unexpected keys: layers\.0\.self_attn\.k_proj\.bias"),
    ("shape", r"wrong shapes: layers\.0\.self_attn\.q_proj\.weight \(file \(128, 64\), model \(128, 128\)\)"),
    ("no positions", r"missing key 'embed_positions\.weight'"),
    ("layer gap", r"use indices \[0, 2\], expected 0\.\.1"),
])
def test_damaged_encoder_is_refused_naming_file_and_keys(pair, tmp_path, case, pattern):
    _, encoder, _, folder = pair
    state = {k: v.half() for k, v in encoder.state_dict().items()}
    if case == "missing":
        del state["layers.1.glu.fc1.weight"]
    elif case == "extra":
        state["layers.0.self_attn.k_proj.bias"] = torch.zeros(128, dtype=torch.half)
    elif case == "shape":
        state["layers.0.self_attn.q_proj.weight"] = state["layers.0.self_attn.q_proj.weight"][:, :64]
    elif case == "no positions":
        del state["embed_positions.weight"]
    else:
        state = {re.sub(r"^layers\.1\.", "layers.2.", k): v for k, v in state.items()}
    path = tmp_path / "encoder.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: .*{pattern}"):
        load_min_dalle_transformer(path, folder / "decoder.pt")


def test_halves_of_different_models_are_refused(pair, tmp_path):
    config, _, _, folder = pair
    other = min_dalle_config(**{**SIZES, "d_model": 64, "encoder_attention_heads": 1, "decoder_attention_heads": 1})
    write_min_dalle_pair(tmp_path, other)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / 'decoder.pt'))}: .*width 64.*128"):
        load_min_dalle_transformer(folder / "encoder.pt", tmp_path / "decoder.pt")


class _Payload:
    """Pickles as the call function(*args): what a hostile checkpoint hides."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_hostile_pickle_is_refused_and_never_runs(pair, tmp_path):
    _, encoder, _, folder = pair
    marker = tmp_path / "pwned"
    state = dict(encoder.state_dict(), final_ln=_Payload(os.system, (f"touch {marker}",)))
    path = tmp_path / "encoder.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: refused"):
        load_min_dalle_transformer(path, folder / "decoder.pt")
    assert not marker.exists()


def test_folder_variants_mini_and_mega(pair, tmp_path):
    """The repository's names: encoder.pt/decoder.pt (mega), encoder_mini.pt/decoder_mini.pt (mini)."""
    config, _, _, folder = pair
    flat = tmp_path / "repo"
    write_min_dalle_pair(flat, config, suffix="_mini")
    for name in ("vocab_mini.json", "merges_mini.txt", "detoker.pt"):
        (flat / name).write_text("")
    files = min_dalle_files(flat)
    assert files["encoder"].name == "encoder_mini.pt" and files["vocab"].name == "vocab_mini.json"
    write_min_dalle_pair(flat, config)
    with pytest.raises(CheckpointError, match=r"also needs .*vocab\.json"):
        min_dalle_files(flat)                       # both: mega, as min-dalle defaults; it has no vocab.json yet
    for name in ("vocab.json", "merges.txt"):
        (flat / name).write_text("")
    assert min_dalle_files(flat)["encoder"].name == "encoder.pt"
    assert min_dalle_files(flat, variant="mini")["decoder"].name == "decoder_mini.pt"
    assert min_dalle_files(tmp_path / "nothing-here") is None
    # min-dalle's own pretrained/ layout: dalle_bart_mini/{encoder,decoder}.pt, vqgan/detoker.pt
    pretrained = tmp_path / "pretrained"
    write_min_dalle_pair(pretrained / "dalle_bart_mini", config)
    for name in ("vocab.json", "merges.txt"):
        (pretrained / "dalle_bart_mini" / name).write_text("")
    (pretrained / "vqgan").mkdir()
    (pretrained / "vqgan" / "detoker.pt").write_text("")
    assert min_dalle_files(pretrained / "dalle_bart_mini")["detokenizer"] == pretrained / "vqgan" / "detoker.pt"
