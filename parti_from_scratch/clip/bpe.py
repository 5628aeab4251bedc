r"""Byte-level byte pair encoding (BPE): how a prompt becomes token ids, tutorial
"Parti原理与代码实例讲解" §3.1 (prompt -> token ids -> text embeddings).

    "a photo of an astronaut riding a horse on mars"
    -> 320 1125 539 550 18376 6765 320 4558 525 7496          (CLIP's vocabulary)

Papers:
  * Sennrich, Haddow and Birch 2016, "Neural Machine Translation of Rare Words with Subword
    Units" (arXiv 1508.07909), Algorithm 1: byte pair encoding. Training repeatedly merges
    the most frequent adjacent pair of symbols; encoding replays the learned merges, the
    earliest learned (lowest *rank*) first.
  * Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2), §2.2:
    BPE over UTF-8 bytes instead of characters, so every string has a spelling and no
    token is unknown; a regex cuts the text into words first, so merges never cross them.
  * Radford et al. 2021, CLIP (arXiv 2103.00020), §2.4: "a lower-cased byte pair encoding
    (BPE) representation with a 49,152 vocab size".

The steps, top to bottom in this file:

  1. normalize     `clean_text`: NFC, every run of whitespace -> " ", lowercase
  2. pre-tokenize  `CLIP_PATTERN` cuts the text into words, single digits and punctuation runs
  3. bytes         each piece's UTF-8 bytes are spelled with `BYTE_TO_UNICODE`
  4. merge         `ByteLevelBPE.bpe`: merges by rank; "</w>" marks the end of each word
  5. ids           each token looked up in the vocabulary; `decode` goes back

What is specific to CLIP is named, not buried: the normalizer (`clean_text`), the
pre-tokenizer patterns (`CLIP_PATTERN` then `BYTE_LEVEL_PATTERN`) and the end-of-word
marker (`END_OF_WORD`) are arguments of `ByteLevelBPE`. GPT-2 and BART use the same merge
loop with no normalizer, only `BYTE_LEVEL_PATTERN`, and no end-of-word marker.
Special tokens, files and the padding/tensor call API are in `tokenizer.py` and
`tokenizer_files.py`.

The reference is transformers' `CLIPTokenizer` (backed by the `tokenizers` library); we
match it id for id. Where it differs from openai/CLIP's `SimpleTokenizer`:
no ftfy repair and no `html.unescape` ("&amp;" -> "&", "amp", ";"); lowercasing is per
character ("Σ" -> "σ" even at the end of a word, "İ" -> "i" + U+0307); whitespace is
Unicode White_Space (the 25 characters of `\s`: U+0085 and U+2028 separate words,
U+001C-U+001F and U+200B do not).

Unicode versions: NFC uses Python's `unicodedata` (Unicode 14.0 on Python 3.11), the
reference's normalizer uses Unicode 9.0 tables. `clean_text` therefore treats the 99
characters of `AFTER_UNICODE_9_NORMALIZATION` as the reference does (see there). Its
`\p{L}`/`\p{N}` and lowercasing use newer tables than Python 3.11's: code points that
Python's database calls unassigned (category Cn), and only those, can tokenize differently
(17,507 of them against tokenizers 0.23.3, all assigned in Unicode 15.0 or later). Every
assigned character is checked against the reference by the tests.
"""
from __future__ import annotations

import heapq
import unicodedata
from typing import Callable, Sequence

import regex

END_OF_WORD = "</w>"  # CLIP's marker on the last symbol of each word ("a</w>" != "a")


# --------------------------------------------------------------------------------------
# Step 3: the byte-level alphabet
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


def spell_bytes(text: str) -> str:
    """Step 3: the UTF-8 bytes of `text` in the byte-level alphabet ("é" -> b"\\xc3\\xa9" -> "Ã©")."""
    return "".join(BYTE_TO_UNICODE[b] for b in text.encode("utf-8"))


