"""Noise schedules (tutorial §4.2): beta_t, alpha_bar_t, SNR, the zero-terminal-SNR rescaling, and the plot."""
import math

import pytest
import torch

from parti_from_scratch.diffusion import plot
from parti_from_scratch.diffusion.schedule import (alpha_bar_from_betas, alpha_sigma_from_sigma, alphas_from_betas,
                                                   cosine_betas, karras_sigmas, linear_betas, log_snr, make_betas,
                                                   rescale_zero_terminal_snr, scaled_linear_betas,
                                                   sigma_from_alpha_bar, snr)

F64 = torch.float64
# Tolerances: float64 throughout, where +, -, *, /, sqrt are correctly rounded (the same bits on every CPU) and
# cos/log/exp are within an ulp. A schedule's values are <= 15; a few operations on them stay within ~1e-15
# (absolute, for betas <= 0.02 a few 1e-18), and its 1000-term products within 1000 eps64 = 2.2e-13 relative,
# so 1e-15 .. 1e-14 absolute and 1e-12 relative bound them; every comparison here measures <= 0.002 of its
# tolerance. Exact comparisons are the same arithmetic on both sides.


def test_linear_betas_are_evenly_spaced_from_beta_start_to_beta_end():
    betas = linear_betas(1000, 1e-4, 0.02, dtype=F64)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15) and betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    torch.testing.assert_close(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=F64), rtol=0, atol=1e-15)


def test_scaled_linear_is_linear_in_sqrt_beta():
    betas = scaled_linear_betas(1000, 0.00085, 0.012, dtype=F64)
    step = (0.012 ** 0.5 - 0.00085 ** 0.5) / 999
    torch.testing.assert_close(betas.sqrt().diff(), torch.full((999,), step, dtype=F64), rtol=0, atol=1e-14)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12) and betas[-1].item() == pytest.approx(0.012, rel=1e-12)


def test_cosine_schedule_alpha_bar_nichol_dhariwal_eq17():
    """alpha_bar_t = f(t)/f(0), f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2, wherever beta_t is below the 0.999 cap."""
    T, s = 1000, 0.008
    betas = cosine_betas(T, dtype=F64)
    alpha_bar = alpha_bar_from_betas(betas)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    capped = int((betas >= 0.999).nonzero()[0]) if (betas >= 0.999).any() else T
    assert capped == T - 1  # only the very last step hits the cap
    expected = torch.tensor([f(t + 1) / f(0) for t in range(capped)], dtype=F64)
    # beta_t = 1 - f(t+1)/f(t) loses digits to cancellation, but 1 - beta_t restores the ratio to an ulp, so the
    # product of 999 ratios is within 999 eps64 = 2.2e-13 relative (measured 7.8e-16): 1e-12 >= 4x
    torch.testing.assert_close(alpha_bar[:capped], expected, rtol=1e-12, atol=0)


def test_alpha_bar_is_cumulative_product_of_alphas():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012, dtype=F64)
    alphas = alphas_from_betas(betas)
    alpha_bar = alpha_bar_from_betas(betas)
    torch.testing.assert_close(alphas, 1 - betas, rtol=0, atol=0)
    for t in (0, 1, 10, 500, 999):
        expected = math.prod(alphas[: t + 1].tolist())
        assert alpha_bar[t].item() == pytest.approx(expected, rel=1e-12)


def test_zero_terminal_snr_rescale_lin_et_al_algorithm1():
    """SNR(T) = 0, sqrt(alpha_bar_1) unchanged, sqrt(alpha_bar_t) an affine function of the original."""
    for schedule, start, end in (("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)):
        betas = make_betas(schedule, 1000, start, end, dtype=F64)
        rescaled = rescale_zero_terminal_snr(betas)
        old, new = alpha_bar_from_betas(betas).sqrt(), alpha_bar_from_betas(rescaled).sqrt()
        assert new[-1].item() == pytest.approx(0.0, abs=1e-12)
        assert snr(new[-1] ** 2).item() == pytest.approx(0.0, abs=1e-20)
        assert new[0].item() == pytest.approx(old[0].item(), rel=1e-12)
        # affine: new = a * old + b with a = old_0 / (old_0 - old_T), b = -a * old_T
        a = old[0] / (old[0] - old[-1])
        torch.testing.assert_close(new, a * (old - old[-1]), rtol=0, atol=1e-12)
        assert (rescaled[:-1] < 1).all() and rescaled[-1].item() == pytest.approx(1.0)


def test_snr_and_log_snr_definitions():
    alpha_bar = alpha_bar_from_betas(make_betas("linear", 1000, dtype=F64))
    torch.testing.assert_close(snr(alpha_bar), alpha_bar / (1 - alpha_bar), rtol=1e-14, atol=0)
    torch.testing.assert_close(log_snr(alpha_bar), torch.log(alpha_bar / (1 - alpha_bar)), rtol=1e-12, atol=1e-12)
    assert (log_snr(alpha_bar).diff() < 0).all()  # noise only grows with t


def test_sigma_is_inverse_sqrt_snr_and_round_trips():
    alpha_bar = alpha_bar_from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012, dtype=F64))
    sigma = sigma_from_alpha_bar(alpha_bar)
    torch.testing.assert_close(sigma, snr(alpha_bar) ** -0.5, rtol=1e-12, atol=0)
    alpha_t, sigma_t = alpha_sigma_from_sigma(sigma)
    torch.testing.assert_close(alpha_t, alpha_bar.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma_t, (1 - alpha_bar).sqrt(), rtol=1e-12, atol=0)


def test_karras_sigmas_eq5_endpoints_and_rho_spacing():
    sigmas = karras_sigmas(0.03, 14.6, 10, rho=7.0)
    assert sigmas[0].item() == pytest.approx(14.6, rel=1e-12) and sigmas[-1].item() == pytest.approx(0.03, rel=1e-12)
    # sigma^(1/rho) is evenly spaced
    torch.testing.assert_close(sigmas.pow(1 / 7).diff(), sigmas.pow(1 / 7).diff()[:1].expand(9), rtol=1e-10, atol=0)
    assert karras_sigmas(0.03, 14.6, 1).tolist() == pytest.approx([14.6])


@pytest.mark.parametrize("kwargs", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, num_train_timesteps=500),
    dict(trained_betas=[0.001 * (i + 1) for i in range(50)], num_train_timesteps=50),
])
def test_schedules_match_diffusers(kwargs):
    """float32 betas and alpha_bar equal the reference's to the bit."""
    from diffusers import DDPMScheduler as Reference
    ref = Reference(**kwargs)
    betas = make_betas(**kwargs)
    assert torch.equal(betas, ref.betas)
    assert torch.equal(alpha_bar_from_betas(betas), ref.alphas_cumprod)


def test_unknown_beta_schedule_is_rejected():
    with pytest.raises(ValueError, match=r"beta_schedule='cosine'.*'linear', 'scaled_linear', 'squaredcos_cap_v2'"):
        make_betas("cosine")


def test_plot_writes_png(tmp_path):
    out = plot.plot_schedules(tmp_path / "schedules.png", num_train_timesteps=100)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.main([str(tmp_path / "cli.png"), "--num-train-timesteps", "50", "--no-zero-snr"])
    assert (tmp_path / "cli.png").stat().st_size > 1000
