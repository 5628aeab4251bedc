"""weights_convert/transformers_clip.py: every transformers CLIP layout loads strictly; bad folders fail by name."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from clip_oracle import CLASSES, Case, max_diff, transformers
from parti_from_scratch.clip import model as clip_model
from parti_from_scratch.clip.model import (CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel,
                                           CLIPVisionModelWithProjection)
from parti_from_scratch.configuration import ConfigError
from weights_convert.common import CheckpointError, rename_keys
from weights_convert.transformers_clip import load_rules, save_rules
from tolerances import CLIP_LOGITS

# fp32 parity (tests/tolerances.py FP32_PARITY): this CLIP's towers drift <= 1.2e-6 from float64 (ours 1.2e-6);
# 1e-5 >= 2 (D_ours + D_ref). Logits: CLIP_LOGITS.
TOL = 1e-5
OURS = (CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel, CLIPVisionModelWithProjection)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return Case("quick_gelu", tmp_path_factory.mktemp("clip_folders"))


def copy_with_state(src, dst, edit=None, filename="model.safetensors"):
    """dst: src's config.json and src's tensors after `edit(state)`, written as `filename`."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(str(src / "model.safetensors"))
    if edit is not None:
        edit(state)
    if filename.endswith(".safetensors"):
        save_file(state, str(dst / filename))
    else:
        torch.save(state, dst / filename)
    return dst


def as_transformers4_layout(state, prefix, n_positions):
    """transformers 4 prefixed every tower key and saved the position_ids buffer."""
    for key in list(state):
        state[prefix + key] = state.pop(key)
    state[prefix + "embeddings.position_ids"] = torch.arange(n_positions)[None]


@torch.no_grad()
def test_transformers4_text_layout_in_pytorch_model_bin_loads(case, tmp_path):
    n = case.ref["CLIPTextModel"].config.max_position_embeddings
    folder = copy_with_state(case.folder["CLIPTextModel"], tmp_path / "text_encoder",
                             lambda s: as_transformers4_layout(s, "text_model.", n), filename="pytorch_model.bin")
    ours = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")
    ref = case.ref["CLIPTextModel"](input_ids=case.ids, attention_mask=case.mask)
    out = ours(case.ids, attention_mask=case.mask)
    assert max_diff(ref.last_hidden_state, out.last_hidden_state) <= TOL
    assert max_diff(ref.pooler_output, out.pooler_output) <= TOL
    assert (folder / "pytorch_model.bin").is_file()


