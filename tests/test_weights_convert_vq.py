"""Loading the public VQ checkpoints: diffusers VQModel folders, taming-transformers .ckpt, min-dalle's detoker.pt.

Each file is written in its exact layout from a tiny random diffusers VQModel
(tests/test_parti_vqgan.py's reference models): diffusers' own save_pretrained
for folders; for taming and min-dalle, the diffusers keys renamed HERE by the
documented names of taming/modules/diffusionmodules/model.py (written
independently of the loader's rules), wrapped as Lightning does. The loaded
model must compute what the reference computes (same tolerance and reasoning as
tests/test_parti_vqgan.py), and every damaged file must fail naming the file and the keys.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import sys

import pytest
import torch

from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.parti.vqgan import VQModel
from weights_convert.common import CheckpointError, check_state_dict
from weights_convert.min_dalle_detoker import load_min_dalle_detokenizer
from weights_convert.taming_vqgan import load_taming_vqgan, taming_to_ours

from test_parti_vqgan import TOL, VQ_CONFIGS, diffusers, image, max_diff, reference_vq

TAMING = "taming-f16-like"  # attention levels in both halves, as vqgan_imagenet_f16_16384


# ------------------------------------------------------------------------------------ diffusers folders

@pytest.fixture(scope="module")
def amused_folder(tmp_path_factory):
    ref = reference_vq("amused-like")
    folder = tmp_path_factory.mktemp("amused") / "vqvae"
    ref.save_pretrained(folder)
    return ref, folder.parent


def test_diffusers_folder_round_trip(amused_folder, tmp_path):
    """Load a `vqvae/` subfolder, save it, and diffusers loads ours back with the same tensors, bit for bit."""
    ref, root = amused_folder
    ours = VQModel.from_pretrained(root, subfolder="vqvae")
    assert ours.config.lookup_from_codebook and ours.config.vq_embed_dim == 5
    ours.save_pretrained(tmp_path / "saved")
    back = diffusers.VQModel.from_pretrained(tmp_path / "saved")
    want = ref.state_dict()
    got = back.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert back.config.vq_embed_dim == 5 and back.config.lookup_from_codebook
    again = VQModel.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def _damaged_folder(src, dst, edit_state=None, edit_config=None):
    import json
    from safetensors.torch import load_file, save_file
    dst.mkdir()
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    save_file(state, str(dst / "diffusion_pytorch_model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"missing keys: decoder\.up_blocks\.1\.resnets\.0\.conv1\.bias"),
    ("extra", r"unexpected keys: .*quantize\.extra_codes"),
    ("shape", r"wrong shapes: quantize\.embedding\.weight \(file \(64, 4\), model \(64, 5\)\)"),
    ("levels", r"config\.json \(layers_per_block\) asks for 3 entries of encoder\.down_blocks\.0\.resnets"),
])
def test_damaged_diffusers_folder_is_refused_naming_file_and_keys(amused_folder, tmp_path, case, pattern):
    _, root = amused_folder
    edits = {
        "missing": dict(edit_state=lambda s: s.pop("decoder.up_blocks.1.resnets.0.conv1.bias")),
        "extra": dict(edit_state=lambda s: s.update({"quantize.extra_codes": torch.zeros(3)})),
        "shape": dict(edit_state=lambda s: s.update({"quantize.embedding.weight": torch.zeros(64, 4)})),
        "levels": dict(edit_config=lambda c: c.update(layers_per_block=3)),
    }
    folder = _damaged_folder(root / "vqvae", tmp_path / case, **edits[case])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder))}.*{pattern}"):
        VQModel.from_pretrained(folder)


def test_spatial_norm_folder_is_refused_naming_file_and_key(amused_folder, tmp_path):
    """Kandinsky's MoVQ (norm_type "spatial") is not built: config.json is refused before any weight is read."""
    _, root = amused_folder
    folder = _damaged_folder(root / "vqvae", tmp_path / "movq", edit_config=lambda c: c.update(norm_type="spatial"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(folder / 'config.json'))}: norm_type='spatial'"):
        VQModel.from_pretrained(folder)


# ---------------------------------------------------------------------------- taming-transformers .ckpt

