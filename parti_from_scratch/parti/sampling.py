"""Writing an image token by token: guidance, temperature, top-k, top-p and the cached generation loop.

Parti (Yu et al. 2022, arXiv 2206.10789, §2) samples each image token from the
decoder's distribution after classifier-free guidance on the logits,

    l = l_uncond + lambda (l_cond - l_uncond)                  (lambda = 1.2 in the paper)

where l_uncond is the decoder's output for an empty prompt (the model learned it
because captions were dropped during training). The guided logits then pass the
usual filters, in this order (as transformers applies them):

    temperature   l / T
    top-k         keep the k largest logits (and every logit tied with the k-th)
    top-p         keep the most probable tokens whose probabilities first reach p

and the next token is drawn from the softmax of what is left. `generate_image_tokens`
runs the loop with the conditional and unconditional rows in one batch and the
decoder's preallocated KV cache, and returns the token grid.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from tqdm.auto import tqdm

from .transformer import PartiTransformer, PartiTransformerConfig


def check_sampling_arguments(temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                             guidance_scale: float = 1.0) -> None:
    """ValueError naming the argument for temperature <= 0, top_k < 1, top_p outside (0, 1], guidance_scale < 0."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k filter), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None for no top-p filter), got {top_p!r}")
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")


def classifier_free_guidance(logits_cond: torch.Tensor, logits_uncond: torch.Tensor,
                             guidance_scale: float) -> torch.Tensor:
    """l = l_uncond + lambda (l_cond - l_uncond): lambda = 0 is the unconditional model, 1 the conditional one,
    lambda > 1 moves further from the unconditional prediction (Parti: 1.2; min-dalle's "supercondition_factor")."""
    return logits_uncond + guidance_scale * (logits_cond - logits_uncond)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """l / T: T < 1 sharpens softmax(l / T), T > 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep logits >= the k-th largest of their row, set the rest to -inf: (..., V) -> (..., V).

    Ties with the k-th largest are all kept (so more than k may survive), as
    min-dalle and transformers' TopKLogitsWarper do; k > V keeps everything.
    """
    k = min(top_k, logits.shape[-1])
    # the k-th largest logit of each row, (..., 1)
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2019, arXiv 1904.09751): keep token j iff the tokens strictly more
    probable than j hold less than p of the mass; the rest become -inf.

    That is the smallest set of most probable tokens whose probabilities sum to at
    least p, plus every token tied with its least probable member (ties are not
    broken by sort order). p = 1 keeps every token (no rounding of a running sum decides).
    """
    if top_p >= 1.0:
        return logits
    probs = logits.float().softmax(dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    # c = the first sorted position where the running sum reaches p; keep every token at least as probable
    reached = sorted_probs.cumsum(dim=-1) >= top_p
    c = torch.where(reached.any(dim=-1, keepdim=True), reached.float().argmax(dim=-1, keepdim=True),
                    torch.full_like(reached[..., :1], probs.shape[-1] - 1, dtype=torch.long))
    threshold = sorted_probs.gather(-1, c)
    return logits.masked_fill(probs < threshold, float("-inf"))


def filtered_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                          top_p: Optional[float] = None) -> torch.Tensor:
    """p = softmax(top_p(top_k(l / T))): the distribution the next token is drawn from, (..., V) in float32."""
    check_sampling_arguments(temperature, top_k, top_p)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits.softmax(dim=-1)


def empty_prompt_ids(batch: int, length: int, config: PartiTransformerConfig,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """The unconditional branch's text: <s></s> then padding, (batch, length) (DALL·E mini's empty prompt)."""
    ids = torch.full((batch, length), config.pad_token_id, dtype=torch.long, device=device)
    ids[:, 0], ids[:, 1] = config.bos_token_id, config.eos_token_id
    return ids


@torch.no_grad()
def generate_image_tokens(model: PartiTransformer, input_ids: torch.Tensor,
                          attention_mask: Optional[torch.Tensor] = None,
                          uncond_input_ids: Optional[torch.Tensor] = None, guidance_scale: float = 1.2,
                          temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                          generator: Optional[torch.Generator] = None, use_cache: bool = True,
                          progress: bool = True) -> torch.Tensor:
    """Sample y_i ~ p(y_i | y_<i, x) for i = 1..N in raster order; returns the token grid (n, rows, columns).

    input_ids (n, T): the prompts' text tokens (padding = config.pad_token_id unless
    attention_mask says otherwise). With guidance_scale != 1 the batch holds
    [unconditional rows; conditional rows], 2n in all (uncond_input_ids default to
    the empty prompt), and each step mixes their logits by `classifier_free_guidance`;
    guidance_scale = 1 is the conditional model alone and runs only n rows.
    use_cache=False recomputes the whole prefix at every step (the reference the cache is tested against).
    The same `generator` seed gives the same tokens.
    """
    check_sampling_arguments(temperature, top_k, top_p, guidance_scale)
    config = model.config
    n = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = input_ids != config.pad_token_id
    guided = guidance_scale != 1.0
    if guided:
        if uncond_input_ids is None:
            uncond_input_ids = empty_prompt_ids(n, input_ids.shape[1], config, input_ids.device)
        # rows [uncond; cond]: (2n, T)
        attention_mask = torch.cat([uncond_input_ids != config.pad_token_id, attention_mask.bool()])
        input_ids = torch.cat([uncond_input_ids, input_ids])
    states = model.encoder(input_ids, attention_mask)
    rows = input_ids.shape[0]
    cache = model.decoder.new_cache(states, attention_mask) if use_cache else None

    N = config.image_token_count
    tokens = torch.full((n, N), config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    next_input = torch.full((rows, 1), config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    for i in tqdm(range(N), desc="image tokens", disable=not progress, leave=False):
        if use_cache:
            logits = model.decoder(next_input, cache=cache)[:, -1]
        else:
            prefix = torch.cat([next_input[:, :1].new_full((rows, 1), config.decoder_start_token_id),
                                tokens[:, :i].repeat(rows // n, 1)], dim=1)
            logits = model.decoder(prefix, states, attention_mask)[:, -1]
        # only image codes are drawn: (rows, C)
        logits = logits[:, :config.codebook_size]
        if guided:
            logits = classifier_free_guidance(logits[n:], logits[:n], guidance_scale)
        probs = filtered_distribution(logits, temperature, top_k, top_p)
        tokens[:, i] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        next_input = tokens[:, i:i + 1].repeat(rows // n, 1)
    # raster order -> (n, rows, columns)
    return tokens.view(n, *config.image_grid_size)
