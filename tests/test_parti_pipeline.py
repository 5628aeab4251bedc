"""PartiPipeline: a min-dalle folder end to end (tokens equal to min-dalle's), its own layout, reranking, bad input.

The min-dalle folder is tiny and in the exact layout users download: encoder.pt / decoder.pt written from
min-dalle's own classes (tests/min_dalle_oracle.py), fp16; vocab.json + merges.txt of a small BPE trained on
PartiPrompts (tests/test_parti_text_tokenizer.py); detoker.pt in taming's names with 2**14 codes.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from min_dalle_oracle import one_thread  # noqa: F401  (autouse fixture)
from min_dalle_oracle import import_min_dalle, min_dalle_config, min_dalle_sample, randomize_
from test_parti_text_tokenizer import parti_prompts, write_bart_vocab
from test_weights_convert_min_dalle import write_min_dalle_pair

from parti_from_scratch import PartiPipeline
from parti_from_scratch.cli import main
from parti_from_scratch.clip.model import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from parti_from_scratch.clip.tokenizer import CLIPTokenizer
from parti_from_scratch.parti.reranking import clip_pixel_values, rerank_by_clip_score
from parti_from_scratch.parti.text_tokenizer import PartiTextTokenizer
from parti_from_scratch.parti.transformer import PartiTransformer
from parti_from_scratch.parti.vqgan import VQModel, VQModelConfig
from parti_from_scratch.parti_pipeline import PartiSamplingDefaults
from weights_convert.common import block_rules, rename_keys
from weights_convert.diffusers_models import to_diffusers
from weights_convert.taming_vqgan import taming_blocks

VOCAB = 900              # the BPE of the fixture: the encoder's text vocabulary
GRID = (3, 3)            # image tokens per image: 9, so a test draws few
VQ = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32, latent_channels=8, vq_embed_dim=8,
          num_vq_embeddings=2 ** 14, mid_block_add_attention=False, sample_size=6,
          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def write_detoker(path) -> None:
    """detoker.pt: a random decoder-only VQModel in taming's names, the codebook as `embedding.weight`, fp16."""
    vq = randomize_(VQModel(VQModelConfig(**VQ), decoder_only=True), seed=4, std=0.1)
    blocks = taming_blocks(1, [False, False], [False, False], mid_attention=False, codebook="embedding",
                           halves=("decoder",))
    state = rename_keys(to_diffusers(vq.state_dict()), block_rules(blocks, reverse=True), source="model")
    torch.save({k: v.half() for k, v in state.items()}, path)


@pytest.fixture(scope="module")
def min_dalle_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("min-dalle-folder")
    write_bart_vocab(folder, VOCAB)
    config = min_dalle_config(vocab_size=VOCAB, d_model=64, encoder_attention_heads=1, decoder_attention_heads=1,
                              max_text_positions=16, image_grid_size=GRID)
    encoder, decoder = write_min_dalle_pair(folder, config)
    write_detoker(folder / "detoker.pt")
    return folder, config, encoder, decoder


@pytest.fixture(scope="module")
def pipe(min_dalle_folder):
    return PartiPipeline.from_pretrained(min_dalle_folder[0])


def tiny_clip_model(seed: int = 0) -> CLIPModel:
    """A random full CLIP (both towers) on 16x16 images, with the built-in vocabulary's 49,408 text tokens."""
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=1,
                                   num_attention_heads=2),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=16)).eval()


@pytest.fixture(scope="module")
def tiny_clip():
    """A random full CLIP (both towers) on 16x16 images, and the vendored CLIP tokenizer."""
    return tiny_clip_model(), CLIPTokenizer()


def test_min_dalle_folder_loads_as_components(pipe, min_dalle_folder):
    folder, config, _, _ = min_dalle_folder
    assert isinstance(pipe.tokenizer, PartiTextTokenizer) and isinstance(pipe.transformer, PartiTransformer)
    assert pipe.vqvae.decoder_only and pipe.transformer.config.image_grid_size == GRID
    assert pipe.tokenizer.model_max_length == 16                   # the encoder's positions
    assert pipe.sampling_defaults == PartiSamplingDefaults(guidance_scale=16.0, temperature=1.0, top_k=256)
    assert set(pipe.components) == {"tokenizer", "transformer", "vqvae", "sampling_defaults", "reranker"}


