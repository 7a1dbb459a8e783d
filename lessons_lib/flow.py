"""Rectified flow (Liu et al. 2022; Lipman et al. 2023) and its bridge to the variance-preserving path.

The flow path joins data and noise by a straight line, x_t = (1 - t) x0 + t eps with t in [0, 1], and a flow
model predicts the velocity u = dx_t/dt = eps - x0. Divided by r(t) = sqrt((1 - t)^2 + t^2) it is a DDPM
("variance preserving") point, x_t / r = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, with

    alpha_bar(t) = (1 - t)^2 / ((1 - t)^2 + t^2),   back:  t = sigma / (1 + sigma),  sigma = sqrt((1 - alpha_bar) / alpha_bar)

(the same eps in both). So a velocity converts to eps / x0 / v at the matching noise level and back, exactly:
the course's DDPM-scale samplers can sample a flow model (:class:`FlowAsEps`) and the flow samplers below can
sample an eps / x0 / v model (:class:`VelocityOf`). Trained by the course's trainer, a flow model is a VP model
with ``prediction="flow"`` (target eps - x0, read at the VP point) on the ``flow`` schedule (t = 1/T, ..., 1).
Kingma & Gao (2023) read all of these objectives as one loss under different weightings and noise schedules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .noising import PREDICTION_TYPES, convert_prediction
from .schedules import NoiseSchedule
from .schedules import flow_alpha_bar as alpha_bar_of_t  # the VP noise level of flow time t


def r(t: torch.Tensor) -> torch.Tensor:
    """The length of the flow point's coefficients: x_t / r(t) is a variance-preserving point."""
    return ((1 - t) ** 2 + t**2).sqrt()


def t_of_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The flow time of a VP noise level: t / (1 - t) = sigma = sqrt((1 - alpha_bar) / alpha_bar), written so that
    alpha_bar = 0 (pure noise, the flow schedule's last step) gives t = 1."""
    return (1 - alpha_bar).sqrt() / (alpha_bar.sqrt() + (1 - alpha_bar).sqrt())


def flow_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps (Liu et al. 2022, eq. 1), t of shape (B,)."""
    t = _b(t, x0)
    return (1 - t) * x0 + t * eps


def _b(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t as a (B, 1, 1, ...) tensor of x's dtype, to broadcast over an image batch."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return (t.expand(len(x)) if t.dim() == 0 else t).view(-1, *([1] * (x.dim() - 1)))


def x0_eps_from_velocity(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = x_t - t u and eps = x_t + (1 - t) u: both ends of the straight line through x_t with slope u."""
    tb = _b(t, x)
    return x - tb * u, x + (1 - tb) * u


class FlowAsEps(torch.nn.Module):
    """A flow model ``flow(x_t, t, y)`` (t in [0, 1]) as an eps model on a discrete VP ``schedule``: the DDPM-scale
    samplers (DDIM, Euler, Heun, DPM-Solver++) then sample it. Step k has t = t_of_alpha_bar(alpha_bar_k)."""

    def __init__(self, flow: Callable, schedule: NoiseSchedule):
        super().__init__()
        self.flow, self.schedule = flow, schedule
        self.config = getattr(flow, "config", None)
        self.train(getattr(flow, "training", False))

    def forward(self, x: torch.Tensor, k: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = t_of_alpha_bar(self.schedule.alpha_bar.to(x.device)[k]).to(x.dtype)
        x_flow = x * _b(r(t), x)  # the VP point scaled back onto the straight line
        return x0_eps_from_velocity(x_flow, t, self.flow(x_flow, t, class_labels))[1]


def _log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log(alpha_bar / (1 - alpha_bar)), clamped: t = 0 and t = 1 meet the grid's first and last step (alpha_bar 0)."""
    alpha_bar = alpha_bar.clamp(1e-12, 1 - 1e-12)
    return (alpha_bar / (1 - alpha_bar)).log()


class VelocityOf(torch.nn.Module):
    """A VP model predicting ``prediction`` (eps, x0, v or flow) on ``schedule`` as a flow model u(x_t, t, y).

    The network knows only the schedule's integer steps: flow time t is sent to the step whose alpha_bar is
    nearest in log-SNR, and its output is read at that step's noise level (exact at the grid's own times)."""

    def __init__(self, model: Callable, prediction: str, schedule: NoiseSchedule):
        super().__init__()
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; allowed: {', '.join(PREDICTION_TYPES)}")
        self.model, self.prediction, self.schedule = model, prediction, schedule
        self.config = getattr(model, "config", None)
        self.train(getattr(model, "training", False))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        ab = self.schedule.alpha_bar.to(x.device)
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64).expand(len(x))
        k = (_log_snr(ab) - _log_snr(alpha_bar_of_t(t))[:, None]).abs().argmin(1)
        t_k = t_of_alpha_bar(ab[k]).to(x.dtype)
        x_vp = x / _b(r(t_k), x)
        return convert_prediction(self.model(x_vp, k, class_labels), self.prediction, "flow", x_vp, k, self.schedule)


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Esser et al. 2024, eq. 23: t' = s t / (1 + (s - 1) t); s > 1 spends more steps at high noise."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1: no shift), got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def flow_times(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The grid 1 = t_0 > t_1 > ... > t_n = 0 of ``num_steps`` steps, uniform then shifted."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    return shift_times(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift)


FLOW_SOLVERS = ("euler", "heun")


@torch.no_grad()
def flow_solve(velocity: Callable, x1: torch.Tensor, num_steps: int, solver: str = "euler", shift: float = 1.0,
               class_labels: torch.Tensor | None = None, return_path: bool = False):
    """Integrate dx/dt = u(x, t) from t = 1 (x1: noise) to t = 0 (an image).

    euler: x_{t'} = x_t + (t' - t) u(x_t, t), 1 evaluation per step; heun: the mean of the slopes at both ends
    of the Euler step (the trapezoidal rule), 2 per step. u is defined at t = 0, so Heun runs every step.
    ``return_path``: also return x at every time of the grid, stacked (num_steps + 1, *x1.shape), x1 first.
    """
    if solver not in FLOW_SOLVERS:
        raise ValueError(f"unknown flow solver {solver!r}; allowed: {', '.join(FLOW_SOLVERS)}")
    times, x = flow_times(num_steps, shift).to(x1.device), x1
    path = [x1]
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        dt = (t_next - t).to(x.dtype)
        u = velocity(x, t.to(x.dtype).expand(len(x)), class_labels)
        x_euler = x + dt * u
        if solver == "euler":
            x = x_euler
        else:
            x = x + dt * (u + velocity(x_euler, t_next.to(x.dtype).expand(len(x)), class_labels)) / 2
        path.append(x)
    return (x, torch.stack(path)) if return_path else x
