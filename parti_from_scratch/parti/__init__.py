"""The real Parti (Yu et al. 2022, arXiv 2206.10789): images as sequences of discrete tokens.

Parti does not denoise. An image tokenizer (a VQGAN; in the paper a ViT-VQGAN,
Yu et al. 2021, arXiv 2110.04627) turns a picture into a grid of codebook
indices, and an encoder-decoder Transformer writes those indices one at a
time from the text, like a translation. This package is that chapter:

    quantize.py     vector quantisation: nearest code, straight-through
                    estimator, VQ-VAE loss, EMA codebook, dead-code restarts,
                    codebook usage and perplexity
    vqgan.py        the convolutional VQGAN tokenizer (`VQModel`, diffusers'
                    config keys): image -> latents -> indices (b, h, w) -> image
    vit_vqgan.py    ViT-VQGAN, the tokenizer of the Parti paper (`ViTVQModel`): 8x8
                    patches, ViT encoder and decoder, factorised l2-normalised codes

It imports `parti_from_scratch.nn` (and `clip` for reranking) and nothing
above them.
"""
