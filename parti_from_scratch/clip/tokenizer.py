"""CLIP's tokenizer: the first step of the text path in tutorial "Parti原理与代码实例讲解"
§2.3 (the CLIP text encoder) and §3.1 (prompt -> token ids -> text embeddings).

A prompt becomes at most 77 integers in a vocabulary of 49,408 tokens:

    "a photo of an astronaut riding a horse on mars"
    -> 49406 320 1125 539 550 18376 6765 320 4558 525 7496 49407

`bpe.py` holds the algorithm (normalize, pre-tokenize, bytes, merges, decode). This file
adds what CLIP and the tutorial's call need around it (Radford et al. 2021, arXiv
2103.00020, §2.4: the sequence is "bracketed with [SOS] and [EOS] tokens", length capped):

  * special tokens: "<|startoftext|>" / "<|endoftext|>" typed in a prompt become their ids,
    matched before normalization (case sensitive) or after it, as the folder's
    AddedToken flags say (`tokenizer_files.special_token_flags`). "<|ENDOFTEXT|>" is seven
    ordinary tokens unless the special token is marked `normalized`. Stable Diffusion 2
    folders use "!" as pad token; it is then special, so "!" in a prompt encodes to id 0
    (not "!</w>" = 256) and `skip_special_tokens` drops it.
  * post-processing: [BOS] ids [EOS], truncation to max_length (keeping EOS), padding,
    int64 tensors, as transformers' `CLIPTokenizer` does; id for id equal to it.
  * A folder without `model_max_length` gets 77 here (transformers uses 1e30, "no limit";
    the text encoder has 77 positions, so a longer sequence is never useful).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import regex
import torch

from parti_from_scratch.clip.bpe import (  # noqa: F401  (re-exported: the names a reader looks for here)
    BYTE_LEVEL_PATTERN,
    BYTE_TO_UNICODE,
    CLIP_PATTERN,
    END_OF_WORD,
    UNICODE_TO_BYTE,
    ByteLevelBPE,
    bytes_to_unicode,
    clean_text,
)
from parti_from_scratch.clip.tokenizer_files import (  # noqa: F401
    ASSETS_DIR,
    BOS_TOKEN,
    CONTEXT_LENGTH,
    DEFAULT_BPE_FILE,
    EOS_TOKEN,
    NUM_CLIP_MERGES,
    check_model_max_length,
    load_bpe_file,
    read_tokenizer_folder,
    write_tokenizer_folder,
)

PADDING_CHOICES = (False, True, "longest", "max_length", "do_not_pad")
TRUNCATION_CHOICES = (False, True, "longest_first", "do_not_truncate")
RETURN_TENSORS_CHOICES = (None, "pt")


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
        model_max_length: int | None = CONTEXT_LENGTH,
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
        self.model = ByteLevelBPE(vocab, merges, unk_token, max_cache_size=max_cache_size)
        self.model_max_length = check_model_max_length(model_max_length)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token), ("unk_token", unk_token)):
            if token not in self.vocab:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")

        # Special tokens, each matched either in the raw text (normalized=False, case
        # sensitive) or in the normalized text (normalized=True, so also "<|ENDOFTEXT|>").
        if added_tokens is None:
            added_tokens = {t: {"normalized": False, "special": True} for t in (bos_token, eos_token, unk_token, pad_token)}
        self.added_tokens = {token: dict(flags) for token, flags in added_tokens.items()}
        self._added_ids: dict[str, int] = {}  # the token as it appears in raw or normalized text -> id
        raw, normalized = [], []
        for token, flags in self.added_tokens.items():
            if token not in self.vocab:
                raise ValueError(f"added token {token!r} is not in the vocabulary")
            if flags.get("single_word"):
                raise ValueError(f"added token {token!r} has single_word=True, which this tokenizer does not implement")
            form = self.model.normalizer(token) if flags.get("normalized") else token
            (normalized if flags.get("normalized") else raw).append(form)
            self._added_ids[form] = self.vocab[token]
        self._raw_split = self._alternation(raw)
        self._normalized_split = self._alternation(normalized)
        # ids that decode(..., skip_special_tokens=True) leaves out
        self.all_special_ids = {self.vocab[t] for t, flags in self.added_tokens.items() if flags.get("special", True)}

    @staticmethod
    def _alternation(tokens: list[str]) -> regex.Pattern | None:
        """A splitting regex for literal tokens; longest first, so overlapping tokens match leftmost-longest."""
        if not tokens:
            return None
        ordered = sorted(set(tokens), key=len, reverse=True)
        return regex.compile("(" + "|".join(regex.escape(t) for t in ordered) + ")")

    # ---- files ----------------------------------------------------------------------------
    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike = DEFAULT_BPE_FILE, **kwargs: Any) -> "CLIPTokenizer":
        """Build the tokenizer from a CLIP merges file such as `bpe_simple_vocab_16e6.txt.gz`."""
        vocab, merges = load_bpe_file(path)
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None) -> "CLIPTokenizer":
        """Read a transformers tokenizer folder (see `tokenizer_files.read_tokenizer_folder`)."""
        folder = Path(path) / subfolder if subfolder else Path(path)
        kwargs = read_tokenizer_folder(folder)
        try:
            return cls(**kwargs)
        except ValueError as error:
            raise ValueError(f"{folder}: {error}") from error

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a transformers tokenizer folder: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
        write_tokenizer_folder(self, Path(folder))

    # ---- vocabulary --------------------------------------------------------------------------
    @property
    def vocab(self) -> dict[str, int]:
        return self.model.vocab

    @property
    def id_to_token(self) -> dict[int, str]:
        return self.model.id_to_token

    @property
    def bpe_ranks(self) -> dict[tuple[str, str], int]:
        return self.model.bpe_ranks

    def bpe(self, word: str) -> list[str]:
        """The merges applied to one byte-spelled word (`ByteLevelBPE.bpe`)."""
        return self.model.bpe(word)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def max_token_id(self) -> int:
        """The largest id this tokenizer can produce: it must be below the text encoder's vocab_size."""
        return max(self.vocab.values())

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

    # ---- text -> ids -----------------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ids: list[int] = []
        normalize, encode_normalized, added_ids = self.model.normalizer, self.model.encode_normalized, self._added_ids
        # raw special tokens are cut out before normalization (the split keeps them at odd
        # positions, the text between them at even positions)
        segments = self._raw_split.split(text) if self._raw_split is not None else [text]
        for i, segment in enumerate(segments):
            if i % 2:
                ids.append(added_ids[segment])
                continue
            normalized = normalize(segment)
            parts = self._normalized_split.split(normalized) if self._normalized_split is not None else [normalized]
            for j, part in enumerate(parts):
                ids.extend([added_ids[part]] if j % 2 else encode_normalized(part))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The token strings of `text` (no BOS/EOS), e.g. "riding" -> ["riding</w>"]."""
        return [self.id_to_token[i] for i in self._text_ids(text)]

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool | str = False,
               max_length: int | None = None) -> list[int]:
        """Token ids of one text: [BOS] ids [EOS] (as a plain list)."""
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length)["input_ids"]

    # ---- post-processing ------------------------------------------------------------------------
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
        text = self.decode(ids[keep:])
        shown = text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"
        warnings.warn(
            f"CLIPTokenizer: truncation dropped {dropped} token{'s' if dropped != 1 else ''} from {where} "
            f"({len(ids)} text tokens, max_length={max_length} keeps {keep} plus BOS/EOS); "
            f"dropped text: {shown!r}",
            stacklevel=3,
        )

    # ---- ids -> text ---------------------------------------------------------------------------
    def decode(self, token_ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Ids -> text (`ByteLevelBPE.decode`), optionally without the special tokens.
        Lowercase and collapsed whitespace stay as tokenized:
        decode(encode("A  Cat"), skip_special_tokens=True) == "a cat"."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        special = self.all_special_ids
        return self.model.decode([int(i) for i in token_ids if not (skip_special_tokens and int(i) in special)])

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        """`decode` applied to each row."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})")
