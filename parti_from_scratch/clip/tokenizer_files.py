"""The files a CLIP tokenizer is stored in, read and written for `CLIPTokenizer`.

  * `bpe_simple_vocab_16e6.txt.gz`: openai/CLIP's merges file (vendored in `assets/`).
  * A transformers tokenizer folder (e.g. the `tokenizer/` folder of a Stable Diffusion
    download): `tokenizer.json` (transformers 5) or `vocab.json` + `merges.txt`, plus
    `tokenizer_config.json` and `special_tokens_map.json` (special tokens and their
    AddedToken flags, `model_max_length`).

The algorithm itself is in `bpe.py`. Every error names the file, and the key or line.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from parti_from_scratch.clip.bpe import BYTE_TO_UNICODE, END_OF_WORD

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
# The merges file of every public CLIP text encoder (vendored from open_clip, MIT licence).
DEFAULT_BPE_FILE = ASSETS_DIR / "bpe_simple_vocab_16e6.txt.gz"

# CLIP keeps the first 49,152 - 256 - 2 = 48,894 merges of the file, so that
# 256 bytes + 256 bytes-with-"</w>" + 48,894 merges + 2 special tokens = 49,408 ids.
NUM_CLIP_MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 77  # positions of the CLIP text encoder (76 + [EOS] in the paper's count)
BOS_TOKEN = "<|startoftext|>"  # id 49406
EOS_TOKEN = "<|endoftext|>"  # id 49407, also the pad and unknown token of most CLIP folders
# transformers writes int(1e30) as model_max_length for "no limit"; we then use CONTEXT_LENGTH
NO_LIMIT = int(1e30)
# the largest model_max_length accepted: padding="max_length" allocates this many ids per prompt
MAX_MODEL_MAX_LENGTH = 1 << 20


def load_bpe_file(path: str | os.PathLike = DEFAULT_BPE_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's 49,408-token vocabulary from its merges file (`bpe_simple_vocab_16e6.txt.gz`).

    Line 1 is a header; lines 2.. are merges ("i n", "t h", ...) in the order they were
    learned. The vocabulary is: the 256 byte symbols, the same 256 with "</w>" appended,
    one token per merge (the pair joined: "i n" -> "in"), then BOS and EOS.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BPE merges file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read BPE merges file {path}: {error}") from error
    if len(lines) < NUM_CLIP_MERGES + 1:
        raise ValueError(f"{path} has {len(lines) - 1} merge lines, CLIP needs {NUM_CLIP_MERGES}")
    merges = [_merge_pair(line, f"{path}, line {number}") for number, line in enumerate(lines[1: NUM_CLIP_MERGES + 1], 2)]
    symbols = list(BYTE_TO_UNICODE.values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def _merge_pair(line: str, where: str) -> tuple[str, str]:
    pair = line.split(" ")
    if len(pair) != 2 or not all(pair):
        raise ValueError(f"{where}: expected two symbols separated by a space, got {line!r}")
    return pair[0], pair[1]


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read JSON file {path}: {error}") from error


def _check_vocab(vocab: Any, source: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{source}: the vocabulary must be a non-empty JSON object token -> id")
    for token, index in vocab.items():
        if not isinstance(token, str) or not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"{source}: bad vocabulary entry {token!r}: {index!r} (expected string -> id >= 0)")
    return vocab


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional "#version" header, then one "left right" pair per line."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read merges file {path}: {error}") from error
    return [_merge_pair(line, f"{path}, line {number}") for number, line in enumerate(lines, start=1)
            if line and not (number == 1 and line.startswith("#version"))]


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tokenizer.json (what transformers 5 `save_pretrained` writes): model.vocab and model.merges.

    Merges are stored either as "left right" strings or as [left, right] pairs.
    """
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
        raise ValueError(f"{path}: expected a BPE tokenizer with 'model.vocab' and 'model.merges'")
    vocab = _check_vocab(model["vocab"], path)
    merges = []
    for index, merge in enumerate(model["merges"]):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, str) and s for s in pair):
            raise ValueError(f"{path}: model.merges[{index}] = {merge!r} is not a pair of symbols")
        merges.append((pair[0], pair[1]))
    return vocab, merges


