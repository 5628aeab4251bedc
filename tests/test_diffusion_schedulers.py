"""The five samplers against the reference implementation (diffusers, a test-time oracle only).

Each parity test drives our scheduler and the reference with the same deterministic fake
noise predictor, eps(x, t) = 0.3 tanh(x) + 0.01 t / 1000 cos(x), from the same x_T and with
identically seeded generators, over whole trajectories, and compares the timesteps exactly
and every prev_sample (and pred_original_sample where both have one):

    float32: max |ours - reference| <= 1e-5
    float64: <= 1e-10 for DDPM, DDIM, PNDM. The reference's Euler and DPM-Solver cast the
             sample to float32 inside step() (to protect half precision), so in float64 they
             carry float32 rounding; we keep float64, and the bound there is
             1e-6 * max(1, max |x|) (a few float32 ulps of the sample).

Why these bounds hold on any CPU: both sides evaluate the same basic float operations (correctly
rounded, so bit-identical everywhere) in nearly the same order, and the fake predictor is one
torch function applied to both. Measured worst (test_report_worst_differences): 2.4e-7 in float32
(Euler; 0 for the others), 6.4e-7 relative in float64. 1e-5 leaves room for a few ulps of
reordering per step (|x| reaches ~500 only for Euler's default linear schedule, where the two
are bit-identical). Where a schedule passes through a transcendental function that the two
libraries evaluate differently (numpy's float32 log: <= 4 ulps, CPU-dependent SIMD paths; torch's:
<= 1 ulp), the timesteps and sigmas may legitimately differ by those ulps: run_pair then checks
them against bounds derived from tests/tolerances.py and widens the trajectory bound by exactly the
sigma disagreement it measured (see run_pair).

Run with -s to see the worst difference per scheduler and dtype (test_report_worst_differences).
"""
import json
import math

import pytest
import torch

import parti_from_scratch
import parti_from_scratch.diffusion.schedulers as ours
from parti_from_scratch.diffusion.schedulers import SCHEDULERS, timestep_grid
from tolerances import EPS32, EPS64, NUMPY_LOG_ULPS, TORCH_EXP_ULPS, TORCH_LOG_ULPS, assert_within_ulps, ulp

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

F32, F64 = torch.float32, torch.float64
NAMES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"]
FLOAT32_INSIDE = {"EulerDiscreteScheduler", "DPMSolverMultistepScheduler"}
SHAPE = (2, 4, 8, 8)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# Stable Diffusion v1.5's scheduler/scheduler_config.json
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
# Stable Diffusion 2.x (768-v)'s: the same schedule, v-prediction, shipped for DDIM
SD2 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
       "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
       "trained_betas": None}

WORST = {}      # (scheduler, dtype) -> (largest |difference|, largest |difference| / max(1, max |x|))


def fake_eps(x, t):
    t = torch.as_tensor(t, dtype=x.dtype)
    return 0.3 * torch.tanh(x) + 0.01 * t / 1000 * torch.cos(x)


def tolerance(name, dtype, scale):
    if dtype == F32:
        return 1e-5
    return 1e-6 * max(1.0, scale) if name in FLOAT32_INSIDE else 1e-10


def sigma_disagreement(mine, ref) -> float:
    """max |sigma_ours / sigma_ref - 1| over the inference sigmas (0 where both are 0)."""
    a, b = mine.sigmas.double(), ref.sigmas.double()
    return float(((a - b).abs() / b.abs().clamp(min=1e-300)).max())


