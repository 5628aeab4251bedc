"""Training the image tokenizer: reconstruction + VQ loss, with an EMA codebook and dead-code restarts.

Parti (Yu et al. 2022, arXiv 2206.10789) first learns to write an image as a
grid of codebook indices; this file trains that tokenizer, the convolutional
VQGAN of parti/vqgan.py (Esser et al. 2021, arXiv 2012.09841), on the built-in
shapes. Per batch x (b, 3, 64, 64) in [-1, 1]:

    z     = E(x)                                   (b, d, h, w), h = 64 / 2^(L-1)
    k*    = argmin_k ||z_ij - e_k||^2              indices (b, h, w)
    z_q   = z + sg(e_{k*} - z)                     straight-through (parti/quantize.py)
    x_hat = G(z_q)

    L = mean w |x - x_hat| + mean w (x - x_hat)^2 + L_VQ                `vq_loss_fn`

with the per-pixel weights w = 1 + foreground_weight * [pixel is not black] of
the diffusion VAE (components/vae.py: the objects cover about 3% of an image)
and no perceptual or adversarial term: the shapes are flat colours, and the
checker, not a human eye, judges the result (VQGAN's patch critic, tried in the
decoder stage, lowered the exact rate from 98.75% to 96.0%: the shipped
tokenizer's RECIPE.md). L_VQ is Eq. 3 of van den Oord et
al. 2017 (arXiv 1711.00937), ||sg(z) - e||^2 + beta ||z - sg(e)||^2, or, with
the EMA codebook (their Appendix A.1), only beta ||z - sg(e)||^2: the codes
then move to the running mean of the vectors they win, without a gradient.

Against codebook collapse (codes no vector ever chooses), three switches, each
measured in train/parti_recipe.py's RECIPE.md:

* k-means initialisation (`kmeans`): the codes start as the k-means centroids
  of the untrained encoder's outputs on some training images, instead of
  uniform noise in [-1/K, 1/K] that no encoder output lies near;
* the EMA codebook (`Codebook.use_ema`, decay gamma);
* dead-code restarts (`Codebook.threshold_ema_dead_code`): a code whose EMA
  count falls below the threshold is moved onto an encoder output of the batch,
  drawn at random or, with `restart_rule="kmeans++"`, in proportion to its
  squared distance from the codebook (so codes go where the error is).

Under torchrun every process sees the whole global batch's z when the codebook
is updated (`gather_global_batch`) and draws the restarts from the step's
shared generator, so all processes hold the same codebook, and it is the one a
single process would have, up to float rounding of the encoder.

`evaluate_tokenizer` measures what issue the Transformer will face: images ->
indices -> images, graded by the analytic checker (data/checker.py), and the
fraction of the codebook the test images use.

The shipped tokenizer is a ValueChromaVQModel (parti/value_chroma.py): the VQGAN
trained here reads the value v = max_c x_c alone (`ValueImages`, one channel), and
its colours are the k-means centroids of the training tokens' colours
(`fit_colours`, `value_chroma_tokenizer`), fitted once after the VQGAN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from parti_from_scratch.data import ShapesDataset, score, summarise
from parti_from_scratch.parti.quantize import (VectorQuantizer, VectorQuantizerConfig, code_counts, codebook_usage,
                                               nearest_code, perplexity, restart_weights)
from parti_from_scratch.parti.value_chroma import ValueChromaConfig, ValueChromaVQModel, image_value, token_colours
from parti_from_scratch.parti.vqgan import VQ_BETA, VQModel, VQModelConfig

from ..distributed import gather_global_batch
from ..loop import StepRNG, TrainConfig, TrainResult, train
from .common import seeded_init
from .vae import image_collate


@dataclass
class Codebook:
    """How the codebook is trained (the fields of VectorQuantizerConfig a recipe sets, plus k-means)."""
    use_ema: bool = True                  # codes by EMA of the vectors they win (arXiv 1711.00937 App. A.1)
    decay: float = 0.99                   # gamma of that EMA (and of the counts that decide restarts)
    threshold_ema_dead_code: float = 1.0  # restart a code whose EMA count per batch falls below this (0: never)
    restart_rule: str = "random"          # restarts land on random batch vectors, or "kmeans++" (where the error is)
    beta: float = VQ_BETA                 # commitment weight of Eq. 3 (paper form, beta on ||z - sg(e)||^2)
    kmeans_images: int = 0                # k-means init on the untrained encoder's outputs for this many images (0: off)
    kmeans_iters: int = 10                # Lloyd iterations of that k-means

    def quantizer_config(self, num_embeddings: int, embedding_dim: int) -> VectorQuantizerConfig:
        """The Euclidean (taming-style) quantizer of a VQModel, with this codebook training."""
        return VectorQuantizerConfig(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                                     use_cosine_sim=False, beta=self.beta, legacy=False, use_ema=self.use_ema,
                                     decay=self.decay, threshold_ema_dead_code=self.threshold_ema_dead_code,
                                     restart_rule=self.restart_rule)


def build_vq(config: Union[dict, VQModelConfig], codebook: Codebook, seed: int = 0) -> VQModel:
    """A freshly initialised VQModel whose quantizer trains as `codebook` says; weights depend on `seed` only.

    The quantizer may carry EMA buffers (cluster_size, embed_sum) that a diffusers
    VQModel folder has no place for: `export_vq` drops them before saving.
    """
    if isinstance(config, dict):
        config = VQModelConfig.from_dict(dict(config))

    def make() -> VQModel:
        model = VQModel(config)
        model.quantize = VectorQuantizer(codebook.quantizer_config(config.num_vq_embeddings, config.code_dim))
        return model
    return seeded_init(make, seed)


def export_vq(model: VQModel) -> VQModel:
    """The trained weights in a plain VQModel (no EMA buffers), as VQModel.save_pretrained writes and loads it."""
    plain = VQModel(model.config)
    state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    extra = sorted(set(model.state_dict()) - set(state))
    if any(not k.startswith("quantize.") for k in extra):
        raise ValueError(f"export_vq: unexpected weights outside the quantizer: {extra}")
    plain.load_state_dict(state, strict=True)
    return plain.eval()


# --------------------------------------------------------------------------------------------- k-means


@torch.no_grad()
def kmeans(z: torch.Tensor, k: int, iters: int = 10, generator: Optional[torch.Generator] = None,
           init: str = "random") -> torch.Tensor:
    """Lloyd's k-means: k centroids of the vectors z (n, d) -> (k, d).

        start:  "random": c_j = k distinct rows of z, drawn at random (with repetition if n < k);
                "kmeans++": c_1 a random row, then each c_j a row drawn with probability proportional to
                min_{l<j} ||z_i - c_l||^2 (Arthur & Vassilvitskii 2007; `restart_weights`), so no cluster
                of a few well-separated ones is left without a centroid
        repeat: a_i = argmin_j ||z_i - c_j||^2;   c_j = mean {z_i : a_i = j}  (kept if no z_i chose it)
    """
    n = z.shape[0]
    if n == 0:
        raise ValueError("kmeans: no vectors to cluster")
    if init == "kmeans++":
        centroids = z[torch.randint(0, n, (1,), generator=generator)].clone()
        while len(centroids) < k:
            w = restart_weights(z, centroids, "kmeans++")
            # every row already a centroid: repeat one at random
            w = w if float(w.sum()) > 0 else torch.ones_like(w)
            centroids = torch.cat([centroids, z[torch.multinomial(w, 1, generator=generator)]])
    elif init == "random":
        pick = (torch.randperm(n, generator=generator)[:k] if n >= k
                else torch.randint(0, n, (k,), generator=generator))
        centroids = z[pick].clone()
    else:
        raise ValueError(f"kmeans: init must be 'random' or 'kmeans++', got {init!r}")
    for _ in range(iters):
        # a_i: (n,)
        assign = nearest_code(z, centroids)
        counts = code_counts(assign, k).to(z.dtype)
        # sum of the vectors of each cluster: (k, d)
        sums = torch.zeros_like(centroids).index_add_(0, assign, z)
        won = counts > 0
        centroids[won] = sums[won] / counts[won, None]
    return centroids


@torch.no_grad()
def kmeans_init(model: VQModel, images: torch.Tensor, iters: int = 10, seed: int = 0) -> None:
    """Set the codebook to the k-means centroids of the encoder's outputs on `images` (b, 3, H, W); restart the EMA."""
    z = model.encode(images).latents
    # (b, d, h, w) -> (b h w, d)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    q = model.quantize
    q.embedding.weight.copy_(kmeans(flat, q.config.num_embeddings, iters, torch.Generator().manual_seed(seed)))
    q.reset_ema()


