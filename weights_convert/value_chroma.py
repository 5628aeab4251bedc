"""ValueChromaVQModel folders (parti/value_chroma.py) <-> the model.

    config.json                    {"_class_name": "ValueChromaVQModel", "num_colours": J, "min_value": tau}
    colour_codebook.safetensors    one tensor, "colours": (J, 3), the colours m_j on the [0, 1] scale
    structure/                     a diffusers VQModel folder with one input and one output channel (`diffusers_vq`)

Loading is strict: the class name, the config's keys, the one tensor's name and shape, and the
structure folder's own checks (`load_vq_model`); an error names the file.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch

from parti_from_scratch.configuration import resolve_folder
from weights_convert.common import CheckpointError, _list, read_state_dict
from weights_convert.diffusers_models import read_config
from weights_convert.diffusers_vq import load_vq_model, save_vq_model

PathLike = Union[str, Path]
CLASS_NAME = "ValueChromaVQModel"
COLOURS_FILE = "colour_codebook.safetensors"
STRUCTURE = "structure"


def is_value_chroma_folder(folder: PathLike) -> bool:
    """True when folder/config.json names this class (a plain VQModel folder names "VQModel")."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("_class_name") == CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False


def load_value_chroma(path: PathLike, subfolder: Optional[str] = None,
                      dtype: Optional[torch.dtype] = torch.float32):
    from parti_from_scratch.parti.value_chroma import ValueChromaConfig, ValueChromaVQModel
    folder = resolve_folder(path, subfolder)
    values, source = read_config(folder, CLASS_NAME)
    if values.get("_class_name") != CLASS_NAME:
        raise CheckpointError(f"{source}: _class_name must be {CLASS_NAME!r}")
    config = ValueChromaConfig.from_dict(values, source=source)
    colours_path = folder / COLOURS_FILE
    state = read_state_dict(colours_path)
    extra = set(state) - {"colours"}
    if "colours" not in state or extra:
        raise CheckpointError(f"{colours_path}: expected exactly one tensor, 'colours'; "
                              f"{'missing it' if 'colours' not in state else 'extra: ' + _list(extra)}")
    colours = state["colours"]
    if tuple(colours.shape) != (config.num_colours, 3) or not colours.is_floating_point():
        raise CheckpointError(f"{colours_path}: 'colours' must be a float tensor of shape ({config.num_colours}, 3) "
                              f"(num_colours in {source}), found {colours.dtype} {tuple(colours.shape)}")
    structure = load_vq_model(folder, STRUCTURE, dtype)
    try:
        model = ValueChromaVQModel(structure, config, colours)
    except ValueError as e:
        raise CheckpointError(f"{folder / STRUCTURE}: {e}") from None
    return model.to(dtype) if dtype is not None else model


def save_value_chroma(model, folder: PathLike) -> None:
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_vq_model(model.structure, folder / STRUCTURE)
    save_file({"colours": model.colours.detach().cpu().contiguous()}, str(folder / COLOURS_FILE))
    config = {"_class_name": CLASS_NAME, **dataclasses.asdict(model.config)}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_image_tokenizer(path: PathLike, subfolder: Optional[str] = None,
                         dtype: Optional[torch.dtype] = torch.float32):
    """A Parti pipeline's vqvae/: a ValueChromaVQModel folder or a diffusers VQModel folder, by its config's class."""
    folder = resolve_folder(path, subfolder)
    if is_value_chroma_folder(folder):
        return load_value_chroma(folder, dtype=dtype)
    return load_vq_model(folder, dtype=dtype)
