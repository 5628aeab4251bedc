"""CLIP's byte-level BPE tokenizer: the first step of the text path in tutorial
"Parti原理与代码实例讲解" §2.3 (the CLIP text encoder) and §3.1 (prompt -> token ids
-> text embeddings).

A prompt becomes at most 77 integers in a vocabulary of 49,408 tokens:

    "a photo of an astronaut riding a horse on mars"
    -> 49406 320 1125 539 550 18376 6765 320 4558 525 7496 49407

Papers:
  * Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision" (CLIP, arXiv 2103.00020), §2.4: "a lower-cased byte pair encoding (BPE)
    representation with a 49,152 vocab size", the sequence "bracketed with [SOS] and [EOS]
    tokens", length capped (76 + 1 = 77 positions here).
  * Sennrich, Haddow and Birch 2016, "Neural Machine Translation of Rare Words with Subword
    Units" (arXiv 1508.07909), Algorithm 1: byte pair encoding. Training repeatedly merges
    the most frequent adjacent pair of symbols; encoding replays the learned merges in the
    order they were learned (their *rank*).
  * The byte-level alphabet and the contraction-aware pre-tokenizer come from GPT-2
    (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", §2.2).

The steps, each implemented below where its docstring explains it:

  1. special tokens   "<|startoftext|>" / "<|endoftext|>" typed in the text become their ids
  2. clean_text       NFC, every run of whitespace -> " ", lowercase
  3. pre-tokenize     CLIP_PATTERN cuts the text into words, digits and punctuation runs
  4. bytes            each piece's UTF-8 bytes are spelled with BYTE_TO_UNICODE
  5. bpe              merges applied by rank, "</w>" marks the end of each word
  6. post-process     [BOS] ids [EOS], truncation to max_length, padding, tensors

The reference is transformers 5's `CLIPTokenizer` (a `tokenizers`-backed class). We match
it id for id, and so inherit its behaviour where it differs from openai/CLIP's original
`SimpleTokenizer` (tests/test_clip_tokenizer.py checks every item of this list):

  * No ftfy repair and no `html.unescape`: "&amp;" is tokenized as "&", "amp", ";"
    (openai/CLIP turns it into "&" first).
  * Lowercasing is per character: a word-final "Σ" becomes "σ", where Python's
    `str.lower()` would apply the Final_Sigma rule and give "ς". Lowercasing runs after NFC,
    so "İ" becomes "i" + U+0307 (not re-composed).
  * Whitespace is Unicode White_Space (the 25 characters of `regex`'s `\\s`): U+0085 and
    U+2028 separate words; U+001C-U+001F (which `str.isspace()` calls space) and U+200B do not.
  * "<|endoftext|>" typed in a prompt becomes id 49407, "<|ENDOFTEXT|>" becomes seven tokens
    ("<", "|</w>", "endof", "text</w>", "|", "></w>") unless the folder's config marks the
    special token `normalized` (then it is matched after lowercasing). Which flag wins when a
    config gives several is decided in `_special_token_flags`.
  * Stable Diffusion 2 folders use "!" as pad token; it is then a special token, so "!" in a
    prompt encodes to id 0 (not "!</w>" = 256) and `skip_special_tokens` drops it.
  * A folder without `model_max_length` gets 77 here (transformers uses 1e30, "no limit";
    the text encoder has 77 positions, so a longer sequence is never useful).

Unicode tables: NFC and lowercasing use Python's `unicodedata`, whose Unicode version
depends on the Python version (14.0 for Python 3.11), and `\p{L}`/`\p{N}` use the `regex`
package's tables; the reference's tables are newer. Characters assigned after Python's
Unicode version can therefore tokenize differently (on Python 3.11: 4,684 of the 1,111,998
code points, all unassigned in Unicode 14.0). Every character Python knows is checked
against the reference by the tests (the BMP by default, planes 1-16 with `-m slow`).
"""
from __future__ import annotations

