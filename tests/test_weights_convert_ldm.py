"""Single-file Stable Diffusion checkpoints (CompVis/LDM layout) and the restricted unpickler.

The oracle is diffusers' own single-file loader, an implementation of the same
key correspondence independent of ours: tiny random diffusers/transformers
models are written to one LDM-layout file by `save_ldm_checkpoint`, and
`StableDiffusionPipeline.from_single_file` (offline, configs from a local
folder) must get every tensor back. Then our reader must give back the same
state dicts, infer the configs the models were built with, and build our
modules that compute what the reference models compute.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import subprocess
import sys
import builtins

import pytest
import torch

from tolerances import VAE_DECODED
from weights_convert.common import CheckpointError
from weights_convert.ldm_checkpoint import (HF_CLIP, OPEN_CLIP, UNET, VAE, diffusers_to_ldm, infer_configs,
                                            ldm_to_diffusers, load_single_file, load_single_file_components,
                                            read_ldm_checkpoint, save_ldm_checkpoint)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

VERSIONS = ("1", "2")
# Tiny models shaped like SD 1.x (1x1-conv projections, 8 heads, quick_gelu CLIP) and SD 2.x (linear
# projections, 64-channel heads per level, GELU OpenCLIP): text widths are multiples of 64 so the
# head counts follow the real models' rule.
UNET_KWARGS = {
    "1": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=128, attention_head_dim=8),
    "2": dict(block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=64,
              attention_head_dim=[1, 2, 2], use_linear_projection=True),
}
TEXT_KWARGS = {
    "1": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              hidden_act="quick_gelu"),
    "2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1, hidden_act="gelu"),
}


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter off its initial value, so that a tensor left unloaded cannot pass for loaded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _reference_models(version: str):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **UNET_KWARGS[version])
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                                  sample_size=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        **TEXT_KWARGS[version]))
    return _perturbed(unet, 1), _perturbed(vae, 2), _perturbed(text, 3)


def _text_layout(state):
    """transformers' CLIPTextModel state dict as a downloaded text_encoder file names it."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


@pytest.fixture(scope="module", params=VERSIONS)
def sd(request, tmp_path_factory):
    """One tiny SD model per version: reference modules, their state dicts, and the LDM file written from them."""
    version = request.param
    unet, vae, text = _reference_models(version)
    states = (unet.state_dict(), vae.state_dict(), _text_layout(text.state_dict()))
    path = save_ldm_checkpoint(tmp_path_factory.mktemp(f"sd{version}") / "model.safetensors", *states, version)
    return {"version": version, "models": (unet, vae, text), "states": states, "path": path}


def _assert_same_tensors(got, want, what):
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())[:5]}"
    for k in want:
        assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), f"{what}: {k}"


# ----------------------------------------------------------------------------- the independent oracle

