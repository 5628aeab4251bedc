"""transformers CLIP folders <-> parti_from_scratch.clip.model.

A transformers CLIP folder holds `config.json` and `model.safetensors` (older
ones `pytorch_model.bin`). Our modules carry transformers' names except one
spelling, so a key maps by a prefix rule (transformers' name on the left):

    [text_model.]embeddings.{token,position}_embedding.weight          embeddings.{token,position}_embedding.weight
    [text_model.]encoder.layers.<i>.<block part>.{weight,bias}         encoder.layers.<i>.<block part>.{weight,bias}
        block part: self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2
    [text_model.]final_layer_norm.{weight,bias}                        final_layer_norm.{weight,bias}
    [vision_model.]embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}   (same)
    [vision_model.]pre_layrnorm.{weight,bias}                          pre_layernorm.{weight,bias}
    [vision_model.]encoder.layers.<i>...  and  post_layernorm.{weight,bias}                          (same)
    text_projection.weight, visual_projection.weight, logit_scale      (same)

The tower prefix: transformers 4 wrote `text_model.` / `vision_model.` in every
CLIP checkpoint (Stable Diffusion's text_encoder folders included);
transformers 5 writes a standalone CLIPTextModel / CLIPVisionModel without
it. Both load; `save_pretrained` writes the prefixed layout, which both read.

A full CLIPModel folder also loads as one tower (with or without its
projection): the parts the target does not hold are ignored, each with its
reason. Every other key must be used, every parameter filled, every shape
equal, or CheckpointError names the file and the keys.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type, Union

import torch
from safetensors.torch import save_file
from torch import nn

from parti_from_scratch.clip.model import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                           CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel,
                                           CLIPVisionModelWithProjection)
from parti_from_scratch.configuration import ConfigError, config_from_dict, config_to_dict, read_json, resolve_folder
from weights_convert.common import (Repeat, build_on_meta, check_repeats, find_weights_file, load_into,
                                    read_state_dict, rename_keys)

# A rule (transformers' name, our name, tail): a key is name + tail, and the tail's one group carries over.
_WEIGHT_BIAS = r"(weight|bias)"
_BLOCK = r"(\d+\.(?:self_attn\.(?:q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(?:weight|bias))"
_TEXT_TOWER = (
    ("embeddings.", "embeddings.", r"((?:token|position)_embedding\.weight)"),
    ("encoder.layers.", "encoder.layers.", _BLOCK),
    ("final_layer_norm.", "final_layer_norm.", _WEIGHT_BIAS),
)
_VISION_TOWER = (
    ("embeddings.", "embeddings.", r"(class_embedding|(?:patch|position)_embedding\.weight)"),
    ("pre_layrnorm.", "pre_layernorm.", _WEIGHT_BIAS),  # sic: transformers' spelling
    ("encoder.layers.", "encoder.layers.", _BLOCK),
    ("post_layernorm.", "post_layernorm.", _WEIGHT_BIAS),
)

# The parts of a full CLIPModel checkpoint: (rules, transformers' prefix, description).
_PARTS = {
    "text": (_TEXT_TOWER, "text_model.", "the text tower"),
    "vision": (_VISION_TOWER, "vision_model.", "the vision tower"),
    "text_projection": ((("text_projection.", "text_projection.", "(weight)"),), "", "the text projection W_t"),
    "visual_projection": ((("visual_projection.", "visual_projection.", "(weight)"),), "",
                          "the image projection W_i"),
    "logit_scale": ((("", "", "(logit_scale)"),), "", "the temperature logit_scale"),
}

# Which parts each of our classes holds, and under which prefix of ours.
_HOLDS: Dict[type, Dict[str, str]] = {
    CLIPTextModel: {"text": ""},
    CLIPTextModelWithProjection: {"text": "", "text_projection": ""},
    CLIPVisionModel: {"vision": ""},
    CLIPVisionModelWithProjection: {"vision": "", "visual_projection": ""},
    CLIPModel: {"text": "text_model.", "vision": "vision_model.", "text_projection": "", "visual_projection": "",
                "logit_scale": ""},
}

# config.json's model_type -> the parts its checkpoint may hold, and the model_types each class reads.
_FOUND_IN = {
    "clip_text_model": ("text", "text_projection"),
    "clip_vision_model": ("vision", "visual_projection"),
    "clip": tuple(_PARTS),
}
_READS = {CLIPTextConfig: ("clip_text_model", "clip"), CLIPVisionConfig: ("clip_vision_model", "clip"),
          CLIPConfig: ("clip",)}
_SUB_CONFIG = {CLIPTextConfig: "text_config", CLIPVisionConfig: "vision_config"}
# For a config.json without model_type: what its `architectures` entry says.
_ARCHITECTURES = {"CLIPTextModel": "clip_text_model", "CLIPTextModelWithProjection": "clip_text_model",
                  "CLIPVisionModel": "clip_vision_model", "CLIPVisionModelWithProjection": "clip_vision_model",
                  "CLIPModel": "clip"}

_POSITION_IDS = (r"(?:(?:text|vision)_model\.)?embeddings\.position_ids",
                 "position ids 0..n-1, a buffer older transformers versions saved; forward computes them")

Rule = Tuple[str, str]


def _layout(cls: type) -> Dict[str, str]:
    for klass in cls.__mro__:
        if klass in _HOLDS:
            return _HOLDS[klass]
    raise TypeError(f"{cls.__name__} is not a CLIP model of parti_from_scratch.clip.model")


def load_rules(cls: type) -> List[Rule]:
    """transformers' key -> ours, for the parts `cls` holds."""
    rules = []
    for part, our_prefix in _layout(cls).items():
        part_rules, their_prefix, _ = _PARTS[part]
        prefix = re.escape(their_prefix)
        if their_prefix and not our_prefix:  # a standalone tower: transformers 5 saves it without the prefix
            prefix = f"(?:{prefix})?"
        rules += [(prefix + re.escape(theirs) + tail, our_prefix + ours + r"\1") for theirs, ours, tail in part_rules]
    return rules


