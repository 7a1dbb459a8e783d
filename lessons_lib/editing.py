"""Editing with a trained model: image-to-image, inpainting (with RePaint resampling) and interpolation.

All three reuse the sampler loop of :func:`lessons_lib.samplers.sample`, which works in the VP scale
where x at noise level alpha_bar is ``sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``:

- image-to-image (SDEdit, Meng et al. 2022): noise the input to an intermediate level and run only the
  last steps of the sampler from there; ``strength`` is the fraction of the steps that are run.
- inpainting (RePaint, Lugmayr et al. 2022): after every step, the known pixels are replaced by the
  original noised to the level the step reached, so the model only invents the masked region; with
  resampling, x is noised back up a few steps and those steps are run again, so the fill agrees with
  its surroundings.
- interpolation: spherical interpolation (slerp) between two noises, or two class embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .device import randn
from .guidance import guided_output
from .samplers import Sampler


def slerp(a: torch.Tensor, b: torch.Tensor, weights: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) from ``a`` (weight 0) to ``b`` (weight 1), each seen as one vector.

    slerp = sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b, theta the angle between a and b.
    Between two Gaussian noises in D dimensions it keeps the norm near sqrt(D), where a straight line
    dips to sqrt(D / 2) half-way: the network never sees such faint noise. A float weight gives one
    tensor shaped like ``a``; a 1-D tensor of weights gives them stacked, ``(len(weights), *a.shape)``.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim > 1:
        raise ValueError(f"weights must be a number or a 1-D tensor, got shape {tuple(w.shape)}")
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    cos = (a64 @ b64 / (a64.norm() * b64.norm())).clamp(-1, 1)
    if cos < -1 + 1e-6:
        raise ValueError("a and b point in opposite directions: the arc between them is not unique")
    theta = torch.arccos(cos)
    w_col = w.reshape(-1, 1)
    if theta < 1e-4:  # (nearly) parallel: the arc is a straight line
        mix = (1 - w_col) * a64 + w_col * b64
    else:
        mix = (torch.sin((1 - w_col) * theta) * a64 + torch.sin(w_col * theta) * b64) / torch.sin(theta)
    out = mix.reshape(-1, *a.shape).to(device=a.device, dtype=a.dtype)
    return out[0] if w.ndim == 0 else out


def noise_to(x0: torch.Tensor, alpha_bar: float, eps: torch.Tensor) -> torch.Tensor:
    """x0 noised to the level alpha_bar: sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (DDPM eq. 4).

    :func:`lessons_lib.noising.q_sample` with the level itself instead of a timestep, because editing
    works with ``sampler.alpha_bars(i)``, defined for every sampler.
    """
    if alpha_bar == 1.0:
        return x0  # the clean image, bit for bit
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps


def img2img_steps(num_steps: int, strength: float) -> int:
    """How many of the sampler's ``num_steps`` steps image-to-image runs: round(strength * num_steps).

    ``strength`` 0 runs none (the input comes back unchanged), 1 runs them all from pure noise
    (the input is ignored: plain generation).
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0 = keep the input, 1 = ignore it), got {strength!r}")
    return round(strength * num_steps)