# --------------------------------------------------------------------------------------
# Step 1: normalization
# --------------------------------------------------------------------------------------
# Characters assigned in Unicode 10.0-14.0 that NFC reorders or composes: 98 combining
# marks (non-zero canonical combining class) and U+11930, the second half of the only new
# canonical composition (U+11935 U+11930 -> U+11938, Dives Akuru, Unicode 13.0). The
# reference's Unicode 9.0 tables do not know them, so for it each is a base character
# that never reorders or composes: "a" U+1ABF U+0301 stays as it is instead of becoming
# "á" U+1ABF. Cutting the text at these characters and normalising the parts reproduces
# that exactly (NFC never acts across a character that neither reorders nor composes).
AFTER_UNICODE_9_NORMALIZATION = regex.compile(
    "([\u07fd\u0898-\u089f\u08ca-\u08d3\u09fe\u0c3c\u0d3b\u0d3c\u0eba\u1715\u1abf-\u1ace\u1df6-\u1dfa\ua82c"
    "\U00010d24-\U00010d27\U00010eab\U00010eac\U00010f46-\U00010f50\U00010f82-\U00010f85\U00011070\U0001133b"
    "\U0001145e\U00011839\U0001183a\U00011930\U0001193d\U0001193e\U00011943\U000119e0\U00011a34\U00011a47"
    "\U00011a99\U00011d42\U00011d44\U00011d45\U00011d97\U00016ff0\U00016ff1\U0001e130-\U0001e136\U0001e2ae"
    "\U0001e2ec-\U0001e2ef])"
)
_WHITESPACE_RUN = regex.compile(r"\s+")


def nfc_unicode_9(text: str) -> str:
    """NFC as the reference computes it with Unicode 9.0 tables (see AFTER_UNICODE_9_NORMALIZATION)."""
    if AFTER_UNICODE_9_NORMALIZATION.search(text) is None:
        return unicodedata.normalize("NFC", text)
    # split with a capturing group: the text between the characters at even positions
    parts = AFTER_UNICODE_9_NORMALIZATION.split(text)
    return "".join(part if i % 2 else unicodedata.normalize("NFC", part) for i, part in enumerate(parts))


def clean_text(text: str) -> str:
    """CLIP's normalizer, in the reference's order:

    1. NFC: "e" + U+0301 (combining acute) becomes the single character "é", so both
       spellings of an accented letter get the same tokens.
    2. Every run of White_Space (spaces, tabs, newlines, U+3000, ...) becomes one " ".
    3. Lowercase each character on its own (CLIP's BPE is "lower-cased", CLIP §2.4).
       `str.lower()` is per character except for the capital sigma, which it turns into
       "ς" at the end of a word; mapping "Σ" to "σ" first removes that context rule.
    """
    text = nfc_unicode_9(text)
    text = _WHITESPACE_RUN.sub(" ", text)
    return text.replace("Σ", "σ").lower()


# --------------------------------------------------------------------------------------
# Step 2: pre-tokenization
# --------------------------------------------------------------------------------------
# CLIP's pre-tokenizer: the special-token strings, the English contractions, a run of
# letters, ONE digit (so "2023" is four tokens), or a run of anything else that is not
# whitespace (punctuation, symbols, emoji, combining marks). Whitespace matches nothing
# and is dropped; it only separates pieces.
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# GPT-2's byte-level split, which the reference then runs on each CLIP piece. It never
# cuts a piece CLIP_PATTERN produced, except the lowercased special strings
# ("<|endoftext|>" from "<|ENDOFTEXT|>"), which it splits into "<|", "endoftext", "|>".
BYTE_LEVEL_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


