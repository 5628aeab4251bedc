"""Text -> tokens -> CLIP -> UNet + scheduler loop -> VAE -> image (tutorial §5.2-5.3).

Latent diffusion (Rombach et al. 2022, arXiv 2112.10752) in five steps:

1. tokenize the prompt with CLIP's BPE (`CLIPTokenizer`), pad to 77 tokens;
2. encode it: c = CLIPTextModel(tokens)[0], one 768-d (SD 1.x) vector per token;
3. start from Gaussian noise z_T ~ N(0, sigma_init^2 I) in the VAE's latent space
   (4 x H/f x W/f, f = vae_scale_factor: 8 for SD, 4 for the shipped model) and run the sampler: at each t, eps_theta(z_t, t, c) from the
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
single-file checkpoint) and the small model this package ships. Steps and w
default to the model folder's own (sampling_defaults.py: 20 and 5.0 for the
shipped model, 50 and 7.5 for Stable Diffusion).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from parti_from_scratch.diffusion.process import randn
from parti_from_scratch.outputs import ModelOutput
from parti_from_scratch.sampling_defaults import SamplingDefaults

PromptType = Union[str, Sequence[str]]
GeneratorType = Union[torch.Generator, Sequence[torch.Generator], None]

# Where the package keeps the small model it ships (see README, "The shipped model").
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"


@dataclass
class TextToImagePipelineOutput(ModelOutput):
    """`images`: a list of PIL images, an (N, H, W, 3) float array in [0, 1], or an (N, 3, H, W) tensor."""
    images: Any


class NonFiniteLatentsError(FloatingPointError):
    """Sampling produced NaN or infinite values (broken weights, or a guidance scale far too large)."""


# frames a warning must not point at: this package's own files and the wrappers that decorators
# such as torch.no_grad put between a caller and the function it called
_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
# (the file of torch.no_grad's wrapper is read off a decorated probe, wherever torch keeps it)
_WRAPPER_FILES = {os.path.realpath(f)
                  for f in (contextlib.__file__, torch.no_grad()(lambda: None).__code__.co_filename)}


def warn_at_caller(message: str, category: type = UserWarning) -> None:
    """warnings.warn(message) attributed to the first frame outside this package (the caller's own line).

    A fixed `stacklevel` breaks as soon as a decorator (torch.no_grad wraps `__call__`) or
    another of the package's functions stands between the caller and the warning, so the
    level is counted here by walking up the stack.
    """
    frame, level = sys._getframe(1), 2          # level 2 = warn_at_caller's caller
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                        or os.path.realpath(frame.f_code.co_filename) in _WRAPPER_FILES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# what separates the words of a prompt: white space and ASCII punctuation; anything else (digits,
# accented letters, CJK characters, emoji) belongs to a word and is checked against the vocabulary
_WORD_SEPARATORS = re.compile(r"[\s!-/:-@\[-`{-~]+")


def prompt_words(text: str) -> List[str]:
    """The lower-cased words of a prompt in order: "一个红色的大圆, on the LEFT" -> ["一个红色的大圆", "on", "the", "left"]."""
    return [w for w in _WORD_SEPARATORS.split(text.lower()) if w]


def _as_list(prompt: PromptType, name: str = "prompt") -> List[str]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise TypeError(f"{name} must be a str or a list of str, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError(f"{name} is an empty list: give at least one prompt")
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name} {p!r} is not valid text: {e.reason} at character {e.start}") from None
    return prompts


def preprocess_image(image: Any, vae_scale_factor: int = 8) -> torch.Tensor:
    """The `image` argument of image-to-image -> (N, 3, H, W) pixels in [-1, 1].

    Accepted: PIL images (resized down to multiples of `vae_scale_factor`, Lanczos);
    numpy arrays (H, W, 3) or (N, H, W, 3), uint8 in 0..255 or float in [0, 1];
    tensors (3, H, W) or (N, 3, H, W), uint8 in 0..255, or float in [0, 1], or in
    [-1, 1] when they hold a negative value (the convention diffusers follows).
    Arrays and tensors are not resized: H and W must be multiples of `vae_scale_factor`.
    A list holds images of one kind and size.
    """
    from PIL import Image

    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("image is an empty list: give at least one image")
    kind = next((k for k in (Image.Image, np.ndarray, torch.Tensor) if isinstance(images[0], k)), None)
    if kind is None or not all(isinstance(im, kind) for im in images):
        raise TypeError("image must be a PIL image, a numpy array or a tensor (or a list of one of them), got "
                        + ", ".join(sorted({type(im).__name__ for im in images})))
    if kind is Image.Image:
        w, h = images[0].size
        w8, h8 = (w // vae_scale_factor) * vae_scale_factor, (h // vae_scale_factor) * vae_scale_factor
        if w8 == 0 or h8 == 0:
            raise ValueError(f"image is {w}x{h} pixels, smaller than the VAE's scale factor {vae_scale_factor}")
        arrays = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (w8, h8):
                im = im.resize((w8, h8), resample=Image.LANCZOS)
            arrays.append(np.asarray(im))
        # (n, h, w, 3) uint8 -> (n, 3, h, w)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif kind is np.ndarray:
        if any(a.ndim not in (3, 4) or a.shape[-1] != 3 for a in images):
            raise ValueError(f"image: a numpy array must be (H, W, 3) or (N, H, W, 3), got shape(s) "
                             f"{', '.join(str(a.shape) for a in images)}")
        x = torch.from_numpy(np.ascontiguousarray(_concatenate([a[None] if a.ndim == 3 else a for a in images])))
        # (n, h, w, 3) -> (n, 3, h, w)
        x = x.permute(0, 3, 1, 2)
    else:
        if any(t.ndim not in (3, 4) or t.shape[-3] != 3 for t in images):
            raise ValueError(f"image: a tensor must be (3, H, W) or (N, 3, H, W), got shape(s) "
                             f"{', '.join(str(tuple(t.shape)) for t in images)}")
        x = _concatenate([t[None] if t.ndim == 3 else t for t in images])
    if x.shape[-2] % vae_scale_factor or x.shape[-1] % vae_scale_factor or 0 in x.shape:
        raise ValueError(f"image is {x.shape[-1]}x{x.shape[-2]} pixels; width and height must be positive multiples "
                         f"of the VAE's scale factor {vae_scale_factor}")
    return _pixels_to_unit_range(x, is_tensor=kind is torch.Tensor)


def _concatenate(parts: list):
    """(n_i, ...) arrays or tensors -> (sum n_i, ...), with an error naming `image` when their shapes differ."""
    if len({tuple(p.shape[1:]) for p in parts}) > 1:
        raise ValueError(f"image: the images differ in shape: {', '.join(str(tuple(p.shape[1:])) for p in parts)}")
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else torch.cat(parts)


def _pixels_to_unit_range(x: torch.Tensor, is_tensor: bool) -> torch.Tensor:
    """(N, 3, H, W) uint8 0..255 or float [0, 1] (tensors also [-1, 1]) -> float [-1, 1]."""
    if x.dtype == torch.uint8:
        # 0..255 -> [0, 1]
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise TypeError(f"image: integer pixels must be uint8 (0..255), got {x.dtype}")
    else:
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("image holds NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if is_tensor and low < 0:
            if low < -1.0 or high > 1.0:
                raise ValueError(f"image: a tensor with negative values must lie in [-1, 1], got [{low:g}, {high:g}]")
            return x          # already in [-1, 1]
        if low < 0.0 or high > 1.0:
            raise ValueError(f"image: float pixels must lie in [0, 1], got [{low:g}, {high:g}] "
                             "(for 0..255 values pass a uint8 array)")
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


# diffusers' pipeline methods this pipeline deliberately leaves out, and what to do instead
_ATTENTION = ("attention already runs through torch.nn.functional.scaled_dot_product_attention, which picks a "
              "memory-efficient kernel by itself; to use less memory, generate fewer images per call")
_OFFLOAD = ("the models stay where pipe.to(device) puts them; move single components yourself, e.g. "
            "pipe.text_encoder.to('cpu') after encoding, since every component is an attribute")
_FREEU = "FreeU (re-weighting the UNet's skip connections) is not offered: the UNet always runs as trained"
NOT_OFFERED = {
    "enable_attention_slicing": _ATTENTION, "disable_attention_slicing": _ATTENTION,
    "enable_xformers_memory_efficient_attention": _ATTENTION, "disable_xformers_memory_efficient_attention": _ATTENTION,
    "enable_model_cpu_offload": _OFFLOAD, "enable_sequential_cpu_offload": _OFFLOAD, "enable_group_offload": _OFFLOAD,
    "load_lora_weights": "LoRA adapters are not supported; load merged weights with from_pretrained",
    "load_textual_inversion": "textual inversion is not supported; pass prompt_embeds you computed instead",
    "load_ip_adapter": "IP-adapter image conditioning is not supported; image-to-image takes `image=`",
    "enable_freeu": _FREEU, "disable_freeu": _FREEU,
    "fuse_qkv_projections": _ATTENTION,
    "progress_bar": "the sampling bar is tqdm, set up with pipe.set_progress_bar_config(...) or progress=False",
}


def _one_of(name: str, first, second):
    """`first` or `second`, whichever is given; both given and different is an error naming `name`."""
    if first is not None and second is not None and first != second:
        raise ValueError(f"to(): two different {name}s given: {first} and {second}")
    return first if first is not None else second


def to_arguments(args: Sequence[Any], device: Union[str, torch.device, None],
                 dtype: Optional[torch.dtype]) -> Tuple[Optional[torch.device], Optional[torch.dtype]]:
    """The device and dtype of a pipeline's `to(*args, device=, dtype=)`, diffusers' way: positional arguments
    are a device (str or torch.device) and/or a torch.dtype; the dtype must be floating point."""
    for value in args:
        if isinstance(value, torch.dtype):
            dtype = _one_of("dtype", dtype, value)
        elif isinstance(value, (str, torch.device)):
            device = _one_of("device", device, value)
        else:
            raise TypeError(f"to() takes a device (str or torch.device) and/or a torch.dtype, "
                            f"got {type(value).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")
    return (torch.device(device) if device is not None else None), dtype   # an unknown device name fails here


class TextToImagePipeline:
    """The text-to-image pipeline. Components are attributes so a reader can call them one by one.

    Attributes: `tokenizer`, `text_encoder`, `unet`, `vae`, `scheduler`;
    `vae_scale_factor` = 2^(number of VAE blocks - 1) (8 for Stable Diffusion, 4 for the shipped model):
    image sizes are multiples of it; `sampling_defaults`: the steps and guidance scale a call uses
    when it names none (read from the model folder's sampling_defaults.json).
    """

    OUTPUT_TYPES = ("pil", "np", "pt", "latent")
    # what `callback_on_step_end_tensor_inputs` may name (diffusers' meaning: "prompt_embeds" is the
    # context the UNet attends to, the unconditional half first when guidance is on)
    CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds")

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, vocabulary: Optional[Sequence[str]] = None,
                 sampling_defaults: Optional[SamplingDefaults] = None):
        check_tokenizer_fits_text_encoder(tokenizer, text_encoder.config)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        # words the model was trained on (the shipped model knows a small grammar); None = open vocabulary
        self.vocabulary = set(vocabulary) if vocabulary is not None else None
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.sampling_defaults = sampling_defaults if sampling_defaults is not None else SamplingDefaults()
        self._progress_bar_config: dict = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: Union[str, Path, None] = None, *, version: Optional[str] = None,
                        prediction_type: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                        vae: Union[str, Path, None] = None, configs: Optional[dict] = None,
                        torch_dtype: Optional[torch.dtype] = None) -> "TextToImagePipeline":
        """Load a pipeline from a diffusers folder, a single-file checkpoint, or (no path) the shipped model.

        path: a folder with `model_index.json` (diffusers layout, what `save_pretrained` writes
            and what Stable Diffusion repositories contain); a `.safetensors`/`.ckpt` file in the
            original CompVis/LDM layout; or None for the package's own small model.
            A folder's `sampling_defaults.json` sets the steps and guidance scale of calls that
            name none; without it (and for single files) they are 50 and 7.5.
        dtype / torch_dtype (diffusers' name, same meaning): the weights' dtype in memory (default float32).
        version / prediction_type: for single files only ("1" or "2"; "epsilon"/"v_prediction"),
            when they cannot be inferred from the tensors.
        vae: optionally a standalone diffusers VAE folder (e.g. sd-vae-ft-mse) replacing the pipeline's.
        configs: for single files only, config values that override what is inferred from the
            tensors, per component, e.g. {"unet": {"attention_head_dim": 8}}.
        (The documented upward edge to weights_convert, which knows the file layouts.)
        """
        from weights_convert.pipeline_loader import load_pipeline
        return load_pipeline(cls, DEFAULT_MODEL_DIR if path is None else path, version=version,
                             prediction_type=prediction_type, dtype=dtype, vae=vae, configs=configs,
                             torch_dtype=torch_dtype)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write the pipeline as a diffusers folder: model_index.json, one subfolder per component and
        sampling_defaults.json (the documented upward edge to weights_convert, which knows the layout)."""
        from weights_convert.pipeline_loader import save_pipeline
        save_pipeline(self, folder)

    def to(self, *args: Union[str, torch.device, torch.dtype], device: Union[str, torch.device, None] = None,
           dtype: Optional[torch.dtype] = None, torch_device: Union[str, torch.device, None] = None,
           torch_dtype: Optional[torch.dtype] = None) -> "TextToImagePipeline":
        """Move the models to a device and/or dtype, as diffusers' pipelines do:
        `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cpu", torch.float32)`,
        `pipe.to(device=..., dtype=...)`; `torch_device` / `torch_dtype` are diffusers' older names for them."""
        device, dtype = to_arguments(args, _one_of("device", device, torch_device), _one_of("dtype", dtype, torch_dtype))
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self

    @property
    def components(self) -> dict:
        """The five models and the scheduler by name: `TextToImagePipeline(**pipe.components)` rebuilds the pipeline."""
        return {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder, "unet": self.unet,
                "vae": self.vae, "scheduler": self.scheduler}

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm settings of the sampling bar for the calls that follow, e.g. `disable=True`, `desc="..."`
        (as in diffusers; `progress=False` in a call also hides it)."""
        from tqdm.std import tqdm as base_tqdm     # tqdm.auto's class takes *args, **kwargs: read its base's
        accepted = set(inspect.signature(base_tqdm.__init__).parameters) - {"self", "iterable", "kwargs"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(f"set_progress_bar_config: tqdm takes no argument(s) {', '.join(unknown)}")
        self._progress_bar_config = dict(kwargs)

    def __getattr__(self, name: str):
        # only reached for names the pipeline does not have: diffusers' names we leave out say what to use
        if name in NOT_OFFERED:
            raise AttributeError(f"{type(self).__name__} has no {name}(): {NOT_OFFERED[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------ steps
    def warn_unknown_words(self, prompts: Sequence[str]) -> List[str]:
        """Warn about words the model never saw in training (only for models that declare a vocabulary).

        Every run of characters between spaces and ASCII punctuation is a word, so a prompt in
        another script ("一个红色的大圆在左边") is named whole. Returns the unknown words in order.
        """
        if self.vocabulary is None:
            return []
        unknown = list(dict.fromkeys(w for p in prompts for w in prompt_words(p) if w not in self.vocabulary))
        if unknown:
            known = sorted(self.vocabulary)
            listing = f"; it knows only these {len(known)} English words: {' '.join(known)}" if len(known) <= 100 \
                else ""
            warn_at_caller(f"the model never saw these words in training: {', '.join(unknown)}{listing}")
        return unknown

    @torch.no_grad()
    def encode_prompt(self, prompts: List[str], clip_skip: Optional[int] = None) -> torch.Tensor:
        """Tokens -> text states c: (n_prompts, 77, d_text), the UNet's cross-attention context."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        if not clip_skip:
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

    def default_size(self) -> int:
        """Height and width when a call names none: the UNet's sample size times vae_scale_factor."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @torch.no_grad()
    def __call__(self, prompt: Optional[PromptType] = None, negative_prompt: Optional[PromptType] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 height: Optional[int] = None, width: Optional[int] = None, generator: GeneratorType = None,
                 latents: Optional[torch.Tensor] = None, num_images_per_prompt: int = 1, output_type: str = "pil",
                 scheduler=None, image: Any = None, strength: float = 0.8, eta: float = 0.0,
                 clip_skip: Optional[int] = None, progress: bool = True, return_dict: bool = True,
                 prompt_embeds: Optional[torch.Tensor] = None, negative_prompt_embeds: Optional[torch.Tensor] = None,
                 callback_on_step_end: Optional[Callable[..., Optional[dict]]] = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)
                 ) -> Union[TextToImagePipelineOutput, tuple]:
        """Generate images for `prompt` (text-to-image), or re-noise and denoise `image` (image-to-image).

        num_inference_steps / guidance_scale: None takes the model's own (`self.sampling_defaults`).
        guidance_scale w: classifier-free guidance weight (w <= 1 turns guidance off: one UNet call per step).
        height / width: multiples of `vae_scale_factor` (default: that of `latents` if given, else the UNet's
            sample size times vae_scale_factor); a model folder that states its training resolution
            warns about other sizes.
        generator: one torch.Generator, or a list with one per image (num_prompts * num_images_per_prompt).
        latents: initial noise z_T (before scaling by init_noise_sigma), to reproduce a run exactly.
        image / strength: image-to-image; the image is encoded, noised to the timestep
            `strength` of the way along the schedule, and denoised from there.
        scheduler: a scheduler instance or name ("pndm", "ddim", "euler", "dpm", "ddpm") for this call.
        clip_skip: use the text encoder's states clip_skip layers before the last (0 or None: the last).
        output_type: "pil", "np" (N, H, W, 3) in [0, 1], "pt" (N, 3, H, W) in [0, 1], or "latent": the final
            z_0 (N, C, H/f, W/f), not decoded.
        The diffusers arguments, with diffusers' meaning:
        return_dict=False returns the tuple `(images,)` instead of the output object.
        prompt_embeds / negative_prompt_embeds: (n, tokens, d) text states used instead of encoding
            `prompt` / `negative_prompt` (e.g. from `pipe.encode_prompt`).
        callback_on_step_end(pipe, i, t, callback_kwargs): called after step i (timestep t) with
            callback_kwargs = {name: tensor} for the names in `callback_on_step_end_tensor_inputs`
            ("latents", "prompt_embeds"); a returned dict replaces those tensors for the next steps.
        Raises NonFiniteLatentsError, naming the step, when sampling produces NaN or inf.
        """
        prompts = self._prompts(prompt, prompt_embeds)
        scheduler = self._select_scheduler(scheduler)
        if num_inference_steps is None:
            num_inference_steps = self.sampling_defaults.num_inference_steps
        if guidance_scale is None:
            guidance_scale = self.sampling_defaults.guidance_scale
        # size: given, or that of the given latents, or the UNet's sample size times vae_scale_factor
        if isinstance(latents, torch.Tensor) and latents.ndim == 4 and image is None:
            height = latents.shape[-2] * self.vae_scale_factor if height is None else height
            width = latents.shape[-1] * self.vae_scale_factor if width is None else width
        height = self.default_size() if height is None else height
        width = self.default_size() if width is None else width
        n_prompts = len(prompts) if prompts is not None else _batch_size_of(prompt_embeds, "prompt_embeds")
        n_images = n_prompts * num_images_per_prompt if _is_int(num_images_per_prompt) else None
        self._check_arguments(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type, strength, image, clip_skip, generator, n_images, scheduler)
        self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if prompts is not None:
            self.warn_unknown_words(prompts)
        if image is None:
            self.warn_untrained_size(height, width)
        device, dtype = self.device, self.dtype

        # 1-2. text states c for each image; c_empty (or the negative prompt) for guidance
        do_guidance = guidance_scale > 1.0
        c = self._text_states(prompts, prompt_embeds, clip_skip, "prompt_embeds")
        if do_guidance:
            if negative_prompt_embeds is None:
                negatives = [""] * n_prompts if negative_prompt is None else _as_list(negative_prompt,
                                                                                      "negative_prompt")
                if len(negatives) == 1 and n_prompts > 1:
                    negatives = negatives * n_prompts
                if len(negatives) != n_prompts:
                    raise ValueError(f"negative_prompt has {len(negatives)} entries for {n_prompts} prompts")
            elif negative_prompt is not None:
                raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
            c_neg = self._text_states(None if negative_prompt_embeds is not None else negatives,
                                      negative_prompt_embeds, clip_skip, "negative_prompt_embeds")
            if c_neg.shape != c.shape:
                raise ValueError(f"negative_prompt_embeds has shape {tuple(c_neg.shape)}, the prompt's states "
                                 f"{tuple(c.shape)}: they must be equal")
            # (2n, L, d): unconditional half first, conditional half second
            c = torch.cat([c_neg, c])
        # one row of states per image: (n, L, d) -> (n * num_images_per_prompt, L, d), each unconditional half apart
        c = torch.cat([half.repeat_interleave(num_images_per_prompt, dim=0) for half in c.chunk(2 if do_guidance
                                                                                                   else 1)])

        # 3. the starting point z_T and the timesteps to visit
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        if image is None:
            shape = (n_images, self.unet.config.in_channels, height // self.vae_scale_factor,
                     width // self.vae_scale_factor)
            z = randn(shape, generator, dtype, device) if latents is None else self._checked_latents(latents, shape)
            # z_T ~ N(0, sigma_init^2 I): sigma_init is 1 for DDPM-type samplers, sigma_max for Euler
            z = z * scheduler.init_noise_sigma
        else:
            z, timesteps = self._noised_image_latents(image, strength, scheduler, n_images, generator, latents)

        # only DDIM takes eta; the stochastic samplers (DDPM, DDIM with eta > 0) draw from the generator(s)
        step_parameters = inspect.signature(scheduler.step).parameters
        extra = {name: value for name, value in (("eta", eta), ("generator", generator)) if name in step_parameters}
        bar = {"desc": "sampling", "leave": False, **self._progress_bar_config}
        bar["disable"] = bar.get("disable", False) or not progress
        for i, t in enumerate(tqdm(timesteps, **bar)):
            z_in = torch.cat([z, z]) if do_guidance else z
            z_in = scheduler.scale_model_input(z_in, t)
            # eps_theta(z_t, t, c)
            eps = self.unet(z_in, t, encoder_hidden_states=c).sample
            if do_guidance:
                eps_uncond, eps_text = eps.chunk(2)
                # eps_hat = eps_uncond + w * (eps_text - eps_uncond)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            z = scheduler.step(eps, t, z, **extra).prev_sample
            if callback_on_step_end is not None:
                z, c = self._run_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, z, c)
            check_finite(z, f"the latents after sampling step {i + 1} of {len(timesteps)} (t={int(t)})",
                         guidance_scale)

        if output_type == "latent":
            out = TextToImagePipelineOutput(images=z)
        else:
            # 4-5. decode: x = D(z_0 / scaling_factor), then [-1, 1] -> pixels
            x = self.vae.decode(z / self.vae.config.scaling_factor).sample
            check_finite(x, "the VAE decoder's output", guidance_scale)
            out = TextToImagePipelineOutput(images=postprocess_image(x, output_type))
        return out if return_dict else out.to_tuple()

    def warn_untrained_size(self, height: int, width: int) -> bool:
        """Warn when height x width is not the resolution the model folder says it was trained at.

        Only folders that state it (`training_resolution` in sampling_defaults.json: the shipped
        model and what `train` writes) warn; Stable Diffusion folders state none, so any size is quiet.
        """
        r = self.sampling_defaults.training_resolution
        if r is None or (height, width) == (r, r):
            return False
        warn_at_caller(f"this model was trained on {r}x{r} images only; at {height}x{width} (height x width) "
                       f"expect repeated, missing or broken objects. Leave height and width out for {r}x{r}.")
        return True

    def _prompts(self, prompt, prompt_embeds) -> Optional[List[str]]:
        """The prompts as a list, or None when `prompt_embeds` stands in for them (exactly one of the two)."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give a prompt (or prompt_embeds)")
        return _as_list(prompt) if prompt is not None else None

    def _text_states(self, prompts: Optional[List[str]], embeds: Optional[torch.Tensor], clip_skip,
                     name: str) -> torch.Tensor:
        """(n, L, d): the encoded prompts, or the given states checked against the UNet's context width."""
        if embeds is None:
            return self.encode_prompt(prompts, clip_skip).to(self.dtype)
        d = self.unet.config.cross_attention_dim
        if not isinstance(embeds, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(embeds).__name__}")
        if embeds.ndim != 3 or embeds.shape[-1] != d or 0 in embeds.shape:
            raise ValueError(f"{name} has shape {tuple(embeds.shape)}; expected (prompts, tokens, {d}), {d} being "
                             "the UNet's cross_attention_dim")
        if not bool(torch.isfinite(embeds).all()):
            raise ValueError(f"{name} holds NaN or infinite values")
        return embeds.to(self.device, self.dtype)

    def _check_callback(self, callback, tensor_inputs) -> None:
        if callback is None:
            return
        if not callable(callback):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        if isinstance(tensor_inputs, str) or not all(isinstance(k, str) for k in tensor_inputs):
            raise TypeError("callback_on_step_end_tensor_inputs must be a list of names")
        unknown = [k for k in tensor_inputs if k not in self.CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {', '.join(unknown)} not offered; "
                             f"choose from {', '.join(self.CALLBACK_TENSOR_INPUTS)}")

    def _run_callback(self, callback, tensor_inputs, i: int, t, z: torch.Tensor, c: torch.Tensor):
        """callback(pipe, i, t, {name: tensor}); a returned dict replaces the latents and/or the text states."""
        current = {"latents": z, "prompt_embeds": c}
        returned = callback(self, i, t, {k: current[k] for k in tensor_inputs})
        if returned is None:
            return z, c
        if not isinstance(returned, dict):
            raise TypeError(f"callback_on_step_end must return a dict (or None), got {type(returned).__name__}")
        unknown = sorted(set(returned) - set(self.CALLBACK_TENSOR_INPUTS))
        if unknown:
            raise ValueError(f"callback_on_step_end returned {', '.join(unknown)}; it may return "
                             f"{', '.join(self.CALLBACK_TENSOR_INPUTS)}")
        for name, old in current.items():
            new = returned.get(name, old)
            if not isinstance(new, torch.Tensor) or new.shape != old.shape:
                raise ValueError(f"callback_on_step_end returned {name} of shape "
                                 f"{tuple(getattr(new, 'shape', ()))}, expected {tuple(old.shape)}")
            current[name] = new.to(old)
        return current["latents"], current["prompt_embeds"]

    def _checked_latents(self, latents: torch.Tensor, shape: tuple) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} "
                             "(images, UNet in_channels, height / vae_scale_factor, width / vae_scale_factor)")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents hold NaN or infinite values")
        return latents.to(self.device, self.dtype)

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
            raise ValueError(f"image: got {x.shape[0]} images for {n_images} outputs")
        if isinstance(generator, (list, tuple)):
            # image i encoded with generator i, so it does not depend on the rest of the batch
            x = x.expand(n_images, -1, -1, -1) if x.shape[0] == 1 else x
            z0 = torch.cat([self.vae.encode(x[i:i + 1]).latent_dist.sample(generator[i]) for i in range(n_images)])
        else:
            z0 = self.vae.encode(x).latent_dist.sample(generator)
            z0 = z0.expand(n_images, -1, -1, -1) if z0.shape[0] == 1 else z0
        z0 = self.vae.config.scaling_factor * z0
        eps = randn(z0.shape, generator, z0.dtype, self.device) if noise is None else noise.to(z0)
        # z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps   (the forward process, closed form)
        z = scheduler.add_noise(z0, eps, timesteps[:1].repeat(n_images))
        return z, timesteps

    def _check_arguments(self, height, width, steps, guidance_scale, num_images_per_prompt, output_type, strength,
                         image, clip_skip, generator, n_images, scheduler):
        """Each argument's type and range, before any work; the error names the argument."""
        f = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < f or value % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (this model's vae_scale_factor), "
                                 f"got {value}")
        n_train = scheduler.config.num_train_timesteps
        if not _is_int(steps):
            raise TypeError(f"num_inference_steps must be an int, got {type(steps).__name__}")
        if not 1 <= steps <= n_train:
            raise ValueError(f"num_inference_steps must be from 1 to {n_train} (the schedule's training steps), "
                             f"got {steps}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise TypeError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")
        if guidance_scale < 0 or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if not _is_int(num_images_per_prompt):
            raise TypeError(f"num_images_per_prompt must be an int, got {type(num_images_per_prompt).__name__}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in self.OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {self.OUTPUT_TYPES}, got {output_type!r}")
        if image is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if clip_skip is not None:
            n_layers = self.text_encoder.config.num_hidden_layers
            if not _is_int(clip_skip):
                raise TypeError(f"clip_skip must be an int or None, got {type(clip_skip).__name__}")
            if not 0 <= clip_skip < n_layers:
                raise ValueError(f"clip_skip must be from 0 to {n_layers - 1} (the text encoder has {n_layers} "
                                 f"layers), got {clip_skip}")
        if isinstance(generator, (list, tuple)):
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("generator must be a torch.Generator or a list of them")
            if len(generator) != n_images:
                raise ValueError(f"generator: a list of {len(generator)} generators for {n_images} images; "
                                 "pass one generator, or a list with one per image")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")


