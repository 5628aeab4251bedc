"""What a diffusers user types works here with the same meaning, checked against diffusers' own pipeline on a
tiny random Stable Diffusion (tests/test_pipeline.py builds it); what we leave out says what to use instead;
warnings about what the model does not know (words, sizes) point at the caller's line."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from parti_from_scratch import TextToImagePipeline
from parti_from_scratch.pipeline import NOT_OFFERED, prompt_words
from test_pipeline import SD1, TOL, build_reference_pipeline

PROMPTS = ["a red circle on the left", "an astronaut riding a horse on mars, 4k, detailed"]
# end-to-end latents z_0 (|z| up to 21 on this setup), before decoding: diffusers' float32 run drifts 1.8e-5
# from its float64 run, ours 1.5e-5; the suite's rule, 10x (D_ours + D_ref), gives 3.3e-4
LATENT_TOL = 4e-4
# the same comparison with both pipelines in float64: LATENT_TOL scaled by EPS64 / EPS32 = 2^-29 (measured 5.4e-14)
LATENT_TOL_64 = LATENT_TOL * 2.0 ** -29


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, clip_vocab_dir):
    folder = tmp_path_factory.mktemp("sd1")
    ref = build_reference_pipeline(folder, SD1, clip_vocab_dir)
    return ref, TextToImagePipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def shipped():
    return TextToImagePipeline.from_pretrained()


def _latents(seed=1, n=2, size=8):
    return torch.randn((n, 4, size, size), generator=torch.Generator().manual_seed(seed))


KW = dict(num_inference_steps=4, guidance_scale=7.5)


# ----------------------------------------------------------------------------------------------- warnings

def _warning_from(call, match):
    """Run call(); return the one warning whose text contains `match` and call's result. Asserts the warning
    points at the line of `call` itself (a lambda in this file): torch.no_grad's wrapper and the package's
    own frames are skipped."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = call()
    found = [w for w in record if match in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in record]
    assert (found[0].filename, found[0].lineno) == (__file__, call.__code__.co_firstlineno)
    return found[0], result


def test_unknown_word_warning_points_at_the_callers_line(shipped):
    w, _ = _warning_from(lambda: shipped("a purple dragon on the left", num_inference_steps=1, output_type="latent",
                                         progress=False), "never saw these words")
    assert "purple, dragon;" in str(w.message)              # named in the order they appear


def test_prompt_in_another_script_warns_naming_its_characters(shipped):
    w, _ = _warning_from(lambda: shipped("一个红色的大圆在左边", num_inference_steps=1, output_type="latent",
                                         progress=False), "never saw these words")
    assert "一个红色的大圆在左边" in str(w.message) and "English words: a and at blue" in str(w.message)


def test_prompt_words_split_at_spaces_and_ascii_punctuation_only():
    assert prompt_words("A red circle, on the LEFT.") == ["a", "red", "circle", "on", "the", "left"]
    assert prompt_words("一个红色的大圆在左边") == ["一个红色的大圆在左边"]
    assert prompt_words("a café 🔴 at top-left, 4k") == ["a", "café", "🔴", "at", "top", "left", "4k"]


def test_known_words_at_the_trained_size_give_no_warning(shipped):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped("a large red circle on the left", height=64, width=64, num_inference_steps=1,
                output_type="latent", progress=False)


def test_other_size_warns_with_the_training_resolution(shipped):
    assert shipped.sampling_defaults.training_resolution == 64
    _, out = _warning_from(lambda: shipped("a red circle on the left", height=128, num_inference_steps=1,
                                           output_type="latent", progress=False),
                           "trained on 64x64 images only; at 128x64")
    assert out.images.shape == (1, 4, 32, 16)          # still generated: a warning, not an error


def test_folder_without_a_training_resolution_never_warns_about_size(pipelines):
    """Stable Diffusion folders state no training size (SD 2.x runs at 512 and 768 alike): no size warning."""
    _, ours = pipelines
    assert ours.sampling_defaults.training_resolution is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(PROMPTS[0], height=32, width=48, output_type="latent", progress=False, **KW)


# ----------------------------------------------------------------------------------------------- the idioms