def test_exported_file_loads_in_diffusers(sd, tmp_path):
    """diffusers' from_single_file reads our LDM file back into exactly the tensors we wrote."""
    unet, vae, text = sd["models"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    config_folder = tmp_path / "pipeline"
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=diffusers.PNDMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(config_folder)

    loaded = diffusers.StableDiffusionPipeline.from_single_file(
        str(sd["path"]), config=str(config_folder), local_files_only=True, safety_checker=None,
        feature_extractor=None)
    for name, want, got in (("unet", unet, loaded.unet), ("vae", vae, loaded.vae),
                            ("text_encoder", text, loaded.text_encoder)):
        _assert_same_tensors(got.state_dict(), want.state_dict(), name)


# ----------------------------------------------------------------------------------- our reader

def test_round_trip_is_exact(sd):
    """ldm_to_diffusers(diffusers_to_ldm(x)) == x, and the file read back is what was written, key for key."""
    ldm = read_ldm_checkpoint(sd["path"])
    _assert_same_tensors(ldm, diffusers_to_ldm(*sd["states"], sd["version"]), "file")
    for got, want, name in zip(ldm_to_diffusers(ldm), sd["states"], ("unet", "vae", "text_encoder")):
        _assert_same_tensors(got, want, name)
    # and the other way round: the LDM state survives a trip through the diffusers layout
    _assert_same_tensors(diffusers_to_ldm(*ldm_to_diffusers(ldm), sd["version"]), ldm, "ldm")


def test_layout_of_the_written_file(sd):
    """Spot checks of the LDM layout itself: prefixes, conv-shaped VAE attention, OpenCLIP's fused in_proj."""
    ldm = read_ldm_checkpoint(sd["path"])
    assert ldm[VAE + "encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert UNET + "output_blocks.0.0.skip_connection.weight" in ldm
    if sd["version"] == "1":
        assert HF_CLIP + "text_model.final_layer_norm.weight" in ldm
        assert ldm[UNET + "middle_block.1.proj_in.weight"].ndim == 4
    else:
        q, k, v = (sd["states"][2][f"text_model.encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
        torch.testing.assert_close(ldm[OPEN_CLIP + "transformer.resblocks.0.attn.in_proj_weight"],
                                   torch.cat([q, k, v]), rtol=0, atol=0)
        # one block more than the text encoder has: the last, never-run OpenCLIP block, written as zeros
        assert not ldm[OPEN_CLIP + "transformer.resblocks.3.mlp.c_fc.weight"].any()
        assert OPEN_CLIP + "transformer.resblocks.4.ln_1.weight" not in ldm


def test_configs_are_inferred_from_shapes(sd):
    unet, vae, text = sd["models"]
    configs = infer_configs(read_ldm_checkpoint(sd["path"]))
    assert configs["version"] == sd["version"]
    for name, model in (("unet", unet), ("vae", vae)):
        for key, value in configs[name].items():
            if key != "sample_size":  # a training resolution, not in the weights (tested below)
                expected = model.config[key]
                assert value == (list(expected) if isinstance(expected, tuple) else expected), (name, key)
    for key, value in configs["text_encoder"].items():
        assert value == getattr(text.config, key), key
    v2 = sd["version"] == "2"
    assert configs["scheduler"]["prediction_type"] == ("v_prediction" if v2 else "epsilon")
    assert configs["unet"]["sample_size"] == (96 if v2 else 64)
    assert configs["vae"]["sample_size"] == configs["unet"]["sample_size"] * 2
    assert configs["tokenizer"] == {"model_max_length": 77, "pad_token": "!" if v2 else "<|endoftext|>"}


# The real models' hyper-parameters (diffusers/transformers config.json of SD 1.5 and SD 2.1).
FULL_SIZE = {
    "1": (dict(cross_attention_dim=768, attention_head_dim=8),
          dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu")),
    "2": (dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
          dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
               hidden_act="gelu")),
}


@pytest.mark.parametrize("version", VERSIONS)
def test_full_size_configs_are_recovered(version):
    """At Stable Diffusion's real sizes (built on the meta device: shapes only), the file has SD's keys and the
    inferred configs are SD's: 8 heads or [5, 10, 20, 20], and 23 of OpenCLIP's 24 text blocks."""
    unet_kwargs, text_kwargs = FULL_SIZE[version]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_kwargs)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=49408, **text_kwargs))
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text.state_dict(), version)
    # v1-5-pruned-emaonly: 686 UNet, 248 VAE, 196 text tensors (+ position_ids); v2-1: 24 OpenCLIP blocks x 12 + 4
    counts = [sum(k.startswith(p) for k in ldm) for p in (UNET, VAE, "cond_stage_model.")]
    assert counts == [686, 248, 196 if version == "1" else 292]
    configs = infer_configs(ldm)
    for key in ("cross_attention_dim", "attention_head_dim", "block_out_channels", "down_block_types",
                "up_block_types", "layers_per_block", "use_linear_projection"):
        expected = unet.config[key]
        assert configs["unet"][key] == (list(expected) if isinstance(expected, tuple) else expected), key
    assert configs["vae"]["block_out_channels"] == [128, 256, 512, 512]
    expected_sizes = (64, 512) if version == "1" else (96, 768)
    assert (configs["unet"]["sample_size"], configs["vae"]["sample_size"]) == expected_sizes
    for key, value in text_kwargs.items():
        assert configs["text_encoder"][key] == value, key


def test_version_and_prediction_type_arguments(sd):
    state = read_ldm_checkpoint(sd["path"])
    epsilon = infer_configs(state, version=sd["version"], prediction_type="epsilon")
    assert epsilon["scheduler"]["prediction_type"] == "epsilon" and epsilon["unet"]["sample_size"] == 64
    other = "2" if sd["version"] == "1" else "1"
    with pytest.raises(CheckpointError, match=f"version='{other}'.*SD {sd['version']}"):
        infer_configs(state, version=other)
    with pytest.raises(ValueError, match="prediction_type"):
        infer_configs(state, prediction_type="sample")
    overridden = infer_configs(state, configs={"unet": {"sample_size": 32}})
    assert overridden["unet"]["sample_size"] == 32


