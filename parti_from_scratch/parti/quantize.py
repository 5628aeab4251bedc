"""Vector quantisation: how an encoder's vectors become Parti's image tokens.

Parti (Yu et al. 2022, arXiv 2206.10789) writes an image as a 32x32 grid of
integers. Each integer is the index of the codebook entry e_k nearest to one
vector z of the image tokenizer's encoder. The equations, one function each:

    k*(z) = argmin_k ||z - e_k||^2                             `nearest_code`
        (van den Oord et al. 2017, "Neural Discrete Representation Learning", arXiv 1711.00937, Eq. 1)
    k*(z) = argmax_k  l2(z) . l2(e_k)                           `cosine_nearest_code`
        on l2-normalised vectors in a low-dimensional lookup space (ViT-VQGAN, Yu et al. 2021,
        arXiv 2110.04627, §3.2 "factorized codes" and "l2-normalized codes")
    z_q = z + sg(e_{k*} - z)                                    `straight_through`
        (arXiv 1711.00937 §3.2: copy the decoder's gradient to the encoder)
    L = ||sg(z) - e||^2 + beta ||z - sg(e)||^2                  `vq_loss`
        (arXiv 1711.00937 Eq. 3; `codebook_loss` and `commitment_loss` are its two terms)
    N_k <- gamma N_k + (1 - gamma) n_k,  m_k <- gamma m_k + (1 - gamma) sum_{i: k*(z_i) = k} z_i,
    e_k = m_k / N_k                                             `ema_codebook_update`
        (arXiv 1711.00937 Appendix A.1; `laplace_smoothing` keeps N_k > 0)
    dead-code restarts (random or k-means++ targets)            `restart_dead_codes`, `restart_weights`
    usage = |{k : n_k > 0}| / K,  perplexity = exp(-sum_k p_k log p_k)   `codebook_usage`, `perplexity`

`VectorQuantizer` ties them together, for channels-first feature maps
(batch, channels, h, w), as a convolutional VQGAN produces them, and for token
sequences (batch, n, channels), as a ViT-VQGAN produces them.

sg(.) is the stop-gradient: `.detach()`. Squared norms are averaged over all
elements (the mean squared error), as every public VQGAN implementation does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from parti_from_scratch.outputs import ModelOutput

_LAYOUTS = "a channels-first map (batch, channels, h, w) or a sequence (batch, n, channels)"


# --------------------------------------------------------------------------------------------
# Nearest-code assignment
# --------------------------------------------------------------------------------------------

def squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """||z_i - e_k||^2 for every vector z_i and every code e_k.

    Expanded as ||z_i||^2 - 2 z_i . e_k + ||e_k||^2, so the (n, K) table costs one
    matrix product instead of an (n, K, d) tensor of differences. The product,
    its factor -2 and the ||e_k||^2 term are one `addmm` (||e||^2 + (-2) z e^T),
    and ||z_i||^2 is added in place: one (n, K) tensor is allocated, not three.

    z: (n, d), codebook: (K, d) -> (n, K)
    """
    # ||z_i||^2: (n, 1)
    z_sq = z.pow(2).sum(dim=-1, keepdim=True)
    # ||e_k||^2: (K,), broadcast over the rows
    e_sq = codebook.pow(2).sum(dim=-1)
    # ||e_k||^2 - 2 z_i . e_k, then + ||z_i||^2: (n, K)
    return torch.addmm(e_sq, z, codebook.T, alpha=-2).add_(z_sq)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """k*(z) = argmin_k ||z - e_k||^2 (arXiv 1711.00937, Eq. 1).

    z: (n, d), codebook: (K, d) -> indices (n,), int64
    """
    return squared_distances(z, codebook).argmin(dim=-1)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """l2(x) = x / max(||x||_2, eps) along the last axis (ViT-VQGAN §3.2).

    eps only guards the zero vector.
    """
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_nearest_code(z_hat: torch.Tensor, codebook_hat: torch.Tensor) -> torch.Tensor:
    """k*(z) = argmax_k z_hat . e_hat_k, for l2-normalised z_hat and e_hat_k (ViT-VQGAN, arXiv 2110.04627, §3.2).

    On unit vectors ||z_hat - e_hat||^2 = 2 - 2 z_hat . e_hat, so the nearest code
    in Euclidean distance is the one of largest cosine similarity: one matrix
    product, no norms. ViT-VQGAN looks codes up this way in a space of 32
    dimensions (a linear projection of the encoder's output, "factorized codes"),
    which the paper reports improves codebook usage and reconstruction.

    z_hat: (n, d), codebook_hat: (K, d), both rows of unit length -> indices (n,)
    """
    # cosine similarities: (n, K)
    return (z_hat @ codebook_hat.T).argmax(dim=-1)


# --------------------------------------------------------------------------------------------
# Gradients through the lookup, and the loss
# --------------------------------------------------------------------------------------------

def straight_through(z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """z_q = z + sg(e_{k*} - z): forward value e_{k*}, gradient dz_q/dz = I (arXiv 1711.00937, §3.2).

    argmin has no useful gradient, so the decoder's gradient at z_q is copied to
    the encoder's output z unchanged. Written as sg(e) + (z - sg(z)), the same
    value and gradient, because then the forward value is bit for bit the code
    (z - z is exactly 0), where z + (e - z) rounds twice.

    z, code: same shape -> same shape
    """
    return code.detach() + (z - z.detach())


def codebook_loss(z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """||sg(z) - e||^2, averaged over elements: moves the codes toward the encoder outputs (arXiv 1711.00937, Eq. 3)."""
    return (z.detach() - code).pow(2).mean()


def commitment_loss(z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """||z - sg(e)||^2, averaged over elements: keeps the encoder committed to its codes (arXiv 1711.00937, Eq. 3)."""
    return (z - code.detach()).pow(2).mean()


def vq_loss(z: torch.Tensor, code: torch.Tensor, beta: float = 0.25, legacy: bool = False) -> torch.Tensor:
    """L = ||sg(z) - e||^2 + beta ||z - sg(e)||^2 (van den Oord et al. 2017, arXiv 1711.00937, Eq. 3).

    The paper weighs the commitment term by beta (0.25 in the ViT-VQGAN and Parti
    papers). `legacy=True` gives the form of taming-transformers and diffusers'
    `VQModel`, where beta weighs the codebook term instead:

        L_legacy = beta ||sg(z) - e||^2 + ||z - sg(e)||^2  =  beta * L_paper(1 / beta)

    Both terms have the same value in the forward pass, so the two forms give the
    same number (1 + beta) mean((z - e)^2); they differ in the gradients: the
    legacy form pulls the encoder 1/beta = 4 times harder and the codes 4 times
    more gently.

    z: encoder outputs, code: e_{k*(z)} of the same shape -> scalar
    """
    if legacy:
        return beta * codebook_loss(z, code) + commitment_loss(z, code)
    return codebook_loss(z, code) + beta * commitment_loss(z, code)


# --------------------------------------------------------------------------------------------
# EMA codebook, dead codes, usage
# --------------------------------------------------------------------------------------------

def code_counts(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """n_k = |{i : k*(z_i) = k}|: how many vectors chose each code. indices: any shape -> (K,), int64."""
    return torch.bincount(indices.reshape(-1), minlength=num_embeddings)


def ema(old: torch.Tensor, new: torch.Tensor, decay: float) -> torch.Tensor:
    """x <- gamma x + (1 - gamma) x_new, the exponential moving average with decay gamma."""
    return decay * old + (1 - decay) * new


def laplace_smoothing(cluster_size: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """N_k' = (N_k + eps) / (n + K eps) * n, with n = sum_k N_k.

    Additive (Laplace) smoothing of the EMA counts: keeps the total n and makes
    every N_k' > 0, so a code nobody chose is not divided by zero in e_k = m_k / N_k'.

    cluster_size: (K,) -> (K,)
    """
    n = cluster_size.sum()
    K = cluster_size.shape[0]
    return (cluster_size + eps) / (n + K * eps) * n


def ema_codebook_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor,
                        indices: torch.Tensor, decay: float = 0.99, eps: float = 1e-5
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EMA step of the codebook (van den Oord et al. 2017, arXiv 1711.00937, Appendix A.1, Eq. 6-8).

        N_k <- gamma N_k + (1 - gamma) n_k                      n_k: vectors assigned to code k in this batch
        m_k <- gamma m_k + (1 - gamma) sum_{i: k*(z_i) = k} z_i
        e_k  = m_k / N_k'                                       N_k': `laplace_smoothing` of N_k

    Each code moves to the running mean of the vectors it wins, with no
    gradient, in place of the codebook term of the loss.

    cluster_size: (K,) N, embed_sum: (K, d) m, z: (n, d), indices: (n,)
    -> (cluster_size (K,), embed_sum (K, d), codebook (K, d))
    """
    K = cluster_size.shape[0]
    # n_k: (K,)
    counts = code_counts(indices, K).to(cluster_size.dtype)
    # sum_{i: k*(z_i) = k} z_i: (K, d)
    sums = torch.zeros_like(embed_sum).index_add_(0, indices, z.to(embed_sum.dtype))
    cluster_size = ema(cluster_size, counts, decay)
    embed_sum = ema(embed_sum, sums, decay)
    # e_k = m_k / N_k'
    codebook = embed_sum / laplace_smoothing(cluster_size, eps)[:, None]
    return cluster_size, embed_sum, codebook


RESTART_RULES = ("random", "kmeans++")


def restart_weights(z: torch.Tensor, codebook: torch.Tensor, rule: str = "random") -> torch.Tensor:
    """How likely each batch vector z_i is to receive a restarted code, unnormalised: (n,).

        random:    w_i = 1                                   every encoder output alike
        kmeans++:  w_i = min_k ||z_i - e_k||^2               the k-means++ seeding rule (Arthur & Vassilvitskii
                                                             2007): vectors the codebook serves worst
    With "kmeans++" a restart lands where the quantisation error is, instead of on
    the commonest vectors (a black background, say), which already have codes.
    """
    if rule == "random":
        return torch.ones(z.shape[0], dtype=codebook.dtype, device=z.device)
    if rule == "kmeans++":
        return squared_distances(z.to(codebook.dtype), codebook).amin(dim=1).clamp_min(0.0)
    raise ValueError(f"restart rule must be one of {RESTART_RULES}, got {rule!r}")


def restart_dead_codes(codebook: torch.Tensor, cluster_size: torch.Tensor, z: torch.Tensor, threshold: float,
                       embed_sum: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                       rule: str = "random") -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Replace every code whose EMA count N_k fell below `threshold` by an encoder output of the batch.

    A code no vector chooses gets no update and stays unused for ever ("codebook
    collapse"); restarting it on a vector the encoder actually produces gives it a
    chance to win some. The new code starts with N_k = threshold (and
    m_k = threshold * e_k, so e_k = m_k / N_k), and has to win vectors to stay.
    The batch vectors are drawn without replacement with probability proportional
    to `restart_weights(z, codebook, rule)` (uniform for "random"); if there are
    more dead codes than vectors with a nonzero weight, a random subset of the dead
    codes is restarted now and the rest in later batches.

    codebook: (K, d), cluster_size: (K,), z: (n, d), embed_sum: (K, d) or None
    -> (codebook, cluster_size, embed_sum, restarted mask (K,)), new tensors
    """
    dead = cluster_size < threshold
    num_dead = int(dead.sum())
    # the distances are computed only when some code is dead (most steps have none)
    weights = restart_weights(z, codebook, rule) if num_dead > 0 else None
    codebook, cluster_size = codebook.clone(), cluster_size.clone()
    embed_sum = None if embed_sum is None else embed_sum.clone()
    num_samples = int((weights > 0).sum()) if weights is not None else 0
    if num_dead == 0 or num_samples == 0:
        return codebook, cluster_size, embed_sum, torch.zeros_like(dead)
    if num_dead > num_samples:
        # keep a random subset of the dead codes, one per available vector
        dead_ids = dead.nonzero(as_tuple=True)[0]
        keep = dead_ids[torch.randperm(num_dead, generator=generator, device=dead.device)[:num_samples]]
        dead = torch.zeros_like(dead)
        dead[keep] = True
        num_dead = num_samples
    # batch vectors drawn without replacement, P(i) proportional to w_i: (num_dead, d)
    if rule == "random":
        picks = torch.randperm(z.shape[0], generator=generator, device=z.device)[:num_dead]
    else:
        picks = torch.multinomial(weights.double(), num_dead, replacement=False, generator=generator)
    samples = z[picks].to(codebook.dtype)
    codebook[dead] = samples
    cluster_size[dead] = threshold
    if embed_sum is not None:
        embed_sum[dead] = samples * threshold
    return codebook, cluster_size, embed_sum, dead


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of the K codes used at least once: |{k : n_k > 0}| / K.

    Accumulate `code_counts` over a whole set (a test set, an epoch) before
    calling: unlike perplexity this does not depend on the batch size.

    counts: (K,)
    """
    return (counts > 0).float().mean().item()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(-sum_k p_k log p_k), p_k = n_k / sum n: the effective number of codes in use (0 log 0 = 0).

    K if all codes are used equally often, 1 if one code takes everything.

    counts: (K,) -> scalar
    """
    p = counts.double() / counts.sum().clamp_min(1)
    # p log p with 0 log 0 = 0
    p_log_p = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return torch.exp(-p_log_p.sum())


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------

@dataclass
class VectorQuantizerConfig:
    """Hyper-parameters of `VectorQuantizer`.

    Defaults: the codebook of ViT-VQGAN and Parti's tokenizer (arXiv 2110.04627), 8192 l2-normalised codes of
    32 dimensions. For the factorised lookup inside the quantizer, set embedding_dim to the encoder's width and
    codebook_dim=32. A taming / diffusers VQGAN quantizer is `use_cosine_sim=False, legacy=True`.
    """
    num_embeddings: int = 8192          # K, codebook size (diffusers' num_vq_embeddings; 8192 in ViT-VQGAN)
    embedding_dim: int = 32             # channels of the vectors coming in and going out (diffusers' vq_embed_dim)
    codebook_dim: Optional[int] = None  # width of the lookup space; None = embedding_dim and no projection,
    #                                     else linear project_in / project_out around the lookup (factorised codes)
    use_cosine_sim: bool = True         # l2-normalise vectors and codes, nearest = largest cosine (ViT-VQGAN §3.2);
    #                                     False: plain Euclidean lookup (taming / diffusers VQGAN)
    beta: float = 0.25                  # commitment weight of Eq. 3
    legacy: bool = False                # True: beta on the codebook term instead (diffusers' VQModel default)
    use_ema: bool = False               # codebook by EMA (Appendix A.1) instead of by gradient
    decay: float = 0.99                 # gamma of the EMA
    eps: float = 1e-5                   # Laplace smoothing of the EMA counts
    threshold_ema_dead_code: float = 0.0  # restart codes whose EMA count falls below this (0: never)
    restart_rule: str = "random"        # where restarted codes land: "random" batch vectors, or "kmeans++"
    #                                     (drawn in proportion to their squared distance to the codebook)

    def __post_init__(self):
        if self.restart_rule not in RESTART_RULES:
            raise ValueError(f"VectorQuantizerConfig.restart_rule must be one of {RESTART_RULES}, got "
                             f"{self.restart_rule!r}")
        for name in ("num_embeddings", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"VectorQuantizerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook_dim is not None and self.codebook_dim < 1:
            raise ValueError(f"VectorQuantizerConfig.codebook_dim must be >= 1 or None, got {self.codebook_dim}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"VectorQuantizerConfig.decay must be in [0, 1), got {self.decay}")
        if self.threshold_ema_dead_code < 0:
            raise ValueError(f"VectorQuantizerConfig.threshold_ema_dead_code must be >= 0, got "
                             f"{self.threshold_ema_dead_code}")

    @property
    def lookup_dim(self) -> int:
        return self.embedding_dim if self.codebook_dim is None else self.codebook_dim


@dataclass
class VectorQuantizerOutput(ModelOutput):
    """What `VectorQuantizer.forward` returns (by name, or by position: `z_q, k, loss, ppl = out`)."""
    quantized: torch.Tensor     # z_q, straight-through, projected back out; same shape as the input
    indices: torch.Tensor       # k*, (batch, h, w) for a map, (batch, n) for a sequence
    loss: torch.Tensor          # Eq. 3 (paper or legacy form; only the commitment term with an EMA codebook)
    perplexity: torch.Tensor    # exp(-sum p log p) of this batch's codes


class VectorQuantizer(nn.Module):
    """Vectors -> nearest codes, with the straight-through gradient, the VQ loss and (optionally) an EMA codebook.

    Steps of `forward`, for each vector z of the input:
        z_e   = project_in(z)                 (identity unless codebook_dim is set)
        z_e, e = l2(z_e), l2(e)               (use_cosine_sim)
        k*    = nearest code of z_e
        loss  = Eq. 3 on (z_e, e_{k*})
        z_q   = project_out(z_e + sg(e_{k*} - z_e))

    Layouts: a channels-first map (batch, embedding_dim, h, w) gives indices
    (batch, h, w), flattened in (batch, h, w) order as diffusers' `VQModel` does;
    a sequence (batch, n, embedding_dim) gives indices (batch, n).

    The codebook is `embedding.weight` (K, lookup_dim), the name taming, diffusers
    and enhancing-transformers checkpoints use. With `use_ema` it has no gradient
    and the buffers `cluster_size` (N, K) and `embed_sum` (m, (K, lookup_dim))
    carry the EMA; they start at N_k = 1, m_k = e_k (so e_k = m_k / N_k holds
    from the first step): call `reset_ema()` after assigning a codebook.
    """

    def __init__(self, config: Optional[VectorQuantizerConfig] = None, **kwargs):
        super().__init__()
        if config is None:
            config = VectorQuantizerConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a VectorQuantizerConfig or keyword arguments, not both")
        self.config = config
        K, d = config.num_embeddings, config.lookup_dim
        if config.codebook_dim is None:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        else:
            self.project_in = nn.Linear(config.embedding_dim, d)
            self.project_out = nn.Linear(d, config.embedding_dim)
        self.embedding = nn.Embedding(K, d)
        # uniform in [-1/K, 1/K], as taming and diffusers initialise it
        nn.init.uniform_(self.embedding.weight, -1.0 / K, 1.0 / K)
        if config.use_cosine_sim:
            with torch.no_grad():
                self.embedding.weight.copy_(l2_normalize(self.embedding.weight))
        if config.use_ema:
            self.embedding.weight.requires_grad_(False)
        if config.use_ema or config.threshold_ema_dead_code > 0:
            self.register_buffer("cluster_size", torch.ones(K))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())

    @property
    def tracks_counts(self) -> bool:
        return self.config.use_ema or self.config.threshold_ema_dead_code > 0

    @torch.no_grad()
    def reset_ema(self) -> None:
        """N_k = 1, m_k = e_k: restart the EMA statistics from the current codebook."""
        if self.tracks_counts:
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(self.embedding.weight)

    def codebook(self) -> torch.Tensor:
        """The codes as the lookup sees them: l2-normalised under cosine similarity. (K, lookup_dim)"""
        e = self.embedding.weight
        return l2_normalize(e) if self.config.use_cosine_sim else e

    def _flatten(self, z: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
        if z.ndim not in (3, 4):
            raise ValueError(f"VectorQuantizer expects {_LAYOUTS}, got shape {tuple(z.shape)}")
        channels = z.shape[1] if z.ndim == 4 else z.shape[-1]
        if channels != self.config.embedding_dim:
            raise ValueError(f"VectorQuantizer expects {_LAYOUTS} with channels = embedding_dim = "
                             f"{self.config.embedding_dim}, got shape {tuple(z.shape)}")
        if z.ndim == 4:
            b, _, h, w = z.shape
            # (b, c, h, w) -> (b h w, c): the flat order of diffusers' quantizer
            return rearrange(z, "b c h w -> (b h w) c"), (b, h, w)
        b, n, _ = z.shape
        # (b, n, c) -> (b n, c)
        return rearrange(z, "b n c -> (b n) c"), (b, n)

    @staticmethod
    def _unflatten(flat: torch.Tensor, grid: tuple) -> torch.Tensor:
        if len(grid) == 3:
            b, h, w = grid
            # (b h w, c) -> (b, c, h, w)
            return rearrange(flat, "(b h w) c -> b c h w", b=b, h=h, w=w)
        b, n = grid
        # (b n, c) -> (b, n, c)
        return rearrange(flat, "(b n) c -> b n c", b=b, n=n)

    def lookup(self, z_e: torch.Tensor, codebook: Optional[torch.Tensor] = None) -> torch.Tensor:
        """k* for vectors already in the lookup space (projected, and normalised under cosine). (n, d) -> (n,)"""
        codebook = self.codebook() if codebook is None else codebook
        if self.config.use_cosine_sim:
            return cosine_nearest_code(z_e, codebook)
        return nearest_code(z_e, codebook)

    def forward(self, z: torch.Tensor, generator: Optional[torch.Generator] = None) -> VectorQuantizerOutput:
        """z: (b, embedding_dim, h, w) or (b, n, embedding_dim). `generator` draws the dead-code restarts."""
        cfg = self.config
        # (b, c, h, w) or (b, n, c) -> (N, c), N = b h w or b n
        flat, grid = self._flatten(z)
        # factorised codes: project to the lookup space, (N, c) -> (N, d)
        z_e = self.project_in(flat)
        if cfg.use_cosine_sim:
            z_e = l2_normalize(z_e)
        codebook = self.codebook()
        # k*: (N,)
        indices = self.lookup(z_e, codebook)
        # e_{k*}: (N, d)
        code = F.embedding(indices, codebook)
        if cfg.use_ema:
            # the EMA update replaces the codebook term; only the commitment term remains
            loss = (1.0 if cfg.legacy else cfg.beta) * commitment_loss(z_e, code)
        else:
            loss = vq_loss(z_e, code, beta=cfg.beta, legacy=cfg.legacy)
        # z_q = z_e + sg(e_{k*} - z_e)
        z_q = straight_through(z_e, code)
        if self.training and self.tracks_counts:
            self._update_codebook(z_e.detach(), indices, generator)
        # (N, d) -> (N, c) -> input layout
        quantized = self._unflatten(self.project_out(z_q), grid)
        counts = code_counts(indices, cfg.num_embeddings)
        return VectorQuantizerOutput(quantized=quantized, indices=indices.reshape(grid), loss=loss,
                                     perplexity=perplexity(counts))

    @torch.no_grad()
    def _update_codebook(self, z_e: torch.Tensor, indices: torch.Tensor,
                         generator: Optional[torch.Generator]) -> None:
        """EMA step (use_ema) or count tracking only (gradient codebook), then dead-code restarts."""
        cfg = self.config
        if cfg.use_ema:
            cluster_size, embed_sum, codebook = ema_codebook_update(
                self.cluster_size, self.embed_sum, z_e, indices, cfg.decay, cfg.eps)
            if cfg.use_cosine_sim:
                codebook = l2_normalize(codebook)
            self.cluster_size.copy_(cluster_size)
            self.embed_sum.copy_(embed_sum)
            self.embedding.weight.copy_(codebook)
        else:
            counts = code_counts(indices, cfg.num_embeddings).to(self.cluster_size.dtype)
            self.cluster_size.copy_(ema(self.cluster_size, counts, cfg.decay))
        if cfg.threshold_ema_dead_code > 0:
            codebook, cluster_size, embed_sum, _ = restart_dead_codes(
                self.embedding.weight, self.cluster_size, z_e, cfg.threshold_ema_dead_code,
                embed_sum=self.embed_sum, generator=generator, rule=cfg.restart_rule)
            self.embedding.weight.copy_(codebook)
            self.cluster_size.copy_(cluster_size)
            self.embed_sum.copy_(embed_sum)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode tokens: k -> project_out(e_k) in the input layout.

        indices (b, h, w) -> (b, embedding_dim, h, w); indices (b, n) -> (b, n, embedding_dim)
        """
        if indices.ndim not in (2, 3):
            raise ValueError(f"indices must be (batch, h, w) or (batch, n), got shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.config.num_embeddings):
            raise ValueError(f"indices must lie in [0, {self.config.num_embeddings}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        # (b, ...) -> (b ...,) -> (b ..., d) -> (b ..., c)
        codes = self.project_out(F.embedding(indices.reshape(-1), self.codebook()))
        return self._unflatten(codes, tuple(indices.shape))