def _token_content(value: Any) -> str | None:
    """A special-token entry of a config is a string or an AddedToken dict {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def special_token_flags(config: dict, special_map: dict | None) -> tuple[dict[str, str], dict[str, dict]]:
    """Read the special tokens of a tokenizer folder, as transformers 5 resolves them.

    Returns {"bos_token": content, ...} and, per content, the AddedToken flags that decide
    how it is found in a prompt: `normalized=False` -> matched in the raw text (case
    sensitive); `normalized=True` -> matched after `clean_text` (so "<|ENDOFTEXT|>" counts);
    `special` -> dropped by `decode(..., skip_special_tokens=True)`.

    The reference's rules (reproduced, and checked on 27 flag combinations in the tests):
      * `added_tokens_decoder` in tokenizer_config.json wins for the tokens it lists, and
        special_tokens_map.json is then ignored; otherwise special_tokens_map.json overrides
        tokenizer_config.json key by key.
      * A plain-string entry means normalized=False. A dict from tokenizer_config.json
        defaults to normalized=not special (special=False), one from special_tokens_map.json
        to special=True, normalized=False.
      * When bos/eos/unk/pad share a content with different flags, the entries are taken
        in that order, exact repeats of an earlier entry are dropped, and the last
        remaining entry wins (so eos {normalized: true} + pad "<|endoftext|>" -> False).
    """
    defaults = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    entries: dict[str, tuple[Any, bool]] = {}  # attribute -> (value, comes from special_tokens_map.json)
    for key, default in defaults.items():
        entries[key] = (config.get(key, default), False)
    decoder = config.get("added_tokens_decoder") or {}
    if special_map and not decoder:
        for key in defaults:
            if key in special_map:
                entries[key] = (special_map[key], True)

    def flags(value: Any, from_map: bool) -> tuple:
        """(content, normalized, lstrip, rstrip, single_word, special, is_plain_string)"""
        if isinstance(value, dict):
            special = bool(value.get("special", from_map))
            normalized = bool(value.get("normalized", not special))
            return (value["content"], normalized, bool(value.get("lstrip", False)), bool(value.get("rstrip", False)),
                    bool(value.get("single_word", False)), special, False)
        return (value, False, False, False, False, True, True)  # a string never equals an AddedToken dict

    added: dict[str, dict] = {}
    for token_id, value in sorted(decoder.items(), key=lambda item: int(item[0])):
        content, normalized, _, _, single_word, special, _ = flags(value, from_map=False)
        if not isinstance(content, str):
            raise ValueError(f"added_tokens_decoder[{token_id}] has no string 'content': {value!r}")
        added[content] = {"normalized": normalized, "special": special, "single_word": single_word}
    listed_in_decoder = set(added)

    seen: list[tuple] = []
    for key in defaults:
        value, from_map = entries[key]
        content = _token_content(value)
        if content is None or content in listed_in_decoder:
            continue
        token_flags = flags(value, from_map)
        if token_flags in seen:  # an exact repeat of an earlier entry changes nothing
            continue
        seen.append(token_flags)
        added[content] = {"normalized": token_flags[1], "special": True, "single_word": token_flags[4]}
    names = {key: _token_content(entries[key][0]) or default for key, default in defaults.items()}
    return names, added


def check_model_max_length(value: Any) -> int:
    """The longest sequence the tokenizer produces, from `model_max_length`.

    Absent (None) or transformers' "no limit" int(1e30) -> CONTEXT_LENGTH (the text encoder
    has 77 positions, so a longer sequence is never useful; transformers keeps 1e30).
    Otherwise an int from 2 (BOS + EOS) to MAX_MODEL_MAX_LENGTH; anything else is refused.
    """
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == NO_LIMIT):
        return CONTEXT_LENGTH
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= MAX_MODEL_MAX_LENGTH:
        raise ValueError(f"model_max_length must be an int from 2 to {MAX_MODEL_MAX_LENGTH} "
                         f"(or {NO_LIMIT} for no limit), got {value!r}")
    return value


def read_tokenizer_folder(folder: Path) -> dict[str, Any]:
    """The keyword arguments of `CLIPTokenizer(...)` stored in a transformers tokenizer folder.

    Files: `tokenizer.json` (written by transformers 5) or `vocab.json` + `merges.txt`
    (older folders; tokenizer.json wins when both exist), plus `tokenizer_config.json`
    and `special_tokens_map.json` when present (model_max_length and special tokens).
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    tokenizer_json, vocab_json, merges_txt = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
    if tokenizer_json.is_file():
        vocab, merges = _read_tokenizer_json(tokenizer_json)
    elif vocab_json.is_file() and merges_txt.is_file():
        vocab, merges = _check_vocab(_read_json(vocab_json), vocab_json), _read_merges_txt(merges_txt)
    elif vocab_json.is_file() or merges_txt.is_file():
        present, missing = (vocab_json, merges_txt) if vocab_json.is_file() else (merges_txt, vocab_json)
        raise FileNotFoundError(f"{folder}: found {present.name} but not {missing.name} ({missing})")
    else:
        raise FileNotFoundError(f"{folder} has no tokenizer files: expected tokenizer.json, or vocab.json and merges.txt")

    config_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    special_map = _read_json(map_path) if map_path.is_file() else None
    if not isinstance(config, dict) or (special_map is not None and not isinstance(special_map, dict)):
        raise ValueError(f"{folder}: tokenizer_config.json and special_tokens_map.json must hold JSON objects")
    try:
        names, added = special_token_flags(config, special_map)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{folder}: bad special-token entry in tokenizer_config.json/special_tokens_map.json: {error}") from error
    try:
        model_max_length = check_model_max_length(config.get("model_max_length"))
    except ValueError as error:
        raise ValueError(f"{config_path}: key 'model_max_length': {error}") from None
    return dict(vocab=vocab, merges=merges, model_max_length=model_max_length, added_tokens=added, **names)


def write_tokenizer_folder(tokenizer: Any, folder: Path) -> None:
    """Write a transformers tokenizer folder: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    names = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
             "unk_token": tokenizer.unk_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.model_max_length, **names,
              "added_tokens_decoder": {str(tokenizer.vocab[t]): {"content": t, "lstrip": False, "rstrip": False,
                                                                  "single_word": False, **flags}
                                       for t, flags in tokenizer.added_tokens.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2), encoding="utf-8")
