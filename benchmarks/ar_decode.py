"""Writing 256 image tokens with guidance: our cached decoder against min-dalle's, fp32 on the CPU.

    python benchmarks/ar_decode.py [--runs 3] [--layers 12] [--width 512] [--stride 16] [--threads N]

What is measured:
* a DALL·E-mini-style encoder-decoder of mid size with random weights (default 12 + 12
  layers, width 512, 8 heads, GLU 1365, text vocabulary 50264, image vocabulary 16385,
  64 text tokens, 256 = 16x16 image tokens): min-dalle's DalleBartEncoder/DalleBartDecoder
  build and initialise it, ours receives the same tensors (key rule `glu.` -> `ffn.`);
* one image with classifier-free guidance, so batch 2 (unconditional + conditional rows),
  guidance 16, top-k 256, temperature 1 (min-dalle's defaults); the full job: encoder,
  then 256 decoder steps, each sampling one token;
* min-dalle's loop is tests/min_dalle_oracle.min_dalle_sample (the steps of
  MinDalle.generate_raw_image_stream around its own sample_tokens); ours is
  parti.sampling.generate_image_tokens with the KV cache;
* `--runs` timed generations of each, alternating ours / min-dalle in one process, the
  median of each and the ratio of tokens/s ours / min-dalle (target >= 1.0); both draw the
  same tokens for the same seed (printed);
* ours cached vs ours uncached (every step recomputes the whole prefix, O(N^2) token
  passes in all): step i of the uncached loop is one full decoder pass over i tokens plus
  the filters, whatever came before, so its total is estimated from every `--stride`-th
  step timed (lengths stride, 2 stride, ..., 256) times the stride, against the measured
  cached loop; running it whole would take minutes;
* memory: the cache's tensors against their analytic size, 2 (K, V) * layers * rows *
  tokens * width * 4 bytes for the self-attention and the same with the text's 64 tokens
  for the projected text keys/values, and the peak growth of the process's resident memory
  during one of our generations, measured after a warm-up generation (sampled from /proc/self/statm every
  millisecond; from the start glibc maps every block over 128 KiB on its own and unmaps it
  when freed, so no freed memory is silently reused and the growth is what the generation
  holds at its peak; the timed runs then use a 32 MiB threshold, glibc's usual ceiling).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                 # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))       # the min-dalle reference loop lives with the tests


def set_mmap_threshold(nbytes: int) -> None:
    """mallopt(M_MMAP_THRESHOLD, nbytes): glibc maps each block of at least nbytes on its own and unmaps it on free."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)          # M_MMAP_THRESHOLD = -3
    except OSError:
        pass                                                   # not glibc: the growth may be understated


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn) -> int:
    """Peak resident memory above the level at the start, while fn() runs (bytes)."""
    start, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], rss_bytes()) - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--stride", type=int, default=16, help="time every stride-th uncached step")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    set_mmap_threshold(128 * 1024)

    from min_dalle_oracle import import_min_dalle, min_dalle_models, min_dalle_sample, ours_from_min_dalle

    from parti_from_scratch.parti.sampling import classifier_free_guidance, filtered_distribution, generate_image_tokens
    from parti_from_scratch.parti.transformer import KVCache, preset_config

    import_min_dalle()                                   # restores autograd and the thread count it changes
    if args.threads:
        torch.set_num_threads(args.threads)
    config = preset_config("dalle-mini", d_model=args.width, encoder_layers=args.layers, decoder_layers=args.layers,
                           encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                           encoder_ffn_dim=args.width * 8 // 3, decoder_ffn_dim=args.width * 8 // 3)
    torch.manual_seed(0)
    encoder, decoder = min_dalle_models(config)
    ours = ours_from_min_dalle(config, encoder, decoder)
    N, T = config.image_token_count, config.max_text_positions
    g = torch.Generator().manual_seed(1)
    text_rows = torch.full((2, T), config.pad_token_id)
    text_rows[0, :2] = torch.tensor([config.bos_token_id, config.eos_token_id])
    text_rows[1, :20] = torch.randint(3, config.vocab_size, (20,), generator=g)
    text_rows[1, 0], text_rows[1, 19] = config.bos_token_id, config.eos_token_id
    settings = dict(temperature=1.0, top_k=256)
    scale = 16.0

    def run_ours(seed=0):
        return generate_image_tokens(ours, text_rows[1:], uncond_input_ids=text_rows[:1], guidance_scale=scale,
                                     generator=torch.Generator().manual_seed(seed), progress=False, **settings)

    def run_min_dalle(seed=0):
        return min_dalle_sample(encoder, decoder, text_rows, image_count=1, image_token_count=N, seed=seed,
                                supercondition_factor=scale, **settings)

    def uncached_step(length):
        """Step `length` of the loop without a cache: a full pass over the prefix, then the filters."""
        prefix = torch.randint(0, config.codebook_size, (2, length), generator=g)
        logits = ours.decoder(prefix, states, mask)[:, -1, :config.codebook_size]
        filtered_distribution(classifier_free_guidance(logits[1:], logits[:1], scale), **settings)

    with torch.inference_mode():
        run_ours()                               # warm-up: one-time allocations of the libraries
        growth = peak_rss_growth(run_ours)
        set_mmap_threshold(32 * 2**20)           # mapping every large block would slow the timed loops
        times_ours, times_reference, same = [], [], []
        for run in range(args.runs):
            start = time.perf_counter()
            tokens_ours = run_ours(seed=run)
            times_ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            tokens_reference = run_min_dalle(seed=run)
            times_reference.append(time.perf_counter() - start)
            same.append(torch.equal(tokens_ours.flatten(1), tokens_reference))
            print(f"ours {times_ours[-1]:.2f} s, min-dalle {times_reference[-1]:.2f} s; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
        t_ours, t_reference = statistics.median(times_ours), statistics.median(times_reference)

        mask = text_rows != config.pad_token_id
        states = ours.encoder(text_rows, mask)
        t_encoder = timed(lambda: ours.encoder(text_rows, mask))
        t_uncached = t_encoder + args.stride * sum(timed(lambda: uncached_step(length))
                                                   for length in range(args.stride, N + 1, args.stride))
    rows = 2
    cache = KVCache(config, rows)
    self_bytes = cache.self_kv.untyped_storage().nbytes()
    self_analytic = KVCache.self_kv_numel(config, rows) * 4
    text_analytic = 2 * config.decoder_layers * rows * T * config.d_model * 4
    min_dalle_state = config.decoder_layers * 4 * N * config.d_model * 4      # its (layers, 4n, N, d) tensor, n = 1

    print(f"\nconfig: {args.layers} + {args.layers} layers, width {config.d_model}, {args.heads} heads, "
          f"{N} image tokens, batch {rows} (guidance {scale}, top-k {settings['top_k']}); "
          f"threads {torch.get_num_threads()}")
    print(f"same tokens as min-dalle for the same seed, per run: {same}")
    print(f"tokens/s: ours {N / t_ours:.1f}, min-dalle {N / t_reference:.1f} (medians of {args.runs}); "
          f"ratio ours/min-dalle {t_reference / t_ours:.2f} (target >= 1.0)")
    print(f"cached vs uncached, {N} tokens: {t_ours:.2f} s measured vs {t_uncached:.1f} s estimated "
          f"(every {args.stride}th step timed), speed-up {t_uncached / t_ours:.1f}x (expect >= 5x)")
    print(f"self-attention cache: {self_bytes / 2**20:.2f} MiB allocated, analytic 2*L*B*N*d*4 = "
          f"{self_analytic / 2**20:.2f} MiB (min-dalle's state tensor: {min_dalle_state / 2**20:.2f} MiB)")
    print(f"text keys/values, projected once: analytic 2*L*B*T*d*4 = {text_analytic / 2**20:.2f} MiB "
          f"(min-dalle projects them again at every step)")
    print(f"peak resident-memory growth during one of our generations: {growth / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
