"""Tutorial §5.2, the autoencoder: q(z|x) = N(mu, sigma^2), z = mu + sigma * eps, KL to N(0, I), and the decoder.

Parity: tiny random diffusers AutoencoderKL models, saved and read back with our
`from_pretrained`; max |ours - diffusers| <= 1e-5 in float32 on the posterior's
mean and log-variance, a sample drawn with the same generator, the KL and the decoding.
"""
from __future__ import annotations

import json

import pytest
import torch

from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution

from diffusers_oracle import VAE_CONFIGS, diffusers, image, max_diff, saved_reference
from tolerances import EPS32, TORCH_EXP_ULPS, VAE_DECODED

# fp32 parity of the posterior (tests/tolerances.py FP32_PARITY): mean, log-variance and std drift <= 1.3e-6
# from float64 (ours 1.3e-6); 1e-5 >= 2 (D_ours + D_ref). Decoded images: VAE_DECODED.
TOL = 1e-5


@pytest.fixture(scope="module", params=sorted(VAE_CONFIGS))
def vae_pair(request, tmp_path_factory):
    """(name, diffusers model, ours loaded from its save_pretrained folder, image size)."""
    ref, folder = saved_reference("vae", request.param, tmp_path_factory)
    return request.param, ref, AutoencoderKL.from_pretrained(folder), VAE_CONFIGS[request.param][1]


def test_posterior_sample_kl_and_decoding_match_diffusers(vae_pair):
    _, ref, ours, size = vae_pair
    x = image(size)
    with torch.no_grad():
        q_ref, q_ours = ref.encode(x).latent_dist, ours.encode(x).latent_dist
        assert max_diff(q_ours.mean, q_ref.mean) <= TOL
        assert max_diff(q_ours.logvar, q_ref.logvar) <= TOL
        assert max_diff(q_ours.std, q_ref.std) <= TOL
        # relative: the KL sums C*H*W terms (|KL| <= 55); it drifts <= 1e-7 relative from float64 (ours 2e-7)
        assert max_diff(q_ours.kl(), q_ref.kl()) <= TOL * q_ref.kl().abs().max().item()
        z_ref = q_ref.sample(torch.Generator().manual_seed(7))
        z_ours = q_ours.sample(torch.Generator().manual_seed(7))
        assert max_diff(z_ours, z_ref) <= TOL  # mean + std * eps: the posterior's bound, |eps| <= 4
        assert torch.equal(q_ours.mode(), q_ours.mean)
        x_ref, x_ours = ref.decode(z_ref).sample, ours.decode(z_ref).sample
        assert x_ours.shape == x.shape
        assert max_diff(x_ours, x_ref) <= VAE_DECODED
        # the full round trip, as diffusers' forward computes it
        assert max_diff(ours(x).sample, ref(x).sample) <= VAE_DECODED


def test_reparameterised_sample_is_mu_plus_sigma_eps():
    params = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    q = DiagonalGaussianDistribution(params)
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    z = q.sample(torch.Generator().manual_seed(3))
    mu, logvar = params[:, :4], params[:, 4:]
    # the same float32 expression on both sides (measured 0); 1e-6 ~ 2 ulps of max |z| = 6.6
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sample(noise=eps), z, atol=0, rtol=0)


def test_kl_to_standard_normal_equals_closed_form():
    """KL = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2), checked against torch.distributions."""
    params = torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = DiagonalGaussianDistribution(params)
    mu, std = params[:, :3], torch.exp(0.5 * params[:, 3:])
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu, std),
                                                 torch.distributions.Normal(0.0, 1.0)).sum(dim=[1, 2, 3])
    # float64 sums of 75 terms, |KL| <= 73: worst case n eps64 sum|terms| ~ 75 * 2.2e-16 * 100 = 1.7e-12 (measured
    # 1.4e-14); 1e-10 >= 50x
    torch.testing.assert_close(q.kl(), expected, atol=1e-10, rtol=0)
    # q = N(0, I) is at zero distance from the prior
    assert q.__class__(torch.zeros(1, 6, 2, 2)).kl().abs().max() == 0


def test_log_variance_is_clamped_to_minus_30_and_20():
    params = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([100.0, -100.0]).reshape(1, 2, 1, 1)], dim=1)
    q = DiagonalGaussianDistribution(params)
    assert q.logvar.flatten().tolist() == [20.0, -30.0]
    # torch.exp of the same exact exponents on both sides, each within 1 ulp; the default atol (1e-5) would
    # accept any value for exp(-15) = 3.1e-7
    torch.testing.assert_close(q.std.flatten(), torch.exp(torch.tensor([10.0, -15.0])), atol=0,
                               rtol=2 * TORCH_EXP_ULPS[torch.float32] * EPS32)


def test_scaling_factor_defaults_to_sd_value():
    assert AutoencoderKLConfig().scaling_factor == 0.18215
    kwargs, _ = VAE_CONFIGS["three-levels"]
    assert AutoencoderKL(**kwargs).config.scaling_factor == 0.13025


@pytest.mark.parametrize("name", ["two-levels", "bare"])
def test_save_pretrained_loads_in_diffusers(name, tmp_path):
    kwargs, size = VAE_CONFIGS[name]
    ours = AutoencoderKL(**kwargs).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    x = image(size)
    with torch.no_grad():
        assert max_diff(ours(x).sample, ref(x).sample) <= VAE_DECODED


def test_builds_on_the_meta_device():
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_CONFIGS["two-levels"][0])
    assert all(p.is_meta for p in vae.parameters())


def test_other_block_types_are_refused_by_name():
    values = {**VAE_CONFIGS["two-levels"][0], "down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]}
    with pytest.raises(ConfigError, match="vae/config.json: down_block_types"):
        AutoencoderKLConfig.from_dict(values, source="vae/config.json")