def to_taming_names(state, levels):
    """A diffusers VQModel state dict in taming's names (taming/modules/diffusionmodules/model.py).

    Attention projections become 1x1 convolutions, as taming's AttnBlock holds them.
    """
    out = {}
    for key, tensor in state.items():
        name = key
        for pattern, repl in [
            (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
            (r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
            (r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
            (r"(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
            (r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
            (r"encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn."),
            (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        ]:
            name = re.sub("^" + pattern, repl, name)
        # taming numbers decoder levels from the image up: diffusers' up_blocks.i is taming's up.(L-1-i)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.(.+)", name)
        if m:
            part = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}[m[2]]
            name = f"decoder.up.{levels - 1 - int(m[1])}.{part}.{m[3]}"
        for ours, theirs in [("conv_shortcut", "nin_shortcut"), ("group_norm", "norm"), ("to_q", "q"),
                             ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
            name = name.replace(f".{ours}.", f".{theirs}.")
        if re.search(r"\.(q|k|v|proj_out)\.weight$", name):
            tensor = tensor[:, :, None, None]  # AttnBlock's projections are 1x1 convolutions
        out[name] = tensor.detach().clone()
    return out


class _Payload:
    """Pickles as the call function(*args): what a hostile checkpoint hides."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _lightning_ckpt(path, state, tmp_path, name):
    """torch.save a Lightning-style checkpoint holding an object of a framework the reader does not have."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("class ModelCheckpoint:\n    def __init__(self):\n        self.best = 0.1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        framework = importlib.import_module(name)
        torch.save({"state_dict": state, "epoch": 11, "global_step": 90000, "pytorch-lightning_version": "1.0.8",
                    "callbacks": {framework.ModelCheckpoint: framework.ModelCheckpoint()},
                    "optimizer_states": [], "lr_schedulers": []}, path)
    finally:
        sys.path.remove(str(tmp_path))
        del sys.modules[name]
    return path


@pytest.fixture(scope="module")
def taming_ckpt(tmp_path_factory):
    ref = reference_vq(TAMING)
    state = to_taming_names(ref.state_dict(), len(ref.config.block_out_channels))
    # the training loss lives in the same state_dict: LPIPS and the discriminator
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    tmp = tmp_path_factory.mktemp("taming")
    return ref, state, _lightning_ckpt(tmp / "last.ckpt", state, tmp, "fake_lightning_vq")


def test_taming_file_layout_is_the_documented_one(taming_ckpt):
    """The test file holds the names of vqgan_imagenet_f16_16384 (sanity of the writer above)."""
    _, state, _ = taming_ckpt
    for key in ["encoder.down.2.attn.0.q.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.mid.attn_1.norm.bias", "decoder.up.2.attn.1.proj_out.weight",
                "decoder.up.1.upsample.conv.weight", "decoder.norm_out.weight",
                "decoder.up.1.block.0.nin_shortcut.weight", "quant_conv.weight", "quantize.embedding.weight"]:
        assert key in state, key
    assert state["decoder.up.2.attn.1.q.weight"].shape[2:] == (1, 1)
    assert not any(k.startswith("decoder.up_blocks") or k.startswith("decoder.up.0.upsample") for k in state)


def test_taming_checkpoint_loads_through_the_restricted_unpickler(taming_ckpt):
    ref, _, path = taming_ckpt
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the framework object: weights_only refuses the file
    ours = load_taming_vqgan(path)
    assert "fake_lightning_vq" not in sys.modules
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "vq_embed_dim", "num_vq_embeddings",
                "down_block_types", "up_block_types", "in_channels", "out_channels"):
        want = getattr(ref.config, key)
        assert getattr(ours.config, key) == (tuple(want) if isinstance(want, list) else want), key
    x = image(VQ_CONFIGS[TAMING][1])
    with torch.no_grad():
        z_ref, z_ours = ref.encode(x).latents, ours.encode(x).latents
        assert max_diff(z_ours, z_ref) <= TOL
        _, _, (_, _, idx_ref) = ref.quantize(z_ref)
        indices = ours.tokenize(x)
        assert torch.equal(indices.reshape(-1), idx_ref.reshape(-1))
        assert max_diff(ours.decode(z_ref).sample, ref.decode(z_ref).sample) <= TOL


def test_hostile_taming_checkpoint_is_refused_and_never_runs(taming_ckpt, tmp_path):
    _, state, _ = taming_ckpt
    marker = tmp_path / "pwned"
    evil = dict(state, **{"loss.discriminator.main.0.bias": _Payload(os.system, (f"touch {marker}",))})
    path = _lightning_ckpt(tmp_path / "evil.ckpt", evil, tmp_path, "fake_lightning_evil_vq")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: refused: the pickle calls posix\.system"):
        load_taming_vqgan(path)
    assert not marker.exists()


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"missing keys: decoder\.up\.1\.block\.0\.conv1\.bias"),
    ("extra", r"unexpected keys: decoder\.up\.1\.block\.0\.temb_proj\.weight"),
    ("shape", r"wrong shapes: encoder\.mid\.attn_1\.q\.weight \(file \(64, 64\), model \(64, 64, 1, 1\)\)"),
    ("no codebook", r"missing key 'quantize\.embedding\.weight'"),
])
def test_damaged_taming_checkpoint_is_refused_naming_file_and_keys(taming_ckpt, tmp_path, case, pattern):
    _, state, _ = taming_ckpt
    state = dict(state)
    if case == "missing":
        del state["decoder.up.1.block.0.conv1.bias"]
    elif case == "extra":
        state["decoder.up.1.block.0.temb_proj.weight"] = torch.zeros(8, 8)
    elif case == "shape":
        state["encoder.mid.attn_1.q.weight"] = state["encoder.mid.attn_1.q.weight"][:, :, 0, 0]
    else:
        del state["quantize.embedding.weight"]
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: .*{pattern}"):
        load_taming_vqgan(path)


# ------------------------------------------------------------------------------------ min-dalle detoker.pt

@pytest.fixture(scope="module")
def detoker(tmp_path_factory):
    """A tiny detoker.pt: decoder, post_quant_conv and the codebook as `embedding.weight`, a plain state dict."""
    ref = reference_vq(TAMING)
    full = to_taming_names(ref.state_dict(), len(ref.config.block_out_channels))
    state = {k: v for k, v in full.items() if k.startswith(("decoder.", "post_quant_conv."))}
    state["embedding.weight"] = full["quantize.embedding.weight"]
    path = tmp_path_factory.mktemp("min-dalle") / "detoker.pt"
    torch.save(state, path)
    return ref, state, path


def test_min_dalle_detokenizer_decodes_indices_in_both_ranges(detoker):
    """Decoder-only; the file's output reads as [0, 1]: by default folded to [-1, 1] (2x - 1), or kept as is."""
    ref, _, path = detoker
    ours, as_file = load_min_dalle_detokenizer(path), load_min_dalle_detokenizer(path, output_range="[0, 1]")
    assert ours.encoder is None and ours.quant_conv is None
    g = torch.Generator().manual_seed(5)
    indices = torch.randint(0, ref.config.num_vq_embeddings, (2, 4, 4), generator=g)
    with torch.no_grad():
        codes = ref.quantize.get_codebook_entry(indices.reshape(-1), (2, 4, 4, ref.config.vq_embed_dim))
        g_ref = ref.decode(codes, force_not_quantize=True).sample  # what min-dalle reads as [0, 1]
        assert max_diff(as_file.decode_indices(indices), g_ref) <= TOL
        # 2 W and 2 b - 1 in the last convolution: the same sums doubled (exact) and one rounding of 2b - 1
        assert max_diff(ours.decode_indices(indices), 2 * g_ref - 1) <= 2 * TOL
    with pytest.raises(RuntimeError, match="decoder_only"):
        ours.encode(image(16))
    with pytest.raises(ConfigError, match="decoder-only VQModel cannot be written"):
        ours.save_pretrained(path.parent / "out")


def test_min_dalle_detoker_with_an_unknown_key_is_refused(detoker, tmp_path):
    _, state, _ = detoker
    path = tmp_path / "detoker.pt"
    torch.save(dict(state, **{"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}), path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: unexpected keys: encoder\.conv_in\.weight"):
        load_min_dalle_detokenizer(path)


def test_full_size_min_dalle_detokenizer_layout_is_accepted():
    """min-dalle's own VQGanDetokenizer (built on the meta device, no weights): every key maps to our
    decoder-only VQModel with the right shapes, 46,709,891 parameters (the count PARTI.md gives)."""
    spec = importlib.util.find_spec("min_dalle")
    if spec is None:
        pytest.skip("min-dalle is not installed")
    # load the one module file, not the package: min_dalle/__init__ switches autograd off process-wide
    path = os.path.join(os.path.dirname(spec.origin), "models", "vqgan_detokenizer.py")
    module_spec = importlib.util.spec_from_file_location("min_dalle_vqgan_detokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    with torch.device("meta"):
        theirs = module.VQGanDetokenizer()
    state = theirs.state_dict()
    model, ours = taming_to_ours(state, "detoker.pt", codebook="embedding", decoder_only=True, ignore=())
    check_state_dict(model, ours, "detoker.pt")
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in state.values()) == 46_709_891
    assert model.config.block_out_channels == (128, 128, 256, 256, 512)
    assert model.config.up_block_types[0] == "AttnUpDecoderBlock2D" and model.config.num_vq_embeddings == 16384
