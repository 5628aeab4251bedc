"""The three models of the shipped pipeline, each plugged into the shared training loop (tutorial §3.3).

    clip.py      CLIP: both towers trained together with the contrastive loss of tutorial §4.3
    vae.py       the autoencoder: reconstruction + beta * KL (Rombach et al. 2022, arXiv 2112.10752, §3)
    unet.py      the latent noise predictor: L_simple with caption dropout (Ho et al. 2020; Ho & Salimans 2022)
    evaluate.py  measuring a trained model: CLIP retrieval and checker adherence of generated images

Each file offers `build_*` (a model from a config dict), a `collate` and a
`loss_fn` for `train.train`, and `train_*` that runs the loop and returns the
trained (EMA) model. default_recipe.py chains them into the shipped model.
"""
from .clip import build_clip, clip_collate, clip_loss_fn, train_clip
from .evaluate import clip_retrieval, evaluate_adherence, generate_images, save_image_grid
from .unet import (LatentCaptionDataset, build_unet, caption_dropout_mask, encode_latents, encode_texts,
                   make_unet_loss, train_unet, training_scheduler)
from .vae import build_vae, finetune_decoder, measure_scaling_factor, train_vae, vae_loss_fn

__all__ = [
    "LatentCaptionDataset", "build_clip", "build_unet", "build_vae", "caption_dropout_mask", "clip_collate",
    "clip_loss_fn", "clip_retrieval", "encode_latents", "encode_texts", "evaluate_adherence", "generate_images",
    "make_unet_loss", "measure_scaling_factor", "save_image_grid", "train_clip", "train_unet", "train_vae",
    "training_scheduler", "vae_loss_fn",
]
