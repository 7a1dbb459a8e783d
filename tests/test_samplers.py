"""Samplers against analytic models: point masses and Gaussians, where the exact denoiser is known,
and identities between samplers (tests/test_sampler_equivalence.py compares them with diffusers)."""

import pytest
import torch

from lessons_lib import samplers
from lessons_lib.device import make_generator
from lessons_lib.noising import PREDICTION_TYPES, convert_prediction
from lessons_lib.samplers import (
    SAMPLERS,
    SPACINGS,
    DDIMSampler,
    DDPMSampler,
    dynamic_threshold,
    get_sampler,
    make_timesteps,
    sample,
)
from lessons_lib.schedules import get_schedule
from lessons_lib.unet import UNet, UNetConfig

S = get_schedule("linear", 1000)
S100 = get_schedule("linear", 100, beta_start=1e-3, beta_end=0.2)  # DDPM's 1000 steps in 100: alpha_bar[-1] ~ 4e-5
STEPS = [1, 2, 3, 7, 10, 37, 999, 1000]
ANCESTRAL = {"ddpm": {}, "euler_ancestral": {}, "ddim": {"eta": 1.0}}


def gaussian_denoiser(mu: float, s: float, schedule, prediction="eps"):
    """The exact model for data x0 ~ N(mu, s^2) per pixel: E[x0 | x_t] in closed form, returned as ``prediction``."""
    def model(x, t, labels=None):
        ab = schedule.alpha_bar[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = mu + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (x - ab.sqrt() * mu)  # Gaussian posterior mean
        return convert_prediction(x0, "x0", prediction, x, t, schedule)
    return model


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", STEPS)
def test_timesteps_valid_for_every_count_and_spacing(spacing, n):
    ts = make_timesteps(1000, n, spacing, get_schedule("cosine", 1000).alpha_bar)
    assert len(ts) == n and ts.min() >= 0 and ts.max() <= 999 and torch.all(ts[1:] < ts[:-1])


def test_timestep_values_match_the_spacing_definitions():
    assert make_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert make_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert make_timesteps(1000, 3, "linspace").tolist() == [999, 500, 0]
    assert make_timesteps(1000, 3, "trailing").tolist() == [999, 666, 332]


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("n", [3, 10, 20, 50])
def test_karras_timesteps_follow_eq_5(schedule_name, n):
    """After t = 999 (pure noise), the grid's sigmas are eq. 5's from sigma_max = 80 down to sigma at t = 0, each
    rounded to the nearest training step in log sigma (at 50 steps, repeats near t = 0 are nudged apart)."""
    ab = get_schedule(schedule_name, 1000).alpha_bar
    ts = make_timesteps(1000, n, "karras", ab)
    sigma = ((1 - ab) / ab).sqrt()
    ramp = torch.linspace(0, 1, n - 1, dtype=torch.float64)
    r = samplers.KARRAS_RHO
    eq5 = (80 ** (1 / r) + ramp * (sigma[0] ** (1 / r) - 80 ** (1 / r))) ** r
    nearest = torch.tensor([int((sigma.log() - s.log()).abs().argmin()) for s in eq5])
    assert ts[0] == 999 and torch.all(ts[1:] < ts[:-1])
    if n < 50:
        assert ts[1:].tolist() == nearest.tolist()
    else:
        assert (ts[1:] - nearest).abs().max() <= 6 and ts[-1] == 0 and (ts[1:] == nearest).float().mean() > 0.8


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("betas", [{"beta_schedule": "linear"},
                                   {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}])
def test_karras_timesteps_match_diffusers(betas, n):
    """diffusers' Karras sigmas (use_karras_sigmas: rho = 7) run from the schedule's own sigma_max, with no step at
    t = 999 before them: ours with that rho and maximum are the same timesteps (both round in log sigma)."""
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, use_karras_sigmas=True, **betas)
    ab = ref.alphas_cumprod.double()
    ref.set_timesteps(n)
    ours = samplers.karras_timesteps(ab, n, rho=7.0, sigma_max=((1 - ab[-1]) / ab[-1]).sqrt().item())
    assert ours.tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("name", ["pndm", "plms"])
def test_pndm_and_plms_refuse_uneven_steps(name):
    with pytest.raises(ValueError, match="evenly spaced"):
        get_sampler(name, get_schedule("cosine", 1000), 10, "karras")
    get_sampler(name, get_schedule("cosine", 1000), 19, "trailing")  # steps of 52 and 53: even enough


