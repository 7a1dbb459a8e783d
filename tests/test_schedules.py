"""Schedules against closed forms and the papers' definitions."""

import math

import numpy as np
import pytest
import torch

from lessons_lib.schedules import (
    SCHEDULES,
    NoiseSchedule,
    get_schedule,
    rescale_zero_terminal_snr,
    schedule_from_record,
    schedule_record,
)

STEP_COUNTS = [1, 2, 7, 50, 1000]


def test_linear_betas_are_ddpm_values():
    s = get_schedule("linear", 1000)
    np.testing.assert_allclose(s.betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)


def test_scaled_linear_is_linear_in_sqrt_beta():
    s = get_schedule("scaled_linear", 1000)
    np.testing.assert_allclose(np.sqrt(s.betas.numpy()), np.linspace(0.00085**0.5, 0.012**0.5, 1000), rtol=1e-12)


def test_sigmoid_betas_follow_the_logistic_curve():
    s = get_schedule("sigmoid", 100)
    x = np.linspace(-6, 6, 100)
    np.testing.assert_allclose(s.betas.numpy(), 1 / (1 + np.exp(-x)) * (0.02 - 1e-4) + 1e-4, rtol=1e-12)


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_alpha_bar_equals_its_formula(T):
    s = get_schedule("cosine", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  (Nichol & Dhariwal eq. 17)
    expected = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    capped = s.betas.numpy() >= 0.999
    assert capped.sum() <= 1 and (not capped.any() or capped[-1])  # the 0.999 cap only ever bites at t = T
    np.testing.assert_allclose(s.alpha_bar.numpy()[~capped], expected[~capped], rtol=1e-10)
    assert s.betas.max() <= 0.999


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("T", STEP_COUNTS)
def test_alpha_bar_strictly_decreasing_in_unit_interval(name, T):
    s = get_schedule(name, T)
    ab = s.alpha_bar
    assert len(ab) == T and s.num_steps == T
    assert torch.all(ab > 0) and torch.all(ab <= 1)
    assert torch.all(ab[1:] < ab[:-1])
    assert s.alpha_bar_prev[0] == 1.0
    torch.testing.assert_close(s.alpha_bar_prev[1:], ab[:-1])


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_derived_quantities_match_closed_forms(name):
    s = get_schedule(name, 200)
    betas = s.betas.numpy()
    ab = np.cumprod(1 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(s.alphas.numpy(), 1 - betas, rtol=1e-14)
    np.testing.assert_allclose(s.alpha_bar.numpy(), ab, rtol=1e-12)
    np.testing.assert_allclose(s.snr.numpy(), ab / (1 - ab), rtol=1e-10)
    np.testing.assert_allclose(s.sigmas.numpy(), np.sqrt((1 - ab) / ab), rtol=1e-10)
    # DDPM eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t, and 0 at the first step
    np.testing.assert_allclose(s.posterior_variance.numpy(), (1 - ab_prev) / (1 - ab) * betas, rtol=1e-10)
    assert s.posterior_variance[0] == 0


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("T", [2, 10, 1000])
def test_zero_terminal_snr(name, T):
    plain, z = get_schedule(name, T), get_schedule(name, T, zero_terminal_snr=True)
    assert z.alpha_bar[-1] == 0 and z.snr[-1] == 0 and z.betas[-1] == pytest.approx(1.0)
    assert z.alpha_bar[0] == pytest.approx(plain.alpha_bar[0].item(), rel=1e-12)  # first step unchanged
    assert torch.all(z.snr[1:] < z.snr[:-1])  # SNR order kept
    # Lin et al. Algorithm 1: sqrt(alpha_bar) is an affine map of the original one
    a, b = plain.alpha_bar.sqrt(), z.alpha_bar.sqrt()
    scale = (a[0] / (a[0] - a[-1]))
    torch.testing.assert_close(b, (a - a[-1]) * scale)
    assert "ztsnr" in z.name


@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_flow_schedule_is_rectified_flows_uniform_times(T):
    """Step i is the VP point of flow time t = (i + 1) / T: alpha_bar = (1 - t)^2 / ((1 - t)^2 + t^2), ending at 0."""
    s = get_schedule("flow", T)
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    torch.testing.assert_close(s.alpha_bar, (1 - t) ** 2 / ((1 - t) ** 2 + t**2), rtol=0, atol=1e-12)
    assert s.alpha_bar[-1] == 0 and torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1])
    torch.testing.assert_close(s.sigmas[:-1], t[:-1] / (1 - t[:-1]))  # sigma = t / (1 - t): the flow's noise-to-signal


def test_rescale_rejects_flat_schedules():
    with pytest.raises(ValueError, match="does not decrease"):
        rescale_zero_terminal_snr(torch.tensor([0.1]))


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_num_steps_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        get_schedule("linear", bad)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed: linear, scaled_linear, cosine, sigmoid"):
        get_schedule("quadratic")


def test_unknown_option_is_a_type_error_naming_the_schedule():
    with pytest.raises(TypeError, match="schedule 'linear'.*'s'"):
        get_schedule("linear", s=0.1)


def test_betas_outside_unit_interval_rejected():
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\]"):
        get_schedule("linear", 10, beta_end=1.5)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        NoiseSchedule(torch.zeros(0))


def test_ztsnr_needs_two_steps():
    with pytest.raises(ValueError, match="num_steps >= 2"):
        get_schedule("cosine", 1, zero_terminal_snr=True)


@pytest.mark.parametrize("schedule", [get_schedule("cosine", 1000), get_schedule("linear", 1000, zero_terminal_snr=True),
                                      get_schedule("linear", 20, beta_end=0.3), NoiseSchedule(torch.full((7,), 0.1))])
def test_a_schedule_record_rebuilds_it_exactly(schedule):
    import json

    record = json.loads(json.dumps(schedule_record(schedule)))  # as a config.json holds it
    assert ("betas" in record) == (schedule.name == "custom" or schedule.num_steps == 20)  # by name where the name suffices
    rebuilt = schedule_from_record(record)
    assert torch.equal(rebuilt.betas, schedule.betas) and rebuilt.name == schedule.name