def test_pipeline_tokens_equal_min_dalle_end_to_end(pipe, min_dalle_folder):
    """Prompt -> min-dalle's TextTokenizer and text rows -> its guided top-k sampler, against the pipeline, same seed."""
    folder, config, encoder, decoder = min_dalle_folder
    import_min_dalle()
    from min_dalle.text_tokenizer import TextTokenizer
    md_tokenizer = TextTokenizer(json.loads((folder / "vocab.json").read_text(encoding="utf-8")),
                                 (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1])
    prompt = "a red cube on top of a blue sphere"
    ids = md_tokenizer.tokenize(prompt)
    # MinDalle.generate_raw_image_stream's text rows: [<s></s> + padding; the prompt's ids + padding]
    rows = torch.ones(2, config.max_text_positions, dtype=torch.long)
    rows[0, :2] = torch.tensor([ids[0], ids[-1]])
    rows[1, :len(ids)] = torch.tensor(ids)
    for seed, top_k, scale in ((5, 100, 16.0), (6, 3, 3.0)):
        expected = min_dalle_sample(encoder, decoder, rows, image_count=2, image_token_count=config.image_token_count,
                                    seed=seed, temperature=1.0, top_k=top_k, supercondition_factor=scale)
        got = pipe(prompt, num_images_per_prompt=2, guidance_scale=scale, top_k=top_k, output_type="tokens",
                   generator=torch.Generator().manual_seed(seed), progress=False).images
        assert torch.equal(got.flatten(1), expected)


def test_outputs_and_reproducibility(pipe):
    kwargs = dict(num_images_per_prompt=2, progress=False)
    pil = pipe("a corgi", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (6, 6) for im in pil)
    arr = pipe("a corgi", generator=torch.Generator().manual_seed(1), output_type="np", **kwargs).images
    assert arr.shape == (2, 6, 6, 3) and 0 <= arr.min() and arr.max() <= 1
    pt = pipe("a corgi", generator=torch.Generator().manual_seed(1), output_type="pt", **kwargs).images
    assert pt.shape == (2, 3, 6, 6)
    # the same seed, the same pixels (PIL's are pt's rounded to 0..255)
    torch.testing.assert_close(torch.from_numpy(arr).permute(0, 3, 1, 2), pt, rtol=0, atol=0)
    assert torch.equal(torch.from_numpy(np.array(pil[0])).permute(2, 0, 1),
                       (pt[0] * 255).round().to(torch.uint8))
    (images,) = pipe(["a corgi", "a cat"], return_dict=False, output_type="tokens", progress=False)
    assert images.shape == (2, *GRID)


def test_progress_bar_over_tokens(pipe, capsys):
    pipe("a corgi", output_type="tokens", progress=False)
    assert "image tokens" not in capsys.readouterr().err
    pipe("a corgi", output_type="tokens", progress=True)
    assert "image tokens" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt=""), "prompt 0 is empty"), (dict(prompt=["a cat", "  "]), "prompt 1 is empty"),
    (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=0.0), "temperature"), (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(num_candidates=0), "num_candidates"), (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(output_type="latent"), "output_type"),
])
def test_bad_arguments_name_the_argument(pipe, kwargs, name):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(ValueError, match=re.escape(name)):
        pipe(kwargs.pop("prompt"), progress=False, **kwargs)


def test_prompt_without_readable_tokens_warns(pipe):
    with pytest.warns(UserWarning, match="has no token this tokenizer reads"):
        pipe("一个红色的大圆", output_type="tokens", progress=False)


def test_to_moves_and_casts(min_dalle_folder):
    pipe = PartiPipeline.from_pretrained(min_dalle_folder[0])
    assert pipe.to(torch.float64) is pipe and pipe.dtype == torch.float64 and pipe.vqvae.dtype == torch.float64
    pipe.to("cpu", torch.float32)
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")
    with pytest.raises(TypeError, match="floating-point"):
        pipe.to(torch.int64)


def test_long_prompt_is_truncated_with_a_warning(pipe):
    long = " ".join(parti_prompts()[:20])
    with pytest.warns(UserWarning, match="truncation dropped"):
        ids, mask = pipe.encode_prompt([long])
    assert ids.shape == (1, 16) and ids[0, -1].item() == pipe.tokenizer.eos_token_id and mask.all()
    with pytest.warns(UserWarning, match="truncation dropped"):
        pipe(long, output_type="tokens", progress=False)


