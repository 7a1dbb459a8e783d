"""The reverse process: samplers that turn unit Gaussian noise x_T into images, one shared interface.

A sampler walks down a descending grid of timesteps t_0 > t_1 > ... > t_{n-1} (from :func:`make_timesteps`
or given), then to a clean image. ``.timesteps`` lists the times at which it evaluates the model, in
order: one per grid step for most samplers, more for Heun's and PNDM's extra stages (``nfe`` in all,
times may repeat). ``step(model_output, i, x)`` takes the i-th evaluation and returns x at the next
level; ``alpha_bars(i)`` says which two noise levels that step goes between. :func:`sample` drives any
sampler with any model ``model(x, t, class_labels)``, with optional classifier-free guidance, progress
bar and trajectory.

x is always in the DDPM ("variance preserving") scale, x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps,
so x_T is unit noise. The ODE solvers of Karras et al. 2022 work inside a step on x / sqrt(alpha_bar) with
noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) (their table 1) and hand x back in the DDPM scale.
Skipping steps is exact bookkeeping: a step from t to t' uses the effective ``alpha = alpha_bar_t / alpha_bar_t'``,
and the step after the last grid timestep uses ``alpha_bar = 1``, so it lands on the predicted x0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import randn
from .guidance import guided_output
from .noising import PREDICTION_TYPES, convert_prediction
from .schedules import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace", "karras")
ZERO_SNR_ALPHA_BAR = 2.0**-24  # stands for alpha_bar = 0 (zero terminal SNR) where a solver divides by it, as in diffusers
SIGMA_MAX = 80.0  # Karras et al. 2022, sec. 5: above this noise level x_t holds no usable signal (1 part in 80)
# Karras et al. 2022, eq. 5 (their rho = 7 for 32-64 px images); on the course's 28x28 model DPM-Solver++ 2M scored
# best with rho = 3, which keeps more steps at high noise (FID 4.1 / 4.4 at 10 / 20 evaluations; rho = 7: 4.4 / 6.6)
KARRAS_RHO = 3.0


def make_timesteps(num_train_steps: int, num_steps: int, spacing: str = "leading",
                   alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
    """``num_steps`` of the ``num_train_steps`` training steps, descending: the spacings of Lin et al. 2023
    (table 2), or ``karras`` (:func:`karras_timesteps`, which needs the schedule's ``alpha_bar``)."""
    T = num_train_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
    if spacing == "leading":
        ts = np.arange(num_steps) * (T // num_steps)
    elif spacing == "trailing":
        ts = np.round(T - np.arange(num_steps) * T / num_steps) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()
    elif spacing == "karras":
        if alpha_bar is None or len(alpha_bar) != T:
            raise ValueError(f"spacing 'karras' places steps by noise level: give the schedule's alpha_bar ({T} values)")
        return karras_timesteps(alpha_bar, num_steps)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    return torch.tensor(sorted(set(ts.astype(np.int64).tolist()), reverse=True))


def karras_timesteps(alpha_bar: torch.Tensor, num_steps: int, rho: float = KARRAS_RHO,
                     sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """``num_steps`` training timesteps whose noise levels follow Karras et al. 2022, eq. 5, descending.

    The grid starts at t = T - 1, where x_T is pure noise; if sigma there exceeds ``sigma_max`` (80), the other
    ``num_steps - 1`` times carry sigma_i = (sigma_max^(1/rho) + i/(n-2) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    with sigma_min = sigma at t = 0, each rounded to the training step nearest in log sigma (and nudged to keep
    the times distinct). With rho = 3 about half the steps lie above sigma = 10, where evenly spaced trailing
    steps take one first-order jump out of pure noise (to sigma ~ 13 at 20 steps).
    """
    T = len(alpha_bar)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    log_sigma = np.log([_sigma(float(ab)) for ab in alpha_bar])  # increasing in t
    top = log_sigma[-1] > math.log(sigma_max)  # the first step leaves pure noise; the Karras grid starts below it
    m = num_steps - 1 if top else num_steps
    hi, lo = (min(sigma_max, math.exp(log_sigma[-1])), math.exp(log_sigma[0]))
    ramp = np.linspace(0, 1, m) if m > 1 else np.zeros(m)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho  # eq. 5
    ts = [int(np.abs(log_sigma - math.log(s)).argmin()) for s in sigmas]
    ts = ([T - 1] if top else []) + ts
    for i in range(len(ts) - 2, -1, -1):  # distinct times: push a repeat up by one step ...
        ts[i] = max(ts[i], ts[i + 1] + 1)
    ts[0] = min(ts[0], T - 1)
    for i in range(1, len(ts)):  # ... and, where that passed T - 1, back down
        ts[i] = min(ts[i], ts[i - 1] - 1)
    return torch.tensor(ts)


def _check_timesteps(timesteps: Sequence[int], T: int) -> torch.Tensor:
    ts = torch.as_tensor(list(timesteps), dtype=torch.long)
    if ts.ndim != 1 or len(ts) == 0 or ts.min() < 0 or ts.max() >= T or not torch.all(ts[1:] < ts[:-1]):
        raise ValueError(f"timesteps must be a non-empty, strictly decreasing list of ints in [0, {T - 1}]")
    return ts


def dynamic_threshold(x0: torch.Tensor, quantile: float, max_value: float | None = None) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per image, s = the ``quantile`` (e.g. 0.995)
    of |x0| (at least 1, at most ``max_value``); x0 is clipped to [-s, s] and divided by s."""
    s = torch.quantile(x0.flatten(1).abs().float(), quantile, dim=1).clamp(min=1, max=max_value)
    s = s.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def _sigma(alpha_bar: float) -> float:
    """The noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) of x / sqrt(alpha_bar) (Karras et al. 2022, table 1)."""
    alpha_bar = alpha_bar if alpha_bar > 0 else ZERO_SNR_ALPHA_BAR  # only an exact zero is replaced; tiny values are kept
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


@dataclass
class StepOutput:
    prev: torch.Tensor  # x at the next (smaller) timestep, or the final image
    x0: torch.Tensor  # the model's current estimate of the clean image


class Sampler:
    """Shared bookkeeping: the grid, the evaluation times, alpha_bar at each and at the next level, the x0 estimate.

    ``timesteps`` (a strictly decreasing list) replaces ``num_steps`` and ``spacing``. The model's output
    (``prediction``: eps, x0 or v) becomes an x0 estimate, clipped to [-1, 1] (``clip_x0``) or, with
    ``dynamic_threshold=p``, thresholded at the p-quantile of |x0| (:func:`dynamic_threshold`, capped at
    ``threshold_max`` if given).
    """

    name = "base"

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "leading", *,
                 timesteps: Sequence[int] | None = None, prediction: str = "eps", clip_x0: bool = True,
                 dynamic_threshold: float | None = None, threshold_max: float | None = None):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; allowed: {', '.join(PREDICTION_TYPES)}")
        if dynamic_threshold is not None and not 0 < dynamic_threshold <= 1:
            raise ValueError(f"dynamic_threshold is a quantile of |x0| in (0, 1], e.g. 0.995; got {dynamic_threshold}")
        if threshold_max is not None and threshold_max < 1:
            raise ValueError(f"threshold_max must be >= 1 (the threshold is never below 1), got {threshold_max}")
        T = schedule.num_steps
        if timesteps is not None:
            self.grid = _check_timesteps(timesteps, T)
        else:
            self.grid = make_timesteps(T, num_steps if num_steps is not None else T, spacing, schedule.alpha_bar)
        self.schedule, self.prediction, self.clip_x0 = schedule, prediction, clip_x0
        self.dynamic_threshold, self.threshold_max = dynamic_threshold, threshold_max
        self.timesteps, self._targets = self._evaluations(self.grid)
        self.reset()

    def _evaluations(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The times the model is evaluated at, and the time each step goes to (-1: the clean image)."""
        return grid, torch.cat([grid[1:], grid.new_tensor([-1])])

    @property
    def nfe(self) -> int:
        """The number of model evaluations of a run."""
        return len(self.timesteps)

    def __len__(self) -> int:
        return self.nfe

    def reset(self) -> None:
        """Forget a previous run (multistep and multi-stage samplers keep state between steps); :func:`sample` calls it."""
        self._next = 0

    def _advance(self, i: int) -> None:
        """For samplers with state between steps: steps must come in order."""
        if i != self._next:
            raise ValueError(f"{self.name} keeps state between steps, which must run in order: expected step "
                             f"{self._next}, got {i} (call reset() to start over)")
        self._next = i + 1

    def _starts_in_pure_noise(self, grid: torch.Tensor) -> bool:
        """Does the grid start above ``SIGMA_MAX``, with a step to take before the last one?

        Heun, PNDM and PLMS then make that first step first order (Euler, which is DDIM). Their corrections
        combine eps from both ends of a step, and an x0 read off x at alpha_bar ~ 0 divides that mix by
        sqrt(alpha_bar): from t = 999 of the cosine schedule (sigma ~ 2e4) to the next grid time (sigma ~ 6 at
        10 steps) the change in eps is amplified ~1e4 times and the run explodes. A first-order step there is
        what Karras et al.'s and DPM-Solver++'s first steps are too.
        """
        return len(grid) > 1 and _sigma(float(self.schedule.alpha_bar[grid[0]])) > SIGMA_MAX

    def _alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.schedule.alpha_bar[t])

    def alpha_bars(self, i: int) -> tuple[float, float]:
        """alpha_bar of the x given to step i and of the x it returns (1.0 after the last step: a clean image)."""
        return self._alpha_bar(int(self.timesteps[i])), self._alpha_bar(int(self._targets[i]))

    def predict_x0_eps(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 and eps implied by the model output; a clipped or thresholded x0 gets its eps re-derived."""
        t = int(self.timesteps[i])
        x0 = convert_prediction(model_output, self.prediction, "x0", x, t, self.schedule)
        if self.dynamic_threshold is not None:
            x0 = dynamic_threshold(x0, self.dynamic_threshold, self.threshold_max)
        elif self.clip_x0:
            x0 = x0.clamp(-1, 1)
        else:
            return x0, convert_prediction(model_output, self.prediction, "eps", x, t, self.schedule)
        return x0, convert_prediction(x0, "x0", "eps", x, t, self.schedule)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> StepOutput:
        raise NotImplementedError


def _check_noise_scale(noise_scale: float) -> float:
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    return noise_scale


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t'} ~ N(mu_tilde(x_t, x0_hat), sigma^2 I).

    ``variance``: ``fixed_small`` = beta_tilde (the posterior variance, eq. 7), ``fixed_large`` = beta.
    ``noise_scale`` multiplies the injected noise (a temperature; 1 is the model's distribution).
    """

    name = "ddpm"

    def __init__(self, schedule, num_steps=None, spacing="leading", *, variance: str = "fixed_small",
                 noise_scale: float = 1.0, **options):
        super().__init__(schedule, num_steps, spacing, **options)
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown variance {variance!r}; allowed: fixed_small, fixed_large")
        self.variance, self.noise_scale = variance, _check_noise_scale(noise_scale)

    def step(self, model_output, i, x, generator=None):
        ab_t, ab_prev = self.alpha_bars(i)
        beta = 1 - ab_t / ab_prev  # effective beta of a step from t to t' (= beta_t without skipping)
        x0, _ = self.predict_x0_eps(model_output, i, x)
        mean = (ab_prev**0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x  # eq. 7
        if self._targets[i] < 0:
            return StepOutput(mean, x0)  # the last step returns the mean: no noise on the final image
        var = (1 - ab_prev) / (1 - ab_t) * beta if self.variance == "fixed_small" else beta
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return StepOutput(mean + self.noise_scale * var**0.5 * z, x0)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12): x_{t'} = sqrt(ab') x0_hat + sqrt(1 - ab' - sigma^2) eps_hat + sigma z,
    with sigma = eta * sqrt((1 - ab') / (1 - ab)) * sqrt(1 - ab / ab') (eq. 16). ``eta=0`` is deterministic,
    ``eta=1`` matches DDPM's fixed_small variance; ``noise_scale`` multiplies z."""

    name = "ddim"

    def __init__(self, schedule, num_steps=None, spacing="leading", *, eta: float = 0.0, noise_scale: float = 1.0,
                 **options):
        super().__init__(schedule, num_steps, spacing, **options)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta, self.noise_scale = eta, _check_noise_scale(noise_scale)

    def step(self, model_output, i, x, generator=None):
        ab_t, ab_prev = self.alpha_bars(i)
        x0, eps = self.predict_x0_eps(model_output, i, x)
        sigma = self.eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5  # eq. 16
        prev = ab_prev**0.5 * x0 + max(0.0, 1 - ab_prev - sigma**2) ** 0.5 * eps  # eq. 12
        if sigma > 0:
            prev = prev + self.noise_scale * sigma * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return StepOutput(prev, x0)


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE of Karras et al. 2022 (eq. 3 with sigma(t) = t):
    dx/dsigma = (x - D(x; sigma)) / sigma for x = x_t / sqrt(alpha_bar), D the x0 estimate; a step is
    x' = x + (sigma' - sigma) d (their Algorithm 1 without the correction). The same numbers as deterministic DDIM."""

    name = "euler"

    def step(self, model_output, i, x, generator=None):
        ab, ab_next = self.alpha_bars(i)
        s, s_next = _sigma(ab), _sigma(ab_next)
        x0, _ = self.predict_x0_eps(model_output, i, x)
        x_ve = x * (1 + s**2) ** 0.5  # x / sqrt(alpha_bar)
        d = (x_ve - x0) / s  # eq. 3
        return StepOutput((x_ve + (s_next - s) * d) / (1 + s_next**2) ** 0.5, x0)


class EulerAncestralSampler(Sampler):
    """Euler ancestral (k-diffusion's sample_euler_ancestral): an Euler step down to sigma_down, then fresh noise
    of std sigma_up, with sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2 and sigma_down^2 = sigma'^2 - sigma_up^2.
    sigma_up^2 is DDPM's posterior variance (Ho et al. 2020, eq. 7) in the sigma scale, so this is DDIM with eta=1;
    ``noise_scale`` multiplies the noise."""

    name = "euler_ancestral"

    def __init__(self, schedule, num_steps=None, spacing="leading", *, noise_scale: float = 1.0, **options):
        super().__init__(schedule, num_steps, spacing, **options)
        self.noise_scale = _check_noise_scale(noise_scale)

    def step(self, model_output, i, x, generator=None):
        ab, ab_next = self.alpha_bars(i)
        s, s_next = _sigma(ab), _sigma(ab_next)
        x0, _ = self.predict_x0_eps(model_output, i, x)
        s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        s_down = (s_next**2 - s_up**2) ** 0.5
        x_ve = x * (1 + s**2) ** 0.5
        prev = x_ve + (s_down - s) * (x_ve - x0) / s
        if s_up > 0:
            prev = prev + self.noise_scale * s_up * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return StepOutput(prev / (1 + s_next**2) ** 0.5, x0)


class HeunSampler(Sampler):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1, deterministic): an Euler step from sigma to sigma'
    (lines 3-5), then the model at the new point and a step with the average of both slopes (lines 6-8); the last
    step, to sigma = 0, is Euler only. Evaluations: t_0, t_1, t_1, t_2, t_2, ..., t_{n-1} (2n - 1). From above
    ``SIGMA_MAX`` the first step is Euler only too (:meth:`Sampler._starts_in_pure_noise`): 2n - 2 evaluations."""

    name = "heun"

    def _evaluations(self, grid):
        g, euler_only = [*grid.tolist(), -1], int(self._starts_in_pure_noise(grid))
        plan = []  # (time evaluated, time the step goes to, stage)
        for k in range(len(grid)):
            plan.append((g[k], g[k + 1], "predict"))
            if k >= euler_only and g[k + 1] >= 0:  # each inner time is evaluated again to correct the step
                plan.append((g[k + 1], g[k + 1], "correct"))
        self._stages = [stage for _, _, stage in plan]
        return torch.tensor([t for t, _, _ in plan]), torch.tensor([t for _, t, _ in plan])

    def reset(self):
        super().reset()
        self._start = None  # (x, sigma, slope) at the start of the step being corrected

    def step(self, model_output, i, x, generator=None):
        self._advance(i)
        ab, ab_next = self.alpha_bars(i)
        s, s_next = _sigma(ab), _sigma(ab_next)
        x0, _ = self.predict_x0_eps(model_output, i, x)
        x_ve = x * (1 + s**2) ** 0.5
        d = (x_ve - x0) / s  # the slope dx/dsigma at (x, sigma), eq. 3
        if self._stages[i] == "predict":  # Euler predictor (lines 3-5)
            self._start = (x_ve, s, d)
            prev = x_ve + (s_next - s) * d
        else:  # corrector with the mean slope (line 8); here s == s_next
            x_start, s_start, d_start = self._start
            prev = x_start + (s_next - s_start) * (d_start + d) / 2
        return StepOutput(prev / (1 + s_next**2) ** 0.5, x0)


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a multistep solver of the diffusion ODE in
    lambda = log(alpha / sigma) (alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)) that integrates the x0 estimate
    exactly: x' = (sigma' / sigma) x - alpha' (e^{-h} - 1) D with h = lambda' - lambda, and
    D = (1 + 1 / (2r)) x0_hat - 1 / (2r) x0_hat_prev, r = h_prev / h. The first step and the last one (to the clean
    image, h = inf) use D = x0_hat (first order, which is DDIM), as diffusers does."""

    name = "dpmpp_2m"

    def reset(self):
        super().reset()
        self._prev = None  # (x0_hat, h) of the previous step

    def step(self, model_output, i, x, generator=None):
        self._advance(i)
        ab, ab_next = self.alpha_bars(i)
        s, s_next = _sigma(ab), _sigma(ab_next)  # sigma / alpha = e^{-lambda}
        alpha_next, sigma, sigma_next = (1 + s_next**2) ** -0.5, s * (1 + s**2) ** -0.5, s_next * (1 + s_next**2) ** -0.5
        x0, _ = self.predict_x0_eps(model_output, i, x)
        D = x0
        if self._prev is not None and s_next > 0:
            x0_prev, h_prev = self._prev
            r = h_prev / math.log(s / s_next)  # h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        self._prev = (x0, math.log(s / s_next) if s_next > 0 else math.inf)
        return StepOutput((sigma_next / sigma) * x - alpha_next * (s_next / s - 1) * D, x0)  # e^{-h} = s' / s


def _transfer(x: torch.Tensor, eps: torch.Tensor, ab: float, ab_next: float) -> torch.Tensor:
    """x at alpha_bar ``ab_next`` from x at ``ab`` along the noise ``eps``: PNDM's transfer part phi(x_t, eps, t, t'),
    which is the deterministic DDIM step (Song et al. 2021, eq. 12 with sigma = 0)."""
    x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
    return ab_next**0.5 * x0 + (1 - ab_next) ** 0.5 * eps


class PNDMSampler(Sampler):
    """Pseudo numerical methods (F-PNDM, Liu et al. 2022): classical formulas applied to eps, each move made
    with the DDIM transfer. Three pseudo Runge-Kutta steps (RK4 on eps: 4 evaluations each, at t, twice at the
    midpoint and at t') warm up the 4th-order pseudo linear multistep (Adams-Bashforth) steps,
    eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 over the last four steps' eps. The midpoint of t and t' is
    t - (t - t') // 2; with fewer than 4 timesteps the last step is a multistep one of the order the history allows.
    From above ``SIGMA_MAX`` the first step is a plain DDIM step and the method starts at t_1
    (:meth:`Sampler._starts_in_pure_noise`). The weights hold for equal steps only: the grid from t_1 on must be
    evenly spaced (``karras`` spacing is refused; on the shipped model PLMS-9 on it scored FID 57 against 9.6).
    """

    name = "pndm"
    prk_warmup = True
    ADAMS_BASHFORTH = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}

    def _evaluations(self, grid):
        g, n, first = [*grid.tolist(), -1], len(grid), int(self._starts_in_pure_noise(grid))
        gaps = [a - b for a, b in zip(g[first:n - 1], g[first + 1:n], strict=True)]
        if gaps and max(gaps) - min(gaps) > 1:  # the Adams-Bashforth weights below hold for equal steps only
            raise ValueError(f"{self.name} needs evenly spaced timesteps (these step by {min(gaps)} to {max(gaps)}): "
                             f"use spacing 'leading', 'trailing' or 'linspace'")
        plan = [(g[0], g[1], "ddim")] if first else []  # (time evaluated, time the step goes to, stage)
        if self.prk_warmup:
            warmup = min(3, n - first - 1)
            for k in range(first, first + warmup):
                mid = g[k] - (g[k] - g[k + 1]) // 2
                plan += [(g[k], mid, "rk1"), (mid, mid, "rk2"), (mid, g[k + 1], "rk3"), (g[k + 1], g[k + 1], "rk4")]
        else:
            warmup = min(1, n - first - 1)
            plan += [(g[first], g[first + 1], "euler"), (g[first + 1], g[first + 1], "heun")] if warmup else []
        plan += [(g[k], g[k + 1], "multistep") for k in range(first + warmup, n)]
        if self.schedule.alpha_bar[grid].min() == 0:
            raise ValueError(f"{self.name} needs alpha_bar > 0 at every timestep; this schedule reaches 0 at t = "
                             f"{self.schedule.num_steps - 1} (zero terminal SNR): start below it or use another sampler")
        self._stages = [stage for _, _, stage in plan]
        return torch.tensor([t for t, _, _ in plan]), torch.tensor([t for _, t, _ in plan])

    def reset(self):
        super().reset()
        self._eps = []  # eps at the start of each step so far (the multistep history)
        self._start = None  # (x, alpha_bar) where the current multi-stage step began
        self._rk_sum = None  # RK4's weighted sum of eps so far

    def step(self, model_output, i, x, generator=None):
        self._advance(i)
        ab, ab_next = self.alpha_bars(i)
        x0, eps = self.predict_x0_eps(model_output, i, x)
        stage = self._stages[i]
        if stage == "ddim":  # the first-order step out of pure noise, before the history starts
            return StepOutput(_transfer(x, eps, ab, ab_next), x0)
        if stage in ("rk1", "euler"):  # first stage of a step: remember where it starts
            self._eps.append(eps)
            self._start, self._rk_sum = (x, ab), eps / 6
            return StepOutput(_transfer(x, eps, ab, ab_next), x0)
        if stage == "multistep":
            self._eps = [*self._eps[-3:], eps]
            coefs = self.ADAMS_BASHFORTH[len(self._eps)]
            eps_ab = sum(c * e for c, e in zip(coefs, reversed(self._eps), strict=True))
            return StepOutput(_transfer(x, eps_ab, ab, ab_next), x0)
        x_start, ab_start = self._start
        if stage == "heun":  # pseudo improved Euler: the mean of both ends' eps
            eps = (self._eps[-1] + eps) / 2
        elif stage in ("rk2", "rk3"):
            self._rk_sum = self._rk_sum + eps / 3
        else:  # rk4: (e1 + 2 e2 + 2 e3 + e4) / 6
            eps = self._rk_sum + eps / 6
        return StepOutput(_transfer(x_start, eps, ab_start, ab_next), x0)


class PLMSSampler(PNDMSampler):
    """PLMS (the pseudo linear multistep sampler of Latent Diffusion; diffusers' PNDM with skip_prk_steps): PNDM
    whose warm-up is one pseudo improved Euler step (2 evaluations), then multistep steps of order 2, 3, then 4."""

    name = "plms"
    prk_warmup = False


SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "euler": EulerSampler,
    "euler_ancestral": EulerAncestralSampler,
    "heun": HeunSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
    "pndm": PNDMSampler,
    "plms": PLMSSampler,
}


def get_sampler(name: str, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "leading",
                **options) -> Sampler:
    """A sampler by name (see ``SAMPLERS``) over ``num_steps`` steps (default: all T), or explicit ``timesteps=``.

    ``options``: ``prediction``, ``clip_x0``, ``dynamic_threshold``, ``threshold_max`` for every sampler, and the
    sampler's own (``variance`` and ``noise_scale`` for ddpm, ``eta`` and ``noise_scale`` for ddim,
    ``noise_scale`` for euler_ancestral).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    try:
        return SAMPLERS[name](schedule, num_steps, spacing, **options)
    except TypeError as err:
        raise TypeError(f"sampler {name!r}: {err}") from None


@dataclass
class SampleResult:
    images: torch.Tensor  # (B, C, H, W) in [-1, 1] (clipped; unclipped with clip=False, e.g. latents)
    trajectory: list[torch.Tensor] | None = None  # x_t before each step, then the final image (on the CPU)
    x0_trajectory: list[torch.Tensor] | None = None  # the predicted x0 at each step


@torch.no_grad()
def sample(model: Callable, x_T: torch.Tensor, sampler: Sampler, class_labels: torch.Tensor | None = None,
           guidance_scale: float = 1.0, generator=None, progress: bool = True, return_trajectory: bool = False, *,
           null_label: int | torch.Tensor | None = None,
           on_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None, clip: bool = True) -> SampleResult:
    """Run ``sampler`` from the noise ``x_T`` with ``model(x, t, class_labels)``, one step per model evaluation.

    Classifier-free guidance (:func:`lessons_lib.guidance.guided_output`) with ``guidance_scale`` w != 1;
    ``null_label`` (default: the model's null class) may be a negative class, one int or one per sample.
    ``generator``: one CPU generator, or one per sample (seeded images stay the same whatever the batch).
    ``on_step(i, x)``: called with x after step i, returns the x to go on from (inpainting uses it).
    ``clip``: clamp the result to [-1, 1], the range of images; latents have no such range (pass ``clip=False`` with a
    sampler made with ``clip_x0=False``).
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if getattr(model, "training", False):
        warnings.warn("sampling with a model in training mode (dropout and BatchNorm batch statistics are on); "
                      "call model.eval() first", stacklevel=2)
    sampler.reset()
    x = x_T
    t_batch = lambda t: torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
    traj, x0_traj = ([x.cpu()], []) if return_trajectory else (None, None)
    for i, t in enumerate(tqdm(sampler.timesteps.tolist(), desc=sampler.name, disable=not progress, leave=False)):
        out = guided_output(model, x, t_batch(t), class_labels, guidance_scale, null_label)
        step = sampler.step(out, i, x, generator=generator)
        x = step.prev if on_step is None else on_step(i, step.prev)
        if return_trajectory:
            traj.append(x.cpu())
            x0_traj.append(step.x0.cpu())
    return SampleResult(x.clamp(-1, 1) if clip else x, traj, x0_traj)