def save_rules(cls: type) -> List[Rule]:
    """Our key -> transformers' (always with the tower prefix, which transformers 4 and 5 both read)."""
    rules = []
    for part, our_prefix in _layout(cls).items():
        part_rules, their_prefix, _ = _PARTS[part]
        rules += [(re.escape(our_prefix + ours) + tail, their_prefix + theirs + r"\1")
                  for theirs, ours, tail in part_rules]
    return rules


def ignore_rules(cls: type, model_type: str) -> List[Tuple[str, str]]:
    """The keys a `model_type` checkpoint may hold that `cls` has no place for, each with the reason."""
    ignore = [_POSITION_IDS]
    for part in _FOUND_IN[model_type]:
        if part in _layout(cls):
            continue
        part_rules, their_prefix, what = _PARTS[part]
        pattern = (re.escape(their_prefix) + ".*" if their_prefix
                   else "|".join(re.escape(theirs) + tail for theirs, _, tail in part_rules))
        ignore.append((pattern, f"{what}, which {cls.__name__} does not hold"))
    return ignore


def source_model_type(cls: type, raw: dict, config_file: Path) -> str:
    """config.json's model_type (or the one its `architectures` implies); ConfigError unless `cls` can read it."""
    model_type = raw.get("model_type") or next(
        (_ARCHITECTURES[a] for a in raw.get("architectures") or () if a in _ARCHITECTURES), None)
    accepted = _READS[cls.config_class]
    if model_type not in accepted:
        found = ", ".join(f"{k}={raw[k]!r}" for k in ("model_type", "architectures", "_class_name") if k in raw)
        raise ConfigError(f"{config_file}: describes {found or 'no model_type or architectures'}, not a model "
                          f"{cls.__name__} can load (expected model_type {' or '.join(map(repr, accepted))})")
    return model_type


def _sub_config(raw: dict, key: str, config_file: Path) -> dict:
    # configs written by early transformers versions also carry `<key>_dict`, which takes precedence
    parts = [raw.get(key) or {}, raw.get(f"{key}_dict") or {}]
    for name, part in zip((key, f"{key}_dict"), parts):
        if not isinstance(part, dict):
            raise ConfigError(f"{config_file}: {name}={part!r} should be a JSON object")
    return {**parts[0], **parts[1]}


def read_config(cls: type, raw: dict, model_type: str, config_file: Path):
    """Our config for `cls` from the parsed config.json of a `model_type` folder; errors name the file and key."""
    config_class = cls.config_class
    if config_class is CLIPConfig:
        towers = {}
        for sub, key in _SUB_CONFIG.items():
            try:
                towers[key] = config_from_dict(sub, _sub_config(raw, key, config_file))
            except ConfigError as e:
                raise ConfigError(f"{config_file}: {key}.{e}") from None
        return config_from_dict(CLIPConfig, {**raw, **towers}, source=str(config_file))
    if model_type == "clip":  # one tower of a full CLIP folder, projecting to the shared joint width
        key = _SUB_CONFIG[config_class]
        values = {**_sub_config(raw, key, config_file),
                  "projection_dim": raw.get("projection_dim", CLIPConfig.projection_dim)}
        return config_from_dict(config_class, values, source=f"{config_file}: {key}")
    return config_from_dict(config_class, raw, source=str(config_file))


def clip_repeats(cls: type, config) -> List[Repeat]:
    """Each tower's list of Transformer blocks in our names, and the length the config gives it."""
    layout = _layout(cls)
    towers = {"text": getattr(config, "text_config", config), "vision": getattr(config, "vision_config", config)}
    return [(f"{layout[part]}encoder.layers", towers[part].num_hidden_layers, "num_hidden_layers")
            for part in ("text", "vision") if part in layout]


def load_pretrained(cls: Type[nn.Module], path: Union[str, Path], subfolder: Optional[str] = None,
                    dtype: Optional[torch.dtype] = torch.float32) -> nn.Module:
    """Build `cls` from a transformers CLIP folder: config first, then every tensor accounted for."""
    folder = resolve_folder(path, subfolder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: file not found (a transformers model folder holds config.json "
                          f"beside its weights)")
    raw = read_json(config_file)
    model_type = source_model_type(cls, raw, config_file)
    config = read_config(cls, raw, model_type, config_file)
    weights = find_weights_file(folder, ("model", "pytorch_model"))
    state = rename_keys(read_state_dict(weights), load_rules(cls), ignore_rules(cls, model_type),
                        source=str(weights))
    check_repeats(clip_repeats(cls, config), state, str(weights), str(config_file))
    model = build_on_meta(lambda: cls(config))
    return load_into(model, state, source=str(weights), dtype=dtype)


def config_json(model: nn.Module) -> dict:
    """config.json as transformers writes it for the matching class."""
    values = config_to_dict(model.config)
    if isinstance(model.config, CLIPConfig):
        for config_class, key in _SUB_CONFIG.items():
            values[key]["model_type"] = config_class.model_type
    return {"architectures": [type(model).__name__], "model_type": model.config_class.model_type, **values}


def save_pretrained(model: nn.Module, folder: Union[str, Path]) -> None:
    """Write `folder/config.json` and `folder/model.safetensors` in transformers' layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = rename_keys(model.state_dict(), save_rules(type(model)), source=type(model).__name__)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    text = json.dumps(config_json(model), indent=2, sort_keys=True)
    (folder / "config.json").write_text(text + "\n", encoding="utf-8")
