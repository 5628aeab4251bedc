"""Configs read from config.json: typed fields, one table of refused keys per class, per-model rules.

Every bad file must give a ConfigError (a ValueError, which the command line
prints as one line) whose message starts with the file's path and names the key.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from parti_from_scratch.clip.model import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
from parti_from_scratch.configuration import Config, ConfigError, Refused, config_from_dict, field_types
from parti_from_scratch.diffusion.schedule import MAX_TRAIN_TIMESTEPS, check_betas
from parti_from_scratch.diffusion.schedulers import SCHEDULERS
from parti_from_scratch.diffusion.schedulers.base import SchedulerConfig
from parti_from_scratch.unet import UNet2DConditionConfig, UNet2DConditionModel
from parti_from_scratch.vae import AutoencoderKL, AutoencoderKLConfig

SHIPPED = Path(__file__).resolve().parents[1] / "parti_from_scratch" / "assets" / "default_model"

TINY_UNET = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "block_out_channels": [32, 64],
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8,
             "cross_attention_dim": 16, "attention_head_dim": 4}
TINY_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [32, 64], "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "norm_num_groups": 8, "scaling_factor": 0.18215}
TINY_TEXT = {"model_type": "clip_text_model", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16, "eos_token_id": 99,
             "initializer_range": 0.02}
TINY_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "trained_betas": None}


def write_config(folder: Path, values: dict, name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(values), encoding="utf-8")
    return folder / name


def load_unet(folder):
    return UNet2DConditionModel.from_pretrained(folder)


def load_vae(folder):
    return AutoencoderKL.from_pretrained(folder)


def load_text(folder):
    return CLIPTextModel.from_pretrained(folder)


def load_scheduler(folder):
    return SCHEDULERS["pndm"].from_pretrained(folder)


# (base config, config file name, loader, key, bad value, what the message must say after "<file>: ")
BAD_VALUES = {
    "string int": (TINY_UNET, "config.json", load_unet, "layers_per_block", "2",
                   r"layers_per_block='2' should be an integer or a list of \(an integer\)"),
    "negative channels": (TINY_UNET, "config.json", load_unet, "block_out_channels", [32, -64],
                          r"block_out_channels=\(32, -64\): must be positive"),
    "zero heads": (TINY_UNET, "config.json", load_unet, "attention_head_dim", 0, r"attention_head_dim=0: must be "),
    "heads not dividing": (TINY_UNET, "config.json", load_unet, "attention_head_dim", 3,
                           r"attention_head_dim=3: 3 heads do not divide the 32 channels of level 0"),
    "zero groups": (TINY_UNET, "config.json", load_unet, "norm_num_groups", 0, r"norm_num_groups=0: must be positive"),
    "groups not dividing": (TINY_UNET, "config.json", load_unet, "norm_num_groups", 5,
                            r"norm_num_groups=5 does not divide block_out_channels entry 32"),
    "null groups": (TINY_UNET, "config.json", load_unet, "norm_num_groups", None,
                    r"norm_num_groups=None should be an integer"),
    "bool as int": (TINY_UNET, "config.json", load_unet, "in_channels", True, r"in_channels=True should be an integer"),
    "even kernel": (TINY_UNET, "config.json", load_unet, "conv_in_kernel", 4, r"conv_in_kernel=4: must be odd"),
    "vae zero scaling": (TINY_VAE, "config.json", load_vae, "scaling_factor", 0, r"scaling_factor=0: must be positive"),
    "vae nan scaling": (TINY_VAE, "config.json", load_vae, "scaling_factor", math.nan,
                        r"scaling_factor=nan should be a number"),
    "vae infinite scaling": (TINY_VAE, "config.json", load_vae, "scaling_factor", math.inf,
                             r"scaling_factor=inf: must be finite"),
    "vae string channels": (TINY_VAE, "config.json", load_vae, "latent_channels", "4",
                            r"latent_channels='4' should be an integer"),
    "vae null groups": (TINY_VAE, "config.json", load_vae, "norm_num_groups", None,
                        r"norm_num_groups=None should be an integer"),
    "clip zero heads": (TINY_TEXT, "config.json", load_text, "num_attention_heads", 0,
                        r"num_attention_heads=0: must be positive"),
    "clip heads not dividing": (TINY_TEXT, "config.json", load_text, "num_attention_heads", 5,
                                r"num_attention_heads=5: does not divide hidden_size=32"),
    "clip null width": (TINY_TEXT, "config.json", load_text, "hidden_size", None,
                        r"hidden_size=None should be an integer"),
    "clip float layers": (TINY_TEXT, "config.json", load_text, "num_hidden_layers", 2.0,
                          r"num_hidden_layers=2.0 should be an integer"),
    "beta_end below beta_start": (TINY_SCHEDULER, "scheduler_config.json", load_scheduler, "beta_end", 0.0001,
                                  r"beta_end=0.0001 < beta_start=0.00085"),
    "beta_end above 1": (TINY_SCHEDULER, "scheduler_config.json", load_scheduler, "beta_end", 2.0,
                         r"beta_end=2.0: must be in \(0, 1\)"),
    "string beta": (TINY_SCHEDULER, "scheduler_config.json", load_scheduler, "beta_start", "0.00085",
                    r"beta_start='0.00085' should be a number"),
    "huge schedule": (TINY_SCHEDULER, "scheduler_config.json", load_scheduler, "num_train_timesteps", 2 ** 26,
                      rf"num_train_timesteps=67108864: must be an integer from 2 to {MAX_TRAIN_TIMESTEPS:,}"),
    "trained beta of 1": (TINY_SCHEDULER, "scheduler_config.json", load_scheduler, "trained_betas",
                          [0.01] * 999 + [1.0], r"trained_betas\[999\]=1.0: every beta_t must be a finite number "
                                                r"in \(0, 1\)"),
    "trained betas too few": (TINY_SCHEDULER, "scheduler_config.json", load_scheduler, "trained_betas", [0.01] * 10,
                              r"trained_betas has 10 values, num_train_timesteps=1000"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_config_value_is_refused_naming_file_and_key(tmp_path, case):
    base, name, load, key, value, message = BAD_VALUES[case]
    path = write_config(tmp_path, {**base, key: value}, name)
    with pytest.raises(ConfigError, match="^" + re.escape(str(path)) + r": (PNDMScheduler: )?" + message):
        load(tmp_path)


def test_the_tiny_configs_themselves_are_valid(tmp_path):
    """The bases of BAD_VALUES pass validation, so each case above fails for its one bad key."""
    UNet2DConditionConfig.from_dict(TINY_UNET)
    AutoencoderKLConfig.from_dict(TINY_VAE)
    CLIPTextConfig.from_dict(TINY_TEXT)
    SCHEDULERS["pndm"].from_pretrained(write_config(tmp_path, TINY_SCHEDULER, "scheduler_config.json"))


def test_config_json_that_is_not_an_object_or_has_a_bad_tower_is_named(tmp_path):
    path = write_config(tmp_path / "a", [1, 2])
    with pytest.raises(ConfigError, match=re.escape(f"{path}: expected a JSON object, got list")):
        load_unet(tmp_path / "a")
    values = {"model_type": "clip", "text_config": {**TINY_TEXT, "hidden_size": -32},
              "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 4, "image_size": 32, "patch_size": 8}}
    path = write_config(tmp_path / "b", values)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: text_config.hidden_size=-32: must be positive")):
        CLIPModel.from_pretrained(tmp_path / "b")
    path = write_config(tmp_path / "c", {**values, "text_config": "clip"})
    with pytest.raises(ConfigError, match=re.escape(f"{path}: text_config='clip' should be a JSON object")):
        CLIPModel.from_pretrained(tmp_path / "c")


# ----------------------------------------------------------------------------------------- refused keys

REFUSING = (UNet2DConditionConfig, AutoencoderKLConfig, CLIPTextConfig, CLIPVisionConfig,
            *(cls.config_class for cls in SCHEDULERS.values()))


@pytest.mark.parametrize("cls", REFUSING, ids=lambda c: c.__name__)
def test_refused_keys_are_one_table_and_not_fields(cls):
    """A key is either a field the model uses or a refused part, never both; the table says why."""
    assert not set(cls.refused) & set(field_types(cls))
    for key, rule in cls.refused.items():
        assert isinstance(rule, Refused) and rule.accepted and rule.why, key


@pytest.mark.parametrize("cls", [UNet2DConditionConfig, AutoencoderKLConfig], ids=lambda c: c.__name__)
def test_every_refused_key_names_itself_and_accepts_its_absent_value(cls, tmp_path):
    base = TINY_UNET if cls is UNet2DConditionConfig else TINY_VAE
    for key, rule in cls.refused.items():
        bad = "something" if rule.accepted[0] is not None and not isinstance(rule.accepted[0], str) else 7
        with pytest.raises(ConfigError, match=re.escape(f"model/config.json: {key}={bad!r} is not supported")):
            cls.from_dict({**base, key: bad}, source="model/config.json")
        for value in rule.accepted:
            cls.from_dict({**base, key: value})


# Fields read only through a property of the config class itself.
READ_INDIRECTLY = {"attention_head_dim": "UNet2DConditionConfig.heads, which the model reads"}


@pytest.mark.parametrize("cls", [UNet2DConditionConfig, AutoencoderKLConfig, CLIPTextConfig, CLIPVisionConfig],
                         ids=lambda c: c.__name__)
def test_every_field_is_read_by_the_package(cls):
    """A field exists because something uses it: `config.<field>` (or per_block("<field>")) appears in the
    package outside the config class itself; keys kept only to be refused belong in `refused`."""
    root = Path(__file__).resolve().parents[1]
    source = "\n".join(p.read_text(encoding="utf-8") for folder in ("parti_from_scratch", "weights_convert")
                       for p in sorted((root / folder).rglob("*.py")))
    source = source.replace(inspect.getsource(cls), "")
    unread = [name for name in field_types(cls) if name not in READ_INDIRECTLY
              and not re.search(rf"\bconfig\.{name}\b|per_block\([\"']{name}[\"']\)", source)]
    assert not unread


def test_bookkeeping_keys_are_ignored_and_python_keywords_are_strict():
    config = UNet2DConditionConfig.from_dict({**TINY_UNET, "_name_or_path": "x", "some_future_key": [1]})
    assert config.block_out_channels == (32, 64)
    with pytest.raises(TypeError, match="unexpected keys"):
        UNet2DConditionModel(**{**TINY_UNET, "layer_per_block": 2})
    with pytest.raises(ConfigError, match="class_embed_type='timestep' is not supported"):
        UNet2DConditionModel(**{**TINY_UNET, "class_embed_type": "timestep"})


def test_the_shipped_configs_pass_validation():
    """The configs the package ships (written by save_pretrained, refused keys at their absent values) load."""
    UNet2DConditionConfig.from_dict(json.loads((SHIPPED / "unet" / "config.json").read_text()))
    AutoencoderKLConfig.from_dict(json.loads((SHIPPED / "vae" / "config.json").read_text()))


def test_lists_become_tuples_and_nested_configs_are_built():
    config = config_from_dict(UNet2DConditionConfig, {**TINY_UNET, "attention_head_dim": [4, 8]})
    assert config.attention_head_dim == (4, 8) and config.heads == (4, 8)
    clip = CLIPModel.config_class(text_config=dict(TINY_TEXT, model_type=None) | {"hidden_size": 64})
    assert isinstance(clip.text_config, CLIPTextConfig) and clip.text_config.hidden_size == 64


def test_a_config_is_validated_however_it_is_made():
    with pytest.raises(ConfigError, match="norm_num_groups=0"):
        UNet2DConditionConfig(block_out_channels=(32,), down_block_types=("DownBlock2D",),
                              up_block_types=("UpBlock2D",), norm_num_groups=0)
    config = AutoencoderKLConfig()
    with pytest.raises(ConfigError, match="scaling_factor=-1.0"):
        dataclasses.replace(config, scaling_factor=-1.0)
    assert issubclass(ConfigError, ValueError) and all(issubclass(c, Config) for c in REFUSING)


# ----------------------------------------------------------------------------------------------- schedules

def test_schedule_check_refuses_a_stride0_tensor_without_copying_it():
    """2^26 timesteps from one stored float: refused by its length, before any value is read or copied."""
    betas = torch.full((1,), 0.01).expand(2 ** 26)
    assert betas.stride() == (0,) and betas.untyped_storage().nbytes() == 4
    with pytest.raises(ConfigError, match=rf"betas: 67108864 timesteps; expected 2 to {MAX_TRAIN_TIMESTEPS:,}"):
        check_betas(betas, "betas")


@pytest.mark.parametrize("betas, message", [
    (torch.full((10, 10), 0.01), r"betas: expected one value per timestep \(1-D\), got shape \(10, 10\)"),
    (torch.full((1,), 0.01), r"betas: 1 timesteps; expected 2 to"),
    (torch.tensor([0.01, float("nan")]), r"betas\[1\]=nan: every beta_t must be a finite number in \(0, 1\)"),
    (torch.tensor([0.0, 0.01]), r"betas\[0\]=0.0: every beta_t"),
    (torch.tensor([0.01, float("inf")]), r"betas\[1\]=inf: every beta_t"),
    (torch.tensor([1, 2]), r"betas: expected floating-point values, got torch.int64"),
], ids=["2-D", "one step", "nan", "zero", "inf", "integer"])
def test_schedule_check_names_the_first_bad_beta(betas, message):
    with pytest.raises(ConfigError, match="^" + message):
        check_betas(betas, "betas")


def test_valid_schedules_pass_the_check():
    for cls in SCHEDULERS.values():
        check_betas(cls().betas)
        check_betas(cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas)
    assert SchedulerConfig(trained_betas=(0.1,) * 1000).trained_betas[0] == 0.1


# ----------------------------------------------------------------------------------------------- the CLI

def test_cli_prints_one_line_naming_file_and_key(tmp_path, capsys):
    """A shipped-model copy whose VAE config says scaling_factor 0: exit 2 and one line, before any generation."""
    from parti_from_scratch.cli import main
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    vae_config = folder / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "scaling_factor": 0}))
    assert main(["generate", "a red circle", "--model", str(folder), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{vae_config}: scaling_factor=0: must be positive" in err
    assert not (tmp_path / "x.png").exists()
