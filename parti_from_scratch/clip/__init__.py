"""CLIP (Radford et al. 2021, arXiv 2103.00020): tokenizer, text and vision encoders, contrastive loss. Tutorial §2.3, §3.1, §4.3."""
