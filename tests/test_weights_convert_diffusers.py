"""weights_convert/diffusers_models.py: diffusers UNet/VAE folders -> ours, by rule, strictly.

Covers the legacy VAE attention names (query/key/value/proj_attn), weights held
as 1x1 convolutions (out, in, 1, 1) where we hold linear ones (out, in), the
.bin format, dtypes, and every kind of bad input: each must raise an error that
names the file and the keys, and never hand back a half-loaded model.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_oracle import UNET_CONFIGS, image, max_diff, saved_reference, unet_inputs
from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.unet import UNet2DConditionModel
from parti_from_scratch.vae import AutoencoderKL
from weights_convert.common import CheckpointError, build_on_meta, load_into
from weights_convert.diffusers_models import (LEGACY_VAE_ATTENTION, UNET_CONV_PROJECTIONS, from_diffusers,
                                              to_diffusers)
from tolerances import VAE_DECODED

# fp32 parity (tests/tolerances.py FP32_PARITY): the UNet drifts <= 8.2e-7 from float64, the VAE's posterior
# <= 8.1e-7 (ours <= 5.8e-7); the VAE comparisons include the decoder, so they use VAE_DECODED
TOL = 1e-5
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A tiny diffusers VAE folder (modern names) and the model that wrote it."""
    ref, folder = saved_reference("vae", "two-levels", tmp_path_factory)
    return folder, ref


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """A tiny SD 1.x-like diffusers UNet folder (1x1-conv proj_in/proj_out) and the model that wrote it."""
    ref, folder = saved_reference("unet", "sd1-like", tmp_path_factory)
    return folder, ref


def copy_folder(src, dst, edit_state=None, edit_config=None, weights_name=WEIGHTS):
    """Copy a diffusers model folder, optionally editing its state dict or config on the way."""
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    state = dict(load_file(str(src / WEIGHTS)))
    if edit_state is not None:
        state = edit_state(state)
    if edit_config is not None:
        config = edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    if weights_name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst / weights_name))
    else:
        torch.save(state, dst / weights_name)
    return dst


def max_vae_diff(ours, ref, size: int) -> float:
    x = image(size)
    with torch.no_grad():
        q_ref = ref.encode(x).latent_dist
        q_ours = ours.encode(x).latent_dist
        z = q_ref.mean
        return max(max_diff(q_ours.mean, q_ref.mean), max_diff(q_ours.logvar, q_ref.logvar),
                   max_diff(ours.decode(z).sample, ref.decode(z).sample))


def to_legacy_attention_names(state):
    """Rename the mid-block attention of a modern diffusers VAE state dict as old checkpoints have it."""
    modern = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out.0"}
    out = {}
    for key, value in state.items():
        for legacy, ours in LEGACY_VAE_ATTENTION:
            key = key.replace(f".attentions.0.{modern[ours]}.", f".attentions.0.{legacy}.")
        out[key] = value
    return out


def test_legacy_vae_attention_names_load_and_match(vae_folder, tmp_path):
    src, ref = vae_folder
    folder = copy_folder(src, tmp_path / "legacy", edit_state=to_legacy_attention_names)
    assert any(".proj_attn." in k for k in load_file(str(folder / WEIGHTS)))
    assert max_vae_diff(AutoencoderKL.from_pretrained(folder), ref, 32) <= VAE_DECODED


def test_vae_attention_stored_as_1x1_convolutions_loads_and_matches(vae_folder, tmp_path):
    def as_conv(state):
        pattern = re.compile(r".*attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")
        return {k: (v[:, :, None, None] if pattern.fullmatch(k) else v) for k, v in state.items()}
    src, ref = vae_folder
    folder = copy_folder(src, tmp_path / "conv", edit_state=lambda s: to_legacy_attention_names(as_conv(s)))
    assert load_file(str(folder / WEIGHTS))["encoder.mid_block.attentions.0.query.weight"].ndim == 4
    assert max_vae_diff(AutoencoderKL.from_pretrained(folder), ref, 32) <= VAE_DECODED


