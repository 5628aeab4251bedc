"""End-to-end parity (tutorial §5.3): tiny Stable Diffusion pipelines built with diffusers, saved, loaded
through our converters, generating from the same initial latents. Images in [0, 1]; tolerance 1e-4."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from parti_from_scratch import TextToImagePipeline

# end-to-end fp32 parity (tests/tolerances.py): diffusers' tiny pipelines' images drift <= 6.7e-6 from a float64 run
# (sd2, PNDM; ours 6.5e-6; every sampler, text-to-image and image-to-image); 1e-4 >= 10x (D_ours + D_ref)
TOL = 1e-4
PROMPTS = ["a red circle on the left", "an astronaut riding a horse on mars, 4k, detailed"]

SD1 = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
              norm_num_groups=16),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
              hidden_act="quick_gelu", projection_dim=32),
    prediction_type="epsilon",
    tokenizer={},
)
SD2 = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
              attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=16),
    text=dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, hidden_act="gelu",
              projection_dim=48),
    prediction_type="v_prediction",
    tokenizer=dict(pad_token="!"),     # SD 2.x tokenizers pad with "!" (id 0), as OpenCLIP does
)


def build_reference_pipeline(folder, spec, clip_vocab_dir, seed=0):
    """A tiny random diffusers StableDiffusionPipeline with CLIP's real vocabulary, saved to `folder`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, layers_per_block=1, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                                eos_token_id=49407, pad_token_id=49407, **spec["text"]))
    # random init leaves outputs tiny; scale the UNet's output layer so the samplers move visibly
    with torch.no_grad():
        unet.conv_out.weight.mul_(1)
    tokenizer = CLIPTokenizer(str(clip_vocab_dir / "vocab.json"), str(clip_vocab_dir / "merges.txt"),
                              model_max_length=77, **spec["tokenizer"])
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                              prediction_type=spec["prediction_type"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    # Stable Diffusion v1.5's scheduler_config.json also carries "clip_sample": false, a key PNDM itself
    # ignores but DDIM inherits through from_config
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "clip_sample": False}))
    pipe.folder = str(folder)
    return pipe


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipelines(request, tmp_path_factory, clip_vocab_dir):
    spec = SD1 if request.param == "sd1" else SD2
    folder = tmp_path_factory.mktemp(request.param)
    ref = build_reference_pipeline(folder, spec, clip_vocab_dir)
    ours = TextToImagePipeline.from_pretrained(folder)
    ref.version = request.param[-1]
    return ref, ours


SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
              "dpm": "DPMSolverMultistepScheduler"}


def _swap_scheduler(ref, name):
    """Give the reference the sampler `name`, built from the pipeline's saved (PNDM) config file as ours is."""
    import diffusers
    config = diffusers.PNDMScheduler.load_config(ref.folder, subfolder="scheduler")
    ref.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(config)


# (scheduler, guidance scale, negative prompt, height, width): every sampler with guidance and a negative
# prompt; guidance off; plain guidance; a non-square size whose latents (6 x 10) are not a power of two
CASES = [(name, 7.5, "blurry, low quality", 64, 64) for name in sorted(SCHEDULERS)] + [
    ("pndm", 1.0, None, 64, 64), ("euler", 7.5, None, 64, 64), ("dpm", 5.0, None, 48, 80), ("ddim", 7.5, None, 48, 80)]


