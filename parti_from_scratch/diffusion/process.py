"""The forward process q, its posterior, the reverse step p_theta and the training loss L_simple.

Tutorial "Parti原理与代码实例讲解" §4.2 (forward and reverse diffusion), in the notation
of Ho et al. 2020 (DDPM, arXiv 2006.11239); beta_t, alpha_t, alpha_bar_t come from `schedule.py`.

    forward, one step     q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)                 Eq. 2
    forward, closed form  q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)         Eq. 4
    posterior             q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I)                    Eq. 6-7
        mu_tilde_t   = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                     + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
        beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    reverse step          p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)                 Eq. 1, 11
        mu_theta = mu_tilde_t(x_0 = x0_theta(x_t, t), x_t)
                 = 1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t))        Eq. 11
        sigma_t^2 = beta_t, beta_tilde_t (§3.2)
                    or exp(v log beta_t + (1 - v) log beta_tilde_t)                        Nichol & Dhariwal Eq. 15
    loss                  L_simple = E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2,                          Eq. 14
                          x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps

A model may predict eps, x_0 itself ("sample") or the velocity
v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, arXiv 2202.00512, §4;
Stable Diffusion 2.x). Since x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, any one of
the three gives the other two; `predict_x0` and `predict_eps` do the conversion.

Every function takes alpha_bar_{t-1} as an argument rather than t - 1, so one step may
skip timesteps (alpha_bar_prev = alpha_bar at the previous *sampled* timestep, with
the effective beta_t = 1 - alpha_bar_t / alpha_bar_prev), as the schedulers need.
Per-sample schedule values of shape (batch,) broadcast over the remaining dimensions.
Randomness is injectable: pass `noise=` to fix it, or a `generator=`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")

Scalar = Union[float, torch.Tensor]
GeneratorArg = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def expand_to(coefficient: Scalar, x: torch.Tensor) -> Scalar:
    """A per-sample coefficient (batch,) reshaped to (batch, 1, 1, ...) to broadcast over x; scalars unchanged."""
    if isinstance(coefficient, torch.Tensor) and 0 < coefficient.ndim < x.ndim:
        return coefficient.reshape(coefficient.shape + (1,) * (x.ndim - coefficient.ndim))
    return coefficient


def randn(shape: Sequence[int], generator: GeneratorArg = None, dtype: Optional[torch.dtype] = None,
          device: Optional[torch.device] = None) -> torch.Tensor:
    """Standard normal noise, drawn on the generator's device and moved to `device`.

    A list of generators draws one batch element from each, so a batch can be
    reproduced sample by sample. The draw order (one call per tensor, in the
    requested dtype) is the one the reference samplers use, so the same seeds give
    the same noise.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        draws = [torch.randn((1,) + tuple(shape[1:]), generator=g, dtype=dtype, device=g.device) for g in generator]
        return torch.cat(draws).to(device)
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=draw_device).to(device)


def _noise_for(x: torch.Tensor, noise: Optional[torch.Tensor], generator: GeneratorArg) -> torch.Tensor:
    if noise is not None:
        if noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
        return noise
    return randn(x.shape, generator, x.dtype, x.device)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {tuple(allowed)}")


# ---------------------------------------------------------------------------------------------
# the forward process q
# ---------------------------------------------------------------------------------------------

def q_step_mean_variance(x_prev: torch.Tensor, beta_t: Scalar) -> Tuple[torch.Tensor, Scalar]:
    """Mean and variance of one forward step, q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho Eq. 2)."""
    beta_t = expand_to(beta_t, x_prev)
    # sqrt(1 - beta_t) x_{t-1}
    mean = (1 - beta_t) ** 0.5 * x_prev
    return mean, beta_t


