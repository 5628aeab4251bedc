"""Training the latent noise predictor eps_theta(z_t, t, c): L_simple with caption dropout.

Ho et al. 2020, arXiv 2006.11239, Eq. 14, in the latent space of Rombach et al.
2022 (arXiv 2112.10752, Eq. 2):

    L_simple = E_{z_0, c, t, eps} || eps - eps_theta( sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps, t, c ) ||^2

z_0 = scaling_factor * (mu + sigma * eps') is a sample of the frozen VAE's
posterior for a training image, c = E(caption) the text encoder's states
(b, 77, d) for its caption, t ~ U{0, ..., T-1}, eps ~ N(0, I).

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598, Algorithm 1):
with probability p_uncond (10% here) the caption is replaced by the empty
prompt "", so the same network also learns eps_theta(z_t, t, c_empty), the
unconditional prediction that guidance extrapolates away from.

The frozen VAE runs once, before training: the posterior (mu, sigma) of every
image of a fixed training set. The result is kept in the run folder
(unet/latents.safetensors, with a fingerprint of the encoder's weights and the
data), so a resumed run reads it instead of encoding every image again. The text encoder E either is frozen too (Stable
Diffusion's choice: its states for every distinct caption are computed once, and
a step costs only the UNet's forward and backward pass), or it starts from
CLIP's text tower and trains together with the UNet (`TextConditionedUNet`),
so that L_simple shapes the states the UNet attends to: a contrastive loss only
asks the end-of-text state to summarise the whole caption, while the UNet needs
each object's words bound to its position ("a red circle on the left and a blue
square at the top"). The text tower costs little next to the UNet.
"""
from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from parti_from_scratch.clip.model import CLIPTextModel
from parti_from_scratch.clip.tokenizer import CLIPTokenizer
from parti_from_scratch.data import COLOURS
from parti_from_scratch.diffusion.process import l_simple
from parti_from_scratch.diffusion.schedulers import DDPMScheduler
from parti_from_scratch.unet import UNet2DConditionConfig, UNet2DConditionModel
from parti_from_scratch.vae import AutoencoderKL

from ..checkpoint import atomic_write_bytes, read_safetensors, safetensors_bytes
from ..distributed import map_sharded
from ..loop import StepRNG, TrainConfig, TrainResult, train
from .common import seeded_init
from .clip import tokenize


def build_unet(config: Union[dict, UNet2DConditionConfig], seed: int = 0) -> UNet2DConditionModel:
    """A freshly initialised UNet from a diffusers-style config dict; weights depend on `seed` only."""
    if isinstance(config, dict):
        config = UNet2DConditionConfig.from_dict(dict(config))
    return seeded_init(lambda: UNet2DConditionModel(config), seed)


def training_scheduler(config: dict) -> DDPMScheduler:
    """The noise schedule the UNet is trained with (beta_t, alpha_bar_t); samplers reuse its config."""
    return DDPMScheduler(**config)


@torch.no_grad()
def encode_texts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str],
                 batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """The frozen text encoder's states c for each caption: (n, 77, d), as the pipeline computes them."""
    device = next(text_encoder.parameters()).device
    states = []
    for i in tqdm(range(0, len(captions), batch_size), desc="text states", disable=not progress, leave=False):
        ids = tokenize(tokenizer, captions[i:i + batch_size]).to(device)
        states.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(states)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, dataset, batch_size: int = 256,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen VAE's posterior of every image of `dataset`: (mu, sigma), each (n, c, h, w), unscaled."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in tqdm(range(0, len(dataset), batch_size), desc="latents", disable=not progress, leave=False):
        x = torch.stack([dataset[j][0] for j in range(i, min(i + batch_size, len(dataset)))]).to(device)
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