import gzip
import json
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import regex
import torch

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
# The merges file of every public CLIP text encoder (vendored from open_clip, MIT licence).
DEFAULT_BPE_FILE = ASSETS_DIR / "bpe_simple_vocab_16e6.txt.gz"

# CLIP keeps the first 49,152 - 256 - 2 = 48,894 merges of the file, so that
# 256 bytes + 256 bytes-with-"</w>" + 48,894 merges + 2 special tokens = 49,408 ids.
NUM_CLIP_MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 77  # positions of the CLIP text encoder (76 + [EOS] in the paper's count)
BOS_TOKEN = "<|startoftext|>"  # id 49406
EOS_TOKEN = "<|endoftext|>"  # id 49407, also the pad and unknown token of most CLIP folders
END_OF_WORD = "</w>"

PADDING_CHOICES = (False, True, "longest", "max_length", "do_not_pad")
TRUNCATION_CHOICES = (False, True, "longest_first", "do_not_truncate")
RETURN_TENSORS_CHOICES = (None, "pt")

# --------------------------------------------------------------------------------------
# Step 4: the byte-level alphabet
# --------------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """One printable, non-space character for each of the 256 byte values (GPT-2 §2.2).

    BPE merges strings, and the merges file is a text file, so each byte must be spelled by
    a visible character. The 188 bytes that already print as themselves ("!".."~",
    "¡".."¬", "®".."ÿ") keep their Latin-1 character; the other 68 (controls, space, DEL,
    no-break space, soft hyphen) take U+0100, U+0101, ... in byte order, so the space byte
    0x20 is spelled "Ġ". The dict order (printable bytes first) is the order of the
    vocabulary's first 256 ids: "!" is id 0, "a" is id 64.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {char: byte for byte, char in BYTE_TO_UNICODE.items()}


# --------------------------------------------------------------------------------------
# Step 2: text cleaning
# --------------------------------------------------------------------------------------
_WHITESPACE_RUN = regex.compile(r"\s+")


def clean_text(text: str) -> str:
    """Normalise a prompt the way the reference does, in its order:

    1. NFC: "e" + U+0301 (combining acute) becomes the single character "é", so both
       spellings of an accented letter get the same tokens.
    2. Every run of White_Space (spaces, tabs, newlines, U+3000, ...) becomes one " ".
    3. Lowercase each character on its own (CLIP's BPE is "lower-cased", CLIP §2.4).
       `str.lower()` is per character except for the capital sigma, which it turns into
       "ς" at the end of a word; mapping "Σ" to "σ" first removes that context rule.
    """
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text)
    return text.replace("Σ", "σ").lower()


# --------------------------------------------------------------------------------------
# Step 3: pre-tokenization
# --------------------------------------------------------------------------------------
# CLIP's pre-tokenizer: the special-token strings, the English contractions, a run of
# letters, ONE digit (so "2023" is four tokens), or a run of anything else that is not
# whitespace (punctuation, symbols, emoji, combining marks). Whitespace matches nothing
# and is dropped; it only separates pieces.
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The reference then runs GPT-2's byte-level split on each CLIP piece. It never cuts a
# piece CLIP_PATTERN produced, except the lowercased special strings ("<|endoftext|>"
# from "<|ENDOFTEXT|>"), which it splits into "<|", "endoftext", "|>".
BYTE_LEVEL_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