def test_karras_spacing_needs_the_schedule():
    with pytest.raises(ValueError, match="alpha_bar"):
        make_timesteps(1000, 10, "karras")


def point_mass_cases():
    """Every sampler, spacing and step count (1 to T); the prediction type rotates along."""
    for name in SAMPLERS:
        for j, spacing in enumerate(SPACINGS):
            for k, n in enumerate((1, 2, 3, 4, 37, 100)):
                if name in ("pndm", "plms") and spacing == "karras" and n not in (1, 2, 3, 100):
                    continue  # uneven steps: refused (test_pndm_and_plms_refuse_uneven_steps)
                yield name, spacing, n, PREDICTION_TYPES[(j + k) % 3]


@pytest.mark.parametrize("name, spacing, n, prediction", list(point_mass_cases()))
def test_point_mass_is_recovered_exactly(name, spacing, n, prediction):
    """With data a single image x*, the exact model predicts x* from any x_t: every sampler must end on it."""
    x_star = torch.linspace(-0.9, 0.9, 16, dtype=torch.float64).view(1, 1, 4, 4)
    model = gaussian_denoiser(x_star, 0.0, S100, prediction)
    sampler = get_sampler(name, S100, n, spacing, prediction=prediction)
    assert sampler.timesteps.min() >= 0 and sampler.timesteps.max() < 100
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(model, x_T, sampler, generator=make_generator(1), progress=False)
    torch.testing.assert_close(out.images, x_star.expand(3, 1, 4, 4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [name for name in SAMPLERS if name not in ("pndm", "plms")])
def test_zero_terminal_snr_starts_from_pure_noise(name):
    """alpha_bar = 0 at t = T - 1: with v-prediction x0 = -v there, and every sampler still lands on x*."""
    s = get_schedule("linear", 100, zero_terminal_snr=True)
    x_star = torch.linspace(-0.9, 0.9, 16, dtype=torch.float64).view(1, 1, 4, 4)
    sampler = get_sampler(name, s, 10, "trailing", prediction="v")
    assert sampler.alpha_bars(0)[0] == 0.0
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(gaussian_denoiser(x_star, 0.0, s, "v"), x_T, sampler, generator=make_generator(1), progress=False)
    torch.testing.assert_close(out.images, x_star.expand(2, 1, 4, 4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, n, spacing, options", [
    ("ddpm", 1000, "leading", {}), ("ddim", 1000, "trailing", {}), ("ddim", 1000, "trailing", {"eta": 1.0}),
    ("heun", 100, "trailing", {}), ("dpmpp_2m", 50, "trailing", {}), ("pndm", 50, "trailing", {}), ("plms", 50, "trailing", {}),
])
def test_gaussian_data_distribution(name, n, spacing, options):
    """Samples of N(mu, s^2) data have mean mu and std s (the model is exact; the error is the discretisation)."""
    mu, s = 0.1, 0.25  # narrow enough that the final clip to [-1, 1] never bites
    sampler = get_sampler(name, S, n, spacing, clip_x0=False, **options)
    x_T = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(gaussian_denoiser(mu, s, S), x_T, sampler, generator=make_generator(2), progress=False).images
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.std().item() - s) / s < 0.03


def ode_error(name: str, n: int, spacing: str, schedule=S) -> float:
    """RMS distance to the exact end of the probability-flow ODE for N(mu, s^2) data: x_t is mapped through
    z = (x_t - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab), which the ODE keeps fixed, so x0 = mu + s z."""
    mu, s = 0.1, 0.5
    sampler = get_sampler(name, schedule, n, spacing, clip_x0=False)
    x_T = torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab = sampler.alpha_bars(0)[0]
    exact = mu + s * (x_T - ab**0.5 * mu) / (ab * s**2 + 1 - ab) ** 0.5
    out = sample(gaussian_denoiser(mu, s, schedule), x_T, sampler, progress=False, return_trajectory=True).trajectory[-1]
    return (out - exact).pow(2).mean().sqrt().item()