def q_sample_step(x_prev: torch.Tensor, beta_t: Scalar, noise: Optional[torch.Tensor] = None,
                  generator: GeneratorArg = None) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_{t-1}): x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, eps ~ N(0, I) (Ho Eq. 2)."""
    mean, variance = q_step_mean_variance(x_prev, beta_t)
    eps = _noise_for(x_prev, noise, generator)
    return mean + variance ** 0.5 * eps


def q_mean_variance(x0: torch.Tensor, alpha_bar_t: Scalar) -> Tuple[torch.Tensor, Scalar]:
    """Mean and variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho Eq. 4)."""
    alpha_bar_t = expand_to(alpha_bar_t, x0)
    # sqrt(alpha_bar_t) x_0
    mean = alpha_bar_t ** 0.5 * x0
    # 1 - alpha_bar_t
    variance = 1 - alpha_bar_t
    return mean, variance


def q_sample(x0: torch.Tensor, alpha_bar_t: Scalar, noise: Optional[torch.Tensor] = None,
             generator: GeneratorArg = None) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) in one step: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho Eq. 4).

    The reparameterisation that makes training cheap: any x_t is one Gaussian
    draw away from x_0, without running the chain.
    """
    alpha_bar_t = expand_to(alpha_bar_t, x0)
    eps = _noise_for(x0, noise, generator)
    # sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)
    signal, noise_scale = alpha_bar_t ** 0.5, (1 - alpha_bar_t) ** 0.5
    return signal * x0 + noise_scale * eps


# ---------------------------------------------------------------------------------------------
# the posterior q(x_{t-1} | x_t, x_0)
# ---------------------------------------------------------------------------------------------

def posterior_variance(alpha_bar_t: Scalar, alpha_bar_prev: Scalar) -> Scalar:
    """beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t, beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}.

    Ho Eq. 7.
    The same quantity is DDIM's sigma_t(eta = 1)^2 (Song et al. 2021, arXiv 2010.02502, Eq. 16).
    """
    # beta_t = 1 - alpha_t, alpha_t = alpha_bar_t / alpha_bar_{t-1}
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t


def posterior_coefficients(alpha_bar_t: Scalar, alpha_bar_prev: Scalar) -> Tuple[Scalar, Scalar]:
    """The weights of x_0 and x_t in mu_tilde_t (Ho Eq. 7).

        mu_tilde_t = [sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)] x_0
                   + [sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)] x_t
    """
    # alpha_t = alpha_bar_t / alpha_bar_{t-1}, beta_t = 1 - alpha_t
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    # sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
    coef_x0 = (alpha_bar_prev ** 0.5 * beta_t) / (1 - alpha_bar_t)
    # sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
    coef_xt = alpha_t ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return coef_x0, coef_xt


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: Scalar,
                alpha_bar_prev: Scalar) -> Tuple[torch.Tensor, Scalar]:
    """Mean mu_tilde_t and variance beta_tilde_t of q(x_{t-1} | x_t, x_0) (Ho Eq. 6-7).

    By Bayes, q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0),
    a product of two Gaussians in x_{t-1}; completing the square gives these.
    """
    alpha_bar_t, alpha_bar_prev = expand_to(alpha_bar_t, x0), expand_to(alpha_bar_prev, x0)
    coef_x0, coef_xt = posterior_coefficients(alpha_bar_t, alpha_bar_prev)
    # mu_tilde_t(x_t, x_0)
    mean = coef_x0 * x0 + coef_xt * x_t
    return mean, posterior_variance(alpha_bar_t, alpha_bar_prev)


# ---------------------------------------------------------------------------------------------
# what the network predicts: eps, x_0 or v
# ---------------------------------------------------------------------------------------------