def test_candidates_need_a_full_clip(pipe, tiny_clip):
    with pytest.raises(ValueError, match=r"num_candidates=4 needs a scorer \(.* has no .*reranker/ and none was "
                                         r"passed\): pass reranker=\(CLIPModel, CLIPTokenizer\)"):
        pipe("a cat", num_candidates=4, progress=False)
    with pytest.raises(TypeError, match="not a full CLIPModel"):
        pipe("a cat", num_candidates=2, reranker=(tiny_clip[0].text_model, tiny_clip[1]), progress=False)


def test_rerank_by_clip_score():
    """s_j = cos(T, I_j), best = argmax_j s_j: against cosines computed one pair at a time."""
    g = torch.Generator().manual_seed(0)
    text, images = torch.randn(3, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    best, scores = rerank_by_clip_score(text, images)
    for n in range(3):
        for j in range(5):
            cosine = torch.dot(text[n], images[n, j]) / (text[n].norm() * images[n, j].norm())
            # one float32 dot product of 8 unit-scale terms: a few ulps of 1
            torch.testing.assert_close(scores[n, j], cosine, rtol=0, atol=1e-6)
        assert best[n].item() == max(range(5), key=lambda j: scores[n, j].item())
    # the scale of either embedding does not matter, only its direction
    best2, scores2 = rerank_by_clip_score(3 * text, images * torch.rand(3, 5, 1, generator=g).add(0.5))
    assert torch.equal(best2, best)
    torch.testing.assert_close(scores2, scores, rtol=0, atol=1e-6)


def test_reranking_keeps_the_candidate_clip_scores_best(pipe, tiny_clip):
    """3 candidates for 1 output are the 3 images the same seed draws without reranking; the kept one is
    the argmax of CLIP's logits_per_text over them, computed here by CLIPModel.forward."""
    clip, clip_tokenizer = tiny_clip
    prompt = "a red cube on top of a blue sphere"
    drawn = pipe(prompt, num_images_per_prompt=3, output_type="pt", generator=torch.Generator().manual_seed(2),
                 progress=False).images
    out = pipe(prompt, num_candidates=3, output_type="pt", generator=torch.Generator().manual_seed(2),
               reranker=tiny_clip, progress=False)
    ids = clip_tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = clip(ids, clip_pixel_values(drawn * 2 - 1, 16)).logits_per_text[0]      # (3,): exp(t) cos
    best = int(logits.argmax())
    # the seed makes reranking change the pick, by a margin far above float32 rounding (~1e-6)
    assert best != 0 and logits.max() - logits.min() > 1e-3
    assert torch.equal(out.images[0], drawn[best])
    torch.testing.assert_close(out.clip_scores[0], logits[best] / clip.logit_scale.exp(), rtol=1e-5, atol=1e-6)


def test_save_pretrained_and_reload_own_layout(tmp_path, min_dalle_folder):
    """The pipeline's own layout (a full VQModel, as a Parti trained here ships): written, read back, same tokens."""
    folder, config, _, _ = min_dalle_folder
    tokenizer = PartiTextTokenizer.from_pretrained(folder, model_max_length=16)
    transformer = randomize_(PartiTransformer(config), seed=9).eval()
    vqvae = randomize_(VQModel(VQModelConfig(**VQ)), seed=10, std=0.1).eval()
    defaults = PartiSamplingDefaults(guidance_scale=2.0, temperature=0.9, top_k=50, top_p=0.95)
    original = PartiPipeline(tokenizer, transformer, vqvae, sampling_defaults=defaults)
    original.save_pretrained(tmp_path / "parti")
    assert {p.name for p in (tmp_path / "parti").iterdir()} == {"text_tokenizer", "transformer", "vqvae",
                                                                "sampling_defaults.json", "model_index.json"}
    again = PartiPipeline.from_pretrained(tmp_path / "parti")
    assert again.sampling_defaults == defaults and again.transformer.config == config
    a, b = (p("a blue sphere", num_images_per_prompt=2, output_type="pt", progress=False,
              generator=torch.Generator().manual_seed(3)).images for p in (original, again))
    assert torch.equal(a, b)


def test_not_a_parti_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"neither a min-dalle folder .* nor a Parti pipeline folder"):
        PartiPipeline.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_generates_from_a_min_dalle_folder(min_dalle_folder, tmp_path, capsys):
    folder = min_dalle_folder[0]
    out = tmp_path / "out.png"
    code = main(["generate", "a red cube", "--model", str(folder), "-o", str(out), "--top-k", "8",
                 "--temperature", "0.8", "--top-p", "0.9", "--guidance", "3", "--num-images", "2", "--quiet"])
    assert code == 0
    images = [Image.open(tmp_path / f"out-{i}.png") for i in range(2)]
    assert all(im.size == (6, 6) for im in images)
    assert capsys.readouterr().out.split() == [str(tmp_path / "out-0.png"), str(tmp_path / "out-1.png")]


