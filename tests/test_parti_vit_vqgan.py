"""ViT-VQGAN (parti_from_scratch/parti/vit_vqgan.py) and its enhancing-transformers loader (weights_convert/vit_vqgan.py).

One test per equation (2-D positions, patch embedding, unpatchify, raster token order, straight-through
gradient), the VQModel-like API, a short training, and the loader against files written here by the
reference's documented key names and checked against a functional re-statement of the reference's
forward pass (enhancing-transformers `ViTEncoder`, `ViTDecoder`, `VectorQuantizer`, `ViTVQ`).
"""
from __future__ import annotations

import math
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.nn.positional import sincos_2d_position_encoding
from parti_from_scratch.parti.quantize import l2_normalize
from parti_from_scratch.parti.vit_vqgan import (ViTVQGANConfig, ViTVQModel, add_positions, patch_embed,
                                                unpatchify)
from weights_convert.common import CheckpointError
from weights_convert.vit_vqgan import IGNORED, load_vit_vqgan, save_vit_vqgan

# tiny models: one thread (tests/conftest.py); on a shared CPU the thread pool's contention costs 10-100x
pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
# tiny, non-square (2 x 3 token grid) so that a transposed grid cannot pass
TINY = dict(image_size=(16, 24), patch_size=8, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64,
            codebook_size=16, codebook_dim=8)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tiny_model(seed=0, **overrides) -> ViTVQModel:
    torch.manual_seed(seed)
    return ViTVQModel(ViTVQGANConfig(**{**TINY, **overrides})).eval()


