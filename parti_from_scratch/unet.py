"""The denoiser eps_theta(z_t, t, c): Stable Diffusion's text-conditioned UNet (tutorial §5.2).

Latent diffusion trains a network to predict the noise that was added to a
latent, given the noise level and the text (Rombach et al. 2022,
arXiv 2112.10752, Eq. 2):

    L_LDM = E_{z, c, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, tau_theta(c)) ||^2

eps_theta is a UNet (Ronneberger et al. 2015, arXiv 1505.04597): an encoder path
that halves the resolution level by level, a middle block, and a decoder path
that doubles it back while concatenating the encoder's feature map of the same
size (the skip connections). Every level is built from

* ResnetBlock2D (nn/resnet.py): convolutions that receive the time step t as an
  embedding  t_emb = W_2 SiLU(W_1 PE(t))  (PE: nn/positional.py);
* SpatialTransformer (nn/transformer_2d.py): self-attention over the pixels and
  cross-attention from the pixels to the text states c (Eq. 3 of the paper);
* Downsample2D / Upsample2D (nn/updown.py).

`UNet2DConditionConfig` has the keys of a diffusers `unet/config.json`, so a
downloaded SD 1.x/2.x folder loads with `UNet2DConditionModel.from_pretrained`.
Module names follow diffusers' except for a handful of renames that
weights_convert/diffusers_models.py applies by rule (`to_q` -> `q_proj`,
`downsamplers.0` -> `downsample`, ...).

A diffusers naming quirk carried by every SD config: `attention_head_dim` is the
number of attention HEADS, not their width (SD 1.x: 8 heads at every level, so
40, 80, 160, 160 channels per head; SD 2.x: [5, 10, 20, 20] heads of 64 channels).
`num_attention_heads`, when a config sets it, takes precedence.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import math
from typing import Any, ClassVar, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from parti_from_scratch.configuration import (Config, Refused, check_groups_divide_widths, check_levels,
                                              config_from_dict, positive, require)
from parti_from_scratch.nn.positional import timestep_embedding
from parti_from_scratch.nn.resnet import ResnetBlock2D, group_norm_silu
from parti_from_scratch.nn.transformer_2d import SpatialTransformer
from parti_from_scratch.nn.updown import Downsample2D, Upsample2D
from parti_from_scratch.outputs import ModelOutput

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

IntOrTuple = Union[int, Tuple[int, ...]]


@dataclass
class UNet2DConditionConfig(Config):
    """Hyper-parameters of the UNet; field names and defaults are those of diffusers' `unet/config.json`."""
    sample_size: Optional[IntOrTuple] = None      # latent size it was trained at (64 for SD 1.x: 512 px / 8)
    in_channels: int = 4                           # channels of z_t (the VAE's latent channels)
    out_channels: int = 4                          # channels of eps_theta
    center_input_sample: bool = False              # feed 2 * z - 1 instead of z
    flip_sin_to_cos: bool = True                   # timestep embedding as [cos, sin] (True in SD) or [sin, cos]
    freq_shift: int = 0                            # downscale_freq_shift of the timestep embedding
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: Union[bool, Tuple[bool, ...]] = False  # first attention reads the text too (per level)
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)  # width of each level
    layers_per_block: IntOrTuple = 2               # resnets per down level (up levels have one more)
    downsample_padding: int = 1                    # 1: symmetric; 0: pad right/bottom only
    mid_block_scale_factor: float = 1.0            # the mid block's resnets divide their output by it
    dropout: float = 0.0                           # dropout inside the resnets (training only)
    norm_num_groups: int = 32                      # GroupNorm groups
    norm_eps: float = 1e-5                         # GroupNorm epsilon of the resnets and the output norm
    cross_attention_dim: IntOrTuple = 1280         # width of the text states (768 SD 1.x, 1024 SD 2.x)
    transformer_layers_per_block: IntOrTuple = 1   # BasicTransformerBlocks per SpatialTransformer
    attention_head_dim: IntOrTuple = 8             # NUMBER OF HEADS per level (diffusers' historical name)
    num_attention_heads: Optional[IntOrTuple] = None  # if set, the number of heads (overrides the above)
    use_linear_projection: bool = False            # proj_in/out stored as linear (SD 2.x) or 1x1 conv (SD 1.x)
    upcast_attention: bool = False                 # attention scores in float32 under half precision (SD 2.x)
    time_embedding_dim: Optional[int] = None       # width of t_emb (default 4 * block_out_channels[0])
    conv_in_kernel: int = 3                        # odd, so the convolution keeps the size
    conv_out_kernel: int = 3

    choices: ClassVar[Mapping[str, Tuple[Any, ...]]] = {
        "down_block_types": DOWN_BLOCK_TYPES, "up_block_types": UP_BLOCK_TYPES, "downsample_padding": (0, 1)}
    # Keys of diffusers' UNet2DConditionModel that add parts SD 1.x/2.x do not have; only "absent" loads.
    refused: ClassVar[Mapping[str, Refused]] = {
        "act_fn": Refused(("silu", "swish"), "another non-linearity than SiLU"),
        "mid_block_type": Refused(("UNetMidBlock2DCrossAttn",), "another middle block"),
        "dual_cross_attention": Refused((False, None), "two text encoders' cross-attention"),
        "class_embed_type": Refused((None,), "a class-label embedding added to t_emb"),
        "num_class_embeds": Refused((None,), "a class-label embedding added to t_emb"),
        "class_embeddings_concat": Refused((False, None), "class embeddings concatenated to t_emb"),
        "addition_embed_type": Refused((None,), "extra conditioning added to t_emb (SDXL's text_time)"),
        "addition_time_embed_dim": Refused((None,), "SDXL's size/crop conditioning"),
        "projection_class_embeddings_input_dim": Refused((None,), "SDXL's size/crop conditioning"),
        "encoder_hid_dim": Refused((None,), "a projection of the text states before cross-attention"),
        "encoder_hid_dim_type": Refused((None,), "a projection of the text states before cross-attention"),
        "time_embedding_type": Refused(("positional",), "a Fourier timestep embedding"),
        "time_embedding_act_fn": Refused((None,), "an activation after the timestep MLP"),
        "timestep_post_act": Refused((None,), "an activation inside the timestep MLP"),
        "time_cond_proj_dim": Refused((None,), "a guidance-scale embedding (LCM)"),
        "resnet_time_scale_shift": Refused(("default",), "scale-shift timestep conditioning in the resnets"),
        "resnet_skip_time_act": Refused((False, None), "resnets without the SiLU before the time projection"),
        "resnet_out_scale_factor": Refused((1.0, 1, None), "rescaled resnet outputs"),
        "attention_type": Refused(("default",), "gated (GLIGEN) attention"),
        "cross_attention_norm": Refused((None,), "a normalisation of the text states in cross-attention"),
        "reverse_transformer_layers_per_block": Refused((None,), "different transformer depths on the way up"),
        "mid_block_only_cross_attention": Refused((None, False), "a self-attention-free middle block"),
    }

    def check(self) -> None:
        n = check_levels(self)
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                    "only_cross_attention", "attention_head_dim", "num_attention_heads"):
            if getattr(self, key) is not None:
                self.per_block(key)
        positive(self, "in_channels", "out_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
                 "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
                 "time_embedding_dim", "sample_size", "conv_in_kernel", "conv_out_kernel", "norm_eps",
                 "mid_block_scale_factor")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            require(getattr(self, key) % 2 == 1, f"{key}={getattr(self, key)}: must be odd (the map keeps its size)")
        require(0 <= self.dropout < 1, f"dropout={self.dropout}: must be in [0, 1)")
        require(math.isfinite(self.mid_block_scale_factor), f"mid_block_scale_factor={self.mid_block_scale_factor}: "
                                                            f"must be finite")
        half = self.block_out_channels[0] // 2
        require(0 <= self.freq_shift < half, f"freq_shift={self.freq_shift}: must be in [0, {half}) "
                                             f"(half of block_out_channels[0])")
        check_groups_divide_widths(self)
        key = "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim"
        attention = [t.startswith("CrossAttn") for t in self.down_block_types]
        attention_up = [t.startswith("CrossAttn") for t in reversed(self.up_block_types)]
        for level, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
            if attention[level] or attention_up[level] or level == n - 1:  # the mid block attends at the last level
                require(c % h == 0, f"{key}={getattr(self, key)!r}: {h} heads do not divide the "
                                    f"{c} channels of level {level}")

    def per_block(self, key: str) -> tuple:
        """A config value given once or per level, as one entry per level (down-path order)."""
        value = getattr(self, key)
        n = len(self.block_out_channels)
        if isinstance(value, tuple):
            require(len(value) == n, f"{key}={value!r} must be one value or {n} values, one per level")
            return value
        return (value,) * n

    @property
    def heads(self) -> tuple:
        """Attention heads per level: num_attention_heads if set, else attention_head_dim (the diffusers quirk)."""
        key = "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim"
        return self.per_block(key)