@torch.no_grad()
def test_transformers4_vision_layout_loads(case, tmp_path):
    config = case.ref["CLIPVisionModel"].config
    n = (config.image_size // config.patch_size) ** 2 + 1
    copy_with_state(case.folder["CLIPVisionModel"], tmp_path, lambda s: as_transformers4_layout(s, "vision_model.", n))
    out = CLIPVisionModel.from_pretrained(tmp_path)(case.pixels)
    assert max_diff(case.ref["CLIPVisionModel"](pixel_values=case.pixels).pooler_output, out.pooler_output) <= TOL


def test_text_projection_folder_loads_as_text_model_without_projection(case):
    model = CLIPTextModel.from_pretrained(case.folder["CLIPTextModelWithProjection"])
    assert not hasattr(model, "text_projection")
    ref = case.ref["CLIPTextModelWithProjection"].text_model
    with torch.no_grad():
        assert max_diff(ref(input_ids=case.ids).pooler_output, model(case.ids).pooler_output) <= TOL


def test_text_model_folder_lacks_the_projection(case):
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing keys: text_projection\.weight"):
        CLIPTextModelWithProjection.from_pretrained(case.folder["CLIPTextModel"])


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_save_rules_write_the_prefixed_layout_and_load_rules_invert_them(cls, case):
    folder = case.folder[cls.__name__]
    state = cls.from_pretrained(folder).state_dict()
    theirs = rename_keys(state, save_rules(cls))
    file_keys = set(load_file(str(folder / "model.safetensors")))
    # transformers 5 saves a standalone tower without its prefix; we write the prefixed layout both versions read
    prefix = {CLIPTextModel: "text_model.", CLIPVisionModel: "vision_model."}.get(cls, "")
    assert set(theirs) == {prefix + k for k in file_keys}
    assert rename_keys(theirs, load_rules(cls)).keys() == state.keys()


@pytest.mark.parametrize("name", CLASSES)
@torch.no_grad()
def test_save_pretrained_folder_loads_in_transformers(name, case, tmp_path):
    ours = case.ours(name)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [name]
    ref, info = getattr(transformers, name).from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    if name == "CLIPModel":
        a, b = ref(input_ids=case.ids, pixel_values=case.pixels), ours(case.ids, case.pixels)
        assert max_diff(a.logits_per_image, b.logits_per_image) <= CLIP_LOGITS
    elif "Text" in name:
        a, b = ref(input_ids=case.ids, attention_mask=case.mask), ours(case.ids, attention_mask=case.mask)
        assert max_diff(a[0], b[0]) <= TOL
    else:
        assert max_diff(ref(pixel_values=case.pixels)[0], ours(case.pixels)[0]) <= TOL
    again = type(ours).from_pretrained(tmp_path)
    assert again.config == ours.config


def test_dtype_none_keeps_the_file_dtype(case, tmp_path):
    CLIPTextModel.from_pretrained(case.folder["CLIPTextModel"]).half().save_pretrained(tmp_path)
    assert CLIPTextModel.from_pretrained(tmp_path, dtype=None).dtype == torch.float16
    assert CLIPTextModel.from_pretrained(tmp_path).dtype == torch.float32
    assert CLIPTextModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_legacy_text_config_dict_overrides_text_config(case, tmp_path):
    copy_with_state(case.folder["CLIPModel"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config_dict"] = {"layer_norm_eps": 1e-3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert CLIPModel.from_pretrained(tmp_path).config.text_config.layer_norm_eps == 1e-3


# ------------------------------------------------------------------------------------------ bad input

def test_truncated_safetensors_names_the_file(case, tmp_path):
    copy_with_state(case.folder["CLIPTextModel"], tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "model.safetensors"))):
        CLIPTextModel.from_pretrained(tmp_path)


def test_corrupted_safetensors_header_names_the_file(case, tmp_path):
    copy_with_state(case.folder["CLIPTextModel"], tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32  # the JSON header starts after its 8-byte length
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        CLIPTextModel.from_pretrained(tmp_path)


def test_missing_key_is_named(case, tmp_path):
    copy_with_state(case.folder["CLIPTextModel"], tmp_path, lambda s: s.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing keys: encoder\.layers\.1\.mlp\.fc2\.bias"):
        CLIPTextModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, tensor", [
    ("encoder.layers.0.self_attn.rotary.weight", torch.zeros(3)),  # no such parameter
    ("encoder.layers.7.mlp.fc1.bias", torch.zeros(64)),            # a layer the config does not have
    ("vision_model.post_layernorm.weight", torch.ones(32)),        # the other tower, in a text-only folder
], ids=["unknown_parameter", "extra_layer", "stray_vision_key"])
def test_extra_key_is_named(case, tmp_path, key, tensor):
    copy_with_state(case.folder["CLIPTextModel"], tmp_path, lambda state: state.update({key: tensor}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected keys.*" + re.escape(key)):
        CLIPTextModel.from_pretrained(tmp_path)


def test_wrongly_shaped_tensor_is_named_with_both_shapes(case, tmp_path):
    copy_with_state(case.folder["CLIPTextModel"], tmp_path,
                    lambda state: state.update({"encoder.layers.0.mlp.fc1.weight": torch.zeros(65, 32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: wrong shapes: encoder\.layers\.0\.mlp\.fc1\.weight "
                                              r"\(file \(65, 32\), model \(64, 32\)\)"):
        CLIPTextModel.from_pretrained(tmp_path)


def test_folder_without_config_json(case, tmp_path):
    shutil.copy(case.folder["CLIPTextModel"] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "config.json")) + ": file not found"):
        CLIPTextModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("config, found", [
    ({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32}, "model_type='bert'"),
    ({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "in_channels": 4},
     "_class_name='UNet2DConditionModel'"),
    ({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]}, "model_type='clip_vision_model'"),
], ids=["bert", "unet", "clip_vision_as_text"])
def test_config_for_another_architecture(case, tmp_path, config, found):
    copy_with_state(case.folder["CLIPTextModel"], tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: describes {found}")):
        CLIPTextModel.from_pretrained(tmp_path)


def test_full_clip_folder_does_not_load_as_clip_model_from_a_tower(case):
    with pytest.raises(ConfigError, match=r"config\.json: describes model_type='clip_text_model'"):
        CLIPModel.from_pretrained(case.folder["CLIPTextModel"])


def test_unsupported_activation_names_the_config_file(case, tmp_path):
    copy_with_state(case.folder["CLIPTextModel"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "swish_cubed"}))
    with pytest.raises(ConfigError, match=r"config\.json: hidden_act='swish_cubed' is not supported"):
        CLIPTextModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name, key", [("CLIPTextModel", None), ("CLIPModel", "text_config"),
                                       ("CLIPModel", "vision_config")])
def test_a_config_deeper_than_its_weights_fails_before_building(case, tmp_path, monkeypatch, name, key):
    """num_hidden_layers = 3000 beside a 2-layer file: refused from the file's key indices, no model built
    (not even on the meta device), so the error costs what the file holds."""
    copy_with_state(case.folder[name], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (config if key is None else config[key])["num_hidden_layers"] = 3000
    (tmp_path / "config.json").write_text(json.dumps(config))

    def refuse(factory):
        raise AssertionError("a model was built before the config was compared with the weights")
    monkeypatch.setattr("weights_convert.transformers_clip.build_on_meta", refuse)
    path = "encoder.layers" if key is None else f"{key[:-len('_config')]}_model.encoder.layers"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / 'model.safetensors'))}: "
                                              rf"{re.escape(str(tmp_path / 'config.json'))} \(num_hidden_layers\) "
                                              rf"asks for 3000 entries of {re.escape(path)}, the weights file has \d"):
        getattr(clip_model, name).from_pretrained(tmp_path)


def test_a_weight_of_the_wrong_dtype_is_named_clip(case, tmp_path):
    key = "final_layer_norm.weight"  # with or without the text_model. prefix, as the folder's layout has it
    copy_with_state(case.folder["CLIPTextModel"], tmp_path,
                    lambda state: state.update({k: v.to(torch.int32) for k, v in state.items() if k.endswith(key)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: wrong dtypes: final_layer_norm\.weight "
                                              rf"\(file torch\.int32, model floating point\)$"):
        CLIPTextModel.from_pretrained(tmp_path)