def test_euler_is_first_order_and_heun_second_order():
    euler, heun = ([ode_error(name, n, "leading") for n in (10, 20, 40)] for name in ("euler", "heun"))
    assert all(1.7 < a / b < 2.3 for a, b in zip(euler, euler[1:], strict=False))
    assert all(3.5 < a / b < 4.5 for a, b in zip(heun, heun[1:], strict=False))


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "pndm", "plms"])
def test_higher_order_solvers_beat_euler(name, schedule_name, monkeypatch):
    """Also from t = 999 of the cosine schedule (sigma ~ 2e4): there a second-order first step misses the exact
    end by 0.6 (Heun) to 5e4 (PNDM) at 20 steps; the first-order first step keeps every solver ahead of Euler."""
    s = get_schedule(schedule_name, 1000)
    assert ode_error(name, 20, "trailing", s) < ode_error("euler", 20, "trailing", s) / 3
    if schedule_name == "cosine" and name != "dpmpp_2m":  # the same run with the first step second order
        monkeypatch.setattr(samplers, "SIGMA_MAX", float("inf"))
        assert ode_error(name, 20, "trailing", s) > 5 * ode_error("euler", 20, "trailing", s)


def test_ddim_converges_as_steps_grow():
    """Deterministic DDIM under-disperses with few steps; the error shrinks as the step count grows."""
    x_T = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = gaussian_denoiser(0.0, 0.25, S)
    errors = [abs(sample(model, x_T, get_sampler("ddim", S, n, "trailing", clip_x0=False), progress=False).images.std().item()
                  - 0.25) for n in (10, 50, 200)]
    assert errors[0] > errors[1] > errors[2]


def test_ddim_eta_one_equals_ddpm_posterior_step():
    """eq. 16 with eta = 1 gives sigma^2 = beta_tilde and the same mean as DDPM's posterior (Song et al. sec. 4.1)."""
    ddpm, ddim = DDPMSampler(S, 20, clip_x0=False), DDIMSampler(S, 20, clip_x0=False, eta=1.0)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    out = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for i in (0, 5, 18):
        a = ddpm.step(out, i, x, generator=make_generator(3)).prev
        b = ddim.step(out, i, x, generator=make_generator(3)).prev
        torch.testing.assert_close(a, b)


def test_last_ddim_step_lands_on_x0():
    sampler = DDIMSampler(S, 10, spacing="trailing")
    assert sampler.alpha_bars(9)[1] == 1.0 and int(sampler.timesteps[-1]) == 99
    x, out = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4) * 0.1
    step = sampler.step(out, 9, x)
    torch.testing.assert_close(step.prev, step.x0)


def gaussian_run(name, n=10, spacing="trailing", prediction="eps", seed=3, **options):
    """Final images of ``name`` on N(0.1, 0.5^2) data (x0 estimates leave [-1, 1] now and then)."""
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = get_sampler(name, S100, n, spacing, prediction=prediction, **options)
    return sample(gaussian_denoiser(0.1, 0.5, S100, prediction), x_T, sampler, generator=make_generator(seed),
                  progress=False).images


GRIDS = [{"num_steps": 7, "spacing": "linspace"}, {"num_steps": 33, "spacing": "trailing"}, {"num_steps": 100},
         {"timesteps": [99, 60, 35, 20, 11, 6, 3, 1, 0]}]  # the last one log-spaced


@pytest.mark.parametrize("grid", GRIDS)
def test_euler_is_deterministic_ddim(grid):
    """Euler on x / sqrt(alpha_bar) in sigma is DDIM (eta = 0) in other coordinates (Karras et al. 2022, sec. 3)."""
    euler, ddim = (sample(gaussian_denoiser(0.1, 0.5, S100), torch.randn(8, 1, 4, 4, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0)), get_sampler(name, S100, **grid), progress=False).images
                   for name in ("euler", "ddim"))
    torch.testing.assert_close(euler, ddim)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_euler_is_ddim_on_the_cosine_schedule_down_from_t_999(spacing):
    """cosine's alpha_bar[999] ~ 2.4e-9 lies below the zero-SNR stand-in 2^-24: it must be used as it is."""
    S1000 = get_schedule("cosine", 1000)
    x_T = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    euler, ddim = (sample(gaussian_denoiser(0.1, 0.5, S1000), x_T, get_sampler(name, S1000, 20, spacing, clip_x0=False),
                          progress=False).images for name in ("euler", "ddim"))
    torch.testing.assert_close(euler, ddim)


@pytest.mark.parametrize("grid", GRIDS)
def test_euler_ancestral_is_ddim_with_eta_one(grid):
    """sigma_up^2 is DDPM's posterior variance in the sigma scale: the same step, given the same noise."""
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = [sample(gaussian_denoiser(0.1, 0.5, S100), x_T, get_sampler(name, S100, **grid, **options),
                   generator=[make_generator(k) for k in range(8)], progress=False).images
            for name, options in (("euler_ancestral", {}), ("ddim", {"eta": 1.0}))]
    torch.testing.assert_close(*runs)


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_prediction_type_does_not_change_the_samples(name):
    eps, x0, v = (gaussian_run(name, prediction=p) for p in ("eps", "x0", "v"))
    torch.testing.assert_close(x0, eps)
    torch.testing.assert_close(v, eps)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 10])