@pytest.mark.parametrize("args, message", [
    (["--steps", "10"], "--steps: not an option for a min-dalle / Parti folder"),
    (["--candidates", "2"], "num_candidates=2 needs a scorer"),
    (["--top-k", "0"], None),                                     # argparse: must be >= 1
])
def test_cli_errors_are_one_line(min_dalle_folder, tmp_path, capsys, args, message):
    argv = ["generate", "a cat", "--model", str(min_dalle_folder[0]), "-o", str(tmp_path / "x.png"), "--quiet"]
    if message is None:
        with pytest.raises(SystemExit) as e:
            main(argv + args)
        assert e.value.code == 2
        return
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_cli_refuses_parti_options_for_a_diffusion_model(tmp_path, capsys):
    assert main(["generate", "a cat", "--top-k", "5", "-o", str(tmp_path / "x.png")]) == 2
    assert "--top-k: not an option for a diffusion model" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"top_k": 0}, "top_k must be an integer >= 1"), ({"top_p": 2}, "top_p must be in (0, 1]"),
    ({"num_candidates": 0}, "num_candidates must be an integer >= 1"),
    ({"num_inference_steps": 20}, "unknown key(s) num_inference_steps"),
])
def test_sampling_defaults_file_is_checked(tmp_path, values, message):
    (tmp_path / "sampling_defaults.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "sampling_defaults.json")) + ".*"
                       + re.escape(message)):
        PartiSamplingDefaults.read(tmp_path)


# ------------------------------------------------------------------------------------------------ the shipped Parti

@pytest.fixture(scope="module")
def parti_folder(tmp_path_factory):
    """A Parti pipeline folder in the layout training writes: the shapes text tokenizer, a random tiny Transformer,
    a random tiny VQModel (8x8 tokens of 32 codes)."""
    from parti_from_scratch.train.components.parti import build_parti, parti_config, shapes_text_tokenizer
    from parti_from_scratch.train.components.vq import Codebook, build_vq, export_vq
    from parti_from_scratch.train.parti_recipe import _vq_config, tiny_parti_recipe

    folder = tmp_path_factory.mktemp("parti_model")
    vq = export_vq(build_vq(_vq_config(block_out_channels=(8, 8, 8, 8), num_vq_embeddings=32, vq_embed_dim=4,
                                       groups=4), Codebook(), seed=0))
    tokenizer = shapes_text_tokenizer(24)
    transformer = build_parti(parti_config(tiny_parti_recipe().transformer, vq, tokenizer), seed=0).eval()
    PartiPipeline(tokenizer, transformer, vq, PartiSamplingDefaults(guidance_scale=2.0, top_k=8)).save_pretrained(folder)
    return folder


def _ship(monkeypatch, folder) -> None:
    import parti_from_scratch.parti_pipeline as module
    monkeypatch.setattr(module, "PARTI_MODEL_DIR", folder)


def test_from_pretrained_without_a_path_says_the_shipped_parti_is_not_trained(tmp_path, monkeypatch):
    from parti_from_scratch.parti_pipeline import TRAIN_PARTI_COMMAND, ShippedPartiMissingError
    (tmp_path / "vqvae").mkdir()
    _ship(monkeypatch, tmp_path)
    with pytest.raises(ShippedPartiMissingError, match="the shipped Parti is not trained yet") as e:
        PartiPipeline.from_pretrained()
    assert TRAIN_PARTI_COMMAND in str(e.value)


def test_from_pretrained_without_a_path_loads_the_shipped_folder(parti_folder, monkeypatch):
    _ship(monkeypatch, parti_folder)
    shipped, named = PartiPipeline.from_pretrained(), PartiPipeline.from_pretrained(parti_folder)
    assert shipped.sampling_defaults == PartiSamplingDefaults(guidance_scale=2.0, top_k=8)
    a, b = (p("a large red circle on the left", output_type="tokens", generator=torch.Generator().manual_seed(3),
              progress=False).images for p in (shipped, named))
    assert torch.equal(a, b)