@pytest.mark.parametrize("scheduler,guidance_scale,negative,height,width", CASES)
def test_text_to_image_matches_diffusers(pipelines, scheduler, guidance_scale, negative, height, width):
    ref, ours = pipelines
    _swap_scheduler(ref, scheduler)
    latents = torch.randn((2, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(1))
    negative_prompt = None if negative is None else [negative] * 2
    kw = dict(num_inference_steps=6, guidance_scale=guidance_scale, height=height, width=width, output_type="np")
    expected = ref(PROMPTS, negative_prompt=negative_prompt, latents=latents.clone(), **kw).images
    got = ours(PROMPTS, negative_prompt=negative_prompt, latents=latents.clone(), scheduler=scheduler,
               progress=False, **kw).images
    assert got.shape == expected.shape
    diff = np.abs(got - expected).max()
    assert diff <= TOL, f"{scheduler} g={guidance_scale} {height}x{width}: max abs diff {diff:.2e}"
    assert expected.std() > 1e-3  # the images are not constant: the comparison means something


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler", "dpm"])
def test_image_to_image_matches_diffusers(pipelines, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline
    ref, ours = pipelines
    _swap_scheduler(ref, scheduler)
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    kw = dict(num_inference_steps=8, strength=0.6, guidance_scale=7.5, output_type="np")
    expected = img2img(PROMPTS[0], image=init, generator=torch.Generator().manual_seed(3), **kw).images
    got = ours(PROMPTS[0], image=init, generator=torch.Generator().manual_seed(3), scheduler=scheduler,
               progress=False, **kw).images
    diff = np.abs(got - expected).max()
    assert diff <= TOL, f"img2img {scheduler}: max abs diff {diff:.2e}"


def test_same_seed_gives_identical_images(pipelines):
    _, ours = pipelines
    kw = dict(num_inference_steps=4, guidance_scale=7.5, output_type="np", progress=False)
    a = ours(PROMPTS[0], generator=torch.Generator().manual_seed(5), **kw).images
    b = ours(PROMPTS[0], generator=torch.Generator().manual_seed(5), **kw).images
    assert np.array_equal(a, b)


def test_image_does_not_depend_on_the_rest_of_the_batch(pipelines):
    _, ours = pipelines
    kw = dict(num_inference_steps=4, guidance_scale=7.5, output_type="np", progress=False)
    alone = ours(PROMPTS[0], generator=[torch.Generator().manual_seed(7)], **kw).images
    batch = ours([PROMPTS[1], PROMPTS[0]], generator=[torch.Generator().manual_seed(9),
                                                       torch.Generator().manual_seed(7)], **kw).images
    # two float32 runs of the whole pipeline over batches of different sizes (other summation orders): each
    # drifts up to 4.1e-6 from float64 (sd2; measured 4.9e-6 apart), so the end-to-end TOL, not 1e-5
    assert np.abs(batch[1] - alone[0]).max() <= TOL


def test_components_are_attributes(pipelines):
    _, ours = pipelines
    for name in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert getattr(ours, name) is not None
    assert ours.vae_scale_factor == 8


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(height=60), ValueError, "height must be a positive multiple of 8"),
    (dict(width=36), ValueError, "width must be a positive multiple of 8"),   # a multiple of 4 is not enough here
    (dict(height=0), ValueError, "height must be a positive multiple of 8"),
    (dict(height=-8), ValueError, "height must be a positive multiple of 8"),
    (dict(height=64.0), TypeError, "height must be an int"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be from 1 to 1000"),
    (dict(num_inference_steps=5000), ValueError, "num_inference_steps must be from 1 to 1000"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
    (dict(output_type="jpeg"), ValueError, "output_type"),
    (dict(scheduler="heun"), ValueError, "unknown scheduler"),
    (dict(clip_skip=100), ValueError, "clip_skip must be from 0 to"),
    (dict(clip_skip=-1), ValueError, "clip_skip must be from 0 to"),
    (dict(prompt=[]), ValueError, "prompt is an empty list"),
    (dict(prompt=["a", 3]), TypeError, "prompt must be a str or a list of str"),
    (dict(prompt="a red \udcff circle"), ValueError, "prompt .* is not valid text"),
    (dict(image=[]), ValueError, "image is an empty list"),
    (dict(image=np.zeros((64, 64), np.float32)), ValueError, "image: a numpy array must be"),
    (dict(image=torch.zeros(1, 4, 64, 64)), ValueError, "image: a tensor must be"),
    (dict(image=torch.full((1, 3, 64, 64), -0.5).expand(1, 3, 64, 64) * 4), ValueError, "must lie in \\[-1, 1\\]"),
    (dict(image=np.full((64, 64, 3), 200.0, np.float32)), ValueError, "float pixels must lie in \\[0, 1\\]"),
    (dict(image=np.zeros((64, 64, 3), np.int32)), TypeError, "integer pixels must be uint8"),
    (dict(image=np.zeros((60, 64, 3), np.uint8)), ValueError, "multiples of the VAE's scale factor 8"),
    (dict(image="cat.png"), TypeError, "image must be a PIL image"),
    (dict(prompt=PROMPTS, generator=[torch.Generator().manual_seed(0)]), ValueError,
     "generator: a list of 1 generators for 2 images"),
    (dict(num_images_per_prompt=2, generator=[torch.Generator()] * 3), ValueError, "3 generators for 2 images"),
    (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), ValueError, "latents hold NaN"),
    (dict(latents=torch.zeros(1, 3, 8, 8)), ValueError, "latents have shape"),
    (dict(latents=torch.zeros(1, 4, 8, 8), height=32), ValueError, "latents have shape"),
])
def test_bad_arguments_are_refused(pipelines, kwargs, error, message):
    _, ours = pipelines
    kwargs = {"prompt": PROMPTS[0], **kwargs}
    with pytest.raises(error, match=message):
        ours(progress=False, num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


def test_sizes_follow_the_vae_scale_factor(pipelines):
    """A size other than the default 64 x 64, a multiple of vae_scale_factor (8 here): 16 x 32 -> 2 x 4 latents."""
    _, ours = pipelines
    assert ours.vae_scale_factor == 8
    images = ours(PROMPTS[0], height=16, width=32, num_inference_steps=2, output_type="np", progress=False,
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 32, 3)


def test_uint8_images_are_rescaled_to_minus_one_one():
    """x = 2 u / 255 - 1 for uint8 pixels u, whether they come as an array, a tensor or a PIL image.
    Tolerance: one float32 rounding of a value in [-1, 1] (2^-24 relative, so 1.2e-7 absolute)."""
    from PIL import Image

    from parti_from_scratch.pipeline import preprocess_image
    u = np.random.default_rng(0).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    expected = torch.from_numpy(2.0 * u.astype(np.float64) / 255.0 - 1.0).permute(2, 0, 1)[None].float()
    for image in (u, torch.from_numpy(u).permute(2, 0, 1), Image.fromarray(u), [u], u[None]):
        got = preprocess_image(image, vae_scale_factor=8)
        torch.testing.assert_close(got, expected, rtol=0, atol=1.2e-7)
    # a float array in [0, 1] gives the same numbers
    torch.testing.assert_close(preprocess_image(u / 255.0, 8), expected, rtol=0, atol=1.2e-7)


def test_folder_without_sampling_defaults_keeps_50_steps_and_guidance_7_5(pipelines):
    from parti_from_scratch.sampling_defaults import FILE_NAME
    ref, ours = pipelines
    assert not (Path(ref.folder) / FILE_NAME).exists()
    assert (ours.sampling_defaults.num_inference_steps, ours.sampling_defaults.guidance_scale) == (50, 7.5)


def test_call_without_sampler_arguments_uses_the_pipelines_defaults(pipelines):
    from parti_from_scratch.sampling_defaults import SamplingDefaults
    _, ours = pipelines
    saved = ours.sampling_defaults
    try:
        ours.sampling_defaults = SamplingDefaults(num_inference_steps=3, guidance_scale=2.0)
        implicit = ours(PROMPTS[0], generator=torch.Generator().manual_seed(1), output_type="np",
                        progress=False).images
    finally:
        ours.sampling_defaults = saved
    explicit = ours(PROMPTS[0], num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1),
                    output_type="np", progress=False).images
    assert np.array_equal(implicit, explicit)
    other = ours(PROMPTS[0], num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(1),
                 output_type="np", progress=False).images
    assert not np.array_equal(implicit, other)