class LatentCaptionDataset(torch.utils.data.Dataset):
    """Item i: (mu_i, sigma_i, c_i) = the VAE posterior of image i and the text states of its caption.

    Text states are stored once per distinct caption; `caption_index[i]` points at them. c_i is
    either the states (77, d), float, or the caption's token ids (77,), long (see `build`).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, text_states: torch.Tensor,
                 caption_index: torch.Tensor):
        assert len(mean) == len(std) == len(caption_index)
        self.mean, self.std, self.text_states, self.caption_index = mean, std, text_states, caption_index

    @classmethod
    def build(cls, dataset, vae: AutoencoderKL, text_encoder: Optional[CLIPTextModel], tokenizer: CLIPTokenizer,
              progress: bool = False) -> "LatentCaptionDataset":
        """Run the frozen encoders over `dataset` (items (image, caption)) once.

        With text_encoder=None the captions are kept as token ids (n, 77), for a text encoder
        that trains together with the UNet (TextConditionedUNet) and so cannot be run ahead.
        """
        captions = [dataset[i][1] for i in range(len(dataset))] if not hasattr(dataset, "captions") \
            else list(dataset.captions)
        # under torchrun each process encodes 1/N of the rows and receives the rest (map_sharded)
        posterior = map_sharded(lambda a, b: torch.cat(encode_latents(vae, Subset(dataset, range(a, b)),
                                                                      progress=progress), dim=1), len(dataset))
        mean, std = (part.contiguous() for part in posterior.chunk(2, dim=1))
        return cls(mean, std, *_caption_table(captions, tokenizer, text_encoder, progress))

    def with_captions(self, captions: list[str], tokenizer: CLIPTokenizer,
                      text_encoder: Optional[CLIPTextModel] = None) -> "LatentCaptionDataset":
        """The same latents with other captions (one per item): text states, or token ids if text_encoder is None."""
        return LatentCaptionDataset(self.mean, self.std, *_caption_table(captions, tokenizer, text_encoder))

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.mean[i], self.std[i], self.text_states[self.caption_index[i]]


    def save(self, path: Union[str, Path], fingerprint: str) -> Path:
        """Write the four tensors to a safetensors file (atomically), with `fingerprint` in its metadata."""
        tensors = {"mean": self.mean, "std": self.std, "text_states": self.text_states,
                   "caption_index": self.caption_index}
        data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()},
                                 metadata={"format": "pt", "fingerprint": fingerprint})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: Union[str, Path], fingerprint: str) -> Optional["LatentCaptionDataset"]:
        """The dataset saved in `path`, or None when there is no such file or it was made from other
        weights or data (its fingerprint differs)."""
        if not Path(path).is_file():
            return None
        tensors, metadata = read_safetensors(path)
        if metadata.get("fingerprint") != fingerprint:
            return None
        return cls(tensors["mean"], tensors["std"], tensors["text_states"], tensors["caption_index"])


def latents_fingerprint(dataset, vae: AutoencoderKL, text_encoder: Optional[CLIPTextModel] = None) -> str:
    """sha256 of everything `LatentCaptionDataset.build` reads: the VAE's encoder weights (the decoder
    does not shape z), the text encoder's weights (when its states are precomputed), and the data: its
    scenes and captions (images are drawn from the scenes), or every image of a dataset without scenes."""
    h = hashlib.sha256()

    def add_weights(module: nn.Module, prefixes: tuple = ("",)) -> None:
        for name, tensor in sorted(module.state_dict().items()):
            if name.startswith(prefixes):
                h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())

    add_weights(vae, ("encoder.", "quant_conv."))
    if text_encoder is not None:
        add_weights(text_encoder)
    h.update(f"text encoder: {text_encoder is not None}; items: {len(dataset)}".encode())
    if hasattr(dataset, "scenes") and hasattr(dataset, "captions"):
        h.update(repr((dataset.scenes, dataset.captions)).encode())
    else:
        for i in range(len(dataset)):
            image, text = dataset[i]
            h.update(image.reshape(-1).view(torch.uint8).numpy().tobytes() + text.encode())
    return h.hexdigest()


def _caption_table(captions: list[str], tokenizer: CLIPTokenizer, text_encoder: Optional[CLIPTextModel],
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(one row per distinct caption: its states, or its token ids without a text encoder; row of each caption)."""
    distinct = sorted(set(captions))
    where = {c: k for k, c in enumerate(distinct)}
    if text_encoder is None:
        table = tokenize(tokenizer, distinct)
    else:
        table = map_sharded(lambda a, b: encode_texts(text_encoder, tokenizer, distinct[a:b], progress=progress),
                            len(distinct))
    return table, torch.tensor([where[c] for c in captions])


def caption_dropout_mask(rng: StepRNG, p_uncond: float) -> torch.Tensor:
    """(b,) bool: True where this step's caption is replaced by the empty prompt (probability p_uncond)."""
    return rng.bernoulli(p_uncond)


