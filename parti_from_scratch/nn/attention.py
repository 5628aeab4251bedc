"""Scaled dot-product attention, the equation of tutorial §4.1.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V          (Vaswani et al. 2017, arXiv 1706.03762, Eq. 1)

Multi-head attention runs h of these side by side on learned projections and
concatenates the results (Eq. 2 of the same paper):

    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,   head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

`explicit_attention` computes the equation term by term and is the reference.
`scaled_dot_product_attention` calls PyTorch's fused kernel by default (same
maths, fewer memory passes); tests/test_attention.py proves the two agree.
Under the same default, self-attention over many tokens projects Q, K and V
with one matrix product, x [W^Q, W^K, W^V], instead of three (each output is
the same dot product; one pass over x and a wider, faster product).
Switch every call in the package to the explicit form (three projections, the
equation written out) with `set_attention_backend("explicit")` or the
`attention_backend("explicit")` context manager, e.g. to step through it in a debugger.

Masks are boolean and mean "may attend": True keeps a (query, key) pair,
False removes it (its logit becomes -inf, so its softmax weight is exactly 0).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_BACKENDS = ("fused", "explicit")
_backend = "fused"


def set_attention_backend(name: str) -> None:
    """Choose how `scaled_dot_product_attention` computes: "fused" (default) or "explicit"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Temporarily switch the attention backend: `with attention_backend("explicit"): ...`."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def causal_mask(n_queries: int, n_keys: Optional[int] = None, device=None) -> torch.Tensor:
    """Boolean (n_queries, n_keys) mask, True on and below the diagonal: query i sees keys 0..i.

    This is what makes a text encoder (CLIP) or a decoder (Parti's Transformer)
    autoregressive: position i cannot read positions after it.
    """
    n_keys = n_queries if n_keys is None else n_keys
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(diagonal=n_keys - n_queries)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Turn a tokenizer's (batch, n_keys) 1/0 attention_mask into a (batch, 1, 1, n_keys) boolean mask.

    The two singleton axes broadcast over heads and queries: a padded key is
    hidden from every query of every head.
    """
    # (b, n_k) -> (b, 1, 1, n_k)
    return rearrange(attention_mask.bool(), "b k -> b 1 1 k")


def combine_masks(*masks: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Logical AND of the given boolean masks (None entries are ignored); None if all are None."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else (out & m)
    return out


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None) -> torch.Tensor:
    """The attention matrix A = softmax(Q K^T / sqrt(d_k)), each row a distribution over keys.

    Shapes: q (..., n_q, d_k), k (..., n_k, d_k), mask broadcastable to (..., n_q, n_k).
    Returns A of shape (..., n_q, n_k). Computed in float32 at least, so half
    precision inputs do not lose the softmax's small weights.
    """
    d_k = q.shape[-1]
    scale = 1.0 / math.sqrt(d_k) if scale is None else scale
    # S = Q K^T / sqrt(d_k): one similarity score per (query, key) pair
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if mask is not None:
        # a removed pair gets logit -inf, hence weight exp(-inf) = 0
        scores = scores.masked_fill(~mask, float("-inf"))
    # A = softmax(S) along the key axis
    a = scores.softmax(dim=-1)
    if mask is not None:
        # a query that may see no key at all (e.g. a left-padded row) gets all-zero weights, not 0/0 = NaN;
        # the fused kernel does the same
        a = a.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return a


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, written out (the reference form).

    Shapes: q (..., n_q, d_k), k (..., n_k, d_k), v (..., n_k, d_v) -> (..., n_q, d_v).
    """
    if causal:
        mask = combine_masks(mask, causal_mask(q.shape[-2], k.shape[-2], device=q.device))
    a = attention_weights(q, k, mask, scale)
    # output_i = sum_j A_ij v_j: each query's output is a weighted average of the values
    return torch.matmul(a.to(v.dtype), v)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: Optional[torch.Tensor] = None, causal: bool = False,
                                 scale: Optional[float] = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V through the selected backend (see `set_attention_backend`)."""
    if _backend == "explicit":
        return explicit_attention(q, k, v, mask=mask, causal=causal, scale=scale)
    if causal:
        mask = combine_masks(mask, causal_mask(q.shape[-2], k.shape[-2], device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(batch, n, heads * d_head) -> (batch, heads, n, d_head)."""
    return rearrange(x, "b n (h d) -> b h n d", h=n_heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, n, d_head) -> (batch, n, heads * d_head): the Concat of Eq. 2."""
    return rearrange(x, "b h n d -> b n (h d)")


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O with head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Self-attention when `context` is None, cross-attention otherwise (queries
    from `x`, keys and values from `context`, as the UNet reads the text).

    Args:
        dim: width of the query stream x.
        n_heads: number of heads h; each has d_head = inner_dim / h.
        context_dim: width of the key/value stream (defaults to dim).
        inner_dim: width of the projected Q, K, V (defaults to dim).
        qkv_bias: whether W^Q, W^K, W^V have biases (CLIP: yes; Stable Diffusion's UNet: no).
        out_bias: whether W^O has a bias.
        upcast: compute Q K^T and the softmax in float32 (SD 2.x's `upcast_attention`).
    """

    def __init__(self, dim: int, n_heads: int, context_dim: Optional[int] = None, inner_dim: Optional[int] = None,
                 qkv_bias: bool = True, out_bias: bool = True, upcast: bool = False):
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        inner_dim = dim if inner_dim is None else inner_dim
        if inner_dim % n_heads != 0:
            raise ValueError(f"inner_dim {inner_dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.upcast = upcast
        self.q_proj = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(inner_dim, dim, bias=out_bias)

    # self-attention over at least this many rows (batch x tokens) projects Q, K, V jointly under the fused backend.
    # Concatenating the weights costs two passes over 3 x dim^2 floats per call, against about 6 x rows x dim^2
    # FLOPs of product: a few percent of it from 1,024 rows up (SD's 32x32 and 64x64 maps at batch 2), more below
    min_joint_qkv_rows = 1024

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        """x (b, n_q, dim), context (b, n_k, context_dim) or None, mask broadcastable to (b, h, n_q, n_k)."""
        if context is None and _backend == "fused" and x.shape[:-1].numel() >= self.min_joint_qkv_rows:
            q, k, v = self.project_qkv(x)
            return self.attend(q, k, v, mask=mask, causal=causal)
        context = x if context is None else context
        # (b, n, h*d) -> (b, h, n, d)
        q = split_heads(self.q_proj(x), self.n_heads)
        k, v = self.project_kv(context)
        return self.attend(q, k, v, mask=mask, causal=causal)

    def project_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[Q, K, V] = x [W^Q, W^K, W^V] + [b^Q, b^K, b^V]: self-attention's three projections as one product.

        Shapes: x (b, n, dim) -> 3 x (b, h, n, d). Each entry is the same dot product as in
        q_proj(x), k_proj(x), v_proj(x); tests/test_attention.py checks the two agree.
        """
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = None if self.q_proj.bias is None else torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        # (b, n, dim) -> (b, n, 3 * h*d) -> 3 x (b, n, h*d) -> 3 x (b, h, n, d)
        q, k, v = F.linear(x, weight, bias).chunk(3, dim=-1)
        return split_heads(q, self.n_heads), split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def project_kv(self, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """K = context W^K, V = context W^V, split into heads: (b, n_k, context_dim) -> 2 x (b, h, n_k, d).

        Separate from `forward` so a decoder can keep the keys and values of past
        positions (a KV cache) and project only the new ones.
        """
        return split_heads(self.k_proj(context), self.n_heads), split_heads(self.v_proj(context), self.n_heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
               causal: bool = False) -> torch.Tensor:
        """Concat(head_1..head_h) W^O from projected heads q (b, h, n_q, d), k and v (b, h, n_k, d) -> (b, n_q, dim).

        With causal=True and n_q < n_k, the queries are the last n_q positions
        (`causal_mask` aligns the diagonal to the end), as in cached decoding.
        """
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal).to(dtype)
        # (b, h, n, d) -> (b, n, h*d) -> W^O
        return self.out_proj(merge_heads(out))