def run_pair(mine, ref, num_inference_steps, dtype=F32, step_kwargs=None, model=fake_eps, seed=0,
             timestep_atol=None, sigma_rel=0.0):
    """Sample with both schedulers side by side; assert the bounds in the module docstring; return the worst diff.

    By default timesteps, sigmas and init_noise_sigma must be equal. For schedules that pass
    through a transcendental function evaluated differently by the two libraries:
    `timestep_atol` (tensor or float) bounds |t_ours - t_ref| elementwise, and `sigma_rel` bounds
    the relative sigma disagreement rel. The sample scales with sigma (x_T = sigma_max z, each step
    adds (sigma_{i+1} - sigma_i) d(x) with d Lipschitz 0.31 in x), so a relative sigma change rel
    moves x by <= rel |x| to first order (measured: <= 0.98 rel max|x| with the reference's log
    pushed 3-5 ulps); the trajectory bound grows by 2 rel max|x| for the rel actually measured (0 on
    a machine where the two agree, leaving the bound as it is). A timestep change dt moves
    fake_eps by <= 0.01 dt / 1000 and x by sigma_max times that. Once any input differs, the two
    trajectories also stop rounding identically: each step rounds a product and a sum, so they may
    drift apart by 2 ulps of max |x| per step (the sum of eps * max|x| over the steps taken so far).
    """
    name = type(mine).__name__
    mine.set_timesteps(num_inference_steps)
    ref.set_timesteps(num_inference_steps)
    assert mine.timesteps.dtype == ref.timesteps.dtype
    if timestep_atol is None:
        assert torch.equal(mine.timesteps, ref.timesteps), (mine.timesteps, ref.timesteps)
        dt = 0.0
    else:
        dt = (mine.timesteps.double() - ref.timesteps.double()).abs()
        assert bool((dt <= torch.as_tensor(timestep_atol, dtype=torch.float64)).all()), (dt, timestep_atol)
        dt = float(dt.max())
    rel = sigma_disagreement(mine, ref) if hasattr(ref, "sigmas") else 0.0
    assert rel <= sigma_rel, (name, rel, sigma_rel)
    # init_noise_sigma is sigma_max or sqrt(sigma_max^2 + 1): relative change <= rel (exact when rel = 0)
    assert abs(float(mine.init_noise_sigma) - float(ref.init_noise_sigma)) <= rel * float(ref.init_noise_sigma)
    sigma_max = float(ref.sigmas.max()) if hasattr(ref, "sigmas") else 1.0
    perturbed, rounding = (rel > 0 or dt > 0), 0.0

    def bound(scale):
        return tolerance(name, dtype, scale) + 2 * rel * scale + sigma_max * 0.01 * dt / 1000 + rounding

    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x_mine, x_ref = x_T * mine.init_noise_sigma, x_T * ref.init_noise_sigma
    g_mine, g_ref = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    ref_kwargs = {} if name == "PNDMScheduler" else {"generator": g_ref}
    worst, scale = 0.0, float(x_ref.abs().max())
    for t_mine, t_ref in zip(mine.timesteps, ref.timesteps):
        if perturbed:
            rounding += 2 * torch.finfo(dtype).eps * float(x_ref.abs().max())
        in_mine, in_ref = mine.scale_model_input(x_mine, t_mine), ref.scale_model_input(x_ref, t_ref)
        assert (in_mine - in_ref).abs().max() <= bound(scale)
        out_mine = mine.step(model(in_mine, t_mine), t_mine, x_mine, generator=g_mine, **(step_kwargs or {}))
        out_ref = ref.step(model(in_ref, t_ref), t_ref, x_ref, **ref_kwargs, **(step_kwargs or {}))
        x_mine, x_ref = out_mine.prev_sample, out_ref.prev_sample
        assert x_mine.dtype == x_ref.dtype == dtype and x_mine.shape == x_ref.shape
        worst = max(worst, float((x_mine - x_ref).abs().max()))
        if getattr(out_ref, "pred_original_sample", None) is not None:
            worst = max(worst, float((out_mine.pred_original_sample - out_ref.pred_original_sample).abs().max()))
        scale = max(scale, float(x_ref.abs().max()))
    seen = WORST.get((name, dtype), (0.0, 0.0))
    WORST[name, dtype] = (max(seen[0], worst), max(seen[1], worst / max(1.0, scale)))
    assert worst <= bound(scale), (name, dtype, num_inference_steps, worst, scale)
    return worst


def pair(name, **config):
    return getattr(ours, name)(**config), getattr(diffusers, name)(**config)


# ---------------------------------------------------------------------------------------------
# the parity grid
# ---------------------------------------------------------------------------------------------

def variants(name):
    """The keys swept besides spacing, offset and prediction type."""
    if name == "DDIMScheduler":
        return [dict(set_alpha_to_one=True), dict(set_alpha_to_one=False)]
    if name == "PNDMScheduler":
        return [dict(skip_prk_steps=s, set_alpha_to_one=a) for s in (True, False) for a in (True, False)]
    return [{}]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NAMES)