class TextConditionedUNet(nn.Module):
    """eps_theta(z_t, t, E(ids)): the UNet together with the text encoder E whose states it attends to.

    Trained as one model when the text encoder is fine-tuned by the UNet's loss (the pipeline then
    ships this text encoder; it starts from CLIP's text tower).
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states=self.text_encoder(input_ids)[0])


def make_unet_loss(alpha_bar: torch.Tensor, empty_state: torch.Tensor, scaling_factor: float,
                   p_uncond: float = 0.1):
    """The UNet's loss_fn for `train`: L_simple on z_0 = scaling_factor * (mu + sigma * eps').

    alpha_bar: (T,) the training schedule; empty_state: (77, d) the text states of "", or for a
    TextConditionedUNet the token ids of "" (77,), long.
    """
    num_train_timesteps = len(alpha_bar)

    def loss_fn(model: nn.Module, batch: Any, rng: StepRNG) -> tuple[torch.Tensor, dict]:
        mean, std, c = batch                                   # (b, C, h, w), (b, C, h, w), (b, 77, d) or (b, 77)
        # z_0 = scaling_factor * (mu + sigma * eps'): a fresh posterior sample each time the image is seen
        z0 = scaling_factor * (mean + std * rng.randn(*mean.shape[1:]))
        # classifier-free guidance training: c -> c_empty with probability p_uncond
        drop = caption_dropout_mask(rng, p_uncond)              # (b,)
        c = torch.where(drop.view(-1, *[1] * (c.dim() - 1)), empty_state.to(c), c)
        t = rng.randint(0, num_train_timesteps)                 # (b,) t ~ U{0..T-1}
        eps = rng.randn(*mean.shape[1:])                        # (b, C, h, w) eps ~ N(0, I)
        # || eps - eps_theta(sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps, t, c) ||^2
        condition = {"input_ids": c} if isinstance(model, TextConditionedUNet) else {"encoder_hidden_states": c}
        loss = l_simple(model, z0, t, alpha_bar, noise=eps, **condition)
        return loss, {"dropped": drop.float().mean().item()}
    return loss_fn


def train_unet(config: Union[dict, UNet2DConditionConfig], latents: LatentCaptionDataset,
               empty_state: torch.Tensor, scaling_factor: float, scheduler: DDPMScheduler,
               train_config: TrainConfig, p_uncond: float = 0.1, resume: Optional[str] = None,
               text_encoder: Optional[CLIPTextModel] = None
               ) -> tuple[UNet2DConditionModel, TrainResult]:
    """Train eps_theta on precomputed latents and text states; returns the EMA model (or the model).

    With `text_encoder` given, `latents` holds token ids (LatentCaptionDataset.build with
    text_encoder=None), `empty_state` the ids of "", and a copy of the text encoder trains
    together with the UNet: then the trained model is a TextConditionedUNet (`.unet`, `.text_encoder`).
    """
    model = build_unet(config, train_config.seed)
    if text_encoder is not None:
        model = TextConditionedUNet(model, copy.deepcopy(text_encoder).float().train().requires_grad_(True))
    return _train_eps_theta(model, latents, empty_state, scaling_factor, scheduler, train_config, p_uncond, resume)


def _train_eps_theta(model: nn.Module, latents: LatentCaptionDataset, empty_state: torch.Tensor,
                     scaling_factor: float, scheduler: DDPMScheduler, train_config: TrainConfig, p_uncond: float,
                     resume: Optional[str]) -> tuple[nn.Module, TrainResult]:
    """Run the loop with L_simple on `model` (a UNet or a TextConditionedUNet); return the EMA model (or the model)."""
    joint = isinstance(model, TextConditionedUNet)           # then empty_state holds token ids, not states
    loss_fn = make_unet_loss(scheduler.alpha_bar.float(), empty_state if joint else empty_state.float(),
                             scaling_factor, p_uncond)
    result = train(model, loss_fn, latents, train_config, resume=resume)
    trained = result.ema_model if result.ema_model is not None else result.model
    return trained.eval(), result


_COLOUR_WORD = re.compile(r"\b(?:" + "|".join(COLOURS) + r") ")


def drop_colour_words(captions: list[str], p: float, seed: int = 0) -> list[str]:
    """Each caption, with probability p, without its colour words: "a large red circle on the left" -> "a large circle on the left".

    The draw is a function of (seed, position in the list) only.
    """
    keep = np.random.default_rng([seed, 7]).random(len(captions)) >= p
    return [c if k else _COLOUR_WORD.sub("", c) for c, k in zip(captions, keep)]


def finetune_with_colour_dropout(model: nn.Module, latents: LatentCaptionDataset, captions: list[str],
                                 tokenizer: CLIPTokenizer, empty_state: torch.Tensor, scaling_factor: float,
                                 scheduler: DDPMScheduler, p_drop_colour: float, seed: int, train_config: TrainConfig,
                                 p_uncond: float = 0.1, resume: Optional[str] = None,
                                 text_encoder: Optional[CLIPTextModel] = None) -> tuple[nn.Module, TrainResult]:
    """Second UNet stage: L_simple again, on the same latents, where a caption has lost its colour words w.p. p.

    A colour and a shape that never appear together in training ("a red triangle") are drawn
    only if the shape word alone decides the shape. After the first stage the colour still
    leans on it: the model has only seen red circles and red squares. Captions such as "a
    large triangle on the left", for triangles of any training colour, teach the shape words
    to carry their shape by themselves.

    `model`: the first stage's UNet, or its TextConditionedUNet (then the text encoder keeps
    training and `empty_state` holds the ids of ""); `captions`: one per item of `latents`;
    `text_encoder`: the frozen encoder of a plain UNet, for the new captions' states.
    """
    joint = isinstance(model, TextConditionedUNet)
    data = latents.with_captions(drop_colour_words(captions, p_drop_colour, seed), tokenizer,
                                 None if joint else text_encoder)
    model = copy.deepcopy(model).train().requires_grad_(True)
    return _train_eps_theta(model, data, empty_state, scaling_factor, scheduler, train_config, p_uncond, resume)