def test_cli_generate_model_parti(parti_folder, tmp_path, monkeypatch, capsys):
    _ship(monkeypatch, parti_folder)
    out = tmp_path / "parti.png"
    assert main(["generate", "a small blue square at the top", "--model", "parti", "-o", str(out), "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)
    # the same image as the Python call with the folder's defaults and the same seed
    expected = PartiPipeline.from_pretrained(parti_folder)("a small blue square at the top", output_type="np",
                                                           generator=torch.Generator().manual_seed(0),
                                                           progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), (expected * 255).round().astype(np.uint8))


def test_cli_model_parti_before_it_is_trained_is_one_line(tmp_path, monkeypatch, capsys):
    from parti_from_scratch.parti_pipeline import TRAIN_PARTI_COMMAND
    (tmp_path / "vqvae").mkdir()
    _ship(monkeypatch, tmp_path)
    for argv in (["generate", "a red circle", "--model", "parti", "-o", str(tmp_path / "x.png")],
                 ["eval", "--model", "parti", "--n", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not trained yet" in err and TRAIN_PARTI_COMMAND in err


def test_cli_eval_grades_a_parti_folder(parti_folder, tmp_path, monkeypatch, capsys):
    _ship(monkeypatch, parti_folder)
    grid = tmp_path / "grid.png"
    assert main(["eval", "--model", "parti", "--prompts", "pair", "--n", "3", "--top-k", "4",
                 "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "3 prompts (pair), guidance 2, temperature 1, top-k 4, top-p None, best of 1" in out
    assert re.search(r"exact\s+\d+\.\d%", out) and grid.is_file()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "PARTI", "--steps", "5"], "--steps: not an option for a min-dalle / Parti folder"),
    (["eval", "--top-k", "5"], "--top-k: not an option for a diffusion model"),
])
def test_cli_eval_refuses_the_other_familys_options(parti_folder, monkeypatch, capsys, argv, message):
    argv = [str(parti_folder) if a == "PARTI" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ reranker/

def _with_reranker(folder, reranker, out):
    """The pipeline at `folder` saved again at `out` with `reranker` as its component."""
    components = {**PartiPipeline.from_pretrained(folder).components, "reranker": reranker}
    PartiPipeline(**components).save_pretrained(out)
    return out


def test_folder_reranker_round_trip(parti_folder, tiny_clip, tmp_path):
    """reranker/ holds the CLIP's transformers folder and, for the built-in vocabulary, a note instead of its files;
    read back, the CLIP has the same tensors and the tokenizer the same ids."""
    folder = _with_reranker(parti_folder, tiny_clip, tmp_path / "parti")
    assert {p.name for p in (folder / "reranker").iterdir()} == {"config.json", "model.safetensors",
                                                                 "builtin_tokenizer.json"}
    assert json.loads((folder / "model_index.json").read_text())["reranker"] == ["transformers", "CLIPModel"]
    clip, clip_tokenizer = PartiPipeline.from_pretrained(folder).reranker
    want = tiny_clip[0].state_dict()
    assert clip.state_dict().keys() == want.keys()
    for key, value in clip.state_dict().items():
        assert torch.equal(value, want[key]), key
    text = "a red cube on top of a blue sphere"
    assert clip_tokenizer(text).input_ids == tiny_clip[1](text).input_ids
    assert clip_tokenizer.model_max_length == tiny_clip[1].model_max_length


def test_folder_reranker_with_its_own_tokenizer_files(parti_folder, tiny_clip, tmp_path):
    """A tokenizer other than the built-in one (here another padding token) is saved as files and read back."""
    tokenizer = CLIPTokenizer(pad_token="!", model_max_length=20)
    folder = _with_reranker(parti_folder, (tiny_clip[0], tokenizer), tmp_path / "parti")
    assert not (folder / "reranker" / "builtin_tokenizer.json").exists()
    assert (folder / "reranker" / "vocab.json").is_file() and (folder / "reranker" / "merges.txt").is_file()
    _, again = PartiPipeline.from_pretrained(folder).reranker
    assert again.pad_token == "!" and again.model_max_length == 20
    assert again("a blue sphere", padding="max_length", max_length=20).input_ids == \
        tokenizer("a blue sphere", padding="max_length", max_length=20).input_ids


def test_folder_reranker_picks_the_candidate_clip_scores_best(parti_folder, tiny_clip, tmp_path):
    """num_candidates=3 with no reranker passed uses the folder's: the kept image is the argmax over the 3 images the
    same seed draws without reranking of CLIP's logits_per_text, computed here by CLIPModel.forward."""
    pipe = PartiPipeline.from_pretrained(_with_reranker(parti_folder, tiny_clip, tmp_path / "parti"))
    clip, clip_tokenizer = tiny_clip
    for seed in range(8):
        prompt = "a red square"
        drawn = pipe(prompt, num_images_per_prompt=3, output_type="pt", generator=torch.Generator().manual_seed(seed),
                     progress=False).images
        ids = clip_tokenizer([prompt], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            logits = clip(ids, clip_pixel_values(drawn * 2 - 1, 16)).logits_per_text[0]      # (3,): exp(t) cos
        best = int(logits.argmax())
        top2 = logits.topk(2).values
        # a seed whose pick is not the first candidate, by a margin far above float32 rounding (~1e-6)
        if best != 0 and top2[0] - top2[1] > 1e-4:
            break
    else:
        pytest.fail("no seed in 0..7 makes the folder's reranker pick another candidate than the first")
    out = pipe(prompt, num_candidates=3, output_type="pt", generator=torch.Generator().manual_seed(seed),
               progress=False)
    assert torch.equal(out.images[0], drawn[best])
    # cosine similarity = logit / exp(t); float32 dot products of unit vectors of width 16: ~1e-6
    torch.testing.assert_close(out.clip_scores[0], logits[best] / clip.logit_scale.exp(), rtol=1e-5, atol=1e-6)


def test_folder_without_reranker_names_the_folder(parti_folder):
    pipe = PartiPipeline.from_pretrained(parti_folder)
    assert pipe.reranker is None
    with pytest.raises(ValueError, match=re.escape(f"needs a scorer ({parti_folder} has no "
                                                   f"{parti_folder / 'reranker'}/ and none was passed)")):
        pipe("a red square", num_candidates=2, progress=False)


def _edit_reranker_weights(folder, edit) -> None:
    from safetensors.torch import load_file, save_file
    path = folder / "reranker" / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("visual_projection.weight"), r"visual_projection\.weight"),
    (lambda s: s.__setitem__("text_projection.weight", torch.zeros(3, 3)), r"text_projection\.weight"),
])
def test_bad_reranker_tensor_names_the_file(parti_folder, tiny_clip, tmp_path, edit, message):
    folder = _with_reranker(parti_folder, tiny_clip, tmp_path / "parti")
    _edit_reranker_weights(folder, edit)
    with pytest.raises(ValueError, match=re.escape(str(folder / "reranker" / "model.safetensors")) + ".*" + message):
        PartiPipeline.from_pretrained(folder)