def _batch_size_of(embeds: Any, name: str) -> int:
    """The number of prompts a (n, tokens, d) tensor of text states stands for."""
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise ValueError(f"{name} must be a (prompts, tokens, d) tensor, got "
                         f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
    return embeds.shape[0]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_finite(x: torch.Tensor, what: str, guidance_scale: float) -> None:
    """Raise NonFiniteLatentsError when x holds NaN or inf, naming where it appeared."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteLatentsError(f"NaN or infinite values in {what}: the model's weights may hold NaN or inf, "
                                    f"or guidance_scale={guidance_scale:g} is too large")


def check_tokenizer_fits_text_encoder(tokenizer, text_config) -> None:
    """Refuse a tokenizer whose ids or length the text encoder cannot embed (this would fail only at generation)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    n_ids = max(vocab.values()) + 1 if vocab else len(tokenizer)
    if n_ids > text_config.vocab_size:
        raise ValueError(f"the tokenizer has token ids up to {n_ids - 1}, beyond the text encoder's vocab_size "
                         f"{text_config.vocab_size}")
    max_length = tokenizer.model_max_length
    if not 1 <= max_length <= text_config.max_position_embeddings:
        raise ValueError(f"the tokenizer's model_max_length {max_length} must be from 1 to the text encoder's "
                         f"max_position_embeddings {text_config.max_position_embeddings}")