# --------------------------------------------------------------------------------------
# Vocabulary files
# --------------------------------------------------------------------------------------
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
    merges = []
    for line_number, line in enumerate(lines[1 : NUM_CLIP_MERGES + 1], start=2):
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{path}, line {line_number}: expected two symbols separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    symbols = list(BYTE_TO_UNICODE.values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


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
    merges = []
    for line_number, line in enumerate(lines, start=1):
        if not line or (line_number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{path}, line {line_number}: expected two symbols separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


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


def _special_token_flags(config: dict, special_map: dict | None) -> tuple[dict[str, str], dict[str, dict]]:
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


# --------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------
class TokenizerOutput(dict):
    """The result of calling the tokenizer: `out.input_ids` and `out["input_ids"]` both work
    (as with transformers' BatchEncoding); likewise `attention_mask` (1 = token, 0 = padding)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> "TokenizerOutput":
        """Move tensor values to `device` (lists are left as they are)."""
        return TokenizerOutput({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class CLIPTokenizer:
    """Byte-level BPE tokenizer of CLIP, id-for-id equal to transformers' `CLIPTokenizer`.

    `CLIPTokenizer()` loads the vendored CLIP vocabulary; `CLIPTokenizer.from_pretrained(folder)`
    reads a transformers tokenizer folder (e.g. the `tokenizer/` folder of a Stable Diffusion
    download). Call it as the tutorial does:

        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids      # (1, 77) int64
    """

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        model_max_length: int = CONTEXT_LENGTH,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        added_tokens: dict[str, dict] | None = None,
        max_cache_size: int = 200_000,
    ) -> None:
        """`vocab` (token -> id) and `merges` (pairs, highest priority first) default to CLIP's.

        `added_tokens` maps a token string to {"normalized": bool, "special": bool}; by
        default bos/eos/pad/unk are special tokens matched in the raw text.
        """
        if (vocab is None) != (merges is None):
            raise ValueError("give both `vocab` and `merges`, or neither (to load CLIP's vocabulary)")
        if vocab is None:
            vocab, merges = load_bpe_file(DEFAULT_BPE_FILE)
        self.vocab: dict[str, int] = dict(vocab)
        self.id_to_token: dict[int, str] = {index: token for token, index in self.vocab.items()}
        self.model_max_length = int(model_max_length)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token), ("unk_token", unk_token)):
            if token not in self.vocab:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")

        # Merge ranks: the pair learned first has rank 0 and is merged first (Sennrich et al.).
        self.bpe_ranks: dict[tuple[str, str], int] = {}
        for rank, (left, right) in enumerate(merges):
            for symbol in (left, right, left + right):
                if symbol not in self.vocab:
                    raise ValueError(f"merge #{rank} ({left!r}, {right!r}) uses {symbol!r}, which is not in the vocabulary")
            self.bpe_ranks.setdefault((left, right), rank)

        # Step 1's tokens, each matched either in the raw text (normalized=False, case
        # sensitive) or in the cleaned text (normalized=True, so also "<|ENDOFTEXT|>").
        if added_tokens is None:
            added_tokens = {t: {"normalized": False, "special": True} for t in (bos_token, eos_token, unk_token, pad_token)}
        self.added_tokens = {token: dict(flags) for token, flags in added_tokens.items()}
        self._added_ids: dict[str, int] = {}  # the token as it appears in raw or cleaned text -> id
        raw, cleaned = [], []
        for token, flags in self.added_tokens.items():
            if token not in self.vocab:
                raise ValueError(f"added token {token!r} is not in the vocabulary")
            if flags.get("single_word"):
                raise ValueError(f"added token {token!r} has single_word=True, which this tokenizer does not implement")
            form = clean_text(token) if flags.get("normalized") else token
            (cleaned if flags.get("normalized") else raw).append(form)
            self._added_ids[form] = self.vocab[token]
        self._raw_split = self._alternation(raw)
        self._normalized_split = self._alternation(cleaned)
        # ids that decode(..., skip_special_tokens=True) leaves out
        self.all_special_ids = {self.vocab[t] for t, flags in self.added_tokens.items() if flags.get("special", True)}

        # word cache: CLIP piece -> its token ids (what makes repeated words cost a dict lookup)
        self._cache: dict[str, tuple[int, ...]] = {}
        self.max_cache_size = max_cache_size
        self._token_bytes: dict[int, bytes] = {}

    @staticmethod
    def _alternation(tokens: list[str]) -> regex.Pattern | None:
        """A splitting regex for literal tokens; longest first, so overlapping tokens match leftmost-longest."""
        if not tokens:
            return None
        ordered = sorted(set(tokens), key=len, reverse=True)
        return regex.compile("(" + "|".join(regex.escape(t) for t in ordered) + ")")

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike = DEFAULT_BPE_FILE, **kwargs: Any) -> "CLIPTokenizer":
        """Build the tokenizer from a CLIP merges file such as `bpe_simple_vocab_16e6.txt.gz`."""
        vocab, merges = load_bpe_file(path)
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None) -> "CLIPTokenizer":
        """Read a transformers tokenizer folder.

        Files: `tokenizer.json` (written by transformers 5) or `vocab.json` + `merges.txt`
        (older folders; tokenizer.json wins when both exist), plus `tokenizer_config.json`
        and `special_tokens_map.json` when present (model_max_length and special tokens).
        """
        folder = Path(path) / subfolder if subfolder else Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        tokenizer_json, vocab_json, merges_txt = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
        if tokenizer_json.is_file():
            vocab, merges = _read_tokenizer_json(tokenizer_json)
        elif vocab_json.is_file() and merges_txt.is_file():
            vocab, merges = _check_vocab(_read_json(vocab_json), vocab_json), _read_merges_txt(merges_txt)
        elif vocab_json.is_file() or merges_txt.is_file():
            missing = merges_txt if vocab_json.is_file() else vocab_json
            raise FileNotFoundError(f"{folder}: found {'vocab.json' if vocab_json.is_file() else 'merges.txt'} but not {missing.name} ({missing})")
        else:
            raise FileNotFoundError(f"{folder} has no tokenizer files: expected tokenizer.json, or vocab.json and merges.txt")

        config_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        special_map = _read_json(map_path) if map_path.is_file() else None
        if not isinstance(config, dict) or (special_map is not None and not isinstance(special_map, dict)):
            raise ValueError(f"{folder}: tokenizer_config.json and special_tokens_map.json must hold JSON objects")
        try:
            names, added = _special_token_flags(config, special_map)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{folder}: bad special-token entry in tokenizer_config.json/special_tokens_map.json: {error}") from error
        max_length = config.get("model_max_length")
        if not isinstance(max_length, (int, float)) or max_length > 1e6:  # absent, or transformers' "no limit" 1e30
            max_length = CONTEXT_LENGTH
        try:
            return cls(vocab, merges, model_max_length=int(max_length), added_tokens=added, **names)
        except ValueError as error:
            raise ValueError(f"{folder}: {error}") from error

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a transformers tokenizer folder: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.__getitem__)
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 "unk_token": self.unk_token}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length, **names,
                  "added_tokens_decoder": {str(self.vocab[t]): {"content": t, "lstrip": False, "rstrip": False,
                                                                 "single_word": False, **flags}
                                           for t, flags in self.added_tokens.items()}}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2), encoding="utf-8")

    # ---- vocabulary --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    @property
    def bos_token_id(self) -> int:
        return self.vocab[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.vocab[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.vocab[self.pad_token]

    @property
    def unk_token_id(self) -> int:
        return self.vocab[self.unk_token]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.vocab.get(tokens, self.unk_token_id)
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, index: int) -> str:
        try:
            return self.id_to_token[index]
        except KeyError:
            raise ValueError(f"token id {index} is not in the vocabulary (size {len(self.vocab)})") from None

    # ---- step 5: BPE ---------------------------------------------------------------------
    def bpe(self, word: str) -> list[str]:
        """Split one byte-level word into vocabulary tokens (Sennrich et al. 2016, Algorithm 1, replayed).

        Start from single characters, the last one carrying "</w>" (so "a" at the end of a
        word, "a</w>", is a different token from "a" inside one). Then repeat: among the
        adjacent pairs, take the one with the lowest merge rank, and merge every occurrence
        of it, left to right; stop when no adjacent pair is a known merge.

            "horse" -> h o r s e</w> -> ... -> horse</w>      (id 4558)
        """
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            # the best (lowest-rank) adjacent pair; pairs that are not merges rank last
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            left, right = best
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        """Token ids of one CLIP piece: steps 3b, 4 and 5, stored in the word cache."""
        ids: list[int] = []
        for word in BYTE_LEVEL_PATTERN.findall(piece):
            # step 4: spell the UTF-8 bytes with the byte-level alphabet ("é" -> b"\xc3\xa9" -> "Ã©")
            spelled = "".join(BYTE_TO_UNICODE[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab.get(token, self.unk_token_id) for token in self.bpe(spelled))
        result = tuple(ids)
        if len(self._cache) < self.max_cache_size:
            self._cache[piece] = result
        return result

    # ---- steps 1-5: text -> ids ------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ids: list[int] = []
        cache, piece_ids, added_ids = self._cache, self._piece_ids, self._added_ids
        # step 1: raw special tokens are cut out before any cleaning (the split keeps them
        # at odd positions, the text between them at even positions)
        segments = self._raw_split.split(text) if self._raw_split is not None else [text]
        for i, segment in enumerate(segments):
            if i % 2:
                ids.append(added_ids[segment])
                continue
            cleaned = clean_text(segment)  # step 2
            parts = self._normalized_split.split(cleaned) if self._normalized_split is not None else [cleaned]
            for j, part in enumerate(parts):
                if j % 2:
                    ids.append(added_ids[part])
                    continue
                for piece in CLIP_PATTERN.findall(part):  # step 3
                    cached = cache.get(piece)
                    ids.extend(cached if cached is not None else piece_ids(piece))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The token strings of `text` (no BOS/EOS), e.g. "riding" -> ["riding</w>"]."""
        return [self.id_to_token[i] for i in self._text_ids(text)]

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool | str = False,
               max_length: int | None = None) -> list[int]:
        """Token ids of one text: [BOS] ids [EOS] (as a plain list)."""
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length)["input_ids"]

    # ---- step 6: post-processing -------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> TokenizerOutput:
        """Tokenize a prompt or a list of prompts.

        padding: False / "do_not_pad" (none), True / "longest" (to the longest in the batch),
            "max_length" (to `max_length`, default `model_max_length`). Padding goes on the
            right, with `pad_token_id` and attention_mask 0.
        truncation: True / "longest_first" keeps the first max_length - 2 text tokens, then
            [EOS], so a truncated sequence still ends in EOS (warns with the count dropped).
        return_tensors: None (Python lists; a single prompt gives a flat list) or "pt"
            (int64 tensors of shape (batch, length), batch = 1 for a single prompt).
        """
        if padding not in PADDING_CHOICES or isinstance(padding, int) and not isinstance(padding, bool):
            raise ValueError(f"padding must be one of {PADDING_CHOICES}, got {padding!r}")
        if truncation not in TRUNCATION_CHOICES or isinstance(truncation, int) and not isinstance(truncation, bool):
            raise ValueError(f"truncation must be one of {TRUNCATION_CHOICES}, got {truncation!r}")
        if return_tensors not in RETURN_TENSORS_CHOICES:
            raise ValueError(f"return_tensors must be one of {RETURN_TENSORS_CHOICES}, got {return_tensors!r}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        for index, item in enumerate(texts):
            if not isinstance(item, str):
                raise ValueError(f"text must be a str or a list of str; item {index} is {type(item).__name__}")
        truncate = truncation in (True, "longest_first")
        pad_to_max = padding == "max_length"
        if max_length is None and (truncate or pad_to_max):
            max_length = self.model_max_length
        if max_length is not None and (not isinstance(max_length, int) or max_length < (2 if add_special_tokens else 1)):
            raise ValueError(f"max_length must be an int >= {2 if add_special_tokens else 1}, got {max_length!r}")

        bos, eos, pad = self.bos_token_id, self.eos_token_id, self.pad_token_id
        sequences = []
        for index, item in enumerate(texts):
            ids = self._text_ids(item)
            if truncate:
                keep = max_length - 2 if add_special_tokens else max_length
                if len(ids) > keep:
                    self._warn_truncation(index, len(texts), ids, keep, max_length)
                    ids = ids[:keep]
            sequences.append([bos, *ids, eos] if add_special_tokens else ids)

        lengths = [len(s) for s in sequences]
        if pad_to_max:
            target = max_length
        elif padding in (True, "longest"):
            target = max(lengths, default=0)
        else:
            target = None

        if return_tensors is None:
            masks = [[1] * n for n in lengths]
            if target is not None:
                for seq, mask, n in zip(sequences, masks, lengths):
                    if n < target:
                        seq.extend([pad] * (target - n))
                        mask.extend([0] * (target - n))
            if single:
                return TokenizerOutput(input_ids=sequences[0], attention_mask=masks[0])
            return TokenizerOutput(input_ids=sequences, attention_mask=masks)

        # "pt": one flat list -> one tensor, and the mask from the lengths, for the whole batch
        width = max([target or 0, *lengths])
        if any(n != width for n in lengths) and (target is None or width > target):
            raise ValueError(
                f"cannot stack sequences of lengths {sorted(set(lengths))} into one tensor; "
                "use padding=True or padding='max_length' (with truncation=True)"
            )
        flat: list[int] = []
        for seq, n in zip(sequences, lengths):
            flat += seq
            if n < width:
                flat += [pad] * (width - n)
        input_ids = torch.tensor(flat, dtype=torch.long).view(len(sequences), width)
        # attention_mask[b, t] = 1 for real tokens (t < length_b), 0 for padding
        attention_mask = (torch.arange(width) < torch.tensor(lengths, dtype=torch.long)[:, None]).long()
        return TokenizerOutput(input_ids=input_ids, attention_mask=attention_mask)

    def _warn_truncation(self, index: int, batch: int, ids: list[int], keep: int, max_length: int) -> None:
        dropped = len(ids) - keep
        where = f"prompt {index} of {batch}" if batch > 1 else "the prompt"
        warnings.warn(
            f"CLIPTokenizer: truncation dropped {dropped} token{'s' if dropped != 1 else ''} from {where} "
            f"({len(ids)} text tokens, max_length={max_length} keeps {keep} plus BOS/EOS); "
            f"dropped text: {self.decode(ids[keep:])!r}",
            stacklevel=3,
        )

    # ---- decoding ------------------------------------------------------------------------
    def _bytes_of(self, index: int) -> bytes:
        """The bytes a token spells; a token with characters outside the byte alphabet
        (none in CLIP's vocabulary) contributes its own UTF-8, as in the reference."""
        cached = self._token_bytes.get(index)
        if cached is None:
            token = self._id_to_token(index)
            if all(c in UNICODE_TO_BYTE for c in token):
                cached = bytes(UNICODE_TO_BYTE[c] for c in token)
            else:
                cached = token.encode("utf-8")
            self._token_bytes[index] = cached
        return cached

    def decode(self, token_ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Ids -> text: join the tokens' bytes, decode UTF-8 (invalid bytes -> U+FFFD),
        turn each "</w>" into a space and strip the ends with `str.strip()` (as the
        reference does, so U+001C-U+001F are stripped here although they are not
        whitespace when encoding). Lowercase and collapsed whitespace stay as tokenized:
        decode(encode("A  Cat"), skip_special_tokens=True) == "a cat"."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        special = self.all_special_ids
        data = b"".join(self._bytes_of(int(i)) for i in token_ids if not (skip_special_tokens and int(i) in special))
        text = data.decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        """`decode` applied to each row."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})")