class ValueImages(torch.utils.data.Dataset):
    """Item i of `dataset` with its image replaced by the value v = max_c x_c, (1, H, W): what the structure
    VQGAN of a ValueChromaVQModel trains on."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, *rest = self.dataset[i]
        return (image_value(image[None])[0], *rest)


@torch.no_grad()
def fit_colours(images: torch.Tensor, config: ValueChromaConfig, patch: int, iters: int = 20,
                seed: int = 0) -> torch.Tensor:
    """The J colours m_j of a ValueChromaVQModel: k-means (k-means++ start) of the colours u_t of every token
    of `images` (b, 3, H, W) whose total value reaches tau, (J, 3) on the [0, 1] scale."""
    u, s = token_colours(images, patch)
    coloured = u[s >= config.min_value]                       # (n, 3)
    return kmeans(coloured, config.num_colours, iters, torch.Generator().manual_seed(seed), init="kmeans++")


def value_chroma_tokenizer(structure: VQModel, dataset, config: ValueChromaConfig, n_images: int = 256,
                           seed: int = 0) -> ValueChromaVQModel:
    """A trained structure VQGAN (on `ValueImages`) and the colours fitted on the first n_images of `dataset`."""
    images = image_collate([dataset[i] for i in range(min(n_images, len(dataset)))])
    colours = fit_colours(images, config, structure.config.downsampling, seed=seed)
    return ValueChromaVQModel(structure, config, colours).eval()


# --------------------------------------------------------------------------------------------- the loss


def foreground_weights(x: torch.Tensor, foreground_weight: float, dilation: int = 0) -> torch.Tensor:
    """w = 1 + foreground_weight * D_r([any channel of x > -0.9]): (b, 1, H, W).

    D_r dilates the object mask by r pixels (a (2r+1) x (2r+1) max filter), so the
    black ring around each object weighs as much as the object itself: with r = 0
    a decoder loses less by painting colour past an edge than by leaving it short,
    and objects come back fatter (a small square then reads as a circle).
    """
    mask = (x.amax(dim=1, keepdim=True) > -0.9).to(x.dtype)
    if dilation > 0:
        mask = F.max_pool2d(mask, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return 1.0 + foreground_weight * mask


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, foreground_weight: float, dilation: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean w |x - x_hat|, mean w (x - x_hat)^2), w = `foreground_weights(x, foreground_weight, dilation)`.

    x, x_hat: (b, 3, H, W) in [-1, 1]; w: (b, 1, H, W), the black background weighing 1.
    """
    w = foreground_weights(x, foreground_weight, dilation)
    return (w * (x - x_hat).abs()).mean(), (w * (x - x_hat) ** 2).mean()


