"""Generation for users: a saved model folder in, images out.

``DiffusionPipeline.from_pretrained(path)`` rebuilds the network, its noise schedule and prediction
type from ``config.json``; calling it samples images with any sampler. Image ``i`` of a call with
``seed=s`` is drawn from its own generator seeded ``s + i`` (for x_T and every later noise draw), so it
is the same image whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_pretrained, save_pretrained
from .data import FASHION_MNIST_CLASSES
from .device import get_device, randn, sample_generators
from .samplers import get_sampler, sample
from .schedules import NoiseSchedule, get_schedule
from .unet import UNet


def class_index(name_or_index: str | int, classes=FASHION_MNIST_CLASSES) -> int:
    """A class given by index or by name (case and punctuation ignored: 'sneaker', 'ankle boot', 't-shirt')."""
    if isinstance(name_or_index, int):
        if not 0 <= name_or_index < len(classes):
            raise ValueError(f"class index must lie in [0, {len(classes) - 1}], got {name_or_index}")
        return name_or_index
    key = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())  # noqa: E731
    matches = [i for i, c in enumerate(classes) if key(c) == key(name_or_index) or key(c).startswith(key(name_or_index))]
    if len(matches) != 1:
        raise ValueError(f"unknown class {name_or_index!r}; allowed: {', '.join(classes)}")
    return matches[0]


@dataclass
class DiffusionPipeline:
    model: UNet
    schedule: NoiseSchedule
    prediction: str = "eps"
    classes: tuple[str, ...] = FASHION_MNIST_CLASSES
    metadata: dict | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> DiffusionPipeline:
        model, config = load_pretrained(path, device=get_device(device))
        train = config.get("train", {})
        schedule = get_schedule(train.get("schedule", "cosine"), train.get("num_steps", 1000),
                                zero_terminal_snr=train.get("zero_terminal_snr", False))
        return cls(model, schedule, train.get("prediction", "eps"), metadata=config)

    def save_pretrained(self, path: str | Path) -> Path:
        return save_pretrained(self.model, path, metadata={k: v for k, v in (self.metadata or {}).items()
                                                          if k not in ("model", "weights_sha256", "lessons_lib_version")})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, n: int = 16, class_label: str | int | None = None, steps: int = 50, sampler: str = "ddim",
                 seed: int = 0, guidance_scale: float = 1.0, progress: bool = True, **sampler_options):
        """``n`` images (B, C, H, W) in [-1, 1] and their labels (or None for an unconditional model)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        cfg = self.model.config
        labels = None
        if class_label is not None:
            if cfg.num_classes is None:
                raise ValueError("this model is unconditional: class_label must be None")
            labels = torch.full((n,), class_index(class_label, self.classes), device=self.device)
        size = (self.metadata or {}).get("image_size", 28)
        generators = sample_generators(seed, n)
        x_T = randn((n, cfg.in_channels, size, size), generator=generators, device=self.device)
        s = get_sampler(sampler, self.schedule, steps, spacing="trailing", prediction=self.prediction, **sampler_options)
        out = sample(self.model, x_T, s, labels, guidance_scale=guidance_scale, generator=generators, progress=progress)
        return out.images, labels