def test_trajectory_matches_diffusers(name, prediction_type, spacing, offset, dtype):
    """num_inference_steps 1, 2, 7, 25, 50 x the keys of `variants` (the Runge-Kutta warm-up needs 4 or more)."""
    for extra in variants(name):
        for n in (1, 2, 7, 25, 50):
            if extra.get("skip_prk_steps") is False and n < 4:
                continue
            config = dict(SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                          **extra)
            run_pair(*pair(name, **config), n, dtype)


def test_tutorial_pndm_construction_matches_diffusers_50_and_1000_steps():
    """The tutorial's PNDMScheduler(...) (Runge-Kutta warm-up, skip_prk_steps=False) at 50 and 1000 steps."""
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    for n, dtype in ((50, F32), (50, F64), (1000, F64)):
        run_pair(ours.PNDMScheduler(**config), diffusers.PNDMScheduler(**config), n, dtype)


@pytest.mark.parametrize("config", [SD15, SD2], ids=["sd15", "sd2"])
def test_stable_diffusion_config_through_from_pretrained(config, tmp_path):
    """SD v1.5's and 2.x's shipped scheduler configs, read from a pipeline folder by both libraries."""
    name = config["_class_name"]
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    cls = getattr(ours, name)
    mine = cls.from_pretrained(tmp_path, subfolder="scheduler")
    ref = getattr(diffusers, name).from_pretrained(tmp_path, subfolder="scheduler")
    for key in mine.config.keys():
        assert mine.config[key] == ref.config[key], key
    assert cls.from_pretrained(tmp_path).config == mine.config     # the subfolder is found
    assert cls.from_pretrained(tmp_path / "scheduler" / "scheduler_config.json").config == mine.config
    assert cls.from_config(ref.config).config == mine.config       # the reference's parsed config
    for n, dtype in ((50, F32), (50, F64), (999, F32)):
        run_pair(cls.from_pretrained(tmp_path, subfolder="scheduler"),
                 getattr(diffusers, name).from_config(ref.config), n, dtype)
    # 1000 "leading" steps shifted by steps_offset=1 would end at t = 1000, past the schedule
    with pytest.raises(ValueError, match=r"timesteps outside \[0, 999\]"):
        mine.set_timesteps(1000)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("config", [SD15, SD2], ids=["sd15", "sd2"])