def test_sampling_defaults_round_trip_through_a_folder(pipelines, tmp_path):
    from parti_from_scratch.sampling_defaults import FILE_NAME, SamplingDefaults
    ref, ours = pipelines
    saved = ours.sampling_defaults
    try:
        ours.sampling_defaults = SamplingDefaults(num_inference_steps=12, guidance_scale=3.5)
        ours.save_pretrained(tmp_path / "saved")
    finally:
        ours.sampling_defaults = saved
    assert json.loads((tmp_path / "saved" / FILE_NAME).read_text()) == {"num_inference_steps": 12,
                                                                         "guidance_scale": 3.5}
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "saved")
    assert loaded.sampling_defaults == SamplingDefaults(num_inference_steps=12, guidance_scale=3.5)


@pytest.mark.parametrize("content,message", [
    ('{"num_inference_steps": 0}', "num_inference_steps must be an integer >= 1"),
    ('{"num_inference_steps": "20"}', "num_inference_steps must be an integer >= 1"),
    ('{"guidance_scale": Infinity}', "guidance_scale must be a finite number"),
    ('{"steps": 20}', "unknown key"),
    ('[20, 5.0]', "expected a JSON object"),
    ('{"num_inference_steps": 20,', "not a JSON file"),
])
def test_bad_sampling_defaults_file_is_refused_with_its_name(pipelines, tmp_path, content, message):
    import shutil

    from parti_from_scratch.sampling_defaults import FILE_NAME
    ref, _ = pipelines
    folder = tmp_path / "model"
    shutil.copytree(ref.folder, folder)
    (folder / FILE_NAME).write_text(content)
    with pytest.raises(ValueError, match=f"{FILE_NAME}.*{message}"):
        TextToImagePipeline.from_pretrained(folder)