@dataclass
class UNet2DConditionOutput(ModelOutput):
    """unet(...).sample: eps_theta(z_t, t, c), shape (b, out_channels, H, W)."""
    sample: torch.Tensor


class TimestepEmbedding(nn.Module):
    """t_emb = W_2 SiLU(W_1 PE(t) + b_1) + b_2: the sinusoid of t mapped to the width the resnets add."""

    def __init__(self, in_dim: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, pe: torch.Tensor) -> torch.Tensor:
        """pe (b, in_dim) -> (b, time_embed_dim)."""
        return self.linear_2(self.act(self.linear_1(pe)))


class UNetDownBlock(nn.Module):
    """One level of the encoder path: n_layers x (ResnetBlock2D [-> SpatialTransformer]), then Downsample2D.

    With `heads` it is diffusers' CrossAttnDownBlock2D, without it DownBlock2D.
    forward returns the block's output and every intermediate map, which the
    decoder path later concatenates (the UNet's skip connections).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, n_layers: int, groups: int,
                 eps: float, dropout: float, heads: Optional[int] = None, cross_attention_dim: int = 768,
                 transformer_layers: int = 1, only_cross_attention: bool = False, upcast_attention: bool = False,
                 add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups=groups,
                          eps=eps, dropout=dropout)
            for i in range(n_layers))
        self.attentions = None if heads is None else nn.ModuleList(
            SpatialTransformer(out_channels, heads, cross_attention_dim, transformer_layers, groups,
                               only_cross_attention, upcast_attention)
            for _ in range(n_layers))
        self.downsample = Downsample2D(out_channels, padding=downsample_padding) if add_downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """h (b, c_in, H, W) -> (b, c_out, H/2, W/2) and the skips [(b, c_out, H, W) x n_layers, output]."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h, skips


