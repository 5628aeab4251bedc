"""min-dalle's `detoker.pt`: the VQGAN decoder of DALL·E mini / mega -> a decoder-only VQModel.

min-dalle (the PyTorch port of DALL·E mini / mega) ships its image
detokenizer as a plain `torch.save` state dict, read with
`torch.load(weights_only=True)`. Its keys are taming's (see `taming_vqgan`),
decoder half only, with the codebook at the top level:

    embedding.weight       (16384, 256)   the codebook, taming's quantize.embedding.weight
    post_quant_conv.*      1x1 convolution 256 -> 256
    decoder.*              taming's decoder: 5 levels of widths 128, 128, 256, 256, 512,
                           3 resnets each, self-attention in the 16x16 level (up.4.attn.0-2)

46,709,891 parameters: exactly the decoder + post_quant_conv + codebook of
taming's vqgan_imagenet_f16_16384 configuration. There is no encoder: the
model decodes token grids (`decode_indices`) and cannot encode.

Output range. min-dalle reads the decoder's output as an image in [0, 1]
(it clips to [0, 1] and multiplies by 255), where taming, diffusers and this
package read a VQGAN's output as [-1, 1]. By default the loader folds the
affine map x_[-1,1] = 2 x_[0,1] - 1 into the last convolution,

    W_out' = 2 W_out,   b_out' = 2 b_out - 1,

so `decode_indices(k)` returns [-1, 1] like every other VQModel and the usual
(x + 1) / 2 gives min-dalle's pixels. `output_range="[0, 1]"` keeps the file's
convolution as it is. (min-dalle's own module uses GroupNorm's default
eps = 1e-5; the trained VQGAN, and this model, use taming's 1e-6.)
"""
from __future__ import annotations

from typing import Optional

import torch

from weights_convert.common import PathLike, read_state_dict
from weights_convert.taming_vqgan import DEFAULT_SAMPLE_SIZE, build_vq_model

CODEBOOK = "embedding"
OUTPUT_RANGES = ("[-1, 1]", "[0, 1]")


@torch.no_grad()
def fold_unit_range_into_output(model) -> None:
    """Make a decoder whose output reads as [0, 1] output [-1, 1]: conv_out <- 2 conv_out - 1 (in place)."""
    conv = model.decoder.conv_out
    conv.weight.mul_(2.0)
    conv.bias.mul_(2.0).sub_(1.0)


def load_min_dalle_detokenizer(path: PathLike, output_range: str = "[-1, 1]",
                               dtype: Optional[torch.dtype] = torch.float32,
                               sample_size: int = DEFAULT_SAMPLE_SIZE):
    """A decoder-only VQModel from min-dalle's `detoker.pt` (fp16 on disk, cast to `dtype`).

    output_range: "[-1, 1]" (default) folds min-dalle's [0, 1] reading into conv_out (see the module
        docstring); "[0, 1]" keeps the file's weights, so the output reads as min-dalle reads it.
    """
    if output_range not in OUTPUT_RANGES:
        raise ValueError(f"output_range={output_range!r}: expected one of {OUTPUT_RANGES}")
    model = build_vq_model(read_state_dict(path), str(path), dtype, codebook=CODEBOOK, decoder_only=True, ignore=(),
                           sample_size=sample_size)
    if output_range == "[-1, 1]":
        fold_unit_range_into_output(model)
    return model
