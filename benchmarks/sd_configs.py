"""The full-size Stable Diffusion v1.5 configurations the benchmarks build (diffusers' config.json keys).

Plain dictionaries, no import of torch: benchmarks/load.py's parent process reads them and stays small.
"""

# Stable Diffusion v1.5's UNet (860M parameters): 8 heads at every level, text width 768
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# Stable Diffusion v1.x/v2.x's KL autoencoder (84M parameters): latents 8x smaller per side
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
