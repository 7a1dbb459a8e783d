"""The forward process q(x_t | x_0) and its posterior q(x_{t-1} | x_t, x_0) (DDPM, Ho et al. 2020).

Also the three ways a network can describe a noisy image — the noise ``eps``, the clean image ``x0``,
or the velocity ``v`` (Salimans & Ho 2022) — and exact conversions between them.
Timesteps ``t`` are integer tensors in [0, T-1], one per batch element (or a single int).

Precision: coefficients are computed in float64 and cast to the data's dtype, but recovering x_0 from
eps divides by sqrt(alpha_bar_t), which multiplies float32 rounding error by up to ~150x near t = T
(linear schedule): compare in float64, or with a tolerance scaled by 1 / sqrt(alpha_bar_t).
"""

from __future__ import annotations

import torch

from .schedules import NoiseSchedule

PREDICTION_TYPES = ("eps", "x0", "v", "flow")  # flow: the velocity eps - x0 of rectified flow


def _timesteps(t: torch.Tensor | int, batch_size: int, schedule: NoiseSchedule) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must hold integers in [0, {schedule.num_steps - 1}], got dtype {t.dtype}")
    if t.ndim == 0:
        t = t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"t must be an int or have shape ({batch_size},), got {tuple(t.shape)}")
    if len(t) and (t.min() < 0 or t.max() >= schedule.num_steps):
        raise ValueError(f"t must lie in [0, {schedule.num_steps - 1}], got values in [{int(t.min())}, {int(t.max())}]")
    return t.long().cpu()


def extract(values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """``values[t]`` reshaped to (B, 1, 1, ...) so it broadcasts against ``like``, in its dtype and device."""
    t = _timesteps(t, like.shape[0], schedule)
    out = values[t].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def _signal_noise(t, like: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), computed in float64 before the cast (no cancellation near t=0)."""
    return (extract(schedule.alpha_bar.sqrt(), t, like, schedule),
            extract((1.0 - schedule.alpha_bar).sqrt(), t, like, schedule))


def q_sample(x0: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4)."""
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
    signal, noise = _signal_noise(t, x0, schedule)
    return signal * x0 + noise * eps


def q_posterior(
    x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7).

    mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    beta_tilde = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    The variance is returned with shape (B, 1, 1, 1) so it broadcasts.
    """
    s = schedule
    coef_x0 = s.alpha_bar_prev.sqrt() * s.betas / (1.0 - s.alpha_bar)  # eq. 7, first term
    coef_xt = s.alphas.sqrt() * (1.0 - s.alpha_bar_prev) / (1.0 - s.alpha_bar)  # eq. 7, second term
    mean = extract(coef_x0, t, xt, s) * x0 + extract(coef_xt, t, xt, s) * xt
    return mean, extract(s.posterior_variance, t, xt, s)


# ---------------------------------------------------------------------------------------------------
# eps / x0 / v: three parametrisations of the same prediction
# ---------------------------------------------------------------------------------------------------
def x0_from_eps(xt, t, eps, schedule):
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (eq. 4 solved for x_0)."""
    signal, noise = _signal_noise(t, xt, schedule)
    return (xt - noise * eps) / signal


def eps_from_x0(xt, t, x0, schedule):
    """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)   (eq. 4 solved for eps)."""
    signal, noise = _signal_noise(t, xt, schedule)
    return (xt - signal * x0) / noise


def v_from_x0_eps(x0, eps, t, schedule):
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0   (Salimans & Ho 2022, sec. 4)."""
    signal, noise = _signal_noise(t, x0, schedule)
    return signal * eps - noise * x0


def x0_from_v(xt, t, v, schedule):
    """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
    signal, noise = _signal_noise(t, xt, schedule)
    return signal * xt - noise * v


def eps_from_v(xt, t, v, schedule):
    """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
    signal, noise = _signal_noise(t, xt, schedule)
    return noise * xt + signal * v


def x0_eps_from_flow(xt, t, u, schedule):
    """x0 = (x_t - sqrt(1 - alpha_bar) u) / (sqrt(alpha_bar) + sqrt(1 - alpha_bar)), eps = (x_t + sqrt(alpha_bar) u) / (...)
    for the velocity u = eps - x0: both follow from x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
    signal, noise = _signal_noise(t, xt, schedule)
    return (xt - noise * u) / (signal + noise), (xt + signal * u) / (signal + noise)


def convert_prediction(
    pred: torch.Tensor, source: str, target: str, xt: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule
) -> torch.Tensor:
    """Turn a prediction of type ``source`` into ``target`` (each of ``eps``, ``x0``, ``v``, ``flow``) at (x_t, t)."""
    for kind in (source, target):
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {kind!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    if source == target:
        return pred
    if source == "v":
        x0, eps = x0_from_v(xt, t, pred, schedule), eps_from_v(xt, t, pred, schedule)
    elif source == "flow":
        x0, eps = x0_eps_from_flow(xt, t, pred, schedule)
    elif source == "eps":
        x0, eps = x0_from_eps(xt, t, pred, schedule), pred
    else:
        x0, eps = pred, eps_from_x0(xt, t, pred, schedule)
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    if target == "flow":
        return eps - x0
    return v_from_x0_eps(x0, eps, t, schedule)


class EpsModel(torch.nn.Module):
    """A network whose output is a ``prediction`` (eps, x0, v or flow), seen as the noise predictor eps_theta(x_t, t, y)
    that DDPM's and DDIM's equations are written with. Classifier-free guidance may mix either output: at fixed
    x_t the conversion is affine in the prediction and guidance's weights (1 - w, w) sum to one, so the two commute."""

    def __init__(self, model: torch.nn.Module, prediction: str, schedule: NoiseSchedule):
        super().__init__()
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; allowed: {', '.join(PREDICTION_TYPES)}")
        self.model, self.prediction, self.schedule = model, prediction, schedule
        self.config = getattr(model, "config", None)  # the null class for guidance: config.num_classes
        self.train(model.training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return convert_prediction(self.model(x, t, class_labels), self.prediction, "eps", x, t, self.schedule)
