"""Every output class reads the same way: by attribute, by position among the fields that are set, by key,
by unpacking; and `return_dict=False` returns the same tuple. Real outputs of the shipped model's parts."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from parti_from_scratch.clip.model import (CLIPEncoderOutput, CLIPOutput, CLIPTextModelOutput,
                                           CLIPVisionModelOutput)
from parti_from_scratch.outputs import ModelOutput
from parti_from_scratch.pipeline import TextToImagePipeline, TextToImagePipelineOutput


@pytest.fixture(scope="module")
def pipe():
    return TextToImagePipeline.from_pretrained()


def check_reads_alike(out, expected_fields):
    """out[i], out["name"], out.name, unpacking and len agree with the (name, value) pairs that are set."""
    assert isinstance(out, ModelOutput)
    names = [name for name, _ in expected_fields]
    values = [value for _, value in expected_fields]
    assert len(out) == len(values)
    for i, (name, value) in enumerate(expected_fields):
        assert out[i] is value and out[name] is value and getattr(out, name) is value
    assert out[-1] is values[-1]
    assert list(out[:]) == values
    unpacked = tuple(out)
    assert len(unpacked) == len(values) and all(a is b for a, b in zip(unpacked, values))
    assert out.to_tuple() == tuple(values)
    with pytest.raises(IndexError):
        out[len(values)]
    with pytest.raises(KeyError):
        out["no_such_field"]
    return names


def test_unet_output(pipe):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    c = pipe.encode_prompt(["a red circle"])
    out = pipe.unet(z, 500, encoder_hidden_states=c)
    check_reads_alike(out, [("sample", out.sample)])
    (eps,) = out
    torch.testing.assert_close(pipe.unet(z, 500, encoder_hidden_states=c, return_dict=False)[0], eps,
                               rtol=0, atol=0)    # the same computation twice: bit-identical


def test_vae_outputs(pipe):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encoded = pipe.vae.encode(x)
    check_reads_alike(encoded, [("latent_dist", encoded.latent_dist)])
    z = encoded[0].mode()
    decoded = pipe.vae.decode(z)
    check_reads_alike(decoded, [("sample", decoded.sample)])
    assert decoded[0].shape == (1, 3, 64, 64)
    torch.testing.assert_close(pipe.vae.decode(z, return_dict=False)[0], decoded[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ddim", "dpm"])
def test_scheduler_output(pipe, name):
    from parti_from_scratch.diffusion.schedulers import SCHEDULERS
    scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    sample, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    out = scheduler.step(eps, scheduler.timesteps[0], sample)
    fields = [("prev_sample", out.prev_sample)]
    if out.pred_original_sample is not None:          # DDIM forms x_0; the multistep solver does not return it
        fields.append(("pred_original_sample", out.pred_original_sample))
    check_reads_alike(out, fields)
    assert len(out) == (2 if name == "ddim" else 1)


def test_clip_text_output(pipe):
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    out = pipe.text_encoder(ids)
    assert isinstance(out, CLIPEncoderOutput)
    check_reads_alike(out, [("last_hidden_state", out.last_hidden_state), ("pooler_output", out.pooler_output)])
    hidden, pooled = out
    assert hidden.shape[:2] == (1, pipe.tokenizer.model_max_length) and pooled.shape[0] == 1
    with_states = pipe.text_encoder(ids, output_hidden_states=True)
    assert len(with_states) == 3 and with_states[2] is with_states.hidden_states


@pytest.mark.parametrize("cls", [CLIPTextModelOutput, CLIPVisionModelOutput, CLIPOutput])
def test_other_clip_outputs(cls):
    # built field by field: a None field (e.g. CLIPOutput.loss without return_loss) is skipped by position
    values = {f.name: (None if i == 0 and cls is CLIPOutput else torch.full((1,), float(i)))
              for i, f in enumerate(dataclasses.fields(cls))}
    out = cls(**values)
    check_reads_alike(out, [(k, v) for k, v in values.items() if v is not None])


def test_pipeline_output(pipe):
    out = pipe("a large red circle on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np", progress=False)
    assert isinstance(out, TextToImagePipelineOutput)
    check_reads_alike(out, [("images", out.images)])
    (images,) = out
    assert images.shape == (1, 64, 64, 3)


def _output_classes():
    """Every dataclass named *Output defined in the package (imported module by module)."""
    import importlib
    import pkgutil

    import parti_from_scratch
    found = {}
    for info in pkgutil.walk_packages(parti_from_scratch.__path__, "parti_from_scratch."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (isinstance(value, type) and name.endswith("Output") and dataclasses.is_dataclass(value)
                    and value.__module__ == module.__name__):
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_output_dataclass_reads_alike():
    """No output class of the package (the Parti chapter's included) is left out of ModelOutput."""
    classes = _output_classes()
    assert "parti_from_scratch.parti.quantize.VectorQuantizerOutput" in classes and len(classes) >= 10
    for name, cls in classes.items():
        assert issubclass(cls, ModelOutput), name
        values = {f.name: torch.full((1,), float(i)) for i, f in enumerate(dataclasses.fields(cls))}
        check_reads_alike(cls(**values), list(values.items()))


def test_vector_quantizer_output_from_a_real_forward():
    from parti_from_scratch.parti.quantize import VectorQuantizer
    torch.manual_seed(0)
    out = VectorQuantizer(num_embeddings=8, embedding_dim=4)(torch.randn(2, 4, 3, 3))
    check_reads_alike(out, [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)])
    z_q, indices, loss, perplexity = out
    assert indices.shape == (2, 3, 3) and z_q.shape == (2, 4, 3, 3)