def test_cross_scheduler_from_config(name, config):
    """Any scheduler built from another's config, as users swap samplers: X.from_config(pipe.scheduler.config)."""
    source = getattr(ours, config["_class_name"]).from_config(config)
    ref_source = getattr(diffusers, config["_class_name"]).from_config(config)
    mine = getattr(ours, name).from_config(source.config)
    assert mine.config == getattr(ours, name).from_config(config).config
    ref = getattr(diffusers, name).from_config(ref_source.config)
    for dtype in (F32, F64):
        run_pair(mine, ref, 25, dtype)
        run_pair(getattr(ours, name).from_config(source.config), getattr(diffusers, name).from_config(ref.config),
                 7, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_carried_keys_do_not_change_a_sampler(name):
    """Keys another sampler's config carries (DDIM's clip_sample, set_alpha_to_one) pass through unused."""
    source = dict(clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=False, timestep_spacing="trailing")
    mine = getattr(ours, name).from_config(ours.DDIMScheduler(**source).config)
    ref = getattr(diffusers, name).from_config(diffusers.DDIMScheduler(**source).config)
    if name not in ("DDPMScheduler", "DDIMScheduler"):
        assert mine.config.clip_sample is True and "clip_sample" in mine.config.keys()
    run_pair(mine, ref, 7, F64)


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_is_read_by_diffusers(name, tmp_path):
    config = dict(SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing")
    mine = getattr(ours, name)(**config)
    path = mine.save_pretrained(tmp_path)
    saved = json.loads(path.read_text())
    assert path.name == "scheduler_config.json" and saved["_class_name"] == name
    ref = getattr(diffusers, name).from_pretrained(tmp_path)
    for key in mine.config.keys():
        value = mine.config[key]
        assert (list(value) if isinstance(value, tuple) else value) == ref.config[key], key
    assert getattr(ours, name).from_pretrained(tmp_path).config == mine.config
    run_pair(getattr(ours, name).from_pretrained(tmp_path), ref, 7, F32)


def test_trained_betas_round_trip(tmp_path):
    betas = torch.linspace(1e-4, 0.02, 100).tolist()
    mine = ours.DDIMScheduler(num_train_timesteps=100, trained_betas=betas)
    mine.save_pretrained(tmp_path)
    ref = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    assert torch.equal(mine.alpha_bar, ref.alphas_cumprod)
    run_pair(ours.DDIMScheduler.from_pretrained(tmp_path), ref, 10, F64)


# ---------------------------------------------------------------------------------------------
# stochastic samplers: the same generator draws
# ---------------------------------------------------------------------------------------------

def learned_range_model(x, t):
    # (B, C, H, W) -> (B, 2C, H, W): eps and the variance interpolation v in [-1, 1]
    return torch.cat([fake_eps(x, t), torch.tanh(x)], dim=1)


def learned_model(x, t):
    return torch.cat([fake_eps(x, t), 0.01 * torch.sigmoid(x)], dim=1)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
def test_ddpm_ancestral_sampling_matches_diffusers(dtype):
    for variance_type, model in (("fixed_small", fake_eps), ("fixed_small_log", fake_eps), ("fixed_large", fake_eps),
                                 ("learned_range", learned_range_model), ("learned", learned_model)):
        run_pair(*pair("DDPMScheduler", variance_type=variance_type), 25, dtype, model=model)
    run_pair(*pair("DDPMScheduler", **SD_BETAS, clip_sample=False, prediction_type="sample"), 7, dtype)
    run_pair(*pair("DDPMScheduler", thresholding=True, sample_max_value=1.5), 7, dtype)
    # all 1000 steps: the sampler of Ho et al. Algorithm 2
    run_pair(*pair("DDPMScheduler"), 1000, dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
def test_ddim_with_eta_matches_diffusers(dtype):
    for step_kwargs in (dict(eta=1.0), dict(eta=0.5, use_clipped_model_output=True)):
        for spacing in ("leading", "trailing"):
            run_pair(*pair("DDIMScheduler", timestep_spacing=spacing), 25, dtype, step_kwargs=step_kwargs)
    run_pair(*pair("DDIMScheduler", thresholding=True, sample_max_value=1.5, prediction_type="sample"), 7, dtype)
    mine, ref = pair("DDIMScheduler")
    for s in (mine, ref):
        s.set_timesteps(5)
    z = torch.randn(SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(3))
    x = torch.randn(SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(4))
    t = mine.timesteps[1]
    a = mine.step(fake_eps(x, t), t, x, eta=0.7, variance_noise=z).prev_sample
    b = ref.step(fake_eps(x, t), t, x, eta=0.7, variance_noise=z).prev_sample
    assert (a - b).abs().max() <= tolerance("DDIMScheduler", dtype, 1.0)


def test_euler_with_churn_matches_diffusers():
    for dtype in (F32, F64):
        run_pair(*pair("EulerDiscreteScheduler", **SD_BETAS), 25, dtype,
                 step_kwargs=dict(s_churn=2.0, s_tmin=0.5, s_tmax=10.0, s_noise=1.003))


@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_dpmsolver_matches_diffusers(solver_order, solver_type):
    for dtype in (F32, F64):
        run_pair(*pair("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=solver_order,
                       solver_type=solver_type), 20, dtype)


# ---------------------------------------------------------------------------------------------
# other schedules and sampler options
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_cosine_and_zero_terminal_snr_schedules_match_diffusers(name):
    """squaredcos_cap_v2, and Lin et al.'s recipe: zero terminal SNR + trailing spacing + v-prediction."""
    for config in (dict(beta_schedule="squaredcos_cap_v2"),
                   dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                        timestep_spacing="trailing", prediction_type="v_prediction"),
                   dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        prediction_type="v_prediction")):
        if name == "PNDMScheduler":
            if config.get("rescale_betas_zero_snr"):
                continue  # the reference's PNDM has no such key (ours refuses it: test_unsupported_keys_are_refused)
            config = dict(config, skip_prk_steps=True)
        mine, ref = pair(name, **config)
        # exact: beta_t = 1 - f(t+1)/f(t) is computed in float64 (torch.cos here, math.cos there, each within
        # 1 float64 ulp; the ratio's error reaches beta through the cancellation, <= 6 eps64) and rounded to
        # float32; every float64 beta lies >= 8.5 times that error from a float32 rounding midpoint, so both
        # round to the same float32 on any CPU; the rest is basic operations in the same order
        assert torch.equal(mine.alphas_cumprod, ref.alphas_cumprod)
        for n, dtype in ((1, F32), (7, F32), (25, F32), (25, F64)):
            run_pair(*pair(name, **config), n, dtype)


@pytest.mark.parametrize("config", [
    dict(solver_order=1), dict(solver_order=3), dict(solver_type="heun"), dict(solver_order=3, solver_type="heun"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3),
    dict(lower_order_final=False), dict(euler_at_final=True, lower_order_final=False),
    dict(final_sigmas_type="sigma_min"), dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, **SD_BETAS),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(thresholding=True, sample_max_value=1.5, prediction_type="sample"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True, sample_max_value=1.2),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_dpm_solver_options_match_diffusers(config):
    """Karras: the fractional timesteps are rounded to integers here, and the float64 values lie >= 75 times
    the bound of a float32 log (karras_timesteps_float64, 4 + 1 ulps) away from any k + 1/2, so they
    round alike on every CPU: the timesteps are compared exactly. The float64 Karras sigmas (two pow
    implementations, a few float64 ulps apart) round to the same or the adjacent float32: 1 ulp.
    lambda_min_clipped = -5.1 cuts the cosine schedule where log SNR / 2 crosses it; the nearest
    value is 0.022 (~47,000 float32 ulps) away, so both libraries' float32 logs cut at the same t.
    """
    sigma_rel = EPS32 if config.get("use_karras_sigmas") else 0.0
    for n, dtype in ((1, F32), (2, F32), (7, F32), (20, F32), (20, F64)):
        run_pair(*pair("DPMSolverMultistepScheduler", **config), n, dtype, sigma_rel=sigma_rel)


def test_dpm_solver_1000_steps_matches_diffusers():
    run_pair(*pair("DPMSolverMultistepScheduler", **SD_BETAS, timestep_spacing="trailing"), 1000, F32)


@pytest.mark.parametrize("config", [
    dict(interpolation_type="log_linear"), dict(final_sigmas_type="sigma_min"), dict(prediction_type="sample"),
    dict(**SD_BETAS, timestep_spacing="leading", steps_offset=1),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_euler_options_match_diffusers(config):
    sigma_rel = log_linear_sigma_rel(config) if config.get("interpolation_type") == "log_linear" else 0.0
    for n, dtype in ((1, F32), (2, F32), (7, F32), (25, F32), (25, F64)):
        run_pair(*pair("EulerDiscreteScheduler", **config), n, dtype, sigma_rel=sigma_rel)


def training_log_sigmas(config) -> list:
    """log sigma_t for t = 0 .. T-1 in float64, of the float32 training sigmas both libraries start from."""
    ref = diffusers.EulerDiscreteScheduler(**config)
    sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5     # float32, basic operations: same everywhere
    return [math.log(float(s)) for s in sigmas]


def log_linear_sigma_rel(config) -> float:
    """Relative sigma disagreement the log-linear schedule allows: sigma_i = exp(linspace(log sigma_0, log sigma_T-1)).

    Both libraries take the two endpoint logs in float32, numpy with <= 4 ulps and torch with
    <= 1 ulp, so an endpoint may move by 5 ulps of |log sigma|; the float32 linspace rounds
    three times per value on each side (step, product, sum); an error e in log sigma is a relative
    error e in sigma; exp (torch on both sides) adds 1 ulp of sigma per side.
    """
    log_sigmas = training_log_sigmas(config)
    ends = max(abs(log_sigmas[0]), abs(log_sigmas[-1]))
    ulps = NUMPY_LOG_ULPS[F32] + TORCH_LOG_ULPS[F32] + 2 * 3
    return ulps * ulp(ends) + 2 * TORCH_EXP_ULPS[F32] * EPS32


def karras_timesteps_float64(config, n):
    """The Karras schedule's fractional timesteps in float64, and the bound of a float32 computation of them.

    t(sigma) = j + w, w = (l_j - log sigma) / (l_j - l_{j+1}), where l_j <= log sigma < l_{j+1} are
    log sigmas of the training table (sigma_to_t). Both libraries hold l_j in float32 after a float32
    log; an error e in l_j or l_{j+1} moves w by at most e / |l_{j+1} - l_j| (the weights of the two
    errors sum to 1; the smaller neighbouring gap covers a bracket chosen one step off at an edge).
    With e = k ulp(|l|) for a log within k ulps, and half an ulp for rounding t to float32,

        |t_float32 - t| <= k ulp(max |l|) / gap + ulp(t) / 2 + (float64 terms, <= 16 eps64 |l| / gap).

    Returns (t, bound) with bound(k) an array over the n timesteps.
    """
    log_sigmas = training_log_sigmas(config)
    plain = diffusers.EulerDiscreteScheduler(**dict(config, use_karras_sigmas=False))
    plain.set_timesteps(n)
    t_max, t_min = float(plain.timesteps.max()), float(plain.timesteps.min())
    assert t_max.is_integer() and t_min.is_integer()    # every spacing starts and ends on a training step
    sigma_max = config.get("sigma_max") or math.exp(log_sigmas[int(t_max)])
    sigma_min = config.get("sigma_min") or math.exp(log_sigmas[int(t_min)])
    # Karras et al. Eq. 5, rho = 7
    sigmas = [(sigma_max ** (1 / 7) + i / (n - 1) * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
              for i in range(n)]
    t, per_ulp, rounding = [], [], []
    last = len(log_sigmas) - 2
    for sigma in sigmas:
        log_sigma = math.log(sigma)
        j = max([i for i in range(last + 1) if log_sigmas[i] <= log_sigma], default=0)
        w = min(max((log_sigmas[j] - log_sigma) / (log_sigmas[j] - log_sigmas[j + 1]), 0.0), 1.0)
        t.append(j + w)
        gap = min(log_sigmas[i + 1] - log_sigmas[i] for i in (j - 1, j, j + 1) if 0 <= i <= last)
        magnitude = max(abs(log_sigmas[j]), abs(log_sigmas[j + 1]))
        per_ulp.append(ulp(magnitude) / gap)
        rounding.append(ulp(j + w) / 2 + 16 * EPS64 * magnitude / gap)
    t, per_ulp, rounding = (torch.tensor(v, dtype=torch.float64) for v in (t, per_ulp, rounding))
    return t, lambda k: k * per_ulp + rounding


@pytest.mark.parametrize("config", [dict(use_karras_sigmas=True),
                                    dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1, **SD_BETAS),
                                    dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)],
                         ids=["karras", "karras-sd", "karras-range"])
def test_euler_karras_sigmas_match_diffusers(config):
    """Karras sigmas agree to an ulp; their fractional timesteps agree to the bound of a float32 log.

    The timesteps interpolate a table of float32 log sigma_t: the reference's numpy log is
    within 4 ulps (its SIMD path, and so its last bits, depend on the CPU), ours (torch) within 1.
    Both are compared with the float64 value: ours to its own 1-ulp bound, and the pair to
    the sum of both bounds (each with its own rounding to float32). A bound of a few ulps of t
    itself is not enough: at t = 6.8 one ulp of log sigma is ~6 ulps of t.
    """
    for n, dtype in ((2, F32), (7, F32), (25, F32), (25, F64)):
        t, bound = karras_timesteps_float64(config, n)
        mine, ref = pair("EulerDiscreteScheduler", **config)
        mine.set_timesteps(n)
        assert bool(((mine.timesteps.double() - t).abs() <= bound(TORCH_LOG_ULPS[F32])).all()), (mine.timesteps, t)
        # both compute the float64 Karras sigmas (pow: a few float64 ulps apart) and round them to
        # float32, which gives the same or the adjacent float32
        run_pair(mine, ref, n, dtype, timestep_atol=bound(TORCH_LOG_ULPS[F32]) + bound(NUMPY_LOG_ULPS[F32]),
                 sigma_rel=EPS32)
        assert_within_ulps(mine.sigmas, ref.sigmas, 1)


def test_euler_1000_steps_matches_diffusers():
    run_pair(*pair("EulerDiscreteScheduler", **SD_BETAS), 1000, F32)


# ---------------------------------------------------------------------------------------------
# add_noise, scale_model_input, init_noise_sigma
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_diffusers(name, dtype):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Euler: x_0 + sigma eps) for a batch of t."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g, dtype=dtype), torch.randn(4, 4, 8, 8, generator=g, dtype=dtype)
    mine, ref = pair(name, **SD_BETAS)
    if name in FLOAT32_INSIDE:
        # these look each t up in the inference schedule
        for s in (mine, ref):
            s.set_timesteps(10)
        timesteps = ref.timesteps[torch.tensor([0, 3, 7, 9])]
    else:
        timesteps = torch.tensor([0, 17, 500, 999])
    got, expected = mine.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps)
    assert got.dtype == expected.dtype
    # the same basic operations on the same table values (measured difference 0): 1e-6 is ~2 float32 ulps of
    # |x_t| <= 4.2 (Euler: |x_t| <= 48, where it asks for the same order of operations); 1e-14 likewise in float64
    assert (got - expected).abs().max() <= (1e-6 if dtype == F32 else 1e-14)
    if name == "EulerDiscreteScheduler":  # before set_timesteps: the full training schedule
        mine, ref = pair(name, **SD_BETAS)
        timesteps = torch.tensor([0.0, 17.0, 500.0, 999.0])
        torch.testing.assert_close(mine.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps),
                                   rtol=0, atol=1e-6 if dtype == F32 else 1e-14)
    if name in ("DDPMScheduler", "DDIMScheduler"):
        got, expected = mine.get_velocity(x0, noise, timesteps), ref.get_velocity(x0, noise, timesteps)
        assert (got - expected).abs().max() <= (1e-6 if dtype == F32 else 1e-14)