def images(b=2, seed=1, size=(16, 24), dtype=torch.float32):
    """Images in [-1, 1]."""
    return torch.rand(b, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


# ------------------------------------------------------------------------------------- the config

def test_config_defaults_are_vit_vqgan_small():
    """ViT-VQGAN-Small (arXiv 2110.04627): 8 blocks, 8 heads, width 512, MLP 2048; 8192 codes of 32 dims; 32x32."""
    c = ViTVQGANConfig()
    assert (c.depth, c.heads, c.dim, c.mlp_dim) == (8, 8, 512, 2048)
    assert (c.image_size, c.patch_size, c.grid_size) == ((256, 256), 8, (32, 32))
    assert (c.codebook_size, c.codebook_dim, c.channels) == (8192, 32, 3)
    assert (c.decoder("dim"), c.decoder("depth")) == (512, 8)
    # Parti's enlarged decoder
    big = ViTVQGANConfig(decoder_depth=32, decoder_dim=1280)
    assert (big.decoder("dim"), big.decoder("depth"), big.decoder("heads")) == (1280, 32, 8)


@pytest.mark.parametrize("values, message", [
    (dict(image_size=(20, 24)), r"image_size=\(20, 24\): not divisible by patch_size=8"),
    (dict(dim=30), r"dim=30: the 2-D sine-cosine positions need a width divisible by 4"),
    (dict(hidden_act="swish"), r"hidden_act='swish' is not supported"),
    (dict(depth=-1), r"depth=-1: must be >= 0"),
])
def test_config_refuses_bad_values(values, message):
    with pytest.raises(ConfigError, match=message):
        ViTVQGANConfig(**{**TINY, **values})


# ------------------------------------------------------------------------------------- the equations

def reference_sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
    """The 2-D table as enhancing-transformers / MAE build it: meshgrid(w, h), so the first half is the column."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)), axis=0)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_sincos_2d_position_encoding():
    """PE(r, c) = [s(c) | s(r)], s = [sin(p omega) | cos(p omega)], omega_i = 10000^(-i/(dim/4)); row k = (k//w, k%w)."""
    h, w, dim = 3, 5, 16
    table = sincos_2d_position_encoding(h, w, dim, dtype=F64)
    # both in float64, the frequencies computed by different formulas (exp/log vs power) agree to a few ulps,
    # angles are <= 4, so sin/cos differ by ~1e-15
    torch.testing.assert_close(table, torch.from_numpy(reference_sincos_2d(h, w, dim)), rtol=0, atol=1e-13)
    # raster order: the first half depends only on the column, the second only on the row
    for k in range(h * w):
        r, c = divmod(k, w)
        assert torch.equal(table[k, :dim // 2], table[c, :dim // 2])
        assert torch.equal(table[k, dim // 2:], table[r * w, dim // 2:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_position_encoding(2, 2, 6)


def test_patch_embed_is_a_linear_map_of_each_patch():
    """x_{ij} = W vec(P_{ij}) + b, token k = patch (k // w, k % w): against a loop over the patches."""
    p, d = 8, 5
    x, weight, bias = randn(2, 3, 16, 24, seed=2, dtype=F64), randn(d, 3, p, p, seed=3, dtype=F64), randn(d, seed=4,
                                                                                                          dtype=F64)
    tokens = patch_embed(x, weight, bias)
    assert tokens.shape == (2, 2 * 3, d)
    for k in range(6):
        i, j = divmod(k, 3)
        patch = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(2, -1)          # vec(P_ij): (b, c p p)
        expected = patch @ weight.reshape(d, -1).T + bias
        # dot products of 192 float64 terms of size O(1): a few hundred ulps of O(10) at most
        torch.testing.assert_close(tokens[:, k], expected, rtol=0, atol=1e-12)


def test_unpatchify_writes_each_token_to_its_own_patch():
    """x_hat[:, i p + u, j p + v] = b + sum_d t_{ij,d} W[d, :, u, v], token k -> patch (k // w, k % w)."""
    p, d = 4, 6
    tokens, weight, bias = randn(2, 6, d, seed=5, dtype=F64), randn(d, 3, p, p, seed=6, dtype=F64), randn(3, seed=7,
                                                                                                          dtype=F64)
    x = unpatchify(tokens, weight, bias, (2, 3))
    assert x.shape == (2, 3, 2 * p, 3 * p)
    for k in range(6):
        i, j = divmod(k, 3)
        # (b, d) x (d, c p p) -> (b, c, p, p)
        expected = (tokens[:, k] @ weight.reshape(d, -1)).reshape(2, 3, p, p) + bias[:, None, None]
        torch.testing.assert_close(x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p], expected, rtol=0, atol=1e-13)


def test_add_positions_refuses_another_grid():
    with pytest.raises(ValueError, match="do not fit the position table"):
        add_positions(torch.zeros(1, 5, 8), torch.zeros(1, 6, 8))


# ------------------------------------------------------------------------------------- token order, API

def test_token_grid_is_raster_order():
    """Token (i, j) of the (b, h, w) grid is the patch at row i, column j; the flat order is k = i w + j.

    With no Transformer blocks every token depends on its own patch only, so changing one patch
    must change exactly one latent, at its place in the grid; and one changed token must change
    exactly its own patch of the decoded image.
    """
    model = tiny_model(depth=0, decoder_depth=0)
    x = images()
    latents = model.encode(x).latents
    assert latents.shape == (2, 8, 2, 3)
    indices = model.quantize(latents).indices
    for i, j in [(0, 0), (0, 2), (1, 1)]:
        x2 = x.clone()
        x2[:, :, 8 * i:8 * (i + 1), 8 * j:8 * (j + 1)] *= -1
        changed = (model.encode(x2).latents - latents).abs().amax(dim=(0, 1)) > 0          # (h, w)
        expected = torch.zeros(2, 3, dtype=torch.bool)
        expected[i, j] = True
        assert torch.equal(changed, expected), (i, j, changed)
        # decode: change token (i, j) only
        k2 = indices.clone()
        k2[:, i, j] = (k2[:, i, j] + 1) % 16
        diff = (model.decode_indices(k2) - model.decode_indices(indices)).abs().amax(dim=(0, 1))   # (H, W)
        touched = diff.reshape(2, 8, 3, 8).amax(dim=(1, 3)) > 0                              # per patch
        assert torch.equal(touched, expected), (i, j, touched)


def test_indices_are_the_encoder_sequence_reshaped_row_major():
    """With Transformer blocks: indices (b, h, w) flattened row-major are the lookups of the encoder's tokens 0..n-1."""
    model = tiny_model()
    x = images()
    with torch.no_grad():
        sequence = model.pre_quant(model.encoder(x))                                       # (b, h w, codebook_dim)
        # k* = argmax_k l2(z) . l2(e_k), token by token, in sequence order
        lookup = (l2_normalize(sequence) @ l2_normalize(model.quantize.embedding.weight).T).argmax(-1)
        grid = model.tokenize(x)
    assert grid.shape == (2, 2, 3) and grid.dtype == torch.int64
    assert torch.equal(grid.reshape(2, -1), lookup)
    assert torch.equal(grid[:, 1, 0], lookup[:, 3])                                           # k = i w + j = 1*3 + 0


def test_decode_indices_equals_decode_of_quantized_latents():
    """decode(indices) = decode(quantize(encode(x))): the same codes, bit for bit, then the same operations."""
    model = tiny_model()
    x = images()
    with torch.no_grad():
        latents = model.encode(x).latents
        out = model.quantize(latents)
        from_latents = model.decode(latents)
        from_indices = model.decode_indices(out.indices)
        from_codes = model.decode(out.quantized, force_not_quantize=True).sample
    assert from_latents.sample.shape == x.shape
    assert torch.equal(from_indices, from_latents.sample)
    assert torch.equal(from_codes, from_latents.sample)
    assert from_latents.commit_loss.ndim == 0 and float(from_latents.commit_loss) > 0
    # the forward pass is encode then decode
    assert torch.equal(model(x).sample, from_latents.sample)
    sample, loss = model(x, return_dict=False)
    assert torch.equal(sample, from_latents.sample) and torch.equal(loss, from_latents.commit_loss)


def test_api_refuses_wrong_shapes():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"expects images \(batch, 3, 16, 24\)"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"indices must be \(batch, 2, 3\)"):
        model.decode_indices(torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\)"):
        model.decode_indices(torch.full((1, 2, 3), 16))
    with pytest.raises(TypeError, match="not both"):
        ViTVQModel(ViTVQGANConfig(**TINY), dim=64)


def test_straight_through_gradient_reaches_the_encoder():
    """z_q = e + l2(z) - sg(l2(z)): d z_q / d z is the Jacobian of l2 alone, and the encoder gets the decoder's gradient."""
    model = tiny_model().double()
    latents = model.encode(images(dtype=F64)).latents.detach().requires_grad_(True)
    w = randn(*latents.shape, seed=8, dtype=F64)
    (grad_st,) = torch.autograd.grad((w * model.quantize(latents).quantized).sum(), latents)
    # the closed form: the gradient of w . l2(z), the codebook contributing nothing; on (b, c, h, w) maps the
    # lookup normalises along c. In float64, the norms of 8 terms summed in another memory order: the two
    # differ by a few ulps of values of size |w| / ||z|| = O(1)
    z = latents.detach().requires_grad_(True)
    (grad_closed,) = torch.autograd.grad((w * l2_normalize(z.movedim(1, -1)).movedim(-1, 1)).sum(), z)
    torch.testing.assert_close(grad_st, grad_closed, rtol=0, atol=1e-13)
    model.float()
    # end to end: a pixel loss (no VQ loss) reaches the patch embedding through the lookup
    model.zero_grad()
    model(images()).sample.square().mean().backward()
    for name in ("encoder.patch_embed.weight", "encoder.transformer.blocks.0.attn.q_proj.weight", "pre_quant.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_short_training_lowers_the_reconstruction_loss():
    """80 Adam steps on 8 tiny images, loss = MSE + the VQ loss: the reconstruction error falls by 4x at least."""
    torch.manual_seed(0)
    model = ViTVQModel(image_size=16, patch_size=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64,
                       decoder_depth=1, codebook_size=32, codebook_dim=8).train()
    # 8 images: two flat colours split by a vertical edge at a random column
    g = torch.Generator().manual_seed(3)
    colours = torch.rand(8, 2, 3, 1, 1, generator=g) * 2 - 1
    edge = torch.randint(2, 14, (8, 1, 1, 1), generator=g)
    left = torch.arange(16).view(1, 1, 1, 16) < edge
    x = torch.where(left, colours[:, 0], colours[:, 1]).expand(8, 3, 16, 16).contiguous()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def reconstruction_error():
        with torch.no_grad():
            return F.mse_loss(model(x).sample, x).item()
    before = reconstruction_error()
    for _ in range(80):
        out = model(x)
        loss = F.mse_loss(out.sample, x) + out.commit_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = reconstruction_error()
    # untrained, the error is ~0.7; a model that learnt nothing stays near it (this seed reaches ~0.08)
    assert after < 0.25 * before, (before, after)


# ------------------------------------------------------------------------------------- the loader

# a tiny enhancing-transformers ViTVQ: encoder width 32 with 2 heads of the default width 64 (inner 128 != 32),
# a narrower 1-block decoder, a 2 x 3 token grid
REF = dict(channels=3, patch=8, grid=(2, 3), dim=32, depth=2, heads=2, mlp=64, decoder_dim=24, decoder_depth=1,
           decoder_heads=1, decoder_mlp=40, dim_head=64, codebook_size=16, codebook_dim=8)


def reference_state_dict(seed=0, **changes) -> dict:
    """An enhancing-transformers ViTVQ state_dict, by the key names and shapes of its source, random values."""
    r = {**REF, **changes}
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        # weights scaled by 1/sqrt(fan_in) so activations stay O(1)
        scale = 1 / math.sqrt(math.prod(shape[1:])) if scale is None else scale
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    c, p, (h, w) = r["channels"], r["patch"], r["grid"]
    sd = {"encoder.to_patch_embedding.0.weight": rand(r["dim"], c, p, p), "encoder.to_patch_embedding.0.bias":
          rand(r["dim"], scale=0.1),
          "encoder.en_pos_embedding": torch.from_numpy(reference_sincos_2d(h, w, r["dim"]))[None],
          "decoder.de_pos_embedding": torch.from_numpy(reference_sincos_2d(h, w, r["decoder_dim"]))[None]}
    for side, d, depth, heads, mlp in (("encoder", r["dim"], r["depth"], r["heads"], r["mlp"]),
                                       ("decoder", r["decoder_dim"], r["decoder_depth"], r["decoder_heads"],
                                        r["decoder_mlp"])):
        inner = heads * r["dim_head"]
        for i in range(depth):
            block = f"{side}.transformer.layers.{i}"
            sd.update({
                f"{block}.0.norm.weight": 1 + rand(d, scale=0.1), f"{block}.0.norm.bias": rand(d, scale=0.1),
                f"{block}.0.fn.to_qkv.weight": rand(3 * inner, d),
                f"{block}.0.fn.to_out.weight": rand(d, inner), f"{block}.0.fn.to_out.bias": rand(d, scale=0.1),
                f"{block}.1.norm.weight": 1 + rand(d, scale=0.1), f"{block}.1.norm.bias": rand(d, scale=0.1),
                f"{block}.1.fn.net.0.weight": rand(mlp, d), f"{block}.1.fn.net.0.bias": rand(mlp, scale=0.1),
                f"{block}.1.fn.net.2.weight": rand(d, mlp), f"{block}.1.fn.net.2.bias": rand(d, scale=0.1)})
        sd[f"{side}.transformer.norm.weight"] = 1 + rand(d, scale=0.1)
        sd[f"{side}.transformer.norm.bias"] = rand(d, scale=0.1)
    sd.update({
        "pre_quant.weight": rand(r["codebook_dim"], r["dim"]), "pre_quant.bias": rand(r["codebook_dim"], scale=0.1),
        "post_quant.weight": rand(r["decoder_dim"], r["codebook_dim"]),
        "post_quant.bias": rand(r["decoder_dim"], scale=0.1),
        "quantizer.embedding.weight": rand(r["codebook_size"], r["codebook_dim"], scale=1.0),
        "decoder.to_pixel.1.weight": rand(r["decoder_dim"], c, p, p, scale=0.2),
        "decoder.to_pixel.1.bias": rand(c, scale=0.1),
        # the training loss: LPIPS and a discriminator, not part of the tokenizer
        "loss.perceptual_loss.net.slice1.0.weight": rand(4, 3, 3, 3),
        "loss.discriminator.convs.0.0.weight": rand(4, 3, 3, 3),
    })
    return sd


def reference_forward(sd: dict, x01: torch.Tensor, dim_head: int = 64):
    """enhancing-transformers' ViTVQ on images in [0, 1]: (latents (b, n, codebook_dim), indices (b, n), output).

    Restated from its source: PreNorm blocks, fused to_qkv chunked in three, softmax(q k^T dim_head^-0.5),
    tanh MLP, final LayerNorm; argmin of ||l2(z)||^2 + ||l2(e)||^2 - 2 l2(z).l2(e); decode from l2(e_k).
    """
    def layer_norm(t, name):
        return F.layer_norm(t, (t.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    def transformer(t, prefix):
        i = 0
        while f"{prefix}.layers.{i}.0.norm.weight" in sd:
            block = f"{prefix}.layers.{i}"
            b, n, _ = t.shape
            q, k, v = (layer_norm(t, block + ".0.norm") @ sd[block + ".0.fn.to_qkv.weight"].T).chunk(3, dim=-1)
            q, k, v = (u.reshape(b, n, -1, dim_head).transpose(1, 2) for u in (q, k, v))
            attention = (q @ k.transpose(-1, -2) * dim_head ** -0.5).softmax(dim=-1)
            out = (attention @ v).transpose(1, 2).reshape(b, n, -1)
            t = out @ sd[block + ".0.fn.to_out.weight"].T + sd[block + ".0.fn.to_out.bias"] + t
            hidden = torch.tanh(layer_norm(t, block + ".1.norm") @ sd[block + ".1.fn.net.0.weight"].T
                                + sd[block + ".1.fn.net.0.bias"])
            t = hidden @ sd[block + ".1.fn.net.2.weight"].T + sd[block + ".1.fn.net.2.bias"] + t
            i += 1
        return layer_norm(t, prefix + ".norm")

    weight = sd["encoder.to_patch_embedding.0.weight"]
    p = weight.shape[-1]
    grid_h, grid_w = x01.shape[2] // p, x01.shape[3] // p
    t = F.conv2d(x01, weight, sd["encoder.to_patch_embedding.0.bias"], stride=p).flatten(2).transpose(1, 2)
    t = transformer(t + sd["encoder.en_pos_embedding"], "encoder.transformer")
    z = t @ sd["pre_quant.weight"].T + sd["pre_quant.bias"]
    z_n, e_n = F.normalize(z, dim=-1), F.normalize(sd["quantizer.embedding.weight"], dim=-1)
    distance = z_n.pow(2).sum(-1, keepdim=True) + e_n.pow(2).sum(-1) - 2 * z_n @ e_n.T
    indices = distance.argmin(dim=-1)
    t = e_n[indices] @ sd["post_quant.weight"].T + sd["post_quant.bias"]
    t = transformer(t + sd["decoder.de_pos_embedding"], "decoder.transformer")
    t = t.transpose(1, 2).reshape(t.shape[0], -1, grid_h, grid_w)
    out = F.conv_transpose2d(t, sd["decoder.to_pixel.1.weight"], sd["decoder.to_pixel.1.bias"], stride=p)
    return z, indices, out


class LightningStub:
    """A training framework's object in a checkpoint: torch.load(weights_only=True) refuses its global."""

    def __init__(self):
        self.monitor = "val/rec_loss"


def write_lightning_ckpt(path, state):
    torch.save({"state_dict": state, "epoch": 7, "global_step": 4000, "pytorch-lightning_version": "1.5.10",
                "callbacks": {"ModelCheckpoint": LightningStub()}, "optimizer_states": [], "lr_schedulers": []},
               path)


def check_against_reference(model: ViTVQModel, sd: dict):
    x = images(b=3, seed=11, dtype=F64)
    z_ref, k_ref, out_ref = reference_forward(sd, (x + 1) / 2)
    with torch.no_grad():
        latents = model.encode(x).latents
        indices = model.tokenize(x)
        sample = model(x).sample
        from_indices = model.decode_indices(indices)
    # float64 on both sides, the same maths in a different order (fused attention kernel, l2 by division):
    # values are O(1) after <= 2 blocks, so differences are a few thousand ulps of float64 at most (~1e-12)
    torch.testing.assert_close(latents.flatten(2).transpose(1, 2), z_ref, rtol=0, atol=1e-10)
    assert torch.equal(indices.reshape(3, -1), k_ref)
    # the reference reads and writes [0, 1]; ours speaks [-1, 1]
    torch.testing.assert_close(sample, 2 * out_ref - 1, rtol=0, atol=1e-10)
    torch.testing.assert_close(from_indices, 2 * out_ref - 1, rtol=0, atol=1e-10)


def test_load_enhancing_transformers_lightning_ckpt(tmp_path):
    """A Lightning .ckpt in the reference layout (framework objects, loss.* keys): read by the restricted
    unpickler, every key used or ignored, and the model computes what the reference computes."""
    sd = reference_state_dict()
    path = tmp_path / "vitvqgan.ckpt"
    write_lightning_ckpt(path, sd)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)          # so the restricted unpickler is the path under test
    model = load_vit_vqgan(path, dtype=F64, image_size=(16, 24))
    c = model.config
    assert (c.dim, c.depth, c.heads, c.dim_head, c.mlp_dim) == (32, 2, 2, 64, 64)
    assert (c.decoder("dim"), c.decoder("depth"), c.decoder("heads"), c.decoder("mlp_dim")) == (24, 1, 1, 40)
    assert (c.codebook_size, c.codebook_dim, c.grid_size, c.pixel_range) == (16, 8, (2, 3), "zero_one")
    assert not model.training
    check_against_reference(model, sd)


def test_load_safetensors_and_save_round_trip(tmp_path):
    from safetensors.torch import save_file
    sd = reference_state_dict(seed=1)
    path = tmp_path / "vitvqgan.safetensors"
    save_file(sd, str(path))
    model = ViTVQModel.from_pretrained(path, dtype=F64, image_size=(16, 24))
    check_against_reference(model, sd)
    # ours -> the reference's names -> ours: the same tensors; the loss.* keys are not written back
    for name in ("again.safetensors", "again.ckpt"):
        model.save_pretrained(tmp_path / name)
        again = load_vit_vqgan(tmp_path / name, dtype=F64, image_size=(16, 24))
        assert again.state_dict().keys() == model.state_dict().keys()
        for key, tensor in model.state_dict().items():
            assert torch.equal(again.state_dict()[key], tensor), key
    from safetensors.torch import load_file
    written = load_file(str(tmp_path / "again.safetensors"))
    assert set(written) == {k for k in sd if not k.startswith("loss.")}


def test_square_grid_and_head_count_are_inferred(tmp_path):
    """No overrides: a square 2x2 grid and heads = inner / 64 are read off the shapes."""
    from safetensors.torch import save_file
    sd = reference_state_dict(grid=(2, 2), heads=3)
    save_file(sd, str(tmp_path / "square.safetensors"))
    model = load_vit_vqgan(tmp_path / "square.safetensors")
    assert (model.config.image_size, model.config.heads) == ((16, 16), 3)
    assert model.dtype == torch.float32
    save_file(reference_state_dict(grid=(2, 3)), str(tmp_path / "oblong.safetensors"))
    with pytest.raises(CheckpointError, match=r"oblong\.safetensors: encoder\.en_pos_embedding has 6 positions, "
                                              r"not a square grid; pass image_size"):
        load_vit_vqgan(tmp_path / "oblong.safetensors")


def _broken(tmp_path, change):
    from safetensors.torch import save_file
    sd = reference_state_dict()
    change(sd)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("decoder.transformer.layers.0.1.fn.net.2.bias"),
     r"missing keys: decoder\.transformer\.layers\.0\.1\.fn\.net\.2\.bias"),
    (lambda sd: sd.update({"encoder.transformer.layers.0.0.fn.to_q.weight": torch.zeros(2, 2)}),
     r"unexpected keys: encoder\.transformer\.layers\.0\.0\.fn\.to_q\.weight"),
    (lambda sd: sd.update({"post_quant.bias": torch.zeros(25, dtype=F64)}),
     r"wrong shapes: post_quant\.bias \(file \(25,\), model \(24,\)\)"),
    (lambda sd: sd.update({"encoder.transformer.layers.1.0.fn.to_qkv.weight": torch.zeros(3 * 64, 32, dtype=F64)}),
     r"wrong shapes: encoder\.transformer\.layers\.1\.0\.fn\.to_qkv\.weight \(file \(192, 32\), model \(384, 32\)\)"),
    (lambda sd: sd.pop("encoder.to_patch_embedding.0.weight"),
     r"missing key encoder\.to_patch_embedding\.0\.weight \(needed to read the architecture"),
])
def test_missing_extra_or_misshapen_tensors_name_the_file_and_key(tmp_path, change, message):
    path = _broken(tmp_path, change)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": .*" + message):
        load_vit_vqgan(path, image_size=(16, 24))


def test_ignored_keys_have_reasons():
    """Only the training loss is dropped, and it says why."""
    assert [pattern for pattern, _ in IGNORED] == [r"loss\..+"]
    assert all(len(reason) > 20 for _, reason in IGNORED)


class _Payload:
    """Pickles as a call of os.system: what a malicious checkpoint hides."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_hostile_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    sd = reference_state_dict()
    sd["loss.discriminator.logit_scale"] = _Payload(marker)   # hidden under a key the loader would ignore
    path = tmp_path / "evil.ckpt"
    write_lightning_ckpt(path, sd)
    with pytest.raises(CheckpointError, match=rf"{path.name}: refused: the pickle calls posix\.system"):
        load_vit_vqgan(path, image_size=(16, 24))
    assert not marker.exists()


def test_saved_file_has_exactly_the_reference_keys(tmp_path):
    """A model of ours saved and read back as a plain state_dict carries exactly the reference's names."""
    model = tiny_model(decoder_dim=24, decoder_depth=1)
    save_vit_vqgan(model, tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    expected = {k for k in reference_state_dict(dim_head=16, decoder_heads=2, decoder_mlp=64, mlp=64)
                if not k.startswith("loss.")}
    assert set(state) == expected