def test_scheduler_config_follows_the_betas_in_the_file(sd):
    state = dict(read_ldm_checkpoint(sd["path"]))
    # LDM's register_schedule: linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, stored as float32
    state["betas"] = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2).float()
    scheduler = infer_configs(state)["scheduler"]
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["num_train_timesteps"]) == (0.00085, 0.012, 1000)
    assert scheduler["trained_betas"] is None
    state["betas"] = torch.linspace(1e-4, 2e-2, 50)
    scheduler = infer_configs(state)["scheduler"]
    assert scheduler["num_train_timesteps"] == 50 and len(scheduler["trained_betas"]) == 50


def test_components_compute_what_the_reference_models_compute(sd):
    """Our modules built from the file: same text states, same eps_theta, same VAE reconstruction."""
    unet, vae, text = sd["models"]
    parts = load_single_file_components(sd["path"])
    assert type(parts["scheduler"]).__name__ == "PNDMScheduler"
    assert parts["scheduler"].config.prediction_type == ("v_prediction" if sd["version"] == "2" else "epsilon")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 77), generator=generator)
    z = torch.randn(2, 4, 8, 8, generator=generator)
    x = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    with torch.no_grad():
        h = text(ids)[0]
        # fp32 parity: the reference text encoder, UNet and VAE encoder drift <= 1.8e-6, 2.3e-6, 1.6e-6 from
        # float64 (|values| <= 3.6): 3e-5 >= 10x each; the decoder (3.1e-6) at VAE_DECODED
        torch.testing.assert_close(parts["text_encoder"](ids)[0], h, rtol=0, atol=3e-5)
        torch.testing.assert_close(parts["unet"](z, 10, encoder_hidden_states=h).sample,
                                   unet(z, 10, encoder_hidden_states=h).sample, rtol=0, atol=3e-5)
        mean = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(parts["vae"].encode(x).latent_dist.mean, mean, rtol=0, atol=3e-5)
        torch.testing.assert_close(parts["vae"].decode(mean).sample, vae.decode(mean).sample, rtol=0,
                                   atol=VAE_DECODED)


def test_load_single_file_returns_configs_and_state_dicts(sd):
    out = load_single_file(sd["path"])
    assert out["version"] == sd["version"]
    for (name, want) in zip(("unet", "vae", "text_encoder"), sd["states"]):
        _assert_same_tensors(out[name]["state_dict"], want, name)
        assert isinstance(out[name]["config"], dict)
    assert out["scheduler"]["config"]["_class_name"] == "PNDMScheduler"


# -------------------------------------------------------------------------------------------- bad input

