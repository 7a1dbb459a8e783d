"""The reverse process: samplers that turn unit Gaussian noise x_T into images, one shared interface.

A sampler holds a descending list of timesteps (``.timesteps``) and a ``step(model_output, i, x)``
that moves x from ``timesteps[i]`` to ``timesteps[i + 1]`` (or to a clean image after the last one).
:func:`sample` drives any sampler with any model ``model(x, t, class_labels)``, with optional
classifier-free guidance, progress bar and trajectory. Skipping steps is exact bookkeeping: a step
from t to t' uses the effective ``alpha = alpha_bar_t / alpha_bar_t'``, and the step after the last
timestep uses ``alpha_bar = 1`` so it lands on the predicted x0.
"""

from __future__ import annotations

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

SPACINGS = ("leading", "trailing", "linspace")


def make_timesteps(num_train_steps: int, num_steps: int, spacing: str = "leading") -> torch.Tensor:
    """``num_steps`` of the ``num_train_steps`` training steps, descending (the spacings of Lin et al. 2023, table 2)."""
    T = num_train_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
    if spacing == "leading":
        ts = np.arange(num_steps) * (T // num_steps)
    elif spacing == "trailing":
        ts = np.round(T - np.arange(num_steps) * T / num_steps) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    return torch.tensor(sorted(set(ts.astype(np.int64).tolist()), reverse=True))


def _check_timesteps(timesteps: Sequence[int], T: int) -> torch.Tensor:
    ts = torch.as_tensor(list(timesteps), dtype=torch.long)
    if ts.ndim != 1 or len(ts) == 0 or ts.min() < 0 or ts.max() >= T or not torch.all(ts[1:] < ts[:-1]):
        raise ValueError(f"timesteps must be a non-empty, strictly decreasing list of ints in [0, {T - 1}]")
    return ts


@dataclass
class StepOutput:
    prev: torch.Tensor  # x at the next (smaller) timestep, or the final image
    x0: torch.Tensor  # the model's current estimate of the clean image


class Sampler:
    """Shared bookkeeping: timesteps, alpha_bar at each and at the next one, conversions of the prediction."""

    name = "base"

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "leading",
                 timesteps: Sequence[int] | None = None, prediction: str = "eps", clip_x0: bool = True):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; allowed: {', '.join(PREDICTION_TYPES)}")
        T = schedule.num_steps
        if timesteps is not None:
            self.timesteps = _check_timesteps(timesteps, T)
        else:
            self.timesteps = make_timesteps(T, num_steps if num_steps is not None else T, spacing)
        self.schedule, self.prediction, self.clip_x0 = schedule, prediction, clip_x0

    def __len__(self) -> int:
        return len(self.timesteps)

    def alpha_bars(self, i: int) -> tuple[float, float]:
        """alpha_bar at timesteps[i] and at the step it goes to (1.0 after the last: a clean image)."""
        ab = self.schedule.alpha_bar
        prev = float(ab[self.timesteps[i + 1]]) if i + 1 < len(self.timesteps) else 1.0
        return float(ab[self.timesteps[i]]), prev

    def predict_x0_eps(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 and eps implied by the model output; with ``clip_x0`` x0 is clipped to [-1, 1] and eps re-derived."""
        t = int(self.timesteps[i])
        x0 = convert_prediction(model_output, self.prediction, "x0", x, t, self.schedule)
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            return x0, convert_prediction(x0, "x0", "eps", x, t, self.schedule)
        return x0, convert_prediction(model_output, self.prediction, "eps", x, t, self.schedule)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> StepOutput:
        raise NotImplementedError


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t'} ~ N(mu_tilde(x_t, x0_hat), sigma^2 I).

    ``variance``: ``fixed_small`` = beta_tilde (the posterior variance, eq. 7), ``fixed_large`` = beta.
    ``noise_scale`` multiplies the injected noise (a temperature; 1 is the model's distribution).
    """

    name = "ddpm"

    def __init__(self, schedule, num_steps=None, spacing="leading", timesteps=None, prediction="eps", clip_x0=True,
                 variance: str = "fixed_small", noise_scale: float = 1.0):
        super().__init__(schedule, num_steps, spacing, timesteps, prediction, clip_x0)
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown variance {variance!r}; allowed: fixed_small, fixed_large")
        self.variance, self.noise_scale = variance, noise_scale

    def step(self, model_output, i, x, generator=None):
        ab_t, ab_prev = self.alpha_bars(i)
        beta = 1 - ab_t / ab_prev  # effective beta of a step from t to t' (= beta_t without skipping)
        x0, _ = self.predict_x0_eps(model_output, i, x)
        mean = (ab_prev**0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x  # eq. 7
        if i == len(self.timesteps) - 1:
            return StepOutput(mean, x0)  # the last step returns the mean: no noise on the final image
        var = (1 - ab_prev) / (1 - ab_t) * beta if self.variance == "fixed_small" else beta
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return StepOutput(mean + self.noise_scale * var**0.5 * z, x0)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12): x_{t'} = sqrt(ab') x0_hat + sqrt(1 - ab' - sigma^2) eps_hat + sigma z,
    with sigma = eta * sqrt((1 - ab') / (1 - ab)) * sqrt(1 - ab / ab') (eq. 16). ``eta=0`` is deterministic,
    ``eta=1`` matches DDPM's fixed_small variance."""

    name = "ddim"

    def __init__(self, schedule, num_steps=None, spacing="leading", timesteps=None, prediction="eps", clip_x0=True,
                 eta: float = 0.0, noise_scale: float = 1.0):
        super().__init__(schedule, num_steps, spacing, timesteps, prediction, clip_x0)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta, self.noise_scale = eta, noise_scale

    def step(self, model_output, i, x, generator=None):
        ab_t, ab_prev = self.alpha_bars(i)
        x0, eps = self.predict_x0_eps(model_output, i, x)
        sigma = self.eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5  # eq. 16
        prev = ab_prev**0.5 * x0 + max(0.0, 1 - ab_prev - sigma**2) ** 0.5 * eps  # eq. 12
        if sigma > 0:
            prev = prev + self.noise_scale * sigma * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return StepOutput(prev, x0)


SAMPLERS: dict[str, type[Sampler]] = {"ddpm": DDPMSampler, "ddim": DDIMSampler}


def get_sampler(name: str, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "leading",
                **options) -> Sampler:
    """A sampler by name (``ddpm``, ``ddim``) over ``num_steps`` steps (default: all T), or explicit ``timesteps=``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](schedule, num_steps, spacing, **options)


@dataclass
class SampleResult:
    images: torch.Tensor  # (B, C, H, W) in [-1, 1] (clipped)
    trajectory: list[torch.Tensor] | None = None  # x_t before each step, then the final image (on the CPU)
    x0_trajectory: list[torch.Tensor] | None = None  # the predicted x0 at each step


@torch.no_grad()
def sample(model: Callable, x_T: torch.Tensor, sampler: Sampler, class_labels: torch.Tensor | None = None,
           guidance_scale: float = 1.0, null_label: int | torch.Tensor | None = None, generator=None,
           progress: bool = True, return_trajectory: bool = False,
           on_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> SampleResult:
    """Run ``sampler`` from the noise ``x_T`` with ``model(x, t, class_labels)``.

    Classifier-free guidance (:func:`lessons_lib.guidance.guided_output`) with ``guidance_scale`` w != 1;
    ``null_label`` (default: the model's null class) may be a negative class, one int or one per sample.
    ``generator``: one CPU generator, or one per sample (seeded images stay the same whatever the batch).
    ``on_step(i, x)``: called with x after step i, returns the x to go on from (inpainting uses it).
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if getattr(model, "training", False):
        warnings.warn("sampling with a model in training mode (dropout and BatchNorm batch statistics are on); "
                      "call model.eval() first", stacklevel=2)
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
    return SampleResult(x.clamp(-1, 1), traj, x0_traj)
