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
    value_chroma.py tokens that factor into structure x colour (`ValueChromaVQModel`): a
                    VQGAN of the value, a colour code per token (the shipped Parti's tokenizer)
    transformer.py  the encoder-decoder Transformer (`PartiTransformer`): p(y | x) =
                    prod_i p(y_i | y_<i, x), Parti's pre-LN block and DALL·E mini's, KV cache
    sampling.py     classifier-free guidance on logits, temperature, top-k, top-p, and the
                    cached generation loop `generate_image_tokens`
    text_tokenizer.py  the prompt's byte-level BPE in BART's files (`PartiTextTokenizer`),
                    min-dalle's normalization (clip/bpe.py's merge loop)
    reranking.py    keep the candidate CLIP scores closest to the prompt (`rerank_by_clip_score`)

The pipeline that chains them is `parti_from_scratch.parti_pipeline.PartiPipeline`.

It imports `parti_from_scratch.nn` (and `clip` for reranking) and nothing
above them.
"""
