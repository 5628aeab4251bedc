"""CLIP's contrastive loss, the equation of tutorial "Parti原理与代码实例讲解" §4.3.

Radford et al. 2021, arXiv 2103.00020, §2.3 and Figure 3. A batch holds N
matching (image, text) pairs. With I_e, T_e the L2-normalised image and text
embeddings (N x D each) and t the learned log inverse temperature (`logit_scale`):

    logits = exp(t) * I_e T_e^T                                     (N x N; logits_ij = exp(t) cos(image_i, text_j))
    L = ( CE(logits, [0..N-1]) + CE(logits^T, [0..N-1]) ) / 2

Written out, with s_ij = logits_ij:

    L = -1/(2N) * sum_i [ log( e^{s_ii} / sum_j e^{s_ij} )          image i must pick its own text among N
                        + log( e^{s_ii} / sum_j e^{s_ji} ) ]         text i must pick its own image among N

The diagonal holds the N true pairs; the N^2 - N off-diagonal entries are the
negatives. The tutorial calls the scale 1/tau; CLIP learns t = log(1/tau) so
that the temperature stays positive, starting at tau = 0.07 (t = 2.6592) and
clipping exp(t) at 100 during training.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F


def similarity_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                      logit_scale: Union[torch.Tensor, float]) -> torch.Tensor:
    """logits_per_image = exp(t) * norm(I) norm(T)^T.

    Shapes: image_embeds (N_img, D), text_embeds (N_txt, D), logit_scale () -> (N_img, N_txt).
    The embeddings need not be normalised; each row is divided by its L2 norm here.
    Its transpose is logits_per_text.
    """
    # I_e, T_e: each row projected onto the unit sphere, so a dot product is a cosine
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    logit_scale = torch.as_tensor(logit_scale, dtype=image_embeds.dtype, device=image_embeds.device)
    # exp(t) * I_e T_e^T
    return logit_scale.exp() * image_embeds @ text_embeds.t()


def symmetric_cross_entropy(logits_per_image: torch.Tensor) -> torch.Tensor:
    """(CE(logits, labels) + CE(logits^T, labels)) / 2 with labels = [0..N-1]: the true pairs are on the diagonal.

    Shape: logits_per_image (N, N) -> ().
    """
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    # each image (row) classifies which of the N texts is its caption
    loss_image = F.cross_entropy(logits_per_image, labels)
    # each text (column) classifies which of the N images it describes
    loss_text = F.cross_entropy(logits_per_image.t(), labels)
    return (loss_image + loss_text) / 2


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
              logit_scale: Union[torch.Tensor, float]) -> torch.Tensor:
    """The CLIP loss of tutorial §4.3 for N matching pairs: symmetric cross-entropy of exp(t) norm(I) norm(T)^T.

    Shapes: image_embeds (N, D), text_embeds (N, D), row i of each describing the same pair; logit_scale () -> ().
    """
    return symmetric_cross_entropy(similarity_logits(image_embeds, text_embeds, logit_scale))