def test_initial_noise_comes_from_the_one_noise_helper(pipelines):
    """The pipeline's z_T is process.randn's draw for the generator(s), so passing that draw as latents
    reproduces the image exactly."""
    from parti_from_scratch.diffusion.process import randn
    _, ours = pipelines
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np", progress=False)
    drawn = ours(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (4, 5)], **kw).images
    noise = randn((2, 4, 8, 8), [torch.Generator().manual_seed(s) for s in (4, 5)], torch.float32)
    given = ours(PROMPTS, latents=noise, **kw).images
    assert np.array_equal(drawn, given)


def test_non_finite_latents_stop_sampling_at_their_step(pipelines):
    import copy

    from parti_from_scratch.pipeline import NonFiniteLatentsError
    _, ours = pipelines
    # guidance so large that eps_hat overflows float32 at the first step
    with pytest.raises(NonFiniteLatentsError, match="sampling step 1 of "):
        ours(PROMPTS[0], num_inference_steps=3, guidance_scale=1e300, progress=False)
    # NaN weights in the UNet
    broken = copy.copy(ours)
    broken.unet = copy.deepcopy(ours.unet)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLatentsError, match="sampling step 1 of .*weights"):
        broken(PROMPTS[0], num_inference_steps=3, progress=False)


def test_tokenizer_that_the_text_encoder_cannot_embed_is_refused(pipelines, tmp_path):
    import copy
    import shutil

    from parti_from_scratch.clip.model import CLIPTextConfig, CLIPTextModel
    _, ours = pipelines
    config = ours.text_encoder.config
    small = CLIPTextModel(CLIPTextConfig(**{**config.__dict__, "vocab_size": 1000}))
    with pytest.raises(ValueError, match="token ids up to 49407, beyond the text encoder's vocab_size 1000"):
        TextToImagePipeline(ours.tokenizer, small, ours.unet, ours.vae, ours.scheduler)
    for max_length in (500, 0, -1):
        odd = copy.copy(ours.tokenizer)
        odd.model_max_length = max_length
        with pytest.raises(ValueError, match=f"model_max_length {max_length} must be from 1 to .* "
                                             "max_position_embeddings 77"):
            TextToImagePipeline(odd, ours.text_encoder, ours.unet, ours.vae, ours.scheduler)
    # from a folder: the error names the folder
    ref, _ = pipelines
    folder = tmp_path / "model"
    shutil.copytree(ref.folder, folder)
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_max_length": 500}))
    with pytest.raises(ValueError, match=f"{folder}.*max_position_embeddings"):
        TextToImagePipeline.from_pretrained(folder)


def test_single_file_checkpoint_matches_diffusers(pipelines, tmp_path):
    """The reference pipeline's weights exported to one LDM-layout file (an exporter validated against
    diffusers' own single-file loader in test_weights_convert_ldm.py) load into our pipeline and generate the
    same images. Head and group counts of these tiny models are not SD's: they are given as config overrides."""
    from weights_convert.ldm_checkpoint import diffusers_to_ldm, save_ldm_checkpoint
    ref, _ = pipelines
    path = tmp_path / "tiny-sd.safetensors"
    save_ldm_checkpoint(path, ref.unet.state_dict(), ref.vae.state_dict(), ref.text_encoder.state_dict(),
                        ref.version)
    heads = ref.unet.config.attention_head_dim
    ours = TextToImagePipeline.from_pretrained(
        path, prediction_type=ref.scheduler.config.prediction_type,
        configs={"unet": {"attention_head_dim": list(heads) if isinstance(heads, (list, tuple)) else heads,
                          "norm_num_groups": ref.unet.config.norm_num_groups},
                 "vae": {"norm_num_groups": ref.vae.config.norm_num_groups},
                 "text_encoder": {"num_attention_heads": ref.text_encoder.config.num_attention_heads}})
    _swap_scheduler(ref, "pndm")
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    kw = dict(num_inference_steps=6, guidance_scale=7.5, output_type="np")
    expected = ref(PROMPTS, latents=latents.clone(), **kw).images
    got = ours(PROMPTS, latents=latents.clone(), progress=False, **kw).images
    diff = np.abs(got - expected).max()
    assert diff <= TOL, f"single file: max abs diff {diff:.2e}"
    # a single file states no sampling defaults: Stable Diffusion's customary 50 steps and guidance 7.5
    assert (ours.sampling_defaults.num_inference_steps, ours.sampling_defaults.guidance_scale) == (50, 7.5)
