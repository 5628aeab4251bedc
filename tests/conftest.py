"""Shared offline fixtures: tiny reference models built with transformers/diffusers and saved to temp folders."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

ASSETS = Path(__file__).resolve().parents[1] / "parti_from_scratch" / "assets"


def write_clip_vocab_files(folder: Path) -> Path:
    """vocab.json + merges.txt of CLIP's 49,408-token vocabulary, derived from the vendored BPE merges.

    The vocabulary is: the 256 byte symbols, the same with "</w>", one token per merge, then
    <|startoftext|> and <|endoftext|> (see the data README).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(ASSETS / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    byte_symbols = _bytes_to_unicode_symbols()
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def _bytes_to_unicode_symbols() -> list:
    """The 256 printable stand-ins for bytes, in CLIP's order (a fact of the format, computed here)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory) -> Path:
    return write_clip_vocab_files(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (they gain nothing from threads, and on a busy
    machine idle threads spin); the previous count is restored afterwards.
    Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