def signal_noise_scales(alpha_bar_t: Scalar) -> Tuple[Scalar, Scalar]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)): the weights of x_0 and eps in x_t.

    VDM and DPM-Solver call them alpha_t and sigma_t.
    """
    return alpha_bar_t ** 0.5, (1 - alpha_bar_t) ** 0.5


def predict_x0(model_output: torch.Tensor, x_t: torch.Tensor, sqrt_alpha_bar: Scalar,
               sqrt_one_minus_alpha_bar: Scalar, prediction_type: str = "epsilon") -> torch.Tensor:
    """x0_theta from the network output, with x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps.

        epsilon:      x_0 = (x_t - sqrt(1 - alpha_bar) eps_theta) / sqrt(alpha_bar)     (Ho Eq. 15)
        v_prediction: x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v_theta           (Salimans & Ho §4)
        sample:       x_0 = the output itself
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    a, s = expand_to(sqrt_alpha_bar, x_t), expand_to(sqrt_one_minus_alpha_bar, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * model_output
    return model_output


def predict_eps(model_output: torch.Tensor, x_t: torch.Tensor, sqrt_alpha_bar: Scalar,
                sqrt_one_minus_alpha_bar: Scalar, prediction_type: str = "epsilon") -> torch.Tensor:
    """eps_theta from the network output.

        epsilon:      the output itself
        v_prediction: eps = sqrt(alpha_bar) v_theta + sqrt(1 - alpha_bar) x_t
        sample:       eps = (x_t - sqrt(alpha_bar) x0_theta) / sqrt(1 - alpha_bar)
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    a, s = expand_to(sqrt_alpha_bar, x_t), expand_to(sqrt_one_minus_alpha_bar, x_t)
    if prediction_type == "v_prediction":
        return a * model_output + s * x_t
    if prediction_type == "sample":
        return (x_t - a * model_output) / s
    return model_output


def velocity(x0: torch.Tensor, eps: torch.Tensor, sqrt_alpha_bar: Scalar,
             sqrt_one_minus_alpha_bar: Scalar) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, the v-prediction target (Salimans & Ho 2022, §4)."""
    a, s = expand_to(sqrt_alpha_bar, x0), expand_to(sqrt_one_minus_alpha_bar, x0)
    return a * eps - s * x0


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding of x0_theta (Saharia et al. 2022, arXiv 2205.11487, §2.3).

        s = clamp(quantile_ratio(|x0|), 1, max_value) per sample;   x0 <- clamp(x0, -s, s) / s

    With max_value = 1 this is the static clipping to [-1, 1]. Meant for pixel-space models.
    """
    dtype = x0.dtype
    batch, *rest = x0.shape
    flat = x0.reshape(batch, -1)                                                 # (B, C*H*W)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    # s: the ratio-quantile of |x0| per sample, at least 1
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, *rest).to(dtype)


# ---------------------------------------------------------------------------------------------
# the reverse step p_theta(x_{t-1} | x_t)
# ---------------------------------------------------------------------------------------------

def reverse_variance(alpha_bar_t: Scalar, alpha_bar_prev: Scalar, variance_type: str = "fixed_small",
                     predicted_variance: Optional[torch.Tensor] = None) -> Tuple[Scalar, Scalar]:
    """(sigma_t^2, sigma_t) of p_theta(x_{t-1} | x_t) for the usual choices of sigma_t.

        fixed_small:     sigma_t^2 = beta_tilde_t                  (Ho §3.2: optimal when x_0 is one point)
        fixed_small_log: the same, with sigma_t = exp(log(beta_tilde_t) / 2)
        fixed_large:     sigma_t^2 = beta_t                        (Ho §3.2: optimal for x_0 ~ N(0, I))
        learned:         sigma_t^2 = the network's output
        learned_range:   sigma_t^2 = exp(v log beta_t + (1 - v) log beta_tilde_t), v = (output + 1) / 2
                         (Nichol & Dhariwal 2021, arXiv 2102.09672, Eq. 15; the output lies in [-1, 1])

    beta_tilde_t is floored at 1e-20 because the log-domain choices take its logarithm
    (it is 0 on the last step, where alpha_bar_{t-1} = 1).
    """
    _check_choice("variance_type", variance_type, VARIANCE_TYPES)
    if variance_type in ("learned", "learned_range") and predicted_variance is None:
        raise ValueError(f"variance_type={variance_type!r} needs the network's predicted_variance")
    alpha_bar_t, alpha_bar_prev = torch.as_tensor(alpha_bar_t), torch.as_tensor(alpha_bar_prev)
    # beta_tilde_t, floored for the logarithm
    beta_tilde = torch.clamp(posterior_variance(alpha_bar_t, alpha_bar_prev), min=1e-20)
    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    if variance_type == "fixed_small":
        return beta_tilde, beta_tilde ** 0.5
    if variance_type == "fixed_small_log":
        return beta_tilde, torch.exp(0.5 * torch.log(beta_tilde))
    if variance_type == "fixed_large":
        return beta_t, beta_t ** 0.5
    if variance_type == "learned":
        return predicted_variance, predicted_variance ** 0.5
    # v = (output + 1) / 2 interpolates log sigma_t^2 between log beta_tilde_t and log beta_t
    frac = (predicted_variance + 1) / 2
    log_variance = frac * torch.log(beta_t) + (1 - frac) * torch.log(beta_tilde)
    return torch.exp(log_variance), torch.exp(0.5 * log_variance)


@dataclass
class ReverseStep:
    """The parameters of p_theta(x_{t-1} | x_t) and the predictions they came from."""
    mean: torch.Tensor             # mu_theta(x_t, t)
    variance: Scalar               # sigma_t^2
    std: Scalar                    # sigma_t
    pred_x0: torch.Tensor          # x0_theta(x_t, t), after clipping if any
    pred_eps: torch.Tensor         # eps_theta(x_t, t)


def p_mean_variance(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: Scalar, alpha_bar_prev: Scalar,
                    prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                    predicted_variance: Optional[torch.Tensor] = None,
                    x0_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> ReverseStep:
    """p_theta(x_{t-1} | x_t) = N(mu_tilde_t(x0_theta, x_t), sigma_t^2 I) (Ho Eq. 1, 7, 11).

    The network's output is turned into x0_theta (optionally clipped by
    `x0_transform`) and put into the posterior mean; with an eps-prediction and no
    clipping this is Ho's Eq. 11, mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t).
    """
    alpha_bar_t, alpha_bar_prev = expand_to(alpha_bar_t, x_t), expand_to(alpha_bar_prev, x_t)
    signal, noise_scale = signal_noise_scales(alpha_bar_t)
    pred_x0 = predict_x0(model_output, x_t, signal, noise_scale, prediction_type)
    pred_eps = predict_eps(model_output, x_t, signal, noise_scale, prediction_type)
    if x0_transform is not None:
        pred_x0 = x0_transform(pred_x0)
    mean, _ = q_posterior(pred_x0, x_t, alpha_bar_t, alpha_bar_prev)
    variance, std = reverse_variance(alpha_bar_t, alpha_bar_prev, variance_type, predicted_variance)
    return ReverseStep(mean, variance, std, pred_x0, pred_eps)


def p_sample(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: Scalar, alpha_bar_prev: Scalar,
             prediction_type: str = "epsilon", variance_type: str = "fixed_small",
             predicted_variance: Optional[torch.Tensor] = None,
             x0_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, add_noise: bool = True,
             noise: Optional[torch.Tensor] = None, generator: GeneratorArg = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I) (Ho Algorithm 2, line 4); returns (x_{t-1}, x0_theta).

    `add_noise=False` on the last step (t = 1 in the paper, 0 here), where Algorithm 2 sets z = 0.
    """
    step = p_mean_variance(model_output, x_t, alpha_bar_t, alpha_bar_prev, prediction_type, variance_type,
                           predicted_variance, x0_transform)
    if not add_noise:
        return step.mean, step.pred_x0
    if noise is None:
        noise = randn(model_output.shape, generator, model_output.dtype, model_output.device)
    # sigma_t z
    return step.mean + expand_to(step.std, x_t) * noise, step.pred_x0