def test_output_type_latent_equals_diffusers_latents(pipelines):
    ref, ours = pipelines
    kw = dict(KW, output_type="latent")
    expected = ref(PROMPTS, latents=_latents(), **kw).images
    got = ours(PROMPTS, latents=_latents(), progress=False, **kw).images
    assert got.shape == expected.shape == (2, 4, 8, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=LATENT_TOL)
    # decoding them as the pipeline does gives its "pt" output exactly: the same operations on the same tensors
    decoded = (ours.vae.decode(got / ours.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    images = ours(PROMPTS, latents=_latents(), progress=False, **dict(KW, output_type="pt")).images
    assert torch.equal(decoded, images)


def test_output_types_pil_np_pt_hold_the_same_pixels(pipelines):
    _, ours = pipelines
    out = {t: ours(PROMPTS[0], latents=_latents(n=1), output_type=t, progress=False, **KW).images
           for t in ("pil", "np", "pt")}
    assert out["pt"].shape == (1, 3, 64, 64) and out["np"].shape == (1, 64, 64, 3)
    assert np.array_equal(out["pt"].permute(0, 2, 3, 1).numpy(), out["np"])
    assert np.array_equal(np.asarray(out["pil"][0]), (out["np"][0] * 255).round().astype(np.uint8))


def test_return_dict_false_returns_a_tuple(pipelines):
    ref, ours = pipelines
    as_tuple = ours(PROMPTS[0], latents=_latents(n=1), output_type="np", progress=False, return_dict=False, **KW)
    as_object = ours(PROMPTS[0], latents=_latents(n=1), output_type="np", progress=False, **KW)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert np.array_equal(as_tuple[0], as_object.images)
    # diffusers' tuple is (images, nsfw flags); the images come first in both
    expected = ref(PROMPTS[0], latents=_latents(n=1), output_type="np", return_dict=False, **KW)
    assert isinstance(expected, tuple) and np.abs(expected[0] - as_tuple[0]).max() <= TOL


def test_prompt_embeds_give_the_prompts_image(pipelines):
    ref, ours = pipelines
    kw = dict(KW, output_type="np", num_images_per_prompt=2)
    latents = _latents(n=4)
    from_text = ours(PROMPTS, negative_prompt=["blurry", "dark"], latents=latents, progress=False, **kw).images
    c, c_neg = ours.encode_prompt(PROMPTS), ours.encode_prompt(["blurry", "dark"])
    from_states = ours(prompt_embeds=c, negative_prompt_embeds=c_neg, latents=latents, progress=False, **kw).images
    # the same operations on the same tensors
    assert np.array_equal(from_text, from_states)
    expected = ref(prompt_embeds=c, negative_prompt_embeds=c_neg, latents=latents, **kw).images
    assert np.abs(expected - from_states).max() <= TOL
    # without negative_prompt_embeds the empty prompt's states are the unconditional half, as in diffusers
    plain = ours(PROMPTS, latents=latents, progress=False, **kw).images
    assert np.array_equal(plain, ours(prompt_embeds=c, latents=latents, progress=False, **kw).images)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(prompt="a", prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "prompt or prompt_embeds, not both"),
    (dict(prompt=None), ValueError, "give a prompt"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 48)), ValueError, "cross_attention_dim"),
    (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), ValueError, "prompt_embeds must be a"),
    (dict(negative_prompt_embeds=torch.zeros(2, 77, 32)), ValueError, "must be equal"),
    (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "not both"),
    (dict(callback_on_step_end_tensor_inputs=["noise_pred"], callback_on_step_end=lambda *a: None),
     ValueError, "noise_pred not offered; choose from latents, prompt_embeds"),
    (dict(callback_on_step_end=lambda *a: {"latents": torch.zeros(3)}), ValueError, "latents of shape"),
    (dict(callback_on_step_end=lambda *a: {"noise": torch.zeros(3)}), ValueError, "returned noise"),
    (dict(callback_on_step_end=lambda *a: 3), TypeError, "must return a dict"),
    (dict(callback_on_step_end="print"), TypeError, "must be callable"),
])
def test_bad_diffusers_arguments_are_refused(pipelines, kwargs, error, message):
    _, ours = pipelines
    kwargs = {"prompt": PROMPTS[0], **kwargs}
    with pytest.raises(error, match=message):
        ours(num_inference_steps=2, progress=False, **kwargs)


def test_callback_on_step_end_sees_and_replaces_what_diffusers_does(pipelines):
    """callback(pipe, i, t, {"latents": z}) after each step; a returned dict replaces the latents. The same
    callback (halve the latents after step 1) on both pipelines: the same steps, timesteps and images."""
    ref, ours = pipelines

    def recorder(seen):
        def callback(pipe, i, t, callback_kwargs):
            seen.append((pipe, i, int(t), callback_kwargs["latents"].clone(), callback_kwargs["prompt_embeds"].shape))
            return {"latents": callback_kwargs["latents"] * 0.5} if i == 1 else callback_kwargs
        return callback

    seen_ref, seen_ours = [], []
    names = ["latents", "prompt_embeds"]
    expected = ref(PROMPTS, latents=_latents(), output_type="np", callback_on_step_end=recorder(seen_ref),
                   callback_on_step_end_tensor_inputs=names, **KW).images
    got = ours(PROMPTS, latents=_latents(), output_type="np", callback_on_step_end=recorder(seen_ours),
               callback_on_step_end_tensor_inputs=names, progress=False, **KW).images
    # PNDM's 4 steps visit 5 timesteps (its first Runge-Kutta-like step evaluates twice): one call each
    n = len(seen_ref)
    assert n == len(ours.scheduler.timesteps) == 5
    assert [s[0] for s in seen_ours] == [ours] * n and [s[0] for s in seen_ref] == [ref] * n
    assert [s[1:3] for s in seen_ours] == [s[1:3] for s in seen_ref] and [s[1] for s in seen_ours] == list(range(n))
    assert [s[4] for s in seen_ours] == [s[4] for s in seen_ref] == [(4, 77, 32)] * n   # guidance: both halves
    for a, b in zip(seen_ours, seen_ref):
        torch.testing.assert_close(a[3], b[3], rtol=0, atol=LATENT_TOL)
    assert np.abs(got - expected).max() <= TOL
    plain = ours(PROMPTS, latents=_latents(), output_type="np", progress=False, **KW).images
    assert np.abs(plain - got).max() > 100 * TOL          # the replacement took effect


