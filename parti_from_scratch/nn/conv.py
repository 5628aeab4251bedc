"""A convolution is a matrix product: the im2col form, used for small feature maps on the CPU.

Tutorial §5.2's UNet is mostly 3x3 convolutions (Ronneberger et al. 2015,
arXiv 1505.04597). Cut the input into its k x k patches, lay each patch out as
one column of length c_in * k * k ("im2col", F.unfold), and the convolution is

    y[n, :, p] = W_mat cols[n, :, p] + b,       W_mat = W.reshape(c_out, c_in * k * k)

for every image n and output pixel p: one matrix product, with the columns of
the whole batch side by side.

PyTorch's CPU convolution (oneDNN) is the faster choice on large maps. On the
few-pixel maps at the bottom of Stable Diffusion's UNet (8x8 and 4x4 pixels
with 1280-2560 channels for 256x256 images) it is not: it re-lays the weight
out into a fresh buffer on every call (59-118 MB there, new memory pages each
time) and its kernels for so few pixels are slow, while the matrix product
reads the weight as stored. `Conv2d` is nn.Conv2d (same parameters, same
state-dict keys) that takes the im2col path on the CPU when the output has at
most `max_im2col_pixels` (64) pixels and the kernel at least
`min_im2col_weights` (2^23, 32 MiB in float32) weights; elsewhere PyTorch's
convolution is as fast or faster. The two agree up to float rounding
(tests/test_unet.py runs the whole UNet both ways against diffusers).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def conv2d_im2col(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: Tuple[int, int] = (1, 1), padding: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """y = W_mat unfold(x) + b: a 2-D convolution (no groups, no dilation) as one matrix product for the batch.

    Shapes: x (n, c_in, H, W), weight (c_out, c_in, k_h, k_w) -> y (n, c_out, H_out, W_out).
    """
    n, _, height, width = x.shape
    c_out, _, k_h, k_w = weight.shape
    h_out = (height + 2 * padding[0] - k_h) // stride[0] + 1
    w_out = (width + 2 * padding[1] - k_w) // stride[1] + 1
    # (n, c_in, H, W) -> (n, c_in * k_h * k_w, P): one column per output pixel, P = H_out * W_out
    cols = F.unfold(x, (k_h, k_w), padding=padding, stride=stride)
    # (n, c_in * k_h * k_w, P) -> (c_in * k_h * k_w, n * P): every image's columns side by side
    cols = cols.transpose(0, 1).reshape(cols.shape[1], n * h_out * w_out)
    # (c_out, c_in * k_h * k_w) @ (c_in * k_h * k_w, n * P) (+ b) -> (c_out, n * P)
    w_mat = weight.reshape(c_out, -1)
    y = torch.mm(w_mat, cols) if bias is None else torch.addmm(bias[:, None], w_mat, cols)
    # (c_out, n * P) -> (c_out, n, H_out, W_out) -> (n, c_out, H_out, W_out)
    return y.view(c_out, n, h_out, w_out).transpose(0, 1).contiguous()


class Conv2d(nn.Conv2d):
    """nn.Conv2d computed by `conv2d_im2col` on the CPU for small outputs of big kernels (see the module docstring)."""

    max_im2col_pixels = 64
    min_im2col_weights = 2 ** 23

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, c_in, H, W) -> (n, c_out, H_out, W_out)."""
        plain = (isinstance(self.padding, tuple) and self.groups == 1 and self.dilation == (1, 1)
                 and self.padding_mode == "zeros")
        big_kernel = self.weight.numel() >= self.min_im2col_weights
        if plain and big_kernel and x.device.type == "cpu" and x.ndim == 4:
            h_out = (x.shape[2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
            w_out = (x.shape[3] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
            if h_out * w_out <= self.max_im2col_pixels:
                return conv2d_im2col(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)