def test_text_only_reranker_is_refused(parti_folder, tiny_clip, tmp_path):
    folder = _with_reranker(parti_folder, tiny_clip, tmp_path / "parti")
    tiny_clip[0].text_model.save_pretrained(tmp_path / "text")
    for name in ("config.json", "model.safetensors"):
        (folder / "reranker" / name).write_bytes((tmp_path / "text" / name).read_bytes())
    with pytest.raises(ValueError, match=re.escape(str(folder / "reranker" / "config.json")) + ".*vision_config"):
        PartiPipeline.from_pretrained(folder)


def test_cli_candidates_use_the_folder_reranker_or_a_clip_folder(parti_folder, tiny_clip, tmp_path, capsys):
    """generate --candidates 2 takes the folder's reranker/ with no --reranker, and --reranker takes a CLIP folder
    without tokenizer files (as `train clip` writes it) with the built-in vocabulary: the same image both ways."""
    folder = _with_reranker(parti_folder, tiny_clip, tmp_path / "parti")
    tiny_clip[0].save_pretrained(tmp_path / "clip")
    argv = ["generate", "a small blue square at the top", "--candidates", "2", "--quiet"]
    assert main([*argv, "--model", str(folder), "-o", str(tmp_path / "a.png")]) == 0
    assert main([*argv, "--model", str(parti_folder), "-o", str(tmp_path / "b.png"),
                 "--reranker", str(tmp_path / "clip")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("a.png", "b.png"))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    tiny_clip[0].text_model.save_pretrained(tmp_path / "text")
    assert main([*argv, "--model", str(parti_folder), "-o", str(tmp_path / "c.png"),
                 "--reranker", str(tmp_path / "text")]) != 0
    assert "not a full CLIP (no 'vision_config')" in capsys.readouterr().err


def test_help_names_the_shipped_parti():
    from parti_from_scratch.cli import build_parser
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for command in ("generate", "eval"):
        assert "`parti` names the Parti the package ships" in " ".join(sub[command].format_help().split())