def _save(tmp_path, state, name="bad.safetensors"):
    from safetensors.torch import save_file
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_training_leftovers_are_ignored(sd, tmp_path):
    """Keys real checkpoints carry besides the three models load without complaint."""
    state = dict(read_ldm_checkpoint(sd["path"]))
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.diffusion_modelout2bias": torch.zeros(4),
                  "alphas_cumprod": torch.rand(1000), "posterior_mean_coef1": torch.rand(1000),
                  "logvar": torch.zeros(1000), "first_stage_model.loss.logvar": torch.zeros(())})
    if sd["version"] == "1":
        state[HF_CLIP + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        state.update({OPEN_CLIP + "text_projection": torch.zeros(64, 64), OPEN_CLIP + "logit_scale": torch.ones(())})
    for got, want in zip(ldm_to_diffusers(read_ldm_checkpoint(_save(tmp_path, state))), sd["states"]):
        _assert_same_tensors(got, want, "with leftovers")


_NARROWED = UNET + "output_blocks.2.0.in_layers.2.weight"
_GONE = (UNET + "output_blocks.3.0.", VAE + "decoder.up.0.block.1.")  # a UNet resnet, a VAE decoder resnet
# case -> (how the file is damaged, which entry point reads it, what the error must say after "<file>: ")
BAD_FILES = {
    "unknown key": (lambda s: {**s, UNET + "input_blocks.1.2.extra.weight": torch.zeros(1)}, load_single_file,
                    r"unexpected keys .*: model\.diffusion_model\.input_blocks\.1\.2\.extra\.weight$"),
    "missing block": (lambda s: {k: v for k, v in s.items() if not k.startswith(_GONE)}, load_single_file,
                      r"no tensors for these parts of the model: first_stage_model\.decoder\.up\.0\.block\.1, "
                      r"model\.diffusion_model\.output_blocks\.3\.0$"),
    "missing key": (lambda s: {k: v for k, v in s.items() if k not in (UNET + "out.2.bias",
                                                                       VAE + "decoder.mid.attn_1.k.bias")},
                    load_single_file_components,
                    r"missing keys: first_stage_model\.decoder\.mid\.attn_1\.k\.bias, "
                    r"model\.diffusion_model\.out\.2\.bias$"),
    "wrong shape": (lambda s: {**s, _NARROWED: s[_NARROWED][:, :-1]}, load_single_file_components,
                    rf"wrong shapes: {re.escape(_NARROWED)} \(file \(\d+, \d+, 3, 3\), model \(\d+, \d+, 3, 3\)\)$"),
    "no text encoder": (lambda s: {k: v for k, v in s.items() if not k.startswith("cond_stage_model.")},
                        load_single_file, r"no Stable Diffusion text encoder found"),
    "conv weight of rank 1": (lambda s: {**s, UNET + "input_blocks.0.0.weight": s[UNET + "input_blocks.0.0.weight"]
                                         .flatten()}, load_single_file,
                              r"model\.diffusion_model\.input_blocks\.0\.0\.weight has shape \(\d+,\); "
                              r"expected 4 dimensions$"),
    "embedding of rank 1": (lambda s: {k: (v.flatten() if k.endswith("token_embedding.weight") else v)
                                       for k, v in s.items()}, load_single_file,
                            r"cond_stage_model\.\S+token_embedding\.weight has shape \(\d+,\); "
                            r"expected 2 dimensions$"),
    "integer weight": (lambda s: {**s, _NARROWED: s[_NARROWED].to(torch.int32)}, load_single_file_components,
                       rf"wrong dtypes: {re.escape(_NARROWED)} \(file torch\.int32, model floating point\)$"),
    "beta above 1": (lambda s: {**s, "betas": torch.linspace(0.1, 2.0, 1000)}, load_single_file,
                     r"betas\[\d+\]=1\.0\d*: every beta_t must be a finite number in \(0, 1\)$"),
    "betas of rank 2": (lambda s: {**s, "betas": torch.full((10, 100), 0.01)}, load_single_file,
                        r"betas: expected one value per timestep \(1-D\), got shape \(10, 100\)$"),
    "alphas_cumprod of another length": (
        lambda s: {**s, "betas": torch.full((1000,), 0.01), "alphas_cumprod": torch.rand(500)}, load_single_file,
        r"alphas_cumprod has shape \(500,\), betas \(1000,\): one value per timestep in both$"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_is_refused_naming_file_and_keys(sd, tmp_path, case):
    damage, read, message = BAD_FILES[case]
    path = _save(tmp_path, damage(dict(read_ldm_checkpoint(sd["path"]))))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": " + message):
        read(path)


def test_truncated_safetensors_is_named(sd, tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(sd["path"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"{path.name}.*not a valid safetensors file"):
        load_single_file(path)


# ---------------------------------------------------------------------------------------------- security

class _Payload:
    """Pickles as a call of `function(*args)`: what a malicious checkpoint hides in its pickle."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _payloads(marker):
    return {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "eval": _Payload(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        "exec": _Payload(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": _Payload(subprocess.Popen, (["touch", str(marker)],)),
    }


@pytest.mark.parametrize("payload", ["os.system", "eval", "exec", "subprocess.Popen"])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    evil = _payloads(marker)[payload]
    torch.save(evil, path)
    called = f"{evil.function.__module__}.{evil.function.__name__}"  # posix.system, builtins.eval, ...
    with pytest.raises(CheckpointError, match=rf"{path.name}: refused: the pickle calls {re.escape(called)} while"):
        read_ldm_checkpoint(path)
    assert not marker.exists()


def _throwaway_framework(tmp_path, name):
    """A module importable only while the checkpoint is written, like a training framework the reader lacks."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "callbacks.py").write_text(
        "class ModelCheckpoint:\n"
        "    def __init__(self):\n"
        "        self.monitor, self.best_k_models, self.kwargs = 'val/loss', {'epoch=3.ckpt': 0.12}, {'every': 1}\n"
        "class AttributeDict(dict):\n"
        "    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(f"{name}.callbacks")
    finally:
        sys.path.remove(str(tmp_path))


def _forget(name):
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_payload_hidden_in_a_training_checkpoint_is_refused(sd, tmp_path):
    marker = tmp_path / "pwned"
    framework = _throwaway_framework(tmp_path, "fake_lightning_evil")
    state = dict(read_ldm_checkpoint(sd["path"]))
    state[UNET + "zz.weight"] = _payloads(marker)["os.system"]
    path = tmp_path / "evil.ckpt"
    try:
        torch.save({"state_dict": state, "callbacks": {framework.ModelCheckpoint: framework.ModelCheckpoint()},
                    "hyper_parameters": framework.AttributeDict(lr=1e-4)}, path)
    finally:
        _forget("fake_lightning_evil")
    with pytest.raises(CheckpointError, match=rf"{path.name}: refused: the pickle calls posix\.system"):
        load_single_file(path)
    assert not marker.exists()


def test_training_checkpoint_with_framework_objects_loads(sd, tmp_path):
    """A Lightning-style .ckpt: weights_only refuses it, the restricted unpickler stubs the framework out."""
    np = pytest.importorskip("numpy")
    framework = _throwaway_framework(tmp_path, "fake_lightning_ok")
    state = dict(read_ldm_checkpoint(sd["path"]))
    path = tmp_path / "model.ckpt"
    try:
        torch.save({"state_dict": state, "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {framework.ModelCheckpoint: framework.ModelCheckpoint()},
                    "hyper_parameters": framework.AttributeDict(lr=1e-4, tags={"a", "b"}),
                    "loss": np.float64(0.125), "history": np.zeros(3)}, path)
    finally:
        _forget("fake_lightning_ok")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    _assert_same_tensors(read_ldm_checkpoint(path), state, "restricted load")
    assert "fake_lightning_ok" not in sys.modules  # read without importing it
    assert load_single_file(path)["version"] == sd["version"]


def test_plain_torch_save_loads_with_weights_only(sd, tmp_path, monkeypatch):
    import weights_convert.ldm_checkpoint as ldm

    def refuse(path):
        raise AssertionError("the restricted unpickler should not be needed")
    monkeypatch.setattr(ldm, "restricted_load", refuse)
    state = dict(read_ldm_checkpoint(sd["path"]))
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": state}, path)
    _assert_same_tensors(read_ldm_checkpoint(path), state, "weights_only load")


def test_stride0_betas_are_refused_before_they_are_copied(sd, tmp_path):
    """torch.save of an expanded tensor stores one float for 2^26 betas; refused by its length, never copied."""
    state = dict(read_ldm_checkpoint(sd["path"]))
    state["betas"] = torch.full((1,), 0.01).expand(2 ** 26)
    path = tmp_path / "bomb.ckpt"
    torch.save(state, path)
    assert path.stat().st_size < 50 * 2 ** 20  # the file holds one float for the betas, not 2^26
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r": betas: 67108864 timesteps; expected 2 to "
                                                                     r"100,000$"):
        load_single_file(path)


def test_a_config_override_larger_than_the_file_fails_before_building(sd, monkeypatch):
    """configs={"unet": {"layers_per_block": 3000}}: refused against the file's own count before any rule list
    or model is made for 3000 layers."""
    def refuse(*args, **kwargs):
        raise AssertionError("built before the override was compared with the file")
    for name in ("build_on_meta", "_blocks"):
        monkeypatch.setattr(f"weights_convert.ldm_checkpoint.{name}", refuse)
    held = UNET_KWARGS[sd["version"]]["layers_per_block"]
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(sd['path']))}: configs\['unet'\]\['layers_per_block'\]"
                                              rf"=3000 does not match the file, which holds {held}$"):
        load_single_file_components(sd["path"], configs={"unet": {"layers_per_block": 3000}})
    with pytest.raises(CheckpointError, match=r"configs\['text_encoder'\]\['num_hidden_layers'\]=3000"):
        load_single_file(sd["path"], configs={"text_encoder": {"num_hidden_layers": 3000}})
