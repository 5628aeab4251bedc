"""Tests for parti_from_scratch/clip/tokenizer.py, CLIP's byte-level BPE (tutorial
"Parti原理与代码实例讲解" §2.3/§3.1; Radford et al. 2021, arXiv 2103.00020; Sennrich et al.
2016, arXiv 1508.07909).

The oracle is transformers' `CLIPTokenizer`, built offline from the SAME files: vocab.json
and merges.txt written here from the vendored `bpe_simple_vocab_16e6.txt.gz` by the recipe
in the data README, and the folder its `save_pretrained` writes. Ours must agree id for id.
"""
from __future__ import annotations

import csv
import gzip
import itertools
import json
import random
import unicodedata
import warnings
from pathlib import Path

import pytest
import regex
import torch

from parti_from_scratch.clip.bpe import AFTER_UNICODE_9_NORMALIZATION, spell_bytes
from parti_from_scratch.clip.tokenizer import (
    BYTE_LEVEL_PATTERN,
    BYTE_TO_UNICODE,
    CLIP_PATTERN,
    DEFAULT_BPE_FILE,
    CLIPTokenizer,
    clean_text,
)

transformers = pytest.importorskip("transformers")

ASSETS = Path(__file__).resolve().parent.parent / "parti_from_scratch" / "assets"
README_PROMPT = "a photo of an astronaut riding a horse on mars"
# from the data README (an external fact, not produced by this code)
README_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
TUTORIAL_CALL = dict(padding="max_length", max_length=77, truncation=True)

_WORDS = "the quick brown fox jumps over a lazy dog while an astronaut rides a horse on mars".split()
ADVERSARIAL = {
    "chinese": "一只穿着宇航服的猫在月球上骑马，背景是地球。",
    "japanese": "富士山の上を飛ぶドラゴン、カタカナとひらがなと漢字",
    "korean": "우주비행사가 말을 타고 있다",
    "emoji": "a cat 🐱 giving a 👍 on the moon 🌕🚀",
    "emoji_zwj_and_skin_tones": "family 👨‍👩‍👧‍👦, rainbow flag 🏳️‍🌈, thumbs 👍🏽👍🏿, 🧑🏻‍🚀 astronaut",
    "accents_composed": "café naïve résumé Ångström São Paulo Dvořák",
    "accents_decomposed": "cafe\u0301 nai\u0308ve re\u0301sume\u0301 A\u030angstro\u0308m Sa\u0303o Paulo Dvor\u030cak",
    "combining_marks_without_composition": "x\u0301 q\u0308\u0323 z\u20dd",
    "html_entities": "Tom &amp; Jerry, it&#39;s &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &nbsp;&#x27;",
    "whitespace_runs": "  a\t\tcat \n\n on\r\n a   mat \u3000 \u00a0 \u2028 \u0085 end  ",
    "contractions": "it's don't we're they've I'm you'll he'd IT'S DON'T We'Re o'clock rock'n'roll",
    "curly_quotes": "it’s a ‘quoted’ “phrase”, don’t „low“ «guillemets»",
    "numbers": "1234 3.14159 1,000,000 2nd 10x 0.5mm -42 1e10 ½ ² Ⅻ ١٢٣ ４２",
    "empty": "",
    "only_whitespace": "   \t\n  ",
    "thousand_words": " ".join(itertools.islice(itertools.cycle(_WORDS), 1000)),
    "punctuation_runs": "wow!!! ... ?!?! --- *** ((( ))) [[x]] {{y}} <<>> ~~~ @@@ ### ,,, ;;",
    "mixed_case": "A PhOtO oF aN AsTrOnAuT RiDiNg A HoRsE oN MARS",
    "control_characters": "a\x00b\x01c\x1b[31mred\x1b[0m\x7f d\x1ce\x1df\x1eg\x1fh i\u200bj\u200dk\ufeffl\u180em",
    "special_strings_inside_text": "<|startoftext|>a cat<|endoftext|> and <|endoftext|><|endoftext|> dog",
    "special_strings_other_case": "<|ENDOFTEXT|> <|StartOfText|> <|endoftext <endoftext|> <<|endoftext|>>",
    "greek_final_sigma": "ΟΔΟΣ ΣΟΦΙΑ ΣΣ Σ",
    "turkish_dotted_i": "İstanbul IŞIK ıi",
    "german_and_ligatures": "Straße STRASSE ﬁne ﬂower Æsir œuvre",
    "right_to_left_and_indic": "مرحبا بالعالم שלום עולם नमस्ते दुनिया สวัสดีชาวโลก",
    "fullwidth": "ＡＢＣ　ｄｅｆ１２３！？",
    "symbols": "∑ √2 ≈ 1.414 → ∞ © ® ™ € £ ¥ ° ± × ÷",
    "url_and_email": "https://example.com/a?b=c&d=e#frag user.name+tag@example.co.uk",
    "apostrophe_edge_cases": "'s 's' ''s '' ' 'll'd ’s",
}