def test_from_pretrained_torch_dtype_matches_diffusers_in_float64(pipelines):
    from diffusers import StableDiffusionPipeline
    ref, _ = pipelines
    ours = TextToImagePipeline.from_pretrained(ref.folder, torch_dtype=torch.float64)
    theirs = StableDiffusionPipeline.from_pretrained(ref.folder, torch_dtype=torch.float64, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert ours.dtype == torch.float64 and {p.dtype for p in ours.text_encoder.parameters()} == {torch.float64}
    kw = dict(KW, output_type="latent")
    got = ours(PROMPTS, latents=_latents().double(), progress=False, **kw).images
    expected = theirs(PROMPTS, latents=_latents().double(), **kw).images
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=LATENT_TOL_64)
    with pytest.raises(ValueError, match="disagree"):
        TextToImagePipeline.from_pretrained(ref.folder, dtype=torch.float32, torch_dtype=torch.float64)
    with pytest.raises(TypeError, match="torch_dtype must be a floating-point torch.dtype"):
        TextToImagePipeline.from_pretrained(ref.folder, torch_dtype="fp16")


@pytest.mark.parametrize("call", [
    lambda p: p.to("cpu", torch.float64), lambda p: p.to(torch.float64), lambda p: p.to(torch.float64, "cpu"),
    lambda p: p.to(device="cpu", dtype=torch.float64), lambda p: p.to(torch_device="cpu", torch_dtype=torch.float64),
])
def test_to_takes_a_device_and_a_dtype_as_diffusers_does(pipelines, call):
    _, ours = pipelines
    pipe = TextToImagePipeline(**{name: copy.deepcopy(m) for name, m in ours.components.items()})
    assert call(pipe) is pipe
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float64)}
    # float32 -> float64 -> float32 is exact: the weights come back bit for bit
    pipe.to("cpu", torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), ours.unet.state_dict().values()))


def test_to_refuses_what_it_cannot_mean(pipelines):
    _, ours = pipelines
    with pytest.raises(ValueError, match="two different devices"):
        ours.to("cpu", device="meta")
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        ours.to(torch.int8)
    with pytest.raises(TypeError, match="takes a device"):
        ours.to(3)
    with pytest.raises(RuntimeError):
        ours.to("no_such_device")


def test_components_rebuild_the_pipeline_as_in_diffusers(pipelines):
    ref, ours = pipelines
    assert set(ours.components) == {"tokenizer", "text_encoder", "unet", "vae", "scheduler"}
    assert set(ours.components) <= set(ref.components)      # diffusers adds its safety checker and the rest
    again = TextToImagePipeline(**ours.components)
    a = ours(PROMPTS[0], latents=_latents(n=1), output_type="np", progress=False, **KW).images
    b = again(PROMPTS[0], latents=_latents(n=1), output_type="np", progress=False, **KW).images
    assert np.array_equal(a, b)


def test_set_progress_bar_config_reaches_the_sampling_bar(pipelines, capsys):
    _, ours = pipelines
    pipe = TextToImagePipeline(**ours.components)
    pipe.set_progress_bar_config(desc="denoising", leave=True)
    pipe(PROMPTS[0], num_inference_steps=2, output_type="latent")
    assert "denoising" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPTS[0], num_inference_steps=2, output_type="latent")
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="tqdm takes no argument.*colour_me"):
        pipe.set_progress_bar_config(colour_me="red")


@pytest.mark.parametrize("name", sorted(NOT_OFFERED))
def test_what_we_leave_out_says_what_to_use_instead(pipelines, name):
    from diffusers import StableDiffusionPipeline
    ref, ours = pipelines
    assert hasattr(StableDiffusionPipeline, name)          # a name diffusers users really type
    with pytest.raises(AttributeError, match=f"has no {name}\\(\\): .{{30,}}"):
        getattr(ours, name)


def test_other_missing_attributes_stay_plain_attribute_errors(pipelines):
    _, ours = pipelines
    with pytest.raises(AttributeError, match="object has no attribute 'no_such_thing'"):
        ours.no_such_thing
    assert not hasattr(ours, "__setstate__") or callable(ours.__setstate__)
    assert copy.copy(ours).unet is ours.unet