# --------------------------------------------------------------------------------------
# Steps 4-5: the merges, encode and decode
# --------------------------------------------------------------------------------------
class ByteLevelBPE:
    """Text <-> ids with a vocabulary (token -> id) and a ranked list of merges.

    `normalizer`, `patterns` and `end_of_word` default to CLIP's choices. `patterns[0]`
    cuts the normalized text into pieces (each piece's ids are cached); each following
    pattern cuts every piece again. `spell` writes each final piece in the merges'
    alphabet before merging (step 3; default: its UTF-8 bytes, `spell_bytes`).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        unk_token: str,
        normalizer: Callable[[str], str] | None = clean_text,
        patterns: Sequence[regex.Pattern] = (CLIP_PATTERN, BYTE_LEVEL_PATTERN),
        end_of_word: str = END_OF_WORD,
        spell: Callable[[str], str] = spell_bytes,
        max_cache_size: int = 200_000,
        max_cached_piece: int = 256,
    ) -> None:
        self.vocab = dict(vocab)
        self.id_to_token = {index: token for token, index in self.vocab.items()}
        if unk_token not in self.vocab:
            raise ValueError(f"unk_token {unk_token!r} is not in the vocabulary")
        self.unk_id = self.vocab[unk_token]
        self.normalizer, self.patterns, self.end_of_word = normalizer, tuple(patterns), end_of_word
        self.spell = spell
        # Merge ranks: the pair learned first has rank 0 and is merged first (Sennrich et al.).
        # A pair listed twice keeps its last rank, as in the reference.
        self.bpe_ranks: dict[tuple[str, str], int] = {}
        for rank, (left, right) in enumerate(merges):
            for symbol in (left, right, left + right):
                if symbol not in self.vocab:
                    raise ValueError(f"merge #{rank} ({left!r}, {right!r}) uses {symbol!r}, which is not in the vocabulary")
            self.bpe_ranks[(left, right)] = rank
        # piece cache: a piece of text -> its ids, so a repeated word costs one dict lookup;
        # long pieces are not cached (they rarely repeat and would fill memory)
        self._cache: dict[str, tuple[int, ...]] = {}
        self.max_cache_size, self.max_cached_piece = max_cache_size, max_cached_piece
        self._token_bytes: dict[int, bytes] = {}

    def bpe(self, word: str) -> list[str]:
        """Split one byte-spelled word into tokens by replaying the merges (Sennrich et al. 2016, Alg. 1).

        Start from single characters, the last carrying the end-of-word marker ("a" at the
        end of a word, "a</w>", is a different token from "a" inside one). Then repeat:
        merge the adjacent pair with the lowest rank, the leftmost one if it occurs more
        than once, until no adjacent pair is a known merge.

            "horse" -> h o r s e</w> -> ... -> horse</w>      (id 4558)

        A heap of candidate merges (rank, position) and a linked list of symbols make each
        merge cost O(log n), so a word of n characters costs O(n log n) in all, not the
        O(n^2) of rescanning the word after every merge. A heap entry is stale when one
        of its two symbols has merged since it was pushed; it is then skipped.
        """
        if not word:
            return []
        symbols = list(word)
        symbols[-1] += self.end_of_word
        n = len(symbols)
        ranks = self.bpe_ranks
        prev = list(range(-1, n - 1))  # prev[i]: position of the symbol left of i (-1: none)
        next_ = list(range(1, n + 1))  # next_[i]: position of the symbol right of i (n: none)
        # candidate merges (rank, position of the left symbol, left, right)
        heap = [(ranks[pair], i, *pair) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = next_[i]
            if j >= n or symbols[i] != left or symbols[j] != right:
                continue  # stale: a symbol of this pair was merged away or grew
            # merge: the left symbol becomes left+right, the right symbol leaves the list
            symbols[i], symbols[j] = left + right, ""
            next_[i] = next_[j]
            if next_[i] < n:
                prev[next_[i]] = i
            # the merged symbol forms new pairs with its neighbours
            if prev[i] >= 0 and (pair := (symbols[prev[i]], symbols[i])) in ranks:
                heapq.heappush(heap, (ranks[pair], prev[i], *pair))
            if next_[i] < n and (pair := (symbols[i], symbols[next_[i]])) in ranks:
                heapq.heappush(heap, (ranks[pair], i, *pair))
        return [s for s in symbols if s]

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        """Token ids of one piece of step 2 (steps 3-5), stored in the piece cache."""
        words = [piece]
        for pattern in self.patterns[1:]:
            words = [part for word in words for part in pattern.findall(word)]
        vocab, unk = self.vocab, self.unk_id
        ids = tuple(vocab.get(token, unk) for word in words for token in self.bpe(self.spell(word)))
        if len(piece) <= self.max_cached_piece and len(self._cache) < self.max_cache_size:
            self._cache[piece] = ids
        return ids

    def encode_normalized(self, text: str) -> list[int]:
        """Steps 2-5 on text that is already normalized."""
        ids: list[int] = []
        cache, piece_ids = self._cache, self._piece_ids
        for piece in self.patterns[0].findall(text):
            cached = cache.get(piece)
            ids.extend(cached if cached is not None else piece_ids(piece))
        return ids

    def encode(self, text: str) -> list[int]:
        """Steps 1-5: text -> token ids (no special tokens added)."""
        return self.encode_normalized(self.normalizer(text) if self.normalizer else text)

    def token_bytes(self, index: int) -> bytes:
        """The bytes a token spells; a token with characters outside the byte alphabet
        (none in CLIP's vocabulary) contributes its own UTF-8, as in the reference."""
        cached = self._token_bytes.get(index)
        if cached is None:
            token = self.id_to_token.get(index)
            if token is None:
                raise ValueError(f"token id {index} is not in the vocabulary (size {len(self.vocab)})")
            if all(c in UNICODE_TO_BYTE for c in token):
                cached = bytes(UNICODE_TO_BYTE[c] for c in token)
            else:
                cached = token.encode("utf-8")
            self._token_bytes[index] = cached
        return cached

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text: join the tokens' bytes, decode UTF-8 (invalid bytes -> U+FFFD); with
        an end-of-word marker, each marker becomes a space and the ends are stripped with
        `str.strip()` (as the reference does, so U+001C-U+001F are stripped here although
        they are not whitespace when encoding)."""
        text = b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")
        return text.replace(self.end_of_word, " ").strip() if self.end_of_word else text
