"""Rectified flow against closed forms: the VP bridge to float64 precision, and for Gaussian data (whose velocity
field and ODE solution are known exactly) the solvers' orders and both directions of the bridge."""

import pytest
import torch

from lessons_lib import flow
from lessons_lib.noising import q_sample
from lessons_lib.samplers import get_sampler, sample
from lessons_lib.schedules import get_schedule

MU, S = 0.3, 0.5  # the data: x0 ~ N(MU, S^2) in every pixel; the noise: eps ~ N(0, 1)


def _noise(n=64, seed=0):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_velocity(x, t, labels=None):
    """E[eps - x0 | x_t] for Gaussian data: x_t ~ N((1 - t) MU, (1 - t)^2 S^2 + t^2) jointly with x0 and eps."""
    t = flow._b(t, x)
    var = (1 - t) ** 2 * S**2 + t**2
    return (t - (1 - t) * S**2) / var * (x - (1 - t) * MU) - MU


def exact_solution(x, t):
    """The ODE from flow time t to 0 keeps the point's z-score: x0 = MU + S (x_t - m_t) / sd_t."""
    return MU + S * (x - (1 - t) * MU) / ((1 - t) ** 2 * S**2 + t**2) ** 0.5


def test_the_bridge_is_exact():
    t = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    torch.testing.assert_close(flow.t_of_alpha_bar(flow.alpha_bar_of_t(t)), t, rtol=0, atol=1e-12)
    x0, eps = _noise(101, 1), _noise(101, 2)
    x_t = flow.flow_sample(x0, t, eps)
    ab = flow.alpha_bar_of_t(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t / flow.r(t).view(-1, 1, 1, 1), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)  # a VP point
    back_x0, back_eps = flow.x0_eps_from_velocity(x_t, t, eps - x0)
    torch.testing.assert_close(back_x0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(back_eps, eps, rtol=0, atol=1e-12)


def test_the_exact_velocity_is_the_data_average():
    """Monte Carlo: the mean of eps - x0 over pairs landing near x_t matches the closed form."""
    g = torch.Generator().manual_seed(3)
    x0 = MU + S * torch.randn(400_000, generator=g, dtype=torch.float64)
    eps = torch.randn(400_000, generator=g, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * eps
    near = (x_t - 0.5).abs() < 0.01
    expected = exact_velocity(torch.tensor([[[[0.5]]]], dtype=torch.float64), t).item()
    assert abs((eps - x0)[near].mean().item() - expected) < 0.02


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_flow_solvers_converge_at_their_order(solver, order):
    x1 = _noise()
    truth = exact_solution(x1, 1.0)
    errors = [(flow.flow_solve(exact_velocity, x1, n, solver) - truth).abs().max().item() for n in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 2**order * 0.8 < coarse / fine < 2**order * 1.25, errors
    shifted = (flow.flow_solve(exact_velocity, x1, 64, solver, shift=3.0) - truth).abs().max().item()
    assert shifted < 4 * errors[-1]  # the shifted grid solves the same ODE


def test_the_path_follows_the_exact_trajectory():
    """return_path: x at every time of the grid, x1 first; with the exact velocity, each point keeps its z-score."""
    x1 = _noise()
    x, path = flow.flow_solve(exact_velocity, x1, 64, "heun", shift=2.0, return_path=True)
    assert path.shape == (65, *x1.shape) and torch.equal(path[0], x1) and torch.equal(path[-1], x)
    for i in (16, 40):
        t = flow.flow_times(64, 2.0)[i]
        truth = (1 - t) * MU + ((1 - t) ** 2 * S**2 + t**2) ** 0.5 * x1  # at t = 1: mean 0, sd 1
        assert (path[i] - truth).abs().max() < 1e-3


def test_shifted_times():
    t = flow.flow_times(4, shift=3.0)
    assert t[0] == 1 and t[-1] == 0 and torch.all(t[1:] < t[:-1])
    torch.testing.assert_close(t[2], torch.tensor(3 * 0.5 / (1 + 2 * 0.5), dtype=torch.float64))  # eq. 23 at t = 0.5
    with pytest.raises(ValueError, match="shift must be > 0"):
        flow.flow_times(4, shift=0.0)
    with pytest.raises(ValueError, match="unknown flow solver 'rk4'"):
        flow.flow_solve(exact_velocity, _noise(), 4, "rk4")


@pytest.mark.parametrize("sampler, tolerance", [("ddim", 0.03), ("heun", 0.003), ("dpmpp_2m", 0.003)])
def test_course_samplers_sample_a_flow_model(sampler, tolerance):
    """FlowAsEps: the VP samplers, given the exact flow model, land where the flow ODE does."""
    schedule = get_schedule("cosine", 1000)
    x_T = _noise()
    eps_model = flow.FlowAsEps(exact_velocity, schedule)
    result = sample(eps_model, x_T, get_sampler(sampler, schedule, 100, "trailing", clip_x0=False), progress=False)
    t_T = flow.t_of_alpha_bar(schedule.alpha_bar[-1])
    truth = exact_solution(x_T * flow.r(t_T), t_T).clamp(-1, 1)  # sample() returns images in [-1, 1]
    assert (result.images - truth).abs().max() < tolerance  # first order (DDIM) and second order, 100 steps


def _exact_v(schedule):
    """The exact v prediction of Gaussian data at the schedule's steps (the VP model the flow should equal)."""
    def v(x, k, labels=None):
        ab = schedule.alpha_bar[k].view(-1, 1, 1, 1)
        var = ab * S**2 + 1 - ab
        x0 = MU + ab.sqrt() * S**2 / var * (x - ab.sqrt() * MU)
        eps = (1 - ab).sqrt() / var * (x - ab.sqrt() * MU)
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0  # v (Salimans & Ho 2022)
    return v


def test_flow_solvers_sample_a_v_model():
    """VelocityOf: a v model, read as a velocity at its own steps, gives the flow's trajectory."""
    schedule = get_schedule("cosine", 1000)
    x1 = _noise()
    u = flow.VelocityOf(_exact_v(schedule), "v", schedule)
    t = flow.t_of_alpha_bar(schedule.alpha_bar[[10, 300, 700]])
    x_t = flow.flow_sample(MU + S * _noise(3, 4), t, _noise(3, 5))
    torch.testing.assert_close(u(x_t, t), exact_velocity(x_t, t))  # exact at the schedule's own times
    truth = exact_solution(x1, 1.0)
    assert (flow.flow_solve(u, x1, 50, "heun") - truth).abs().max() < 0.02
    with pytest.raises(ValueError, match="unknown prediction type"):
        flow.VelocityOf(_exact_v(schedule), "velocity", schedule)


def test_q_sample_and_the_flow_share_the_noise():
    schedule = get_schedule("cosine", 1000)
    x0, eps, k = _noise(3, 6), _noise(3, 7), torch.tensor([5, 500, 990])
    t = flow.t_of_alpha_bar(schedule.alpha_bar[k])
    torch.testing.assert_close(flow.flow_sample(x0, t, eps) / flow.r(t).view(-1, 1, 1, 1), q_sample(x0, k, eps, schedule))


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_ddim_on_the_flow_schedule_is_euler_in_t(steps):
    """DDIM puts the predicted x0 and eps back at the next noise level, which on the straight path is one Euler
    step in t; with trailing spacing the flow schedule's DDIM grid is t = 1, 1 - 1/n, ..., 0. So they agree."""
    schedule = get_schedule("flow", 1000)

    def flow_model(x_vp, k, labels=None):  # a VP model with prediction="flow": the exact velocity, read at the VP point
        t = flow.t_of_alpha_bar(schedule.alpha_bar[k])
        return exact_velocity(x_vp * flow.r(t).view(-1, 1, 1, 1), t)

    x1 = 0.3 * _noise()  # small enough that sample()'s final clamp to [-1, 1] changes nothing
    ddim = sample(flow_model, x1, get_sampler("ddim", schedule, steps, "trailing", prediction="flow", clip_x0=False),
                  progress=False).images
    euler = flow.flow_solve(flow.VelocityOf(flow_model, "flow", schedule), x1, steps, "euler")
    assert euler.abs().max() < 1
    torch.testing.assert_close(ddim, euler, rtol=0, atol=1e-9)