# ---------------------------------------------------------------------------------------------
# the training loss
# ---------------------------------------------------------------------------------------------

def l_simple(model: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
             noise: Optional[torch.Tensor] = None, generator: GeneratorArg = None,
             prediction_type: str = "epsilon", reduction: str = "mean", **model_kwargs) -> torch.Tensor:
    """L_simple = || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2 (Ho Eq. 14).

    `model(x_t, t, **model_kwargs)` is the network (an object with `.sample`, as the
    UNet returns, is unwrapped); `t` holds one 0-based timestep per sample and
    `alpha_bar` the whole schedule. For a v- or x_0-predicting network the target
    is v or x_0 instead of eps (the same loss up to a per-t weight). The squared norm
    is averaged over elements: a scalar for reduction="mean", one value per sample
    for reduction="none".
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("reduction", reduction, ("mean", "none"))
    eps = _noise_for(x0, noise, generator)
    alpha_bar_t = alpha_bar.to(device=x0.device, dtype=x0.dtype)[t]                 # (B,)
    # x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    x_t = q_sample(x0, alpha_bar_t, noise=eps)
    output = model(x_t, t, **model_kwargs)
    output = getattr(output, "sample", output)
    if prediction_type == "epsilon":
        target = eps
    elif prediction_type == "v_prediction":
        target = velocity(x0, eps, *signal_noise_scales(expand_to(alpha_bar_t, x0)))
    else:
        target = x0
    # || target - output ||^2, averaged over the elements of each sample
    per_sample = ((target - output) ** 2).reshape(x0.shape[0], -1).mean(dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample


__all__ = [
    "PREDICTION_TYPES", "VARIANCE_TYPES", "ReverseStep", "dynamic_threshold", "expand_to", "l_simple",
    "p_mean_variance", "p_sample", "posterior_coefficients", "posterior_variance", "predict_eps", "predict_x0",
    "q_mean_variance", "q_posterior", "q_sample", "q_sample_step", "q_step_mean_variance", "randn",
    "reverse_variance", "signal_noise_scales", "velocity",
]
