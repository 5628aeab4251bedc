"""Floating-point error bounds shared by the tests, each with its derivation.

A tolerance in this suite is a bound the numerics guarantee on any machine, not a value
that passed once. Two kinds of operation are treated differently:

* The basic IEEE operations (+, -, *, /, sqrt) are correctly rounded: the same operations on
  the same inputs give the same bits on every CPU. Two codes that perform the same sequence
  agree exactly; a different order of n float32 additions moves a sum by at most
  ~n * EPS32 * sum|terms| (worst case; ~sqrt(n) * EPS32 typically).
* Transcendental functions (exp, log, pow, sin, cos, tanh) are NOT correctly rounded, and
  which implementation runs depends on the CPU: numpy dispatches float32 log/exp to AVX2 or
  AVX-512 kernels, torch to SLEEF vector kernels (and libm for the remainder of an array).
  Only their documented ulp bounds hold across machines (the constants below), so a value
  computed by such a function in one library and compared with another library's value needs
  a tolerance of (bound_a + bound_b) ulps, propagated through whatever follows it.

ulp(x) is the gap between |x| and the next float of the same type; for normal x,
ulp(x) <= EPS * |x| with EPS = 2^-23 (float32) or 2^-52 (float64).
"""
from __future__ import annotations

import math

import numpy as np
import torch

EPS32 = 2.0 ** -23     # torch.finfo(torch.float32).eps: ulp(1.0) in float32
EPS64 = 2.0 ** -52     # torch.finfo(torch.float64).eps

# Documented maximum errors, in ulps of the result, of the implementations that may run:
# numpy's own accuracy tests (numpy/_core/tests/data/umath-validation-set-log.csv,
# column "ulperrortol") allow 4 ulps for float32 log and 1 for float64 log, on every
# SIMD path numpy dispatches to.
NUMPY_LOG_ULPS = {torch.float32: 4, torch.float64: 1}
# torch's CPU log: SLEEF's *_u10 kernels (max 1.0 ulp) on AVX2/AVX-512, glibc's logf
# (correctly rounded) / log (< 1 ulp) for scalars and array tails.
TORCH_LOG_ULPS = {torch.float32: 1, torch.float64: 1}
# torch's exp: SLEEF *_u10 (1.0 ulp) or glibc (< 1 ulp).
TORCH_EXP_ULPS = {torch.float32: 1, torch.float64: 1}


def ulp(x, dtype: torch.dtype = torch.float32):
    """ulp of |x| in `dtype` (a float, or a float64 numpy array for array input)."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    values = np.abs(np.asarray(x, dtype=np_dtype))
    out = np.spacing(values).astype(np.float64)
    return float(out) if out.ndim == 0 else out


def assert_within_ulps(got: torch.Tensor, expected: torch.Tensor, ulps: float, dtype: torch.dtype = torch.float32,
                       msg: str = "") -> None:
    """|got - expected| <= ulps * ulp(max(|got|, |expected|)) elementwise (ulps of the larger magnitude, in `dtype`)."""
    got64, expected64 = got.detach().double().cpu(), expected.detach().double().cpu()
    assert got64.shape == expected64.shape, (got64.shape, expected64.shape)
    bound = torch.from_numpy(ulps * ulp(torch.maximum(got64.abs(), expected64.abs()).numpy(), dtype))
    diff = (got64 - expected64).abs()
    bad = diff > bound
    assert not bool(bad.any()), (f"{msg} {int(bad.sum())} values differ by more than {ulps} ulps; worst "
                                 f"{float((diff / bound.clamp(min=math.ulp(0.0))).max()):.3g} ulps")


# ------------------------------------------------------------------ float32 parity with a reference module
# Ours and the reference compute the same function: run in float64 they agree to ~1e-14. In float32 each
# drifts from its float64 run by D (measured as max |out32 - out64|), so |ours - ref| <= D_ours + D_ref. D is
# set by the summation orders the CPU's kernels choose, so it changes from machine to machine, but its size
# (the largest of many accumulated rounding errors) does not change by much. A parity tolerance is therefore
# at least 2 (D_ours + D_ref) (about 4x either drift), and a tightened one at least 10x the reference's drift.
# The measured drifts are stated beside each tolerance; benchmarks/parity_drift.py measures them again.

# Per module, float32, inputs ~ N(0, 1): the UNet drifts <= 1.6e-6 (ours 1.6e-6), the CLIP towers'
# hidden states <= 2.2e-6 (ours 2.2e-6), the VAE's posterior <= 1.3e-6 (ours 1.3e-6): 1e-5 >= 2 (D_ours + D_ref).
FP32_PARITY = 1e-5
# The VAE's decoded image (and its full forward): the decoder drifts up to 6.2e-6 from float64 (diffusers'
# three-level test VAE, 5 images; ours 5.1e-6), so the two may differ by 1.1e-5, above FP32_PARITY;
# 5e-5 >= 4x that sum (8x either drift).
VAE_DECODED = 5e-5
# CLIP logits = exp(t) cos(image, text) with exp(t) ~ 14.3: the unit embeddings' drift (<= 1.9e-7) times
# exp(t); the reference's logits drift up to 3.8e-6 (ours 3.1e-6), so they may differ by 6.9e-6;
# 3e-5 >= 4x that sum.
CLIP_LOGITS = 3e-5
