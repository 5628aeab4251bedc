"""Tokenizer throughput: our CLIPTokenizer against transformers' on the 1,632 PartiPrompts.

Both tokenizers are built from the same files (the vendored CLIP merges, written out as
vocab.json + merges.txt in a temporary folder for transformers) and called the way tutorial
"Parti原理与代码实例讲解" §3.1 calls them:

    tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")

Two workloads, each timed `--repeats` times with the two tokenizers alternating (and
swapping which goes first every repetition, so neither always runs on a warmer machine):
  * per-prompt: one call per prompt, 1,632 calls;
  * batched: one call with the list of all 1,632 prompts.
Both tokenizers keep a word cache, so the repeated runs are warm; the first ("cold") pass of
a freshly built tokenizer is reported separately. transformers' batched call runs in Rust
on all cores; ours runs in one Python thread.

Then long inputs, one call each: a single word of `--long` random letters, of random emoji,
and of one repeated letter. The merge loop costs O(n log n) in the word's length, so these
take about a second at 100,000 characters, not minutes.

    python benchmarks/tokenizer_throughput.py [--repeats 7] [--long 100000]
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from parti_from_scratch.clip.tokenizer import ASSETS_DIR, CLIPTokenizer, load_bpe_file  # noqa: E402

CALL = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")


def read_prompts() -> list[str]:
    with open(ASSETS_DIR / "PartiPrompts.tsv", encoding="utf-8", newline="") as handle:
        return [row["Prompt"] for row in csv.DictReader(handle, delimiter="\t")]


def build_reference(folder: Path):
    """transformers' CLIPTokenizer from vocab.json + merges.txt made from the same merges file."""
    from transformers import CLIPTokenizer as ReferenceTokenizer

    vocab, merges = load_bpe_file()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return ReferenceTokenizer.from_pretrained(str(folder))


def per_prompt(tokenizer, prompts: list[str]) -> float:
    """Seconds for one call per prompt."""
    start = time.perf_counter()
    for prompt in prompts:
        tokenizer(prompt, **CALL).input_ids
    return time.perf_counter() - start


def batched(tokenizer, prompts: list[str]) -> float:
    """Seconds for one call on the whole list."""
    start = time.perf_counter()
    tokenizer(prompts, **CALL).input_ids
    return time.perf_counter() - start


def long_inputs(length: int) -> dict[str, str]:
    """One word of `length` characters each, seeded."""
    rng = random.Random(0)
    emoji = [chr(c) for c in range(0x1F300, 0x1F650)]
    return {"random letters": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)),
            "random emoji": "".join(rng.choice(emoji) for _ in range(length)),
            "one letter repeated": "a" * length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions of each workload")
    parser.add_argument("--long", type=int, default=100_000, help="characters of each long input (0: skip)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # truncation warnings: some PartiPrompts exceed 77 tokens
    prompts = read_prompts()

    with tempfile.TemporaryDirectory() as tmp:
        reference = build_reference(Path(tmp))
        ours = CLIPTokenizer()

        # the outputs must agree before their speed means anything
        mine, theirs = ours(prompts, **CALL), reference(prompts, **CALL)
        assert torch.equal(mine.input_ids, theirs.input_ids) and torch.equal(mine.attention_mask, theirs.attention_mask)

        # cold: first pass of freshly built tokenizers (empty word caches)
        cold = {
            "ours": len(prompts) / batched(CLIPTokenizer(), prompts),
            "transformers": len(prompts) / batched(build_reference(Path(tmp)), prompts),
        }

        contenders = {"ours": ours, "transformers": reference}
        rates: dict[tuple[str, str], list[float]] = {(n, w): [] for n in contenders for w in ("per-prompt", "batched")}
        for repeat in range(args.repeats):
            order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
            for workload, run in (("per-prompt", per_prompt), ("batched", batched)):
                for name in order:
                    rates[(name, workload)].append(len(prompts) / run(contenders[name], prompts))

        long_seconds = {}
        for label, text in (long_inputs(args.long) if args.long else {}).items():
            for name in contenders:  # fresh tokenizers: a long word is never served from a cache
                tokenizer = CLIPTokenizer() if name == "ours" else build_reference(Path(tmp))
                long_seconds[(label, name)] = batched(tokenizer, [text])

    print(f"{len(prompts)} PartiPrompts, tokenizer(prompt, {', '.join(f'{k}={v!r}' for k, v in CALL.items())})")
    print(f"median of {args.repeats} alternating repetitions, prompts per second")
    print(f"{'workload':<22}{'ours':>12}{'transformers':>16}{'ours/transformers':>20}")
    for workload in ("per-prompt", "batched"):
        ours_rate = statistics.median(rates[("ours", workload)])
        ref_rate = statistics.median(rates[("transformers", workload)])
        print(f"{workload:<22}{ours_rate:>12,.0f}{ref_rate:>16,.0f}{ours_rate / ref_rate:>20.2f}")
    print(f"{'batched, cold cache':<22}{cold['ours']:>12,.0f}{cold['transformers']:>16,.0f}"
          f"{cold['ours'] / cold['transformers']:>20.2f}")
    if long_seconds:
        print(f"\none word of {args.long:,} characters, seconds per call")
        print(f"{'input':<22}{'ours':>12}{'transformers':>16}")
        for label in long_inputs(1):
            print(f"{label:<22}{long_seconds[(label, 'ours')]:>12.2f}{long_seconds[(label, 'transformers')]:>16.2f}")


if __name__ == "__main__":
    main()