def test_dpm_add_noise_before_set_timesteps_is_the_forward_process():
    """Before set_timesteps the sigma table covers all T steps: x_t = alpha_t x_0 + sigma_t eps, as DDPM's add_noise."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    got = ours.DPMSolverMultistepScheduler().add_noise(x0, noise, t)
    expected = ours.DDPMScheduler().add_noise(x0, noise, t)
    # both start from the same float32 alpha_bar_t. DPM: sigma (3 roundings), alpha_t = 1/sqrt(sigma^2 + 1)
    # (relative error <= 3 eps), sigma_t = sigma alpha_t (<= 5 eps); DDPM: sqrt(alpha_bar), sqrt(1 - alpha_bar)
    # (<= 0.75 eps); then a product each and the sum: |difference| <= 8 eps (|x_0| + |eps|) elementwise
    assert bool(((got - expected).abs() <= 8 * EPS32 * (x0.abs() + noise.abs())).all())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", NAMES)
def test_scale_model_input_and_init_noise_sigma_match_diffusers(name, spacing):
    mine, ref = pair(name, **SD_BETAS, timestep_spacing=spacing, steps_offset=1)
    for s in (mine, ref):
        s.set_timesteps(10)
    assert float(mine.init_noise_sigma) == float(ref.init_noise_sigma)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in mine.timesteps[:1]:
        assert torch.equal(mine.scale_model_input(x, t), ref.scale_model_input(x, t))


# ---------------------------------------------------------------------------------------------
# interface and bad input
# ---------------------------------------------------------------------------------------------

def test_public_names_and_interface():
    assert parti_from_scratch.PNDMScheduler is ours.PNDMScheduler
    assert SCHEDULERS["dpm"] is SCHEDULERS["dpm++"] is ours.DPMSolverMultistepScheduler
    assert {SCHEDULERS[k].__name__ for k in ("ddpm", "ddim", "pndm", "euler", "dpm")} == set(NAMES)
    for name in NAMES:
        s = getattr(ours, name)(**SD_BETAS)
        assert len(s) == 1000 and s.order == 1 and s.num_inference_steps is None
        assert s.config.beta_schedule == "scaled_linear" == s.config["beta_schedule"]
        assert dict(s.config.items())["beta_end"] == 0.012
        s.set_timesteps(5)
        x = torch.zeros(SHAPE)
        t = s.timesteps[0]
        out = s.step(fake_eps(s.scale_model_input(x, t), t), t, x, return_dict=False)
        assert isinstance(out, tuple) and out[0].shape == SHAPE


def test_trailing_spacing_gives_exactly_n_timesteps():
    """round(T - i T/N) - 1 for i < N; an arange-based computation can return N + 1 values (a -1) for e.g. N = 61."""
    for n in (61, 103, 121):
        grid = timestep_grid("trailing", n, 1000)
        assert len(grid) == n and grid.min() >= 0 and grid.max() == 999


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises_clear_errors(name):
    cls = getattr(ours, name)
    s = cls()
    for n in (0, -3, 1001, 2.5):
        with pytest.raises(ValueError, match=r"num_inference_steps must be an integer from 1 to "
                                             r"num_train_timesteps=1000"):
            s.set_timesteps(n)
    with pytest.raises(ValueError, match=r"beta_schedule='cosine'.*'linear', 'scaled_linear', 'squaredcos_cap_v2'"):
        cls(beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"prediction_type='eps' is not supported; choose one of \('epsilon'"):
        cls(prediction_type="eps")
    with pytest.raises(ValueError, match=r"timestep_spacing='uniform'.*'leading', 'trailing', 'linspace'"):
        cls(timestep_spacing="uniform")
    x = torch.zeros(SHAPE)
    t = torch.tensor(999.0) if name == "EulerDiscreteScheduler" else torch.tensor(999)
    with pytest.raises(ValueError, match=r"step\(\) called before set_timesteps\(num_inference_steps\)"):
        cls().step(x, t, x)
    s = cls(skip_prk_steps=True) if name == "PNDMScheduler" else cls()
    s.set_timesteps(10)
    bad = torch.tensor(998.5) if name == "EulerDiscreteScheduler" else torch.tensor(998)
    with pytest.raises(ValueError, match=r"timestep=998.* is not in this scheduler's timesteps"):
        s.step(x, bad, x)
    with pytest.raises(TypeError, match="unexpected config keys"):
        cls(beta_shedule="linear")
    assert cls.from_config({"beta_shedule": "linear", "_class_name": "X"}).config == cls().config


def test_unsupported_keys_are_refused():
    """Keys of the reference that change the computation in ways not implemented here are refused, not dropped."""
    cases = [(ours.EulerDiscreteScheduler, "use_exponential_sigmas", True),
             (ours.EulerDiscreteScheduler, "timestep_type", "continuous"),
             (ours.DPMSolverMultistepScheduler, "use_lu_lambdas", True),
             (ours.DPMSolverMultistepScheduler, "variance_type", "learned_range"),
             (ours.DPMSolverMultistepScheduler, "algorithm_type", "sde-dpmsolver"),
             (ours.PNDMScheduler, "rescale_betas_zero_snr", True),
             (ours.DDPMScheduler, "variance_type", "fixed_large_log")]
    for cls, key, value in cases:
        with pytest.raises(ValueError, match=key):
            cls.from_config({key: value})
    # the same keys at their "off" values are accepted
    ours.EulerDiscreteScheduler.from_config({"use_exponential_sigmas": False, "timestep_type": "discrete"})
    with pytest.raises(ValueError, match="final_sigmas_type='zero'"):
        ours.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")


def test_sampler_specific_bad_input():
    with pytest.raises(ValueError, match="at least 4 with skip_prk_steps=False"):
        ours.PNDMScheduler().set_timesteps(3)
    s = ours.EulerDiscreteScheduler()
    s.set_timesteps(5)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="is an integer"):
        s.step(x, 0, x)
    s = ours.DDIMScheduler()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        s.step(x, s.timesteps[0], x, eta=1.0, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match=r"timesteps must be integers in \[0, 999\]"):
        s.add_noise(x, x, torch.tensor([1000, 0]))
    with pytest.raises(ValueError, match="all 5 steps have been taken"):
        s = ours.DPMSolverMultistepScheduler()
        s.set_timesteps(5)
        for t in list(s.timesteps) + [s.timesteps[-1]]:
            x = s.step(fake_eps(x, t), t, x).prev_sample


def test_report_worst_differences():
    """Print the worst difference per scheduler and dtype over everything above (pytest -s)."""
    if not WORST:
        pytest.skip("run with the parity tests to collect differences")
    lines = ["worst max |ours - diffusers| over all trajectories (relative: divided by max(1, max |x|)):"]
    for name in NAMES:
        row = [f"{WORST[name, d][0]:.3g} (rel {WORST[name, d][1]:.3g})" if (name, d) in WORST else "-"
               for d in (F32, F64)]
        lines.append(f"  {name:30s} float32 {row[0]:>22s}   float64 {row[1]:>22s}")
    print("\n" + "\n".join(lines))
    assert all(math.isfinite(v) for pair_ in WORST.values() for v in pair_)
