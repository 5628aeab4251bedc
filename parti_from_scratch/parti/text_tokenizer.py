"""The text side of Parti's encoder: a prompt -> BART/GPT-2-style byte-level BPE ids.

Parti (Yu et al. 2022, arXiv 2206.10789, §2.2) reads the prompt as SentencePiece
tokens; its open relatives DALL·E mini and mega read it with BART's byte-level BPE
(Radford et al. 2019, §2.2; Lewis et al. 2019, arXiv 1910.13461), shipped as
`vocab.json` (token -> id) and `merges.txt` (the ranked merges, after a "#version"
line). The merge loop is CLIP's (`clip/bpe.py`, Sennrich et al. 2016, Algorithm 1);
what differs is named here, as min-dalle's `TextTokenizer` does it, so the ids are
those the DALL·E mini/mega weights were run with:

  1. normalize     `dalle_normalize`: lowercase, then drop every non-ASCII character
                   ("Salvador Dalí" -> "salvador dal", "corgi’s" -> "corgis")
  2. pre-tokenize  `WORD_PATTERN`: the runs of characters between spaces (" " only:
                   punctuation stays attached, "horse," is one word; a tab is a character)
  3. spell         `space_prefixed`: "Ġ" + the word's characters (Ġ is how the byte-level
                   alphabet spells the space before a word: every word, the first included)
  4. merge         `ByteLevelBPE.bpe` with no end-of-word marker
  5. ids           <s> ids </s>; a symbol missing from the vocabulary is <unk>

    "A photo of an astronaut" -> <s> Ġa Ġphoto Ġof Ġan Ġastronaut </s>

Where this differs from min-dalle, on purpose:
  * min-dalle first replaces emoji by their names with the `emoji` package
    ("🐶" -> "dog_face"); this package has no emoji table, so an emoji is dropped like
    every other non-ASCII character. (PartiPrompts has no emoji: the tests compare all
    1,632 prompts id for id.)
  * a prompt longer than the encoder's positions keeps its first max_length - 2 tokens
    and </s>, with a warning (as CLIPTokenizer does); min-dalle cuts after 64 ids,
    dropping </s>.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import regex
import torch

from parti_from_scratch.clip.bpe import BYTE_TO_UNICODE, ByteLevelBPE
from parti_from_scratch.clip.tokenizer import TokenizerOutput
from parti_from_scratch.clip.tokenizer_files import _check_vocab, _read_json, _read_merges_txt
from parti_from_scratch.configuration import resolve_folder

WORD_PATTERN = regex.compile(r"[^ ]+")      # step 2: runs between spaces; empty words vanish
SPACE = BYTE_TO_UNICODE[ord(" ")]           # "Ġ"
DEFAULT_MAX_LENGTH = 64                     # DALL·E mini/mega's text positions
CONFIG_FILE = "tokenizer_config.json"


def dalle_normalize(text: str) -> str:
    """Step 1: lowercase, then keep only ASCII characters (in this order, so "İ" -> "i" + U+0307 -> "i")."""
    return text.lower().encode("ascii", errors="ignore").decode("ascii")


def space_prefixed(word: str) -> str:
    """Step 3: "Ġ" + the word, each character its own symbol (after step 1 all are ASCII).

    A control character such as a tab stays itself, not its byte-level spelling ("ĉ"), so it
    is <unk>, as in min-dalle.
    """
    return SPACE + word


class PartiTextTokenizer:
    """Prompt -> ids for the encoder: `tok(prompts, padding="max_length", max_length=64, truncation=True,
    return_tensors="pt").input_ids` (as CLIPTokenizer), `encode`, `decode`, `from_pretrained`, `save_pretrained`.

    vocab: token -> id (BART's, with "<s>", "<pad>", "</s>", "<unk>"); merges: ranked pairs.
    model_max_length: the longest sequence, special tokens included (the encoder's positions).
    """

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]],
                 model_max_length: int = DEFAULT_MAX_LENGTH, bos_token: str = "<s>", eos_token: str = "</s>",
                 pad_token: str = "<pad>", unk_token: str = "<unk>"):
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token not in vocab:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
            raise ValueError(f"model_max_length must be an int >= 2 (<s> and </s>), got {model_max_length!r}")
        self.model = ByteLevelBPE(vocab, merges, unk_token, normalizer=dalle_normalize, patterns=(WORD_PATTERN,),
                                  end_of_word="", spell=space_prefixed)
        self.merges = list(merges)
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id, self.unk_token_id = vocab[pad_token], vocab[unk_token]

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], subfolder: Optional[str] = None,
                        model_max_length: Optional[int] = None) -> "PartiTextTokenizer":
        """Read vocab.json + merges.txt (a min-dalle folder, a transformers BART folder, or what
        `save_pretrained` wrote); model_max_length from the argument, else tokenizer_config.json, else 64."""
        folder = resolve_folder(path, subfolder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise ValueError(f"{folder}: no {f.name} (a BART/GPT-2 tokenizer folder has vocab.json and merges.txt)")
        if model_max_length is None:
            config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
            model_max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH) if isinstance(config, dict) \
                else DEFAULT_MAX_LENGTH
        return cls.from_files(vocab_file, merges_file, model_max_length)

    @classmethod
    def from_files(cls, vocab_file: Union[str, Path], merges_file: Union[str, Path],
                   model_max_length: int = DEFAULT_MAX_LENGTH) -> "PartiTextTokenizer":
        """From a vocab.json and a merges.txt of any name (min-dalle's repository has vocab_mini.json, merges_mini.txt)."""
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        vocab = _check_vocab(_read_json(vocab_file), vocab_file)
        merges = _read_merges_txt(merges_file)
        try:
            return cls(vocab, merges, model_max_length)
        except ValueError as e:
            raise ValueError(f"{vocab_file.parent}: {e}") from None

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write vocab.json, merges.txt (with the "#version" line) and tokenizer_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.model.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
                                           encoding="utf-8")
        (folder / CONFIG_FILE).write_text(json.dumps({"model_max_length": self.model_max_length}) + "\n",
                                          encoding="utf-8")

    # ------------------------------------------------------------------ text -> ids
    @property
    def vocab_size(self) -> int:
        return len(self.model.vocab)

    def get_vocab(self) -> Dict[str, int]:
        return dict(self.model.vocab)

    def tokenize(self, text: str) -> List[str]:
        """The token strings of `text` without <s> and </s>: "A horse," -> ["Ġa", "Ġhorse", ","] (merges permitting)."""
        return [self.model.id_to_token[i] for i in self.model.encode(text)]

    def encode(self, text: str) -> List[int]:
        """<s> ids </s>, untruncated: min-dalle's `TextTokenizer.tokenize(text)` id for id (emoji aside)."""
        return [self.bos_token_id, *self.model.encode(text), self.eos_token_id]

    def __call__(self, text: Union[str, Sequence[str]], padding: Union[bool, str] = "max_length",
                 truncation: bool = True, max_length: Optional[int] = None,
                 return_tensors: Optional[str] = "pt") -> TokenizerOutput:
        """Tokenize prompts into a (batch, length) tensor with an attention mask (1 = token, 0 = padding).

        padding: "max_length" (to max_length, default model_max_length) or True / "longest".
        truncation: keep the first max_length - 2 text tokens and </s>, warning with the count dropped;
            False with a prompt longer than max_length is an error.
        """
        if padding not in ("max_length", True, "longest"):
            raise ValueError(f"padding must be 'max_length', True or 'longest', got {padding!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a str or a non-empty list of str")
        max_length = self.model_max_length if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        sequences = []
        for index, item in enumerate(texts):
            ids = self.encode(item)
            if len(ids) > max_length:
                if not truncation:
                    raise ValueError(f"prompt {index} has {len(ids)} tokens, more than max_length={max_length}")
                dropped = ids[max_length - 1:-1]
                warnings.warn(f"PartiTextTokenizer: truncation dropped {len(dropped)} token"
                              f"{'s' if len(dropped) != 1 else ''} from prompt {index} ({len(ids)} tokens, "
                              f"max_length={max_length}); dropped text: {self.decode(dropped)!r}", stacklevel=2)
                ids = ids[:max_length - 1] + [self.eos_token_id]
            sequences.append(ids)
        width = max_length if padding == "max_length" else max(len(s) for s in sequences)
        lengths = [len(s) for s in sequences]
        padded = [s + [self.pad_token_id] * (width - len(s)) for s in sequences]
        masks = [[1] * n + [0] * (width - n) for n in lengths]
        if return_tensors is None:
            return TokenizerOutput(input_ids=padded, attention_mask=masks)
        return TokenizerOutput(input_ids=torch.tensor(padded, dtype=torch.long),
                               attention_mask=torch.tensor(masks, dtype=torch.long))

    # ------------------------------------------------------------------ ids -> text
    def decode(self, token_ids: Union[Sequence[int], torch.Tensor], skip_special_tokens: bool = False) -> str:
        """Ids -> text (lowercased, ASCII, as tokenized); the space every word starts with is dropped at the start."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        ids = [int(i) for i in token_ids if not (skip_special_tokens and int(i) in special)]
        return self.model.decode(ids).removeprefix(" ")

    def __repr__(self) -> str:
        return f"PartiTextTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length})"