def test_evaluations_and_noise_levels_chain(name, n):
    """nfe evaluations; each step starts at the level the previous one reached, the last reaches alpha_bar = 1."""
    sampler = get_sampler(name, S100, n, "trailing")
    first_order = n > 1  # S100 starts above SIGMA_MAX: Heun, PNDM and PLMS take the first step first order
    nfe = {"heun": 2 * n - 1 - first_order, "pndm": n + 3 * min(3, n - 1 - first_order),
           "plms": n + (n - first_order > 1)}.get(name, n)
    assert sampler.nfe == len(sampler) == len(sampler.timesteps) == nfe
    levels = [sampler.alpha_bars(i) for i in range(nfe)]
    assert [a for a, _ in levels] == [float(S100.alpha_bar[t]) for t in sampler.timesteps]
    assert all(a_next == b for (_, a_next), (b, _) in zip(levels, levels[1:], strict=False))
    assert levels[0][0] == float(S100.alpha_bar[sampler.grid[0]]) and levels[-1][1] == 1.0
    assert all(a <= a_next for a, a_next in levels)
    x_T = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    out = sample(gaussian_denoiser(0.1, 0.5, S100), x_T, sampler, progress=False, return_trajectory=True)
    assert len(out.trajectory) == nfe + 1 and len(out.x0_trajectory) == nfe


@pytest.mark.parametrize("name", SAMPLERS)
def test_a_sampler_can_be_reused(name):
    sampler = get_sampler(name, S100, 10, "trailing")
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda: sample(gaussian_denoiser(0.1, 0.5, S100), x_T, sampler, generator=make_generator(5), progress=False)  # noqa: E731
    torch.testing.assert_close(run().images, run().images, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "pndm", "plms"])
def test_samplers_with_state_insist_on_order(name):
    sampler, x = get_sampler(name, S100, 5), torch.zeros(1, 1, 4, 4)
    sampler.step(x, 0, x)
    with pytest.raises(ValueError, match="expected step 1, got 3"):
        sampler.step(x, 3, x)
    sampler.reset()
    sampler.step(x, 0, x)


@pytest.mark.parametrize("name, options", ANCESTRAL.items())
def test_noise_scale_zero_takes_the_randomness_out(name, options):
    cold = [gaussian_run(name, seed=seed, noise_scale=0.0, **options) for seed in (1, 2)]
    warm = [gaussian_run(name, seed=seed, **options) for seed in (1, 2)]
    torch.testing.assert_close(cold[0], cold[1], rtol=0, atol=0)
    assert not torch.allclose(warm[0], warm[1])


def test_dynamic_threshold_closed_form():
    x0 = torch.tensor([[0.5, -0.2, 2.0, -4.0], [0.1, 0.2, -0.3, 0.4]]).view(2, 1, 2, 2)
    # image 0: the median of |x0| is (0.5 + 2) / 2 = 1.25, so x0 is clipped to [-1.25, 1.25] and divided by 1.25;
    # image 1: every |x0| < 1, so s = 1 and nothing changes
    expected = torch.tensor([[0.4, -0.16, 1.0, -1.0], [0.1, 0.2, -0.3, 0.4]]).view(2, 1, 2, 2)
    torch.testing.assert_close(dynamic_threshold(x0, 0.5), expected)
    torch.testing.assert_close(dynamic_threshold(x0, 0.5, max_value=1.1)[0], (x0[0].clamp(-1.1, 1.1) / 1.1))


@pytest.mark.parametrize("options, processed", [({"clip_x0": False}, lambda x0: x0), ({}, lambda x0: x0.clamp(-1, 1)),
                                                ({"dynamic_threshold": 0.5}, lambda x0: dynamic_threshold(x0, 0.5))])