def check_mask(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The inpainting mask as a bool tensor broadcastable to ``image`` (True = repaint, False = keep)."""
    shapes = "(H, W), (1, H, W), (B, 1, H, W) or the image's shape"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor of shape {shapes}, got {type(mask).__name__}")
    try:
        fits = mask.ndim >= 2 and torch.broadcast_shapes(mask.shape, image.shape) == image.shape
    except RuntimeError:  # not broadcastable
        fits = False
    if not fits or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask must have shape {shapes} for an image of shape {tuple(image.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask values must be 0 (keep the pixel) or 1 (repaint it)")
    return mask.to(device=image.device, dtype=torch.bool)


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A (B, C, H, W) bool pixel mask on a grid ``factor`` times coarser, (B, 1, H / factor, W / factor): a cell is
    repainted (True) when any of its factor x factor pixels is, in any channel. Inpainting in an autoencoder's latent
    space works on this grid, so the repainted region grows to whole cells."""
    if mask.ndim != 4 or mask.shape[-1] % factor or mask.shape[-2] % factor:
        raise ValueError(f"need a (B, C, H, W) mask with H and W divisible by {factor}, got {tuple(mask.shape)}")
    return torch.nn.functional.max_pool2d(mask.float().amax(dim=1, keepdim=True), factor).bool()


# Samplers whose step i depends only on (model output, i, x): RePaint may run a step again. The others keep
# a history (dpmpp_2m, pndm, plms) or a stage (heun) between steps.
RESAMPLING_SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral")


@dataclass
class Inpainter:
    """The ``on_step`` hook of :func:`lessons_lib.samplers.sample` that inpaints (RePaint, Lugmayr et al. 2022).

    After step i, x sits at the level ``sampler.alpha_bars(i)[1]``; its known pixels (mask False) are
    replaced by the original ``x0`` noised to that level with fresh noise (Algorithm 1, line 8). After the
    last step that level is 1, so the known pixels come out exact.

    Resampling (Algorithm 1, lines 9-10, with the jump schedule of the paper's sec. 4.2 as in diffusers'
    RePaintScheduler): at every ``jump_length``-th step from the end, x is noised back up ``jump_length``
    steps, q(x_t | x_t') = N(sqrt(ab_t / ab_t') x_t', (1 - ab_t / ab_t') I), and those steps are run again,
    ``resample - 1`` times. ``resample=1`` is plain inpainting. Re-running a step needs a sampler without
    memory between steps.
    """

    model: Callable
    sampler: Sampler
    x0: torch.Tensor
    mask: torch.Tensor
    generator: torch.Generator | list[torch.Generator] | None = None
    class_labels: torch.Tensor | None = None
    guidance_scale: float = 1.0
    null_label: int | torch.Tensor | None = None
    jump_length: int = 10
    resample: int = 1

    def __post_init__(self):
        for name in ("jump_length", "resample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.resample > 1 and self.sampler.name not in RESAMPLING_SAMPLERS:
            raise ValueError(f"resampling re-runs steps, which needs a sampler without memory between steps: "
                             f"{', '.join(RESAMPLING_SAMPLERS)}; got {self.sampler.name!r}")
        self.mask = check_mask(self.mask, self.x0)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        return randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def keep_known(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x after step i with its known pixels replaced by x0 noised to the step's level (Algorithm 1, line 8)."""
        alpha_bar = self.sampler.alpha_bars(i)[1]
        known = self.x0 if alpha_bar == 1.0 else noise_to(self.x0, alpha_bar, self._noise(x))
        return torch.where(self.mask, x, known)

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.keep_known(i, x)
        n, j = len(self.sampler.timesteps), self.jump_length
        from_end = n - 1 - i  # steps left after this one
        if self.resample > 1 and from_end % j == 0 and from_end < n - j:
            for _ in range(self.resample - 1):
                x = self._jump_back(i, x)
                for k in range(i - j + 1, i + 1):
                    x = self._step(k, x)
        return x

    def _jump_back(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x after step i noised back to the input level of step i - jump_length + 1 (Algorithm 1, line 10)."""
        ratio = self.sampler.alpha_bars(i - self.jump_length + 1)[0] / self.sampler.alpha_bars(i)[1]
        return ratio**0.5 * x + (1 - ratio) ** 0.5 * self._noise(x)

    def _step(self, k: int, x: torch.Tensor) -> torch.Tensor:
        t = torch.full((len(x),), int(self.sampler.timesteps[k]), device=x.device, dtype=torch.long)
        out = guided_output(self.model, x, t, self.class_labels, self.guidance_scale, self.null_label)
        return self.keep_known(k, self.sampler.step(out, k, x, generator=self.generator).prev)


def embedding_model(model: torch.nn.Module, table: torch.Tensor) -> Callable:
    """``model`` as ``f(x, t, index)`` conditioned on rows of ``table`` (class embeddings) instead of labels.

    Interpolated classes are not labels; indexing a table of blended embeddings keeps guidance
    (:func:`lessons_lib.guidance.guided_output`) working unchanged: one row per image, plus a row for
    the unconditional branch passed as ``null_label``.
    """
    return lambda x, t, index: model(x, t, class_embedding=table[index])