def test_unet_projections_in_either_shape_load_and_match(unet_folder, tmp_path):
    """SD 1.x files hold proj_in/proj_out as (out, in, 1, 1); a file holding them as (out, in) loads the same."""
    src, ref = unet_folder
    state = load_file(str(src / WEIGHTS))
    assert state["down_blocks.0.attentions.0.proj_in.weight"].ndim == 4
    flat = copy_folder(src, tmp_path / "flat", edit_state=lambda s: {
        k: (v[:, :, 0, 0] if re.search(r"proj_(in|out)\.weight$", k) else v) for k, v in s.items()})
    z, c = unet_inputs(UNET_CONFIGS["sd1-like"][0], (16, 16))
    with torch.no_grad():
        expected = ref(z, 321, encoder_hidden_states=c).sample
        for folder in (src, flat):
            got = UNet2DConditionModel.from_pretrained(folder)(z, 321, encoder_hidden_states=c).sample
            assert max_diff(got, expected) <= TOL


def test_rules_round_trip_every_key_and_shape(unet_folder):
    src, _ = unet_folder
    state = load_file(str(src / WEIGHTS))
    ours = from_diffusers(state)
    model = UNet2DConditionModel(**UNET_CONFIGS["sd1-like"][0])
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    back = to_diffusers(ours, UNET_CONV_PROJECTIONS)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_bin_weights_load(vae_folder, tmp_path):
    src, ref = vae_folder
    folder = copy_folder(src, tmp_path / "bin", weights_name="diffusion_pytorch_model.bin")
    assert max_vae_diff(AutoencoderKL.from_pretrained(folder), ref, 32) <= VAE_DECODED


def test_dtype_argument(vae_folder):
    src, _ = vae_folder
    assert AutoencoderKL.from_pretrained(src, dtype=torch.float16).dtype == torch.float16
    assert AutoencoderKL.from_pretrained(src, dtype=None).dtype == torch.float32  # the file's dtype


def test_subfolder_argument(vae_folder, tmp_path):
    src, _ = vae_folder
    copy_folder(src, tmp_path / "pipeline" / "vae")
    assert isinstance(AutoencoderKL.from_pretrained(tmp_path / "pipeline", subfolder="vae"), AutoencoderKL)


# --- bad input: every error names the file and the keys -----------------------------------------------------

def test_missing_key_is_named(vae_folder, tmp_path):
    src, _ = vae_folder
    folder = copy_folder(src, tmp_path / "m", edit_state=lambda s: {k: v for k, v in s.items()
                                                                   if k != "decoder.conv_out.bias"})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / WEIGHTS))}: missing keys: "
                                              r"decoder\.conv_out\.bias"):
        AutoencoderKL.from_pretrained(folder)


def test_extra_key_is_named(unet_folder, tmp_path):
    src, _ = unet_folder
    folder = copy_folder(src, tmp_path / "e", edit_state=lambda s: {**s, "class_embedding.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=rf"{re.escape(WEIGHTS)}: unexpected keys: class_embedding\.weight"):
        UNet2DConditionModel.from_pretrained(folder)


def test_wrong_shape_is_named(unet_folder, tmp_path):
    src, _ = unet_folder
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    folder = copy_folder(src, tmp_path / "s", edit_state=lambda s: {**s, key: torch.zeros(32, 25)})
    with pytest.raises(CheckpointError, match=r"wrong shapes: down_blocks\.0\.attentions\.0\.transformer_blocks\.0"
                                              r"\.attn2\.k_proj\.weight \(file \(32, 25\), model \(32, 24\)\)"):
        UNet2DConditionModel.from_pretrained(folder)


def test_truncated_safetensors_is_refused(vae_folder, tmp_path):
    src, _ = vae_folder
    folder = copy_folder(src, tmp_path / "t")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(folder / WEIGHTS))):
        AutoencoderKL.from_pretrained(folder)


def test_missing_config_is_refused(vae_folder, tmp_path):
    src, _ = vae_folder
    folder = copy_folder(src, tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=re.escape(str(folder / "config.json"))):
        AutoencoderKL.from_pretrained(folder)


def test_config_of_another_architecture_is_refused(vae_folder, unet_folder):
    vae_src, _ = vae_folder
    unet_src, _ = unet_folder
    with pytest.raises(ConfigError, match=r"config\.json: _class_name is 'AutoencoderKL', "
                                          r"expected 'UNet2DConditionModel'"):
        UNet2DConditionModel.from_pretrained(vae_src)
    with pytest.raises(ConfigError, match=r"_class_name is 'UNet2DConditionModel', expected 'AutoencoderKL'"):
        AutoencoderKL.from_pretrained(unet_src)