def test_x0_estimates_are_clipped_or_thresholded(options, processed):
    """Thresholding wins over clipping; eps is re-derived from the processed x0 (it points from x0 to x_t)."""
    sampler = get_sampler("ddim", S100, 10, prediction="x0", **options)
    x0, x = torch.tensor([0.5, -0.2, 2.0, -4.0], dtype=torch.float64).view(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    x0_hat, eps_hat = sampler.predict_x0_eps(x0, 3, x.double())
    torch.testing.assert_close(x0_hat, processed(x0))
    torch.testing.assert_close(eps_hat, convert_prediction(x0_hat, "x0", "eps", x.double(), sampler.timesteps[3], S100))


@pytest.mark.parametrize("name, n, options", [("ddpm", 10, {}), *((name, 4, {}) for name in SAMPLERS if name != "ddpm"),
                                               ("ddim", 4, {"eta": 1.0, "dynamic_threshold": 0.9})])
def test_per_sample_generators_make_images_batch_independent(name, n, options):
    """Every sampler runs a real U-Net (float32, guidance); seeded images do not depend on the batch around them."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2,
                            num_res_blocks=1, num_classes=3)).eval()
    s = get_schedule("cosine", 50)
    gens = lambda seeds: [make_generator(k) for k in seeds]  # noqa: E731
    x_T = torch.stack([torch.randn(1, 8, 8, generator=make_generator(100 + k)) for k in range(4)])
    labels = torch.tensor([0, 1, 2, 0])
    run = lambda idx: sample(model, x_T[idx], get_sampler(name, s, n, "leading", **options), labels[idx],  # noqa: E731
                             guidance_scale=2.0, generator=gens(range(4)[idx]), progress=False)
    batch, alone = run(slice(0, 4)), run(slice(2, 3))
    assert torch.isfinite(batch.images).all()
    torch.testing.assert_close(batch.images[2:3], alone.images, rtol=0, atol=1e-5)


def test_guidance_scale_endpoints_and_trajectory():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2,
                            num_res_blocks=1, num_classes=3)).eval()
    s = get_schedule("cosine", 50)
    x_T, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    run = lambda **kw: sample(model, x_T, DDIMSampler(s, 5), progress=False, **kw)  # noqa: E731
    torch.testing.assert_close(run(class_labels=labels, guidance_scale=1.0).images, run(class_labels=labels).images)
    torch.testing.assert_close(run(class_labels=labels, guidance_scale=0.0).images, run(class_labels=None).images,
                               rtol=1e-5, atol=1e-5)
    traj = run(class_labels=labels, return_trajectory=True)
    assert len(traj.trajectory) == 6 and len(traj.x0_trajectory) == 5


def test_clear_errors():
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 1000\], got 0"):
        get_sampler("ddim", S, 0)
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 1000\], got 1001"):
        get_sampler("ddpm", S, 1001)
    with pytest.raises(ValueError, match="unknown spacing 'random'; allowed: leading, trailing, linspace"):
        get_sampler("ddim", S, 10, "random")
    with pytest.raises(ValueError, match="unknown sampler 'lms'; allowed: ddpm, ddim, euler, euler_ancestral, heun, "
                                         "dpmpp_2m, pndm, plms"):
        get_sampler("lms", S, 10)
    with pytest.raises(ValueError, match="strictly decreasing"):
        get_sampler("ddim", S, timesteps=[10, 500])
    with pytest.raises(ValueError, match="eta must be >= 0"):
        get_sampler("ddim", S, 10, eta=-1)
    with pytest.raises(ValueError, match="unknown variance"):
        get_sampler("ddpm", S, 10, variance="learned")
    with pytest.raises(ValueError, match="noise_scale must be >= 0"):
        get_sampler("euler_ancestral", S, 10, noise_scale=-0.5)
    with pytest.raises(ValueError, match=r"dynamic_threshold is a quantile of \|x0\| in \(0, 1\]"):
        get_sampler("dpmpp_2m", S, 10, dynamic_threshold=99.5)
    with pytest.raises(ValueError, match="threshold_max must be >= 1"):
        get_sampler("ddim", S, 10, dynamic_threshold=0.99, threshold_max=0.5)
    with pytest.raises(TypeError, match="sampler 'euler': .*unexpected keyword argument 'eta'"):
        get_sampler("euler", S, 10, eta=1.0)
    with pytest.raises(ValueError, match="pndm needs alpha_bar > 0 at every timestep"):
        get_sampler("pndm", get_schedule("linear", 100, zero_terminal_snr=True), 10, "trailing")
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        sample(lambda x, t, y: x, torch.zeros(1, 1, 4, 4), get_sampler("ddim", S, 2), guidance_scale=-1, progress=False)


def test_sampling_a_training_mode_model_warns():
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2,
                            num_res_blocks=1)).train()
    with pytest.warns(UserWarning, match="call model.eval"):
        sample(model, torch.randn(1, 1, 8, 8), get_sampler("ddim", get_schedule("cosine", 10), 2), progress=False)