def _read_prompts() -> list[str]:
    with open(ASSETS / "PartiPrompts.tsv", encoding="utf-8", newline="") as handle:
        return [row["Prompt"] for row in csv.DictReader(handle, delimiter="\t")]


def _write_vocab_and_merges(folder: Path) -> None:
    """The data README's recipe, written independently of the code under test."""
    with gzip.open(ASSETS / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1 : 1 + 48894]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return _read_prompts()


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip_vocab_merges")
    _write_vocab_and_merges(folder)
    return folder


@pytest.fixture(scope="module")
def reference(vocab_folder):
    return transformers.CLIPTokenizer.from_pretrained(str(vocab_folder))


@pytest.fixture(scope="module")
def saved_folder(reference, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip_saved")
    reference.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def ours_variants(ours, vocab_folder, saved_folder) -> dict[str, CLIPTokenizer]:
    return {
        "vendored": ours,
        "vocab.json+merges.txt": CLIPTokenizer.from_pretrained(vocab_folder),
        "save_pretrained folder": CLIPTokenizer.from_pretrained(saved_folder),
    }


def _assert_same_encoding(ours, reference, texts, **kwargs):
    """Same input_ids and attention_mask (values, types, dtypes), or both raise ValueError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = reference(texts, **kwargs)
        except ValueError:
            with pytest.raises(ValueError):
                ours(texts, **kwargs)
            return
        mine = ours(texts, **kwargs)
    for key in ("input_ids", "attention_mask"):
        if isinstance(expected[key], torch.Tensor):
            assert mine[key].dtype == expected[key].dtype
            torch.testing.assert_close(mine[key], expected[key], rtol=0, atol=0)
        else:
            assert mine[key] == expected[key]


# ---- the vocabulary -------------------------------------------------------------------------
def test_readme_example_ids(ours, reference):
    assert ours(README_PROMPT).input_ids == README_IDS
    assert reference(README_PROMPT).input_ids == README_IDS


def test_default_vocabulary_is_the_readme_recipe(ours, vocab_folder):
    expected = json.loads((vocab_folder / "vocab.json").read_text(encoding="utf-8"))
    assert ours.get_vocab() == expected
    assert ours.vocab_size == len(ours) == 49408
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49406, 49407, 49407)
    assert ours.model_max_length == 77
    assert DEFAULT_BPE_FILE.is_file()


def test_bytes_to_unicode_is_a_printable_bijection():
    chars = list(BYTE_TO_UNICODE.values())
    assert len(set(chars)) == 256
    assert not any(c.isspace() or unicodedata.category(c).startswith("C") for c in chars)
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ" and BYTE_TO_UNICODE[ord("a")] == "a"


# ---- the algorithm, step by step -------------------------------------------------------------
def _toy_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(BYTE_TO_UNICODE.values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def _toy_pair(merges: list[tuple[str, str]]):
    """Ours and the reference on the same tiny merge list."""
    vocab = _toy_vocab(merges)
    return CLIPTokenizer(vocab, merges), transformers.CLIPTokenizer(vocab=vocab, merges=list(merges))


def test_bpe_merges_by_rank():
    # the same two merges in opposite orders: the lower rank is applied first, wherever it sits
    for merges, expected in ([("b", "c</w>"), ("a", "b")], ["a", "bc</w>"]), ([("a", "b"), ("b", "c</w>")], ["ab", "c</w>"]):
        mine, reference = _toy_pair(merges)
        assert mine.bpe("abc") == expected
        assert mine.tokenize("abc") == reference.tokenize("abc") == expected


def test_bpe_merges_every_occurrence_left_to_right():
    mine, reference = _toy_pair([("a", "a"), ("aa", "a</w>")])
    cases = {"aaaa": ["aa", "a", "a</w>"], "aaa": ["aaa</w>"], "aaaaa": ["aa", "aaa</w>"]}
    for word, expected in cases.items():
        assert mine.bpe(word) == expected
        assert mine.tokenize(word) == reference.tokenize(word) == expected


def test_end_of_word_marker_separates_word_final_tokens(ours):
    assert ours.tokenize("a") == ["a</w>"]
    assert ours.tokenize("horse horses") == ["horse</w>", "horses</w>"]
    assert ours.vocab["a"] == 64 and ours.vocab["a</w>"] == 320


def test_clean_text_matches_reference_normalizer(reference):
    normalize = reference.backend_tokenizer.normalizer.normalize_str
    for name, text in ADVERSARIAL.items():
        assert clean_text(text) == normalize(text), name
    assert clean_text("ΟΔΟΣ") == "οδοσ"  # per-character lowercasing, no final sigma
    assert clean_text("&amp;") == "&amp;"  # no html.unescape in the reference


def test_pretokenizer_matches_reference(ours, reference):
    pre_tokenize = reference.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    for name, text in ADVERSARIAL.items():
        if "special_strings" in name:
            continue  # cut out before pre-tokenization; covered by the parity tests
        cleaned = clean_text(text)
        expected = [piece for piece, _ in pre_tokenize(cleaned)]
        pieces = [word for piece in CLIP_PATTERN.findall(cleaned) for word in BYTE_LEVEL_PATTERN.findall(piece)]
        spelled = ["".join(BYTE_TO_UNICODE[b] for b in p.encode()) for p in pieces]
        assert spelled == expected, name


def test_word_cache_serves_repeated_words(ours, monkeypatch):
    text = "an unusual zebroid wordpiece"
    first = ours(text).input_ids
    assert "zebroid" in ours.model._cache

    def no_bpe(word):
        raise AssertionError(f"bpe called for cached word {word!r}")

    monkeypatch.setattr(ours.model, "bpe", no_bpe)
    assert ours(text).input_ids == first


# ---- parity with transformers ----------------------------------------------------------------
@pytest.mark.parametrize("variant", ["vendored", "vocab.json+merges.txt", "save_pretrained folder"])
def test_partiprompts_parity_padded_truncated(prompts, ours_variants, reference, variant):
    assert len(prompts) == 1632
    _assert_same_encoding(ours_variants[variant], reference, prompts, return_tensors="pt", **TUTORIAL_CALL)


def test_partiprompts_parity_without_padding_or_truncation(prompts, ours, reference):
    _assert_same_encoding(ours, reference, prompts)


def test_partiprompts_parity_one_prompt_at_a_time(prompts, ours, reference):
    for prompt in prompts[::16]:
        _assert_same_encoding(ours, reference, prompt, return_tensors="pt", **TUTORIAL_CALL)
        _assert_same_encoding(ours, reference, prompt)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_parity(name, ours_variants, reference):
    text = ADVERSARIAL[name]
    for tokenizer in ours_variants.values():
        _assert_same_encoding(tokenizer, reference, text)
        _assert_same_encoding(tokenizer, reference, [text], return_tensors="pt", **TUTORIAL_CALL)


def _character_probes(code_points) -> list[str]:
    """Each character Python's unicodedata knows, between letters and doubled before a capital,
    eight characters to a text."""
    chars = [chr(c) for c in code_points if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"]
    probes = [f"x{c}y {c}{c}Q" for c in chars]
    return [" ".join(probes[i : i + 8]) for i in range(0, len(probes), 8)]


def test_every_bmp_character_matches_reference(ours, reference):
    _assert_same_encoding(ours, reference, _character_probes(range(0x10000)))


@pytest.mark.slow
def test_every_unicode_character_matches_reference(ours, reference):
    """Planes 1-16; characters newer than Python's Unicode database are excluded (see the module docstring)."""
    _assert_same_encoding(ours, reference, _character_probes(range(0x10000, 0x110000)))


@pytest.mark.parametrize("padding", [False, True, "longest", "max_length", "do_not_pad"])
@pytest.mark.parametrize("truncation", [False, True])
@pytest.mark.parametrize("return_tensors", [None, "pt"])
def test_padding_and_truncation_options_match_reference(ours, reference, padding, truncation, return_tensors):
    batch = ["a cat", "", README_PROMPT, ADVERSARIAL["thousand_words"][:200]]
    if return_tensors == "pt" and padding in (False, "do_not_pad"):
        batch = [README_PROMPT, README_PROMPT.upper()]  # equal lengths, so they stack without padding
    kwargs = dict(padding=padding, truncation=truncation, max_length=20, return_tensors=return_tensors)
    _assert_same_encoding(ours, reference, batch, **kwargs)
    _assert_same_encoding(ours, reference, batch[0], **kwargs)


# ---- truncation --------------------------------------------------------------------------------
def test_truncation_keeps_eos_and_warns_how_many_tokens_were_dropped(ours, reference):
    text = ADVERSARIAL["thousand_words"]
    text_tokens = len(reference(text).input_ids) - 2
    with pytest.warns(UserWarning, match=rf"dropped {text_tokens - 75} tokens"):
        ids = ours(text, **TUTORIAL_CALL).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert ids == reference(text, **TUTORIAL_CALL).input_ids


def test_truncation_warning_names_the_prompt_in_a_batch(ours):
    with pytest.warns(UserWarning, match=r"dropped 5 tokens from prompt 1 of 2"):
        ours(["short", "a b c d e f g h"], truncation=True, max_length=5)


def test_no_truncation_warning_when_the_prompt_fits(ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(README_PROMPT, **TUTORIAL_CALL)


# ---- decoding ------------------------------------------------------------------------------------
def test_decode_round_trip(prompts, ours):
    for prompt in prompts:
        ids = ours(prompt).input_ids
        assert ours(ours.decode(ids, skip_special_tokens=True)).input_ids == ids
    assert ours.decode(ours(README_PROMPT).input_ids, skip_special_tokens=True) == README_PROMPT
    assert ours.decode(ours("A  Cat").input_ids) == "<|startoftext|>a cat <|endoftext|>"


def test_decode_matches_reference(prompts, ours, reference):
    texts = prompts[::8] + list(ADVERSARIAL.values())
    for text in texts:
        ids = reference(text, padding="max_length", max_length=max(77, len(text) * 4)).input_ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text
    # invalid UTF-8 (a lone continuation byte, a truncated emoji) decodes to U+FFFD as in the reference
    for ids in ([128, 320], [164, 100], ours("🐱").input_ids[1:2], [219, 498, 475, 287, 201]):
        assert ours.decode(ids) == reference.decode(ids)


def test_batch_decode_decodes_each_row(ours, reference):
    batch = ours([README_PROMPT, "a cat"], padding=True, return_tensors="pt").input_ids
    assert ours.batch_decode(batch, skip_special_tokens=True) == [README_PROMPT, "a cat"]
    assert ours.batch_decode(batch) == reference.batch_decode(batch)


# ---- calling conventions --------------------------------------------------------------------------
def test_tutorial_call_returns_tensor_of_shape_1_by_77(ours):
    out = ours(README_PROMPT, padding="max_length", max_length=ours.model_max_length, truncation=True, return_tensors="pt")
    assert out.input_ids.shape == (1, 77) and out.input_ids.dtype == torch.int64
    assert out["input_ids"] is out.input_ids and out["attention_mask"] is out.attention_mask
    assert out.attention_mask.sum().item() == len(README_IDS)
    assert out.input_ids[0, : len(README_IDS)].tolist() == README_IDS
    assert (out.input_ids[0, len(README_IDS) :] == ours.pad_token_id).all()


def test_list_of_prompts_batches_like_single_calls(ours):
    batch = ["a cat", README_PROMPT, ""]
    out = ours(batch, padding="longest", return_tensors="pt")
    assert out.input_ids.shape == (3, len(README_IDS))
    for row, text in enumerate(batch):
        single = ours(text).input_ids
        assert out.input_ids[row, : len(single)].tolist() == single
        assert out.attention_mask[row].tolist() == [1] * len(single) + [0] * (len(README_IDS) - len(single))
    assert ours.encode(README_PROMPT) == README_IDS
    assert ours(batch).input_ids == [ours(t).input_ids for t in batch]


@pytest.mark.parametrize("bad", ["maximum", "max", "right", 1, None])
def test_bad_padding_value_raises_naming_allowed_values(ours, bad):
    with pytest.raises(ValueError, match=r"padding must be one of .*max_length"):
        ours("a cat", padding=bad)


@pytest.mark.parametrize("bad", ["np", "tf", "jax", "torch", "PT"])
def test_bad_return_tensors_raises_naming_allowed_values(ours, bad):
    with pytest.raises(ValueError, match=r"return_tensors must be one of \(None, 'pt'\)"):
        ours("a cat", return_tensors=bad)


def test_bad_truncation_and_text_raise(ours):
    with pytest.raises(ValueError, match="truncation must be one of"):
        ours("a cat", truncation="only_second")
    with pytest.raises(ValueError, match="text must be a str or a list of str"):
        ours(["a cat", 3])
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        ours("a cat", truncation=True, max_length=1)


def test_ragged_batch_to_tensor_raises(ours):
    with pytest.raises(ValueError, match="use padding=True"):
        ours(["a cat", README_PROMPT], return_tensors="pt")


# ---- loading folders ---------------------------------------------------------------------------------
def test_from_pretrained_reads_subfolder(vocab_folder, tmp_path):
    sub = tmp_path / "tokenizer"
    sub.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (sub / name).write_bytes((vocab_folder / name).read_bytes())
    assert CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")(README_PROMPT).input_ids == README_IDS


def test_save_pretrained_folder_holds_tokenizer_json_only(saved_folder):
    assert (saved_folder / "tokenizer.json").is_file() and not (saved_folder / "vocab.json").exists()
    assert CLIPTokenizer.from_pretrained(saved_folder)(README_PROMPT).input_ids == README_IDS


def test_from_pretrained_errors_name_the_folder_and_missing_files(tmp_path, vocab_folder):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        CLIPTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files: expected tokenizer.json, or vocab.json and merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_bytes((vocab_folder / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"found vocab.json but not merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_from_pretrained_malformed_files_raise_value_error(tmp_path, vocab_folder):
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "merges.txt").write_bytes((vocab_folder / "merges.txt").read_bytes())
    with pytest.raises(ValueError, match=r"cannot read JSON file .*vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_bytes((vocab_folder / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nthree parts here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt, line 3: expected two symbols"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nzz qq\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merge #1 \('zz', 'qq'\) uses 'zzqq', which is not in the vocabulary"):
        CLIPTokenizer.from_pretrained(tmp_path)
    bad_json = tmp_path / "json_only"
    bad_json.mkdir()
    (bad_json / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer.json: expected a BPE tokenizer"):
        CLIPTokenizer.from_pretrained(bad_json)
    with pytest.raises(FileNotFoundError, match="BPE merges file not found"):
        CLIPTokenizer.from_bpe_file(tmp_path / "missing.txt.gz")


def _added(content: str, normalized: bool) -> dict:
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": normalized,
            "__type": "AddedToken"}


# tokenizer_config.json / special_tokens_map.json as found in public Stable Diffusion folders
SD_CONFIGS = {
    "sd1_legacy": (
        {"bos_token": _added("<|startoftext|>", True), "eos_token": _added("<|endoftext|>", True),
         "unk_token": _added("<|endoftext|>", True), "pad_token": "<|endoftext|>", "model_max_length": 77,
         "do_lower_case": True, "errors": "replace", "tokenizer_class": "CLIPTokenizer"},
        {"bos_token": _added("<|startoftext|>", True), "eos_token": _added("<|endoftext|>", True),
         "unk_token": _added("<|endoftext|>", True), "pad_token": "<|endoftext|>"},
    ),
    "sd2_pad_is_exclamation_mark": (
        {"bos_token": _added("<|startoftext|>", True), "eos_token": _added("<|endoftext|>", True),
         "unk_token": _added("<|endoftext|>", True), "pad_token": "<|endoftext|>", "model_max_length": 77},
        {"bos_token": _added("<|startoftext|>", True), "eos_token": _added("<|endoftext|>", True),
         "unk_token": _added("<|endoftext|>", True), "pad_token": "!"},
    ),
    "added_tokens_decoder": (
        {"added_tokens_decoder": {
            "0": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
            "49406": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": True},
            "49407": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}},
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!", "unk_token": "<|endoftext|>",
         "clean_up_tokenization_spaces": True, "model_max_length": 77},
        None,
    ),
}
SPECIAL_PROBES = ["hi!", "<|ENDOFTEXT|> x", "<|StartOfText|>", "a<|endoftext|>b!!", ADVERSARIAL["special_strings_other_case"]]


def _config_folder(vocab_folder: Path, folder: Path, config: dict, special_map: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((vocab_folder / name).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    return folder


def _assert_special_handling_matches(folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = transformers.CLIPTokenizer.from_pretrained(str(folder))
    mine = CLIPTokenizer.from_pretrained(folder)
    assert mine.pad_token_id == expected.pad_token_id
    assert mine.model_max_length == expected.model_max_length
    for text in SPECIAL_PROBES:
        _assert_same_encoding(mine, expected, [text, "a"], return_tensors="pt", **TUTORIAL_CALL)
        _assert_same_encoding(mine, expected, text)
        ids = expected(text).input_ids
        assert mine.decode(ids, skip_special_tokens=True) == expected.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", sorted(SD_CONFIGS))
def test_special_tokens_of_stable_diffusion_folders_match_reference(name, vocab_folder, tmp_path):
    config, special_map = SD_CONFIGS[name]
    _assert_special_handling_matches(_config_folder(vocab_folder, tmp_path / name, config, special_map))


def test_sd2_pad_token_is_exclamation_mark(vocab_folder, tmp_path):
    folder = _config_folder(vocab_folder, tmp_path, *SD_CONFIGS["sd2_pad_is_exclamation_mark"])
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token_id == 0
    assert tokenizer("hi!", padding="max_length", max_length=6).input_ids == [49406, 1883, 0, 49407, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("flags", ["".join(f) for f in itertools.product("TFs", repeat=3)])
def test_special_token_flag_precedence_matches_reference(flags, vocab_folder, tmp_path):
    """eos/unk/pad = <|endoftext|> as {normalized: true} (T), {normalized: false} (F) or a plain string (s)."""
    choice = {"T": _added("<|endoftext|>", True), "F": _added("<|endoftext|>", False), "s": "<|endoftext|>"}
    config = {"bos_token": _added("<|startoftext|>", True), "model_max_length": 77}
    config.update({key: choice[f] for key, f in zip(("eos_token", "unk_token", "pad_token"), flags)})
    _assert_special_handling_matches(_config_folder(vocab_folder, tmp_path, config, None))


# ---- long inputs: work linear in the input ----------------------------------------------------
class _CountingRanks(dict):
    """The merge ranks, counting every lookup the merge loop makes."""

    lookups = 0

    def __contains__(self, pair):
        _CountingRanks.lookups += 1
        return super().__contains__(pair)

    def __getitem__(self, pair):
        _CountingRanks.lookups += 1
        return super().__getitem__(pair)

    def get(self, pair, default=None):
        _CountingRanks.lookups += 1
        return super().get(pair, default)


def _random_word(alphabet: str, length: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(length))


LETTERS = "abcdefghijklmnopqrstuvwxyz"
EMOJI = "".join(chr(c) for c in range(0x1F300, 0x1F650))


@pytest.mark.parametrize("alphabet", [LETTERS, EMOJI, "a"], ids=["letters", "emoji", "one_letter"])
def test_bpe_merge_loop_work_is_linear_in_word_length(alphabet):
    """Each merge costs O(1) rank lookups (a heap entry is pushed only after a lookup, so
    lookups also bound the heap work): quadrupling a word quadruples the lookups, and
    there are at most 6 per byte (n - 1 initial pairs and at most two new pairs for each
    of at most n - 1 merges, each pair a membership test plus a rank read). Rescanning
    the word after each merge (a quadratic loop) needs millions of lookups here."""
    tokenizer = CLIPTokenizer()
    tokenizer.model.bpe_ranks = _CountingRanks(tokenizer.model.bpe_ranks)
    counts = {}
    for length in (2_000, 8_000):
        word = spell_bytes(_random_word(alphabet, length, seed=length))
        _CountingRanks.lookups = 0
        tokenizer.bpe(word)
        counts[length] = _CountingRanks.lookups
        assert counts[length] <= 6 * len(word), (length, counts[length])
    # 4x the input, 4x the lookups (+10% for the word-dependent merge count)
    assert counts[8_000] <= 4.4 * counts[2_000], counts


@pytest.fixture(scope="module")
def long_inputs() -> dict[str, str]:
    """The inputs of a denial-of-service probe: one word of 100,000 characters."""
    return {"letters": _random_word(LETTERS, 100_000, seed=0), "emoji": _random_word(EMOJI, 100_000, seed=1),
            "one_letter": "a" * 100_000,
            "many_words": " ".join(_random_word(LETTERS, 7, seed=i) for i in range(10_000))}


@pytest.mark.parametrize("name", ["letters", "emoji", "one_letter", "many_words"])
def test_long_input_ids_match_reference(name, long_inputs, ours, reference):
    text = long_inputs[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning
        assert ours(text).input_ids == reference(text).input_ids
        _assert_same_encoding(ours, reference, [text], return_tensors="pt", **TUTORIAL_CALL)


def test_truncation_warning_shortens_the_dropped_text(ours, long_inputs):
    with pytest.warns(UserWarning, match=r"dropped text: 'a+\.\.\. \(\d+ characters\)'") as record:
        ours(long_inputs["one_letter"], **TUTORIAL_CALL)
    assert len(str(record[0].message)) < 500


# ---- Unicode normalization and fuzzing ---------------------------------------------------------
def _nfc_probes(char: str) -> list[str]:
    """Texts where NFC would reorder or compose `char` with its neighbours."""
    return [f"a{char}\u0301", f"a\u0301{char}", f"a{char}\u0316", f"a\u0316{char}", f"a{char}{char}", f"x{char}\u05b0",
            unicodedata.normalize("NFD", char), "\U00011935" + char]


def test_nfc_differs_from_python_exactly_on_characters_after_unicode_9(reference):
    """The reference normalizes with Unicode 9.0 tables, Python 3.11 with Unicode 14.0. The
    characters where that matters are exactly those of AFTER_UNICODE_9_NORMALIZATION
    (98 combining marks and U+11930), and clean_text matches the reference on all of them."""
    normalize = reference.backend_tokenizer.normalizer.normalize_str
    candidates = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF
                  and (unicodedata.combining(chr(c)) or unicodedata.decomposition(chr(c)) or c == 0x11930)]
    python_differs = set()
    for char in candidates:
        for text in _nfc_probes(char):
            assert clean_text(text) == normalize(text), (hex(ord(char)), text)
            # clean_text with Python's own NFC (Unicode 14.0) in place of the Unicode 9.0 one
            if regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).replace("Σ", "σ").lower() != normalize(text):
                python_differs.add(char)
    table = {chr(c) for c in range(0x110000) if AFTER_UNICODE_9_NORMALIZATION.fullmatch(chr(c))}
    if unicodedata.unidata_version == "14.0.0":  # Python 3.11; a newer Python knows newer marks
        assert len(table) == 99
        assert python_differs == table | {"\U00011938"}  # U+11938 = U+11935 U+11930
    assert clean_text("a\u1abf\u0301") == normalize("a\u1abf\u0301") == "a\u1abf\u0301"


def _fuzz_pools() -> list[str]:
    """Pools of characters a fuzzed text is drawn from; every character is assigned in
    Python's Unicode database (unassigned code points are covered by the module docstring)."""
    assigned = [c for c in range(0x110000)
                if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) not in ("Cn", "Co", "Cs")]
    marks = "".join(chr(c) for c in assigned if unicodedata.combining(chr(c)))
    return [
        LETTERS + LETTERS.upper() + "0123456789",
        " \t\n\r\u00a0\u0085\u2028\u3000\x1c\x1f\u200b",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~’“”«»",
        marks,
        "àéîõüçñßøæœÀÉÎÕÜÇÑΣσςİıΑΒΓαβγДЖЯжя",
        "一二三四五六七八九十猫狗马宇航员가나다라あいうアイウ",
        EMOJI + "\u200d\ufe0f\U0001f3fb\U0001f3ff",
        "".join(chr(random.Random(3).choice(assigned)) for _ in range(5000)),
    ]


FUZZ_WORDS = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "'s", "'LL", "'Re", "&amp;"]


def test_fuzzed_strings_match_reference(ours, reference):
    """5,000 seeded random strings mixing letters, whitespace, punctuation, every combining
    mark, case pairs, CJK, emoji, special strings and random assigned characters."""
    rng = random.Random(0)
    pools = _fuzz_pools()
    texts = []
    for _ in range(5000):
        parts = [rng.choice(FUZZ_WORDS) if rng.random() < 0.05 else rng.choice(rng.choice(pools))
                 for _ in range(rng.randint(1, 30))]
        texts.append("".join(parts))
    expected, mine = reference(texts).input_ids, ours(texts).input_ids
    differ = [text for text, a, b in zip(texts, expected, mine) if a != b]
    assert not differ, f"{len(differ)} of {len(texts)} differ, e.g. {[ascii(t) for t in differ[:3]]}"


# ---- model_max_length from the folder ---------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 1, 77.5, "77", True, [77], 10**12, 1e300])
def test_bad_model_max_length_is_refused_naming_file_and_key(bad, vocab_folder, tmp_path):
    folder = _config_folder(vocab_folder, tmp_path, {"model_max_length": bad}, None)
    with pytest.raises(ValueError, match=r"tokenizer_config.json: key 'model_max_length': .*got"):
        CLIPTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("value, expected", [(77, 77), (248, 248), (int(1e30), 77), (1e30, 77), (None, 77)])
def test_model_max_length_no_limit_and_absent_mean_the_text_encoder_length(value, expected, vocab_folder, tmp_path):
    config = {} if value is None else {"model_max_length": value}
    assert CLIPTokenizer.from_pretrained(_config_folder(vocab_folder, tmp_path, config, None)).model_max_length == expected


def test_max_token_id_is_exposed_for_the_text_encoder_check(ours):
    assert ours.max_token_id == 49407 == ours.vocab_size - 1