def test_unsupported_unet_config_is_refused_naming_the_file(unet_folder, tmp_path):
    src, _ = unet_folder
    folder = copy_folder(src, tmp_path / "u", edit_config=lambda c: {**c, "class_embed_type": "timestep"})
    with pytest.raises(ConfigError, match=rf"{re.escape(str(folder / 'config.json'))}: class_embed_type="):
        UNet2DConditionModel.from_pretrained(folder)


def test_a_refused_checkpoint_leaves_nothing_loaded(unet_folder):
    """All-or-nothing: the check runs before any tensor is assigned, so the meta model stays empty."""
    src, _ = unet_folder
    state = from_diffusers(load_file(str(src / WEIGHTS)))
    state.pop("conv_out.bias")
    model = build_on_meta(lambda: UNet2DConditionModel(**UNET_CONFIGS["sd1-like"][0]))
    with pytest.raises(CheckpointError, match="conv_out.bias"):
        load_into(model, state, source="unet")
    assert all(p.is_meta for p in model.parameters())


def _no_model_may_be_built(monkeypatch):
    """Make building any model (even on the meta device) an error: a refusal must come before it."""
    def refuse(factory):
        raise AssertionError("a model was built before the config was compared with the weights")
    monkeypatch.setattr("weights_convert.diffusers_models.build_on_meta", refuse)


@pytest.mark.parametrize("kind, key, value, message", [
    ("unet", "layers_per_block", 3000, r"config\.json \(layers_per_block\) asks for 3000 entries of "
                                       r"down_blocks\.0\.resnets, the weights file has 2 \(indices 0, 1\)"),
    ("unet", "transformer_layers_per_block", 3000, r"config\.json \(transformer_layers_per_block\) asks for 3000 "
                                                   r"entries of down_blocks\.0\.attentions\.0\.transformer_blocks"),
    ("unet", "block_out_channels", [32] * 3000, r"config\.json \(block_out_channels\) asks for 3000 entries of "
                                                r"down_blocks, the weights file has 2"),
    ("vae", "layers_per_block", 3000, r"config\.json \(layers_per_block\) asks for 3000 entries of "
                                      r"encoder\.down_blocks\.0\.resnets, the weights file has 1"),
])
def test_a_config_larger_than_its_weights_fails_before_building(unet_folder, vae_folder, tmp_path, monkeypatch,
                                                                   kind, key, value, message):
    """A config saying 3000 layers next to a small weights file: refused from the file's key indices, with
    no model built (not even on the meta device), so the error costs what the file holds."""
    src, _ = unet_folder if kind == "unet" else vae_folder
    def edit(c):
        c = {**c, key: value}
        if key == "block_out_channels":  # keep the per-level lists consistent, so only the count is wrong
            c.update(down_block_types=["DownBlock2D"] * 3000, up_block_types=["UpBlock2D"] * 3000,
                     attention_head_dim=8)
        return c
    folder = copy_folder(src, tmp_path / kind, edit_config=edit)
    _no_model_may_be_built(monkeypatch)
    load = UNet2DConditionModel.from_pretrained if kind == "unet" else AutoencoderKL.from_pretrained
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(folder / WEIGHTS))}: {re.escape(str(folder))}.*"
                                              + message):
        load(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_weight_of_the_wrong_dtype_is_named(unet_folder, tmp_path, dtype):
    """An integer, bool or complex tensor where the model has a float weight: named, with both dtypes."""
    src, _ = unet_folder
    folder = copy_folder(src, tmp_path / "u", edit_state=lambda s: {**s, "conv_in.bias": s["conv_in.bias"].to(dtype)})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / WEIGHTS))}: wrong dtypes: conv_in\.bias "
                                              rf"\(file {re.escape(str(dtype))}, model floating point\)$"):
        UNet2DConditionModel.from_pretrained(folder)


def test_a_weight_of_the_wrong_rank_is_named(vae_folder, tmp_path):
    src, _ = vae_folder
    key = "decoder.conv_in.weight"
    folder = copy_folder(src, tmp_path / "v", edit_state=lambda s: {**s, key: s[key].flatten()})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / WEIGHTS))}: wrong shapes: "
                                              rf"{re.escape(key)} \(file \(\d+,\), model \(64, 4, 3, 3\)\)$"):
        AutoencoderKL.from_pretrained(folder)