def vq_loss_fn(model: VQModel, x: torch.Tensor, rng: StepRNG, foreground_weight: float = 10.0, dilation: int = 0
               ) -> tuple[torch.Tensor, dict]:
    """L = mean w |x - x_hat| + mean w (x - x_hat)^2 + L_VQ, with x_hat = G(z + sg(e_{k*} - z)), z = E(x).

    The lookup and L_VQ use the codebook as it stands before this step; then the
    codebook takes its EMA step and restarts on the global batch's z (every
    process the same, see the module docstring).

    Shapes: x (b, 3, H, W) in [-1, 1]; z (b, d, h, w).
    """
    q = model.quantize
    z = model.encode(x).latents
    # lookup, L_VQ and straight-through, with the codebook left untouched
    was_training = q.training
    q.train(False)
    out = q(z)
    q.train(was_training)
    updating = was_training and q.tracks_counts
    x_hat = model.decode(out.quantized, force_not_quantize=True).sample
    l1, l2 = reconstruction_loss(x, x_hat, foreground_weight, dilation)
    loss = l1 + l2 + out.loss
    # one generator draw every step, used or not, so the random stream does not depend on the settings
    generator = rng.generator()
    if updating:
        with torch.no_grad():
            # EMA step and dead-code restarts on every process's z at once
            q(gather_global_batch(z.detach()), generator=generator)
    dead = (q.cluster_size < q.config.threshold_ema_dead_code).float().mean().item() if q.tracks_counts else 0.0
    return loss, {"l1": l1.item(), "l2": l2.item(), "vq": out.loss.item(), "perplexity": out.perplexity.item(),
                  "dead_fraction": dead}


