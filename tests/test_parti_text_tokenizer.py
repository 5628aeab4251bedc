"""The Parti text tokenizer (BART-style byte-level BPE with DALL·E mini's pre-tokenization) against min-dalle's.

The vocabulary: a byte-level BPE of 900 tokens (640 merges) trained on the lowercased
PartiPrompts by the `tokenizers` library, saved as vocab.json + merges.txt in BART's
layout (<s> 0, <pad> 1, </s> 2, <unk> 3). min-dalle's `TextTokenizer` and ours read the
same two files; min-dalle reads merges.txt as its `MinDalle.init_tokenizer` does.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from min_dalle_oracle import import_min_dalle
from min_dalle_oracle import one_thread  # noqa: F401  (autouse fixture)
from parti_from_scratch.parti.text_tokenizer import PartiTextTokenizer, dalle_normalize

ASSETS = Path(__file__).resolve().parents[1] / "parti_from_scratch" / "assets"


def parti_prompts() -> list:
    with open(ASSETS / "PartiPrompts.tsv", encoding="utf-8", newline="") as f:
        return [row[0] for row in list(csv.reader(f, delimiter="\t"))[1:]]


def write_bart_vocab(folder: Path, vocab_size: int = 900) -> Path:
    """vocab.json + merges.txt of a small byte-level BPE trained on PartiPrompts (BART's special tokens first)."""
    tokenizers = pytest.importorskip("tokenizers")
    trainer = tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator([p.lower() for p in parti_prompts()], vocab_size=vocab_size, min_frequency=2,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(folder))
    return folder


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    return write_bart_vocab(tmp_path_factory.mktemp("bart_vocab"))


@pytest.fixture(scope="module")
def min_dalle_tokenizer(vocab_dir):
    import_min_dalle()                     # the package's import side effects, undone
    from min_dalle.text_tokenizer import TextTokenizer
    vocab = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (vocab_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]   # as MinDalle reads it
    return TextTokenizer(vocab, merges)


@pytest.fixture(scope="module")
def ours(vocab_dir) -> PartiTextTokenizer:
    return PartiTextTokenizer.from_pretrained(vocab_dir)


def test_vocabulary_exercises_the_merges(ours):
    # the fixture is not trivial: 640 merges, and prompts neither all whole words nor all single letters
    assert len(ours.merges) == 900 - 256 - 4
    ids = ours.encode("a corgi's head depicted as an explosion of a nebula")
    assert 8 < len(ids) < 40


def test_bpe_matches_min_dalle_on_parti_prompts(ours, min_dalle_tokenizer):
    prompts = parti_prompts()
    assert len(prompts) == 1632
    mismatches = [p for p in prompts if ours.encode(p) != min_dalle_tokenizer.tokenize(p)]
    assert not mismatches, f"{len(mismatches)} of 1632 prompts differ, e.g. {mismatches[:3]}"
    # the non-ASCII prompts (Dalí, Irmãos, corgi’s, ‘openai’) are among those compared
    assert sum(any(ord(c) > 127 for c in p) for p in prompts) == 17


def test_bpe_matches_min_dalle_on_random_text(ours, min_dalle_tokenizer):
    """Case, runs of spaces, tabs and newlines (<unk> in both), punctuation, digits, non-ASCII letters."""
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,;:!?'\"-()/&") + [" "] * 12 + \
        ["\t", "\n", "é", "ß", "İ", "ñ", "’", "中", "Ω"]
    words = [w for p in parti_prompts()[:300] for w in p.split(" ")]
    texts = ["", " ", "   ", "\t", "A  B", " leading", "trailing  "]
    for _ in range(300):
        if rng.random() < 0.5:
            texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))))
        else:   # real words, glued and cased at random
            texts.append(rng.choice(["", " ", "  ", "\t"]).join(
                w.upper() if rng.random() < 0.2 else w for w in rng.sample(words, rng.randint(1, 8))))
    mismatches = [t for t in texts if ours.encode(t) != min_dalle_tokenizer.tokenize(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"
    assert ours.unk_token_id in ours.encode("a\tb")


def test_dalle_normalize_lowercases_then_drops_non_ascii():
    assert dalle_normalize("Salvador Dalí") == "salvador dal"
    assert dalle_normalize("a corgi’s HEAD") == "a corgis head"
    assert dalle_normalize("İ") == "i"               # lower() first: "i" + U+0307, then the mark goes


def test_emoji_are_dropped_not_named(ours):
    # min-dalle spells emoji by name with the emoji package; here they go like any non-ASCII character
    assert ours.encode("a 🐶 on a bench") == ours.encode("a  on a bench")


def test_call_pads_and_masks(ours):
    out = ours(["a red cube", "a dog"], max_length=10)
    assert out.input_ids.shape == (2, 10) and out.input_ids.dtype == torch.long
    n0, n1 = len(ours.encode("a red cube")), len(ours.encode("a dog"))
    assert out.attention_mask.sum(1).tolist() == [n0, n1]
    assert out.input_ids[1, n1:].eq(ours.pad_token_id).all()
    assert out.input_ids[:, 0].eq(ours.bos_token_id).all()
    longest = ours(["a red cube", "a dog"], padding="longest")
    assert longest.input_ids.shape == (2, n0)


def test_truncation_keeps_eos_and_warns(ours):
    prompt = " ".join(["astronaut"] * 40)
    full = ours.encode(prompt)
    assert len(full) > 16
    with pytest.warns(UserWarning, match=r"truncation dropped \d+ tokens from prompt 0"):
        ids = ours(prompt, max_length=16).input_ids[0].tolist()
    assert ids == full[:15] + [ours.eos_token_id]
    with pytest.raises(ValueError, match="max_length=16"):
        ours(prompt, max_length=16, truncation=False)


def test_decode_inverts_encode(ours):
    text = "a photo of an astronaut riding a horse on mars, oil painting"
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


def test_save_pretrained_roundtrip(ours, tmp_path):
    ours.save_pretrained(tmp_path / "tok")
    again = PartiTextTokenizer.from_pretrained(tmp_path, subfolder="tok")
    prompts = parti_prompts()[::50]
    assert [again.encode(p) for p in prompts] == [ours.encode(p) for p in prompts]
    assert again.model_max_length == ours.model_max_length


def test_bad_folders_are_named(vocab_dir, tmp_path):
    with pytest.raises(ValueError, match="no merges.txt"):
        (tmp_path / "only_vocab").mkdir()
        (tmp_path / "only_vocab" / "vocab.json").write_text("{}")
        PartiTextTokenizer.from_pretrained(tmp_path / "only_vocab")
    broken = tmp_path / "broken"
    broken.mkdir()
    vocab = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    del vocab["</s>"]
    (broken / "vocab.json").write_text(json.dumps(vocab))
    (broken / "merges.txt").write_text((vocab_dir / "merges.txt").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match=r"broken.*eos_token '</s>' is not in the vocabulary"):
        PartiTextTokenizer.from_pretrained(broken)
