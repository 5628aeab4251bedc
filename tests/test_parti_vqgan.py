"""The convolutional VQGAN (parti_from_scratch/parti/vqgan.py) against diffusers' VQModel, on tiny random models.

Three configs shaped like the public checkpoints: aMUSEd's vqvae (several levels,
vq_embed_dim set, lookup_from_codebook, no mid-block attention), LDM's vq-f4
(3-channel codes, no attention levels) and taming's vqgan_imagenet_f16_16384 /
min-dalle's detokenizer (self-attention in the deepest level, both halves).
Weights are diffusers' initialisation perturbed by noise (GroupNorm scales away
from 1, biases away from 0), and the codebook is drawn at the scale of the
latents, so that every lookup has a clear winner.
"""
from __future__ import annotations

import functools

import pytest
import torch

from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.parti.quantize import squared_distances
from parti_from_scratch.parti.vqgan import VQModel, VQModelConfig

diffusers = pytest.importorskip("diffusers")

EPS32 = 2.0 ** -23
# name -> (diffusers VQModel kwargs, image size)
VQ_CONFIGS = {
    "amused-like": (dict(block_out_channels=(8, 16, 16, 24), layers_per_block=2, norm_num_groups=8, latent_channels=8,
                         vq_embed_dim=5, num_vq_embeddings=64, mid_block_add_attention=False,
                         lookup_from_codebook=True, force_upcast=True, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4), 32),
    "ldm-vq-f4-like": (dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=8, latent_channels=3,
                            num_vq_embeddings=32, sample_size=16,
                            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
                       16),
    # taming's GroupNorm always has 32 groups, so its widths are multiples of 32
    "taming-f16-like": (dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=8,
                             vq_embed_dim=8, num_vq_embeddings=48, sample_size=16,
                             down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                             up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D")), 16),
}
# The bound of the issue for every floating-point output. The decoded images here reach |x| ~ 5 (ulp 4.8e-7).
# Both models run the same float32 convolutions on the same inputs and differ only in the order of the
# attention's and GroupNorm's sums (SDPA vs ours): a few ulps per layer, which the decoder amplifies (GroupNorm
# rescales small-variance features; at random init a 6e-8 change of the codes moves a mid-size decoder's output
# by 1.8e-5). Measured on these configs: latents <= 1.6e-6, decoded images 3e-6 .. 8e-6, within 1e-5.
TOL = 1e-5


def image(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """A random image batch in [-1, 1], shape (batch, 3, size, size)."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@functools.lru_cache(maxsize=None)
@torch.no_grad()
def reference_vq(name: str, seed: int = 0):
    """A diffusers VQModel for VQ_CONFIGS[name], its weights perturbed off init, its codebook at the latents' scale.

    Cached: built once per session and shared with tests/test_weights_convert_vq.py; never modified by a test.
    """
    kwargs, size = VQ_CONFIGS[name]
    torch.manual_seed(seed)
    ref = diffusers.VQModel(**kwargs).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in ref.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    # codes drawn from the encoder's own outputs, so each latent has a near code and the lookup is not degenerate
    z = ref.encode(image(size, batch=4, seed=seed + 2)).latents
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    picks = torch.randint(0, flat.shape[0], (ref.quantize.embedding.weight.shape[0],), generator=g)
    ref.quantize.embedding.weight.copy_(flat[picks] + 0.3 * flat.std() * torch.randn(len(picks), flat.shape[1],
                                                                                     generator=g))
    return ref


@pytest.fixture(scope="module", params=sorted(VQ_CONFIGS))
def vq_pair(request, tmp_path_factory):
    """(name, diffusers VQModel, ours loaded from its save_pretrained folder, image size)."""
    ref = reference_vq(request.param)
    folder = tmp_path_factory.mktemp(f"vq-{request.param}")
    ref.save_pretrained(folder)
    return request.param, ref, VQModel.from_pretrained(folder), VQ_CONFIGS[request.param][1]


def lookup_slack(latents: torch.Tensor, codebook: torch.Tensor, delta: float) -> float:
    """min over vectors of (second-nearest - nearest squared distance) - the most two float32 lookups can disagree.

    Per vector z (n_z = ||z||, n_e = max_k ||e_k||, d channels), in float64:
    * the two models' latents differ by <= delta per channel, ||dz|| <= sqrt(d) delta, which moves
      ||z - e||^2 by <= 2 ||z - e|| ||dz|| <= 2 (n_z + n_e) sqrt(d) delta;
    * each lookup computes ||z - e||^2 (as ||z||^2 - 2 z.e + ||e||^2, or cdist's differences) with rounding
      error <= (d + 2) EPS32 (n_z + n_e)^2 (sums of d products, Cauchy-Schwarz on their magnitudes).
    The nearest code can only differ if the gap is below twice their sum; a positive slack rules it out.
    """
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    e = codebook.detach().double()
    d2 = squared_distances(flat, e).sort(dim=-1).values
    d = flat.shape[1]
    reach = flat.norm(dim=-1) + e.norm(dim=-1).max()
    bound = 2 * (2 * reach * d ** 0.5 * delta + (d + 2) * EPS32 * reach ** 2)
    return float((d2[:, 1] - d2[:, 0] - bound).min())


@torch.no_grad()
def test_latents_indices_and_decodings_match_diffusers(vq_pair):
    """encode -> latents, quantize -> identical indices, decode from latents and from indices: <= 1e-5."""
    name, ref, ours, size = vq_pair
    x = image(size)
    z_ref, z_ours = ref.encode(x).latents, ours.encode(x).latents
    h = size // ours.config.downsampling
    assert z_ours.shape == (2, ours.config.code_dim, h, h)
    assert max_diff(z_ours, z_ref) <= TOL

    # Identical indices are guaranteed, not lucky: the seeded lookup has positive slack (see lookup_slack).
    assert lookup_slack(z_ref, ours.quantize.embedding.weight, max_diff(z_ours, z_ref)) > 0
    q_ref, loss_ref, (_, _, idx_ref) = ref.quantize(z_ref)
    q_ours = ours.quantize(z_ours)
    assert q_ours.indices.shape == (2, h, h)
    assert torch.equal(q_ours.indices.reshape(-1), idx_ref.reshape(-1))
    assert max_diff(q_ours.quantized, q_ref) <= TOL
    # the legacy VQ loss (1 + beta) mean((z - e)^2): a mean of O(1) squares, relative float32 error ~n EPS32
    torch.testing.assert_close(q_ours.loss, loss_ref, rtol=1e-5, atol=TOL)

    x_ref, x_ours = ref.decode(z_ref).sample, ours.decode(z_ref).sample
    assert x_ours.shape == x.shape
    assert max_diff(x_ours, x_ref) <= TOL
    # from indices: diffusers reads them with lookup_from_codebook; ours has decode_indices for every config
    from_indices = ours.decode_indices(q_ours.indices)
    # codes re-quantise to themselves (distance 0 against >= the lookup margin to any other code)
    assert torch.equal(from_indices, ours.decode(q_ours.quantized).sample)
    if ours.config.lookup_from_codebook:
        shape = (2, h, h, ours.config.code_dim)
        x_ref_idx = ref.decode(idx_ref, force_not_quantize=True, shape=shape).sample
        assert max_diff(from_indices, x_ref_idx) <= TOL
        assert torch.equal(ours.decode(q_ours.indices, force_not_quantize=True).sample, from_indices)
    else:
        x_ref_idx = ref.decode(ref.quantize.get_codebook_entry(idx_ref, (2, h, h, ours.config.code_dim)),
                               force_not_quantize=True).sample
        assert max_diff(from_indices, x_ref_idx) <= TOL
        assert torch.equal(ours.decode(q_ours.quantized, force_not_quantize=True).sample, from_indices)
    # the whole round trip and its loss, as diffusers' forward computes them
    out_ref, out_ours = ref(x), ours(x)
    assert max_diff(out_ours.sample, out_ref.sample) <= TOL
    torch.testing.assert_close(out_ours.commit_loss, out_ref.commit_loss, rtol=1e-5, atol=TOL)
    assert torch.equal(ours.tokenize(x), q_ours.indices)


def test_straight_through_gradient_reaches_the_encoder():
    """z_q = z + sg(e - z): d(decoder input)/dz = I, so a reconstruction loss trains the encoder; the
    codebook learns only through the VQ loss (no gradient reaches it through z_q)."""
    config = VQModelConfig(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, num_vq_embeddings=16)
    model = VQModel(config)
    x = image(8, batch=1)
    out = model.quantize(model.encode(x).latents)
    out.quantized.sum().backward()
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None
    model.zero_grad()
    model.quantize(model.encode(x).latents).loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_spatial_norm_and_other_unbuilt_keys_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"vqvae/config.json: norm_type='spatial' is not supported \(MoVQ"):
        VQModelConfig.from_dict({"norm_type": "spatial"}, source="vqvae/config.json")
    with pytest.raises(ConfigError, match=r"act_fn='gelu' is not supported"):
        VQModel(act_fn="gelu")
    VQModelConfig.from_dict({"norm_type": "group", "act_fn": "silu"})  # what every supported file says
    with pytest.raises(ConfigError, match="down_block_types"):
        VQModelConfig(down_block_types=("DownBlock2D",))
    with pytest.raises(ConfigError, match="up_block_types has 1 entries"):
        VQModelConfig(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2)
    with pytest.raises(ConfigError, match="vq_embed_dim"):
        VQModelConfig(vq_embed_dim=0)


def test_config_keys_are_diffusers_vqmodel_keys():
    """Every field and refused key is a VQModel.__init__ argument (config.json is read as it is), every argument
    is one of them, and the defaults agree."""
    import inspect
    params = {k: v for k, v in inspect.signature(diffusers.VQModel.__init__).parameters.items() if k != "self"}
    ours = VQModelConfig()
    assert set(params) == set(vars(ours)) | set(VQModelConfig.refused)
    for name, value in vars(ours).items():
        default = params[name].default
        assert (tuple(default) if isinstance(default, (list, tuple)) else default) == value, name
    for name, rule in VQModelConfig.refused.items():
        assert params[name].default in rule.accepted, name


def test_decoder_only_model_refuses_to_encode():
    model = VQModel(VQModelConfig(block_out_channels=(8,), norm_num_groups=4, num_vq_embeddings=8),
                    decoder_only=True)
    assert model.encoder is None and model.quant_conv is None
    assert model.decode_indices(torch.zeros(1, 2, 2, dtype=torch.long)).shape == (1, 3, 2, 2)
    with pytest.raises(RuntimeError, match="decoder_only"):
        model.encode(image(2, batch=1))