def vq_loss_fn_with(foreground_weight: float, dilation: int = 0) -> Any:
    """The loss for a given foreground weight and mask dilation (see vq_loss_fn)."""
    def loss_fn(model: VQModel, x: torch.Tensor, rng: StepRNG) -> tuple[torch.Tensor, dict]:
        return vq_loss_fn(model, x, rng, foreground_weight, dilation)
    return loss_fn


def decoder_loss_fn(model: VQModel, x: torch.Tensor, rng: StepRNG, foreground_weight: float = 10.0,
                    dilation: int = 0) -> tuple[torch.Tensor, dict]:
    """Decoder fine-tuning: L = mean w |x - G(e_{k*(E(x))})| + mean w (x - G(e_{k*}))^2, E and the codebook frozen.

    The tokens of every image stay what the first stage made them; only the way
    they are drawn back improves (`freeze_all_but_decoder`).
    """
    with torch.no_grad():
        # k*(E(x)): (b, h, w)
        indices = model.tokenize(x)
    x_hat = model.decode_indices(indices)
    l1, l2 = reconstruction_loss(x, x_hat, foreground_weight, dilation)
    return l1 + l2, {"l1": l1.item(), "l2": l2.item()}


def train_vq(config: Union[dict, VQModelConfig], codebook: Codebook, dataset, train_config: TrainConfig,
             foreground_weight: float = 10.0, resume: Union[str, None] = None, dilation: int = 0
             ) -> tuple[VQModel, TrainResult]:
    """Train the tokenizer; return it as a plain VQModel (export_vq) in eval mode, and the run.

    With k-means on (codebook.kmeans_images > 0) the codes start at the centroids of the untrained
    encoder's outputs on the first training images (a resumed run loads its codebook instead).
    With a weight EMA (train_config.ema_decay) the returned model is the EMA copy; its codebook,
    which the EMA of the weights leaves alone when the codebook trains by EMA, is the last one.
    """
    model = build_vq(config, codebook, train_config.seed)
    if codebook.kmeans_images > 0 and resume is None:
        n = min(codebook.kmeans_images, len(dataset))
        kmeans_init(model, image_collate([dataset[i] for i in range(n)]), codebook.kmeans_iters, train_config.seed)
    result = train(model, vq_loss_fn_with(foreground_weight, dilation), dataset, train_config, collate=image_collate,
                   resume=resume)
    trained = result.model
    if result.ema_model is not None:
        trained = result.ema_model
        if codebook.use_ema:
            trained.quantize.embedding.weight.data.copy_(result.model.quantize.embedding.weight.detach())
    return export_vq(trained.cpu()), result


