"""Noise schedules: how much noise the forward process adds at each of its T steps.

A schedule is a sequence ``beta_1..beta_T``; everything else follows (DDPM, Ho et al. 2020, sec. 2):
``alpha_t = 1 - beta_t`` and ``alpha_bar_t = prod_{s<=t} alpha_s``, the fraction of signal variance left
at step t. Arrays are indexed 0..T-1 (index i is the paper's step t = i + 1) and kept in float64, so
closed forms can be checked exactly; they are cast to the data's dtype where they are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete noise schedule. Build one with :func:`get_schedule`."""

    betas: torch.Tensor  # (T,) float64, beta_t in (0, 1]
    name: str = "custom"

    def __post_init__(self):
        betas = torch.as_tensor(self.betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.all((betas > 0) & (betas <= 1)):
            raise ValueError(f"every beta must lie in (0, 1]; got min {betas.min():.3g}, max {betas.max():.3g}")
        object.__setattr__(self, "betas", betas)

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return len(self.betas)

    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas  # alpha_t = 1 - beta_t

    @cached_property
    def alpha_bar(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)  # alpha_bar_t = prod_{s<=t} alpha_s (DDPM eq. 4)

    @cached_property
    def alpha_bar_prev(self) -> torch.Tensor:
        """alpha_bar_{t-1}, with alpha_bar_0 = 1 (no noise before the first step)."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])

    @cached_property
    def snr(self) -> torch.Tensor:
        return self.alpha_bar / (1.0 - self.alpha_bar)  # SNR(t) = alpha_bar_t / (1 - alpha_bar_t)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """Noise level of the equivalent variance-exploding process: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
        return torch.sqrt((1.0 - self.alpha_bar) / self.alpha_bar)

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """Variance of q(x_{t-1} | x_t, x_0): beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (DDPM eq. 7)."""
        return (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar) * self.betas

    def __repr__(self) -> str:
        return (f"NoiseSchedule({self.name!r}, T={self.num_steps}, beta {self.betas[0]:.3g}..{self.betas[-1]:.3g}, "
                f"alpha_bar[-1]={self.alpha_bar[-1]:.3g})")


# ---------------------------------------------------------------------------------------------------
# The schedules: each returns betas (float64, shape (T,))
# ---------------------------------------------------------------------------------------------------
def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4): beta rises linearly from 1e-4 to 0.02."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def scaled_linear_betas(num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent Diffusion / Stable Diffusion: linear in sqrt(beta), beta_t = (linspace(sqrt b0, sqrt b1))^2."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos(((t + s) / (1 + s)) * pi / 2)^2, t in [0, 1]."""
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(torch.zeros_like(t))


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM cosine schedule: beta_t = min(1 - alpha_bar(t) / alpha_bar(t - 1), 0.999) (eq. 17 and below)."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = cosine_alpha_bar(t, s)
    return torch.clamp(1.0 - alpha_bar[1:] / alpha_bar[:-1], max=max_beta)


def sigmoid_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """GeoDiff's sigmoid schedule (Xu et al. 2022): beta follows a sigmoid over [-6, 6] from beta_start to beta_end."""
    return torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


def flow_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """The rectified-flow path x_t = (1 - t) x0 + t eps, divided by its length r(t) = sqrt((1 - t)^2 + t^2), is the VP
    point with alpha_bar(t) = (1 - t)^2 / ((1 - t)^2 + t^2) (see :mod:`lessons_lib.flow`)."""
    return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)


def flow_betas(num_steps: int) -> torch.Tensor:
    """Rectified flow's times t = 1/T, 2/T, ..., 1 as VP steps: alpha_bar_i = flow_alpha_bar((i + 1) / T), ending at 0."""
    alpha_bar = flow_alpha_bar(torch.arange(num_steps + 1, dtype=torch.float64) / num_steps)
    return 1.0 - alpha_bar[1:] / alpha_bar[:-1]


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {  # the noise schedules lesson 02 compares
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}
NAMED_SCHEDULES = {**SCHEDULES, "flow": flow_betas}  # and rectified flow's straight path (lessons_lib.flow)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step is pure noise.

    sqrt(alpha_bar) is moved so its last value is 0 and scaled so its first value is unchanged; the
    SNR then reaches exactly 0 at t = T, and the order of SNRs is kept.
    """
    sqrt_ab = torch.sqrt(torch.cumprod(1.0 - betas, dim=0))
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    if first - last <= 0:
        raise ValueError("cannot rescale a schedule whose alpha_bar does not decrease")
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def get_schedule(name: str, num_steps: int = 1000, *, zero_terminal_snr: bool = False, **kwargs) -> NoiseSchedule:
    """A named schedule with ``num_steps`` steps: one of ``linear``, ``scaled_linear``, ``cosine``, ``sigmoid``, ``flow``.

    Extra keyword arguments go to the schedule (e.g. ``beta_start``, ``beta_end`` or ``s``).
    ``zero_terminal_snr=True`` applies :func:`rescale_zero_terminal_snr`.
    """
    if name not in NAMED_SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(NAMED_SCHEDULES)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    try:
        betas = NAMED_SCHEDULES[name](num_steps, **kwargs)
    except TypeError as err:
        raise TypeError(f"schedule {name!r}: {err}") from None
    if zero_terminal_snr:
        if num_steps < 2:
            raise ValueError("zero_terminal_snr needs num_steps >= 2 (the first step must keep some signal)")
        betas, name = rescale_zero_terminal_snr(betas), f"{name}+ztsnr"
    return NoiseSchedule(betas, name)


def schedule_record(schedule: NoiseSchedule) -> dict:
    """How a saved config names ``schedule``: by name where :func:`get_schedule` rebuilds it bit for bit, else by
    its betas too (custom betas, or a named schedule built with other keyword arguments)."""
    base, zero_terminal_snr = schedule.name.removesuffix("+ztsnr"), schedule.name.endswith("+ztsnr")
    record = {"name": base, "num_steps": schedule.num_steps, "zero_terminal_snr": zero_terminal_snr}
    try:
        rebuilt = get_schedule(base, schedule.num_steps, zero_terminal_snr=zero_terminal_snr).betas
    except (ValueError, TypeError):  # "custom", or a name this version does not know
        rebuilt = None
    if rebuilt is not None and torch.equal(rebuilt, schedule.betas):
        return record
    return {**record, "betas": schedule.betas.tolist()}


def schedule_from_record(record: dict) -> NoiseSchedule:
    """The schedule :func:`schedule_record` describes."""
    if "betas" in record:
        name = record["name"] + ("+ztsnr" if record.get("zero_terminal_snr") else "")
        return NoiseSchedule(torch.tensor(record["betas"], dtype=torch.float64), name=name)
    return get_schedule(record["name"], record["num_steps"], zero_terminal_snr=record.get("zero_terminal_snr", False))