class UNetMidBlock(nn.Module):
    """The bottom of the U: ResnetBlock2D -> SpatialTransformer -> ResnetBlock2D (UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, dropout: float, heads: int,
                 cross_attention_dim: int, transformer_layers: int = 1, upcast_attention: bool = False,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups=groups, eps=eps, dropout=dropout,
                          output_scale_factor=output_scale_factor)
            for _ in range(2))
        self.attentions = nn.ModuleList([
            SpatialTransformer(channels, heads, cross_attention_dim, transformer_layers, groups,
                               upcast_attention=upcast_attention)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """h (b, c, H, W) -> (b, c, H, W)."""
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UNetUpBlock(nn.Module):
    """One level of the decoder path: n_layers x (concat skip -> ResnetBlock2D [-> SpatialTransformer]), then Upsample2D.

    With `heads` it is diffusers' CrossAttnUpBlock2D, without it UpBlock2D.
    Resnet i reads [h, skip] along the channels: the previous level's width
    (prev_channels) or this level's (out_channels) for h, and this level's or,
    for the last one, the next-deeper encoder level's (skip_channels) for the skip.
    """

    def __init__(self, prev_channels: int, out_channels: int, skip_channels: int, temb_channels: int,
                 n_layers: int, groups: int, eps: float, dropout: float, heads: Optional[int] = None,
                 cross_attention_dim: int = 768, transformer_layers: int = 1, only_cross_attention: bool = False,
                 upcast_attention: bool = False, add_upsample: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(n_layers):
            h_channels = prev_channels if i == 0 else out_channels
            res_channels = skip_channels if i == n_layers - 1 else out_channels
            self.resnets.append(ResnetBlock2D(h_channels + res_channels, out_channels, temb_channels, groups=groups,
                                              eps=eps, dropout=dropout))
        self.attentions = None if heads is None else nn.ModuleList(
            SpatialTransformer(out_channels, heads, cross_attention_dim, transformer_layers, groups,
                               only_cross_attention, upcast_attention)
            for _ in range(n_layers))
        self.upsample = Upsample2D(out_channels) if add_upsample else None

    def forward(self, h: torch.Tensor, skips: Sequence[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                upsample_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """h (b, c_prev, H, W), skips: n_layers maps of size (H, W), consumed last first -> (b, c_out, 2H, 2W)."""
        for i, resnet in enumerate(self.resnets):
            # (b, c_h, H, W) + (b, c_skip, H, W) -> (b, c_h + c_skip, H, W)
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsample is not None:
            h = self.upsample(h, upsample_size)
        return h


class UNet2DConditionModel(nn.Module):
    """eps_theta(z_t, t, c): the noise in the latent z_t at step t, given text states c.

    unet(sample, timestep, encoder_hidden_states=c).sample, with `timestep` an
    int, a float, a 0-d tensor or one value per sample ((b,) tensor).

    Build from a config, `UNet2DConditionModel(UNet2DConditionConfig(...))` or
    `UNet2DConditionModel(block_out_channels=(32, 64), ...)`, or load a diffusers
    folder with `from_pretrained`.
    """

    def __init__(self, config: Optional[UNet2DConditionConfig] = None, **kwargs):
        super().__init__()
        config = config_from_dict(UNet2DConditionConfig, kwargs, strict=True) if config is None else config
        self.config = config
        self.in_channels = config.in_channels
        n = len(config.block_out_channels)
        widths = config.block_out_channels
        layers = config.per_block("layers_per_block")
        cross_dims = config.per_block("cross_attention_dim")
        transformer_layers = config.per_block("transformer_layers_per_block")
        only_cross = config.per_block("only_cross_attention")
        heads = config.heads
        common = dict(temb_channels=config.time_embedding_dim or 4 * widths[0], groups=config.norm_num_groups,
                      eps=config.norm_eps, dropout=config.dropout)

        self.conv_in = nn.Conv2d(config.in_channels, widths[0], config.conv_in_kernel,
                                 padding=(config.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(widths[0], common["temb_channels"])

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(config.down_block_types):
            cross = kind == "CrossAttnDownBlock2D"
            self.down_blocks.append(UNetDownBlock(
                widths[max(i - 1, 0)], widths[i], n_layers=layers[i], heads=heads[i] if cross else None,
                cross_attention_dim=cross_dims[i], transformer_layers=transformer_layers[i],
                only_cross_attention=only_cross[i], upcast_attention=config.upcast_attention,
                add_downsample=i < n - 1, downsample_padding=config.downsample_padding, **common))

        self.mid_block = UNetMidBlock(widths[-1], heads=heads[-1], cross_attention_dim=cross_dims[-1],
                                      transformer_layers=transformer_layers[-1],
                                      upcast_attention=config.upcast_attention,
                                      output_scale_factor=config.mid_block_scale_factor, **common)

        # the decoder path visits the levels deepest first
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(config.up_block_types):
            level = n - 1 - i
            cross = kind == "CrossAttnUpBlock2D"
            self.up_blocks.append(UNetUpBlock(
                prev_channels=widths[min(level + 1, n - 1)], out_channels=widths[level],
                skip_channels=widths[max(level - 1, 0)], n_layers=layers[level] + 1,
                heads=heads[level] if cross else None, cross_attention_dim=cross_dims[level],
                transformer_layers=transformer_layers[level], only_cross_attention=only_cross[level],
                upcast_attention=config.upcast_attention, add_upsample=i < n - 1, **common))

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, widths[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, config.conv_out_kernel,
                                  padding=(config.conv_out_kernel - 1) // 2)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def time_embed(self, timestep: Union[int, float, torch.Tensor], batch: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        """t (int, float, 0-d or (b,) tensor) -> t_emb (b, time_embed_dim) = MLP(PE(t))."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep])
        # () or (1,) or (b,) -> (b,)
        t = t.reshape(-1).to(device).expand(batch)
        pe = timestep_embedding(t, self.config.block_out_channels[0], flip_sin_to_cos=self.config.flip_sin_to_cos,
                                downscale_freq_shift=self.config.freq_shift)
        return self.time_embedding(pe.to(dtype))

    def forward(self, sample: torch.Tensor, timestep: Union[int, float, torch.Tensor],
                encoder_hidden_states: torch.Tensor, return_dict: bool = True
                ) -> Union[UNet2DConditionOutput, Tuple[torch.Tensor]]:
        """eps_theta(z_t, t, c).

        Shapes: sample z_t (b, in_channels, H, W); timestep scalar or (b,);
        encoder_hidden_states c (b, n_text, cross_attention_dim) -> sample (b, out_channels, H, W).
        H and W should be multiples of 2^(levels - 1); other sizes work, the
        upsamplers then resize to the matching skip connection.
        """
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        context = encoder_hidden_states
        temb = self.time_embed(timestep, sample.shape[0], sample.device, sample.dtype)
        factor = 2 ** (len(self.up_blocks) - 1)
        odd_size = any(s % factor != 0 for s in sample.shape[-2:])

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            n_skips = len(block.resnets)
            block_skips, skips = skips[-n_skips:], skips[:-n_skips]
            upsample_size = skips[-1].shape[-2:] if odd_size and skips else None
            h = block(h, block_skips, temb, context, upsample_size)
        eps = self.conv_out(group_norm_silu(h, self.conv_norm_out))
        return UNet2DConditionOutput(sample=eps) if return_dict else (eps,)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], subfolder: Optional[str] = None,
                        dtype: Optional[torch.dtype] = torch.float32) -> "UNet2DConditionModel":
        """Load a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors or .bin), strictly.

        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        """
        from weights_convert.diffusers_models import load_unet
        return load_unet(path, subfolder=subfolder, dtype=dtype)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write config.json and diffusion_pytorch_model.safetensors in diffusers' layout (diffusers loads it).

        The documented upward edge (docs/ARCHITECTURE.md): the file layout lives in weights_convert.
        """
        from weights_convert.diffusers_models import save_unet
        save_unet(self, folder)
