"""Training the autoencoder: reconstruction + beta * KL (latent diffusion's first stage).

Rombach et al. 2022, arXiv 2112.10752, §3 and Appendix G ("KL-reg"): the
encoder gives q(z | x) = N(mu, sigma^2), a sample z = mu + sigma * eps is
decoded to x_hat, and

    L = L_rec(x, x_hat) + beta * KL(q(z | x) || N(0, I))

with beta tiny, so z keeps almost all the information of x while its scale stays
tame. Written per pixel, as here,

    L_rec = mean w |x - x_hat| + mean w (x - x_hat)^2     (an L1 + L2 mix, no perceptual or GAN term)
    beta * KL / n_pixels                                  (KL summed over z's elements, as the LDM code does)

with per-pixel weights w = 1 + foreground_weight * [pixel is not black]. The
shapes cover about 3% of an image: unweighted, the decoder first learns to
paint everything black and leaves the objects grey for hundreds of steps.

so `beta` is the LDM paper's kl_weight (1e-6 there for images with a GAN loss).
Sampling z (not taking mu) during training teaches the decoder to tolerate
small errors in z: exactly what it meets when decoding a diffusion sample.

A second, optional stage fine-tunes the decoder alone with the encoder frozen
(as Stability AI's sd-vae-ft-mse fine-tuned SD's decoder): the latent space, and
so anything trained on it, stays the same while the decoded images sharpen. The
UNet can therefore train on the frozen encoder's latents during this stage.

After training, the latents' standard deviation over the training images gives
`scaling_factor` = 1 / std, so the UNet works on unit-variance z (SD 1.x: 0.18215).
"""
from __future__ import annotations

import copy
from typing import Any, Union

import torch

from parti_from_scratch.vae import AutoencoderKL, AutoencoderKLConfig

from ..loop import StepRNG, TrainConfig, TrainResult, train
from .common import seeded_init


def build_vae(config: Union[dict, AutoencoderKLConfig], seed: int = 0) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL from a diffusers-style config dict; weights depend on `seed` only."""
    if isinstance(config, dict):
        config = AutoencoderKLConfig.from_dict(dict(config))
    return seeded_init(lambda: AutoencoderKL(config), seed)


def image_collate(samples: list) -> torch.Tensor:
    """[(image (3, 64, 64), caption)] -> images (b, 3, 64, 64); the autoencoder never reads the captions."""
    return torch.stack([image for image, _ in samples])


def vae_loss_fn_with(beta: float, foreground_weight: float = 0.0) -> Any:
    """The loss for a given KL weight beta and foreground weight (see vae_loss_fn)."""
    def loss_fn(model: AutoencoderKL, x: torch.Tensor, rng: StepRNG) -> tuple[torch.Tensor, dict]:
        return vae_loss_fn(model, x, rng, beta, foreground_weight)
    return loss_fn


def vae_loss_fn(model: AutoencoderKL, x: torch.Tensor, rng: StepRNG, beta: float = 1e-4,
                foreground_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """L = mean w |x - x_hat| + mean w (x - x_hat)^2 + beta * KL / n_pixels, with x_hat = D(mu + sigma * eps).

    Shapes: x (b, 3, H, W) in [-1, 1]; z (b, c, h, w); w (b, 1, H, W).
    """
    posterior = model.encode(x).latent_dist
    # eps ~ N(0, I): one draw per sample from the step's generator, so the run is reproducible
    eps = rng.randn(*posterior.mean.shape[1:]).to(posterior.mean.dtype)
    # z = mu + sigma * eps (the reparameterisation trick)
    z = posterior.sample(noise=eps)
    x_hat = model.decode(z).sample
    # w = 1 + foreground_weight where any channel is lit (the background is black, -1 in every channel)
    w = 1.0 + foreground_weight * (x.amax(dim=1, keepdim=True) > -0.9).to(x.dtype)
    l1 = (w * (x - x_hat).abs()).mean()
    l2 = (w * (x - x_hat) ** 2).mean()
    # KL(q(z|x) || N(0, I)), summed over z's elements, averaged over the batch, per pixel of x
    kl = posterior.kl().mean() / x[0].numel()
    loss = l1 + l2 + beta * kl
    return loss, {"l1": l1.item(), "l2": l2.item(), "kl_per_pixel": kl.item()}


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of the posterior means over `images` (b, 3, H, W): the UNet then sees unit-variance latents."""
    means = torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean
                       for i in range(0, len(images), batch_size)])
    return float(1.0 / means.std())


def train_vae(config: Union[dict, AutoencoderKLConfig], dataset, train_config: TrainConfig, beta: float = 1e-4,
              foreground_weight: float = 0.0, resume: Union[str, None] = None, scaling_images: int = 1024
              ) -> tuple[AutoencoderKL, TrainResult]:
    """Train the autoencoder, then set its scaling_factor from the first `scaling_images` training images."""
    model = build_vae(config, train_config.seed)
    result = train(model, vae_loss_fn_with(beta, foreground_weight), dataset, train_config, collate=image_collate, resume=resume)
    trained = (result.ema_model if result.ema_model is not None else result.model).eval()
    n = min(scaling_images, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(n)]).to(next(trained.parameters()).device)
    trained.config.scaling_factor = measure_scaling_factor(trained, images)
    return trained, result


def finetune_decoder(vae: AutoencoderKL, dataset, train_config: TrainConfig, beta: float = 1e-4,
                     foreground_weight: float = 0.0, resume: Union[str, None] = None
                     ) -> tuple[AutoencoderKL, TrainResult]:
    """Train the decoder (and post_quant_conv) of a trained VAE with its encoder frozen: same latents, sharper images.

    The loss is vae_loss_fn's; with the encoder frozen its KL term is a constant.
    The scaling_factor is kept, since the latents do not change.
    """
    # a trained VAE may come frozen (an EMA copy): train the decoder, freeze
    # every parameter that shapes z, the encoder and quant_conv
    model = copy.deepcopy(vae).train().requires_grad_(True)
    model.encoder.requires_grad_(False)
    if model.quant_conv is not None:
        model.quant_conv.requires_grad_(False)
    result = train(model, vae_loss_fn_with(beta, foreground_weight), dataset, train_config, collate=image_collate,
                   resume=resume)
    trained = (result.ema_model if result.ema_model is not None else result.model).eval()
    trained.config.scaling_factor = vae.config.scaling_factor
    return trained, result
