"""The forward process against its statistics and against Bayes' rule."""

import pytest
import torch

from lessons_lib.device import randn
from lessons_lib.noising import (
    PREDICTION_TYPES,
    EpsModel,
    convert_prediction,
    eps_from_v,
    eps_from_x0,
    q_posterior,
    q_sample,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from lessons_lib.schedules import get_schedule

S = get_schedule("linear", 1000)


def _x0(batch=3, seed=1):
    return torch.rand(batch, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_q_sample_marginal_statistics(t):
    """Over many draws, x_t has mean sqrt(alpha_bar) x0 and variance 1 - alpha_bar (DDPM eq. 4)."""
    n = 20_000
    x0 = _x0(1).expand(n, 1, 4, 4)
    xt = q_sample(x0, t, randn(x0.shape, seed=0), S)
    ab = S.alpha_bar[t].item()
    var = 1 - ab
    tol_mean = 5 * (var / n) ** 0.5  # 5 standard errors
    torch.testing.assert_close(xt.mean(0), ab**0.5 * x0[0], atol=tol_mean, rtol=0)
    torch.testing.assert_close(xt.var(0), torch.full_like(xt[0], var), atol=5 * var * (2 / n) ** 0.5, rtol=0)


def test_closed_form_matches_composed_single_steps():
    """Composing t one-step kernels x <- sqrt(1-beta) x + sqrt(beta) eps gives eq. 4's mean and variance."""
    n, t = 20_000, 40
    x = _x0(1).expand(n, 1, 4, 4).clone()
    g = torch.Generator().manual_seed(3)
    for i in range(t + 1):
        x = (1 - S.betas[i]).sqrt().float() * x + S.betas[i].sqrt().float() * torch.randn(x.shape, generator=g)
    ab = S.alpha_bar[t].item()
    torch.testing.assert_close(x.mean(0), ab**0.5 * _x0(1)[0], atol=5 * ((1 - ab) / n) ** 0.5, rtol=0)
    torch.testing.assert_close(x.var(0).mean(), torch.tensor(1 - ab), atol=0.01, rtol=0)


def test_q_sample_per_element_timesteps_and_dtype():
    x0 = _x0(3).double()
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    out = q_sample(x0, t, eps, S)
    assert out.dtype == torch.float64
    for i in range(3):
        ab = S.alpha_bar[t[i]]
        torch.testing.assert_close(out[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps[i])


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [1, 7, 500, 999])
def test_posterior_matches_bayes_rule(name, t):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): product of two Gaussians, done directly."""
    s = get_schedule(name, 1000)
    x0, xt = _x0(2).double(), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    prior_mean, prior_var = s.alpha_bar_prev[t].sqrt() * x0, 1 - s.alpha_bar_prev[t]
    alpha, beta = s.alphas[t], s.betas[t]
    precision = 1 / prior_var + alpha / beta
    expected_var = 1 / precision
    expected_mean = expected_var * (prior_mean / prior_var + alpha.sqrt() * xt / beta)
    mean, var = q_posterior(x0, xt, t, s)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var.flatten(), expected_var.expand(2), rtol=1e-9, atol=0)


def test_posterior_at_first_step_is_x0():
    x0, xt = _x0(2), torch.randn(2, 1, 4, 4)
    mean, var = q_posterior(x0, xt, 0, S)
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0)


def test_prediction_conversions_round_trip():
    x0, eps = _x0(4).double(), torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 100, 600, 999])
    xt = q_sample(x0, t, eps, S)
    v = v_from_x0_eps(x0, eps, t, S)
    torch.testing.assert_close(x0_from_eps(xt, t, eps, S), x0)
    torch.testing.assert_close(eps_from_x0(xt, t, x0, S), eps)
    torch.testing.assert_close(x0_from_v(xt, t, v, S), x0)
    torch.testing.assert_close(eps_from_v(xt, t, v, S), eps)
    truth = {"eps": eps, "x0": x0, "v": v, "flow": eps - x0}
    for source in PREDICTION_TYPES:
        for target in PREDICTION_TYPES:
            torch.testing.assert_close(convert_prediction(truth[source], source, target, xt, t, S), truth[target])


class _Oracle(torch.nn.Module):
    """Answers the exact ``prediction`` for the clean image x0 (label 0) or -x0 (label 1, the null class), given eps."""

    config = type("Config", (), {"num_classes": 1})

    def __init__(self, x0, prediction):
        super().__init__()
        self.x0, self.prediction = x0, prediction

    def forward(self, x, t, y):
        k = len(y) // len(self.x0)  # guidance sends both branches as one batch
        x0 = torch.where((y == 0).view(-1, 1, 1, 1), self.x0.repeat(k, 1, 1, 1), -self.x0.repeat(k, 1, 1, 1))
        return convert_prediction(x0, "x0", self.prediction, x, t, S)


@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_eps_model_sees_any_prediction_as_the_noise(prediction):
    """An oracle of any parametrisation, seen through EpsModel, answers the true eps, and guidance mixes it
    as it mixes clean images: uncond + w (cond - uncond) of x0 and -x0 is (2w - 1) x0."""
    from lessons_lib.guidance import guided_output

    x0, eps = _x0(4).double(), torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 100, 600, 998])
    xt, labels = q_sample(x0, t, eps, S), torch.zeros(4, dtype=torch.long)
    wrapped = EpsModel(_Oracle(x0, prediction).eval(), prediction, S)
    assert not wrapped.training
    torch.testing.assert_close(wrapped(xt, t, labels), eps)
    torch.testing.assert_close(guided_output(wrapped, xt, t, labels, 3.0), eps_from_x0(xt, t, 5 * x0, S))
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        EpsModel(wrapped, "noise", S)


def test_v_definition():
    """Salimans & Ho: v = alpha eps - sigma x0 with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)."""
    x0, eps = _x0(1).double(), torch.randn(1, 1, 4, 4, dtype=torch.float64)
    ab = S.alpha_bar[300]
    torch.testing.assert_close(v_from_x0_eps(x0, eps, 300, S), ab.sqrt() * eps - (1 - ab).sqrt() * x0)


def test_bad_timesteps_and_shapes_are_clear_errors():
    x0 = _x0(2)
    with pytest.raises(TypeError, match="integers"):
        q_sample(x0, torch.tensor([0.5, 1.0]), torch.randn_like(x0), S)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\], got values in \[0, 1000\]"):
        q_sample(x0, torch.tensor([0, 1000]), torch.randn_like(x0), S)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        q_sample(x0, torch.tensor([1, 2, 3]), torch.randn_like(x0), S)
    with pytest.raises(ValueError, match="eps must have the shape"):
        q_sample(x0, 1, torch.randn(2, 1, 4, 5), S)
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        convert_prediction(x0, "noise", "x0", x0, 1, S)
