"""Samplers against analytic models: point masses and Gaussians, where the exact denoiser is known."""

import pytest
import torch

from lessons_lib.device import make_generator
from lessons_lib.noising import convert_prediction
from lessons_lib.samplers import SPACINGS, DDIMSampler, DDPMSampler, get_sampler, make_timesteps, sample
from lessons_lib.schedules import get_schedule
from lessons_lib.unet import UNet, UNetConfig

S = get_schedule("linear", 1000)
STEPS = [1, 2, 3, 7, 10, 37, 999, 1000]


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
    ts = make_timesteps(1000, n, spacing)
    assert len(ts) == n and ts.min() >= 0 and ts.max() <= 999 and torch.all(ts[1:] < ts[:-1])


def test_timestep_values_match_the_spacing_definitions():
    assert make_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert make_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert make_timesteps(1000, 3, "linspace").tolist() == [999, 500, 0]
    assert make_timesteps(1000, 3, "trailing").tolist() == [999, 666, 332]


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 3, 37, 1000])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_point_mass_is_recovered_exactly(name, spacing, n, prediction):
    """With data a single image x*, the exact model predicts x* from any x_t: every sampler must end on it."""
    x_star = torch.linspace(-0.9, 0.9, 16, dtype=torch.float64).view(1, 1, 4, 4)
    model = gaussian_denoiser(x_star, 0.0, S, prediction)
    sampler = get_sampler(name, S, n, spacing, prediction=prediction)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(model, x_T, sampler, generator=make_generator(1), progress=False)
    torch.testing.assert_close(out.images, x_star.expand(3, 1, 4, 4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, n, options", [("ddpm", 1000, {}), ("ddim", 1000, {}), ("ddim", 1000, {"eta": 1.0})])
def test_gaussian_data_distribution(name, n, options):
    """Samples of N(mu, s^2) data have mean mu and std s (the model is exact; the error is the discretisation)."""
    mu, s = 0.1, 0.25  # narrow enough that the final clip to [-1, 1] never bites
    sampler = get_sampler(name, S, n, "leading" if name == "ddpm" else "trailing", clip_x0=False, **options)
    x_T = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(gaussian_denoiser(mu, s, S), x_T, sampler, generator=make_generator(2), progress=False).images
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.std().item() - s) / s < 0.03


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


def test_per_sample_generators_make_images_batch_independent():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2,
                            num_res_blocks=1, num_classes=3)).eval()
    s = get_schedule("cosine", 50)
    gens = lambda seeds: [make_generator(k) for k in seeds]  # noqa: E731
    x_T = torch.stack([torch.randn(1, 8, 8, generator=make_generator(100 + k)) for k in range(4)])
    labels = torch.tensor([0, 1, 2, 0])
    batch = sample(model, x_T, DDPMSampler(s, 10), labels, guidance_scale=2.0, generator=gens(range(4)), progress=False)
    alone = sample(model, x_T[2:3], DDPMSampler(s, 10), labels[2:3], guidance_scale=2.0, generator=gens([2]), progress=False)
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
    with pytest.raises(ValueError, match="unknown sampler 'plms'; allowed: ddpm, ddim"):
        get_sampler("plms", S, 10)
    with pytest.raises(ValueError, match="strictly decreasing"):
        get_sampler("ddim", S, timesteps=[10, 500])
    with pytest.raises(ValueError, match="eta must be >= 0"):
        get_sampler("ddim", S, 10, eta=-1)
    with pytest.raises(ValueError, match="unknown variance"):
        get_sampler("ddpm", S, 10, variance="learned")
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        sample(lambda x, t, y: x, torch.zeros(1, 1, 4, 4), get_sampler("ddim", S, 2), guidance_scale=-1, progress=False)


def test_sampling_a_training_mode_model_warns():
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2,
                            num_res_blocks=1)).train()
    with pytest.warns(UserWarning, match="call model.eval"):
        sample(model, torch.randn(1, 1, 8, 8), get_sampler("ddim", get_schedule("cosine", 10), 2), progress=False)
