"""Text -> tokens -> CLIP -> UNet + scheduler loop -> VAE -> image (tutorial §5.2-5.3).

Latent diffusion (Rombach et al. 2022, arXiv 2112.10752) in five steps:

1. tokenize the prompt with CLIP's BPE (`CLIPTokenizer`), pad to 77 tokens;
2. encode it: c = CLIPTextModel(tokens)[0], one 768-d (SD 1.x) vector per token;
3. start from Gaussian noise z_T ~ N(0, sigma_init^2 I) in the VAE's latent space
   (4 x H/8 x W/8) and run the sampler: at each t, eps_theta(z_t, t, c) from the
   UNet, then z_{t-1} = scheduler.step(eps_theta, t, z_t);
4. decode: x = VAE.decode(z_0 / scaling_factor);
5. map x from [-1, 1] to [0, 1] pixels.

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) changes step 3:

    eps_hat = eps_theta(z_t, t, c_empty) + w * (eps_theta(z_t, t, c) - eps_theta(z_t, t, c_empty))

The tutorial's loop calls the UNet once, with the prompt only (w = 1). A model
trained with caption dropout learns both the conditional and unconditional
noise; their difference is the direction "towards the prompt". With w = 1
the sampler follows the conditional score alone, which spreads probability
over everything loosely compatible with the text: the image comes out
washed-out, low-contrast and only vaguely on-prompt. w = 7.5 extrapolates
past the conditional prediction, trading diversity for fidelity.

The same class serves Stable Diffusion weights (a diffusers folder or a
single-file checkpoint) and the small model this package ships.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

PromptType = Union[str, Sequence[str]]
GeneratorType = Union[torch.Generator, Sequence[torch.Generator], None]

# Where the package keeps the small model it ships (see README, "The shipped model").
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"


@dataclass
class TextToImagePipelineOutput:
    """`images`: a list of PIL images, an (N, H, W, 3) float array in [0, 1], or an (N, 3, H, W) tensor."""
    images: Any

    def __getitem__(self, i):
        return (self.images,)[i]


def _as_list(prompt: PromptType) -> List[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")


def randn_latents(shape: Sequence[int], generator: GeneratorType = None, dtype: torch.dtype = torch.float32,
                  device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Standard normal noise of `shape`; with a list of generators, image i draws from generator i.

    One generator per image makes each image a function of its own seed only,
    independent of what else is in the batch.
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]} images")
            # (1, c, h, w) per image -> (n, c, h, w)
            return torch.cat([torch.randn((1,) + shape[1:], generator=g, dtype=dtype) for g in generator]).to(device)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def preprocess_image(image: Any, vae_scale_factor: int = 8) -> torch.Tensor:
    """A PIL image, an (H, W, 3)/(N, H, W, 3) array in [0, 1] or an (N, 3, H, W) tensor -> (N, 3, H, W) in [-1, 1].

    Sizes are rounded down to a multiple of `vae_scale_factor` (Lanczos resize for PIL images).
    """
    from PIL import Image

    images = image if isinstance(image, (list, tuple)) else [image]
    if isinstance(images[0], Image.Image):
        w, h = images[0].size
        w8, h8 = (w // vae_scale_factor) * vae_scale_factor, (h // vae_scale_factor) * vae_scale_factor
        arrays = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (w8, h8):
                im = im.resize((w8, h8), resample=Image.LANCZOS)
            arrays.append(np.asarray(im).astype(np.float32) / 255.0)
        # (n, h, w, 3) -> (n, 3, h, w)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif isinstance(images[0], np.ndarray):
        arr = np.concatenate(images) if images[0].ndim == 4 else np.stack(images)
        x = torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2)
    elif isinstance(images[0], torch.Tensor):
        x = torch.cat(images) if images[0].ndim == 4 else torch.stack(images)
        x = x.float()
        if x.min() < 0:      # already in [-1, 1]
            return x
    else:
        raise TypeError(f"image must be a PIL image, a numpy array or a tensor, got {type(images[0]).__name__}")
    if x.shape[1] != 3:
        raise ValueError(f"image must have 3 channels, got shape {tuple(x.shape)}")
    # [0, 1] -> [-1, 1]
    return 2.0 * x - 1.0


def postprocess_image(x: torch.Tensor, output_type: str = "pil"):
    """(N, 3, H, W) in [-1, 1] -> PIL images, an (N, H, W, 3) float array in [0, 1] ("np"), or a tensor ("pt")."""
    # [-1, 1] -> [0, 1]
    x = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return x
    arr = x.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return arr
    from PIL import Image
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


class TextToImagePipeline:
    """The text-to-image pipeline. Components are attributes so a reader can call them one by one.

    Attributes: `tokenizer`, `text_encoder`, `unet`, `vae`, `scheduler`;
    `vae_scale_factor` = 2^(number of VAE blocks - 1) (8 for Stable Diffusion).
    """

    OUTPUT_TYPES = ("pil", "np", "pt")

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, vocabulary: Optional[Sequence[str]] = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        # words the model was trained on (the shipped model knows a small grammar); None = open vocabulary
        self.vocabulary = set(vocabulary) if vocabulary is not None else None
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: Union[str, Path, None] = None, *, version: Optional[str] = None,
                        prediction_type: Optional[str] = None, dtype: torch.dtype = torch.float32,
                        vae: Union[str, Path, None] = None,
                        configs: Optional[dict] = None) -> "TextToImagePipeline":
        """Load a pipeline from a diffusers folder, a single-file checkpoint, or (no path) the shipped model.

        path: a folder with `model_index.json` (diffusers layout, what `save_pretrained` writes
            and what Stable Diffusion repositories contain); a `.safetensors`/`.ckpt` file in the
            original CompVis/LDM layout; or None for the package's own small model.
        version / prediction_type: for single files only ("1" or "2"; "epsilon"/"v_prediction"),
            when they cannot be inferred from the tensors.
        vae: optionally a standalone diffusers VAE folder (e.g. sd-vae-ft-mse) replacing the pipeline's.
        configs: for single files only, config values that override what is inferred from the
            tensors, per component, e.g. {"unet": {"attention_head_dim": 8}}.
        """
        from weights_convert.pipeline_loader import load_pipeline_components

        parts = load_pipeline_components(DEFAULT_MODEL_DIR if path is None else path, version=version,
                                         prediction_type=prediction_type, dtype=dtype, configs=configs)
        if vae is not None:
            from parti_from_scratch.vae import AutoencoderKL
            parts["vae"] = AutoencoderKL.from_pretrained(vae, dtype=dtype)
        return cls(**parts)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write the pipeline as a diffusers folder (model_index.json + one subfolder per component)."""
        from weights_convert.pipeline_loader import save_pipeline
        save_pipeline(self, folder)

    def to(self, device: Union[str, torch.device]) -> "TextToImagePipeline":
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------ steps
    def warn_unknown_words(self, prompts: Sequence[str]) -> List[str]:
        """Warn about words the model never saw in training (only for models that declare a vocabulary)."""
        if self.vocabulary is None:
            return []
        import re
        unknown = sorted({w for p in prompts for w in re.findall(r"[a-z]+", p.lower())} - self.vocabulary)
        if unknown:
            warnings.warn(f"the model never saw these words in training: {', '.join(unknown)}", stacklevel=3)
        return unknown

    @torch.no_grad()
    def encode_prompt(self, prompts: List[str], clip_skip: Optional[int] = None) -> torch.Tensor:
        """Tokens -> text states c: (n_prompts, 77, d_text), the UNet's cross-attention context."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        if clip_skip is None:
            return self.text_encoder(ids)[0]
        # "clip skip": take an earlier layer's states, then the final LayerNorm as the last layer would
        out = self.text_encoder(ids, output_hidden_states=True)
        return self.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])

    def _select_scheduler(self, scheduler):
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, str):
            from parti_from_scratch.diffusion.schedulers import SCHEDULERS
            if scheduler not in SCHEDULERS:
                raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
            return SCHEDULERS[scheduler].from_config(self.scheduler.config)
        return scheduler

    @torch.no_grad()
    def __call__(self, prompt: PromptType, negative_prompt: Optional[PromptType] = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: Optional[int] = None,
                 width: Optional[int] = None, generator: GeneratorType = None,
                 latents: Optional[torch.Tensor] = None, num_images_per_prompt: int = 1, output_type: str = "pil",
                 scheduler=None, image: Any = None, strength: float = 0.8, eta: float = 0.0,
                 clip_skip: Optional[int] = None, progress: bool = True) -> TextToImagePipelineOutput:
        """Generate images for `prompt` (text-to-image), or re-noise and denoise `image` (image-to-image).

        guidance_scale w: classifier-free guidance weight (w <= 1 turns guidance off: one UNet call per step).
        generator: one torch.Generator, or a list with one per image (num_prompts * num_images_per_prompt).
        latents: initial noise z_T (before scaling by init_noise_sigma), to reproduce a run exactly.
        image / strength: image-to-image; the image is encoded, noised to the timestep
            `strength` of the way along the schedule, and denoised from there.
        scheduler: a scheduler instance or name ("pndm", "ddim", "euler", "dpm", "ddpm") for this call.
        """
        prompts = _as_list(prompt)
        scheduler = self._select_scheduler(scheduler)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self._check_arguments(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type, strength, image)
        self.warn_unknown_words(prompts)
        n_images = len(prompts) * num_images_per_prompt
        device, dtype = self.device, self.dtype

        # 1-2. text states c for each image; c_empty (or the negative prompt) for guidance
        do_guidance = guidance_scale > 1.0
        c = self.encode_prompt(prompts, clip_skip).to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if do_guidance:
            negatives = [""] * len(prompts) if negative_prompt is None else _as_list(negative_prompt)
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
            c_neg = self.encode_prompt(negatives).to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
            # (2n, 77, d): unconditional half first, conditional half second
            c = torch.cat([c_neg, c])

        # 3. the starting point z_T and the timesteps to visit
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        if image is None:
            shape = (n_images, self.unet.config.in_channels, height // self.vae_scale_factor,
                     width // self.vae_scale_factor)
            z = randn_latents(shape, generator, dtype, device) if latents is None else latents.to(device, dtype)
            # z_T ~ N(0, sigma_init^2 I): sigma_init is 1 for DDPM-type samplers, sigma_max for Euler
            z = z * scheduler.init_noise_sigma
        else:
            z, timesteps = self._noised_image_latents(image, strength, scheduler, n_images, generator, latents)

        # only DDIM takes eta; the stochastic samplers (DDPM, DDIM with eta > 0) draw from the generator(s)
        step_parameters = inspect.signature(scheduler.step).parameters
        extra = {name: value for name, value in (("eta", eta), ("generator", generator)) if name in step_parameters}
        for t in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
            z_in = torch.cat([z, z]) if do_guidance else z
            z_in = scheduler.scale_model_input(z_in, t)
            # eps_theta(z_t, t, c)
            eps = self.unet(z_in, t, encoder_hidden_states=c).sample
            if do_guidance:
                eps_uncond, eps_text = eps.chunk(2)
                # eps_hat = eps_uncond + w * (eps_text - eps_uncond)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            z = scheduler.step(eps, t, z, **extra).prev_sample

        # 4-5. decode: x = D(z_0 / scaling_factor), then [-1, 1] -> pixels
        x = self.vae.decode(z / self.vae.config.scaling_factor).sample
        return TextToImagePipelineOutput(images=postprocess_image(x, output_type))

    def _noised_image_latents(self, image, strength, scheduler, n_images, generator, noise):
        """Image-to-image start: z_0 = scaling_factor * E(x), then z_t ~ q(z_t | z_0) at t = strength * T."""
        x = preprocess_image(image, self.vae_scale_factor).to(self.device, self.dtype)
        n_steps = len(scheduler.timesteps) // scheduler.order
        init_steps = min(int(n_steps * strength), n_steps)
        t_start = max(n_steps - init_steps, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if len(timesteps) == 0:
            raise ValueError(f"strength={strength} leaves no denoising step with {n_steps} inference steps")
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        if x.shape[0] not in (1, n_images):
            raise ValueError(f"got {x.shape[0]} images for {n_images} outputs")
        if isinstance(generator, (list, tuple)) and len(generator) > 1:
            x = x.expand(n_images, -1, -1, -1) if x.shape[0] == 1 else x
            z0 = torch.cat([self.vae.encode(x[i:i + 1]).latent_dist.sample(generator[i]) for i in range(n_images)])
        else:
            z0 = self.vae.encode(x).latent_dist.sample(generator)
            z0 = z0.expand(n_images, -1, -1, -1) if z0.shape[0] == 1 else z0
        z0 = self.vae.config.scaling_factor * z0
        eps = randn_latents(z0.shape, generator, z0.dtype, self.device) if noise is None else noise.to(z0)
        # z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps   (the forward process, closed form)
        z = scheduler.add_noise(z0, eps, timesteps[:1].repeat(n_images))
        return z, timesteps

    def _check_arguments(self, height, width, steps, guidance_scale, num_images_per_prompt, output_type, strength,
                         image):
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        if guidance_scale < 0 or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in self.OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {self.OUTPUT_TYPES}, got {output_type!r}")
        if image is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