def freeze_all_but_decoder(model: VQModel) -> VQModel:
    """requires_grad only for post_quant_conv and the decoder G; the encoder, quant_conv and codebook stay fixed."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    return model


def finetune_decoder(model: VQModel, dataset, train_config: TrainConfig, foreground_weight: float = 10.0,
                     dilation: int = 0, resume: Union[str, None] = None) -> tuple[VQModel, TrainResult]:
    """Train only the decoder of a trained tokenizer (`decoder_loss_fn`); return it (all weights) in eval mode.

    `model` is a plain VQModel (as `train_vq` returns it): its quantizer keeps no
    EMA statistics, so tokenizing in training mode changes nothing.
    """
    model = freeze_all_but_decoder(export_vq(model).train())

    def loss_fn(m: VQModel, x: torch.Tensor, rng: StepRNG) -> tuple[torch.Tensor, dict]:
        return decoder_loss_fn(m, x, rng, foreground_weight, dilation)
    result = train(model, loss_fn, dataset, train_config, collate=image_collate, resume=resume)
    trained = result.ema_model if result.ema_model is not None else result.model
    for p in trained.parameters():
        p.requires_grad_(True)
    return export_vq(trained.cpu()), result


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def tokenize_and_decode(model: VQModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (b, 3, H, W) in [-1, 1] -> (indices (b, h, w), decoded images (b, 3, H, W)), through the indices alone."""
    indices = model.tokenize(images.to(model.device, model.dtype))
    return indices, model.decode_indices(indices).float().clamp(-1, 1)


@torch.no_grad()
def evaluate_tokenizer(model: Union[VQModel, ValueChromaVQModel], n: int = 400, split: str = "test", seed: int = 0, batch_size: int = 100
                       ) -> dict:
    """Encode -> indices -> decode n images of `split` and grade each against its own scene.

    Returns {"exact": fraction of images the checker reads as exactly their scene, the other
    checker attributes, "usage": fraction of the K codes used at least once on these images,
    "perplexity": exp(entropy) of the code frequencies, "mse": mean squared error in [-1, 1],
    "tokens_per_image", "n"}. For a ValueChromaVQModel, K, usage and perplexity are those of its
    structure codes, and "colour_codes_used" counts the colour codes used.
    """
    data = ShapesDataset(split, size=n, seed=seed)
    model = model.eval()
    factored = isinstance(model, ValueChromaVQModel)
    # the codebook whose usage is reported: a ValueChromaVQModel's structure codes (its colours are counted apart)
    K = model.codebook_factors[0] if factored else model.config.num_vq_embeddings
    counts = torch.zeros(K, dtype=torch.long)
    colour_counts = torch.zeros(model.codebook_factors[1] if factored else 1, dtype=torch.long)
    scores, squared_errors = [], []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        x = torch.stack([data[i][0] for i in range(start, stop)])
        indices, x_hat = tokenize_and_decode(model, x)
        if factored:
            structure, colour = model.split_indices(indices.cpu())
            counts += code_counts(structure, K)
            colour_counts += code_counts(colour, len(colour_counts))
        else:
            counts += code_counts(indices.cpu(), K)
        squared_errors.append(((x_hat.cpu() - x) ** 2).mean().item() * (stop - start))
        # (b, 3, H, W) in [-1, 1] -> (b, H, W, 3) in [0, 1], the checker's layout
        pictures = ((x_hat.cpu() + 1) / 2).permute(0, 2, 3, 1).numpy()
        scores += [score(image, data.scenes[i]) for i, image in zip(range(start, stop), pictures)]
    grid = tuple(indices.shape[1:])
    return {**{k: v for k, v in summarise(scores).items()}, "usage": codebook_usage(counts),
            "codes_used": int((counts > 0).sum()), "perplexity": float(perplexity(counts)),
            "mse": float(np.sum(squared_errors) / n), "tokens_per_image": grid[0] * grid[1], "n": n,
            **({"colour_codes_used": int((colour_counts > 0).sum())} if factored else {})}

