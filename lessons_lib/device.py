"""Where code runs, and how randomness is made reproducible across devices.

Device choice: ``cuda`` > ``mps`` > ``cpu``, overridden by the ``LESSONS_DEVICE`` environment variable
or an explicit argument. Noise is always drawn on the CPU from a ``torch.Generator`` and then moved,
so a seed gives the same numbers on every device; an integer seed gives each sample its own generator
(seed, seed+1, ...), so an image does not change when the batch around it grows or shrinks.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def available_devices() -> list[str]:
    """The device types this machine can use, best first."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if _mps_available():
        found.append("mps")
    return [*found, "cpu"]


def get_device(name: str | torch.device | None = None) -> torch.device:
    """Pick a device: ``name`` if given, else ``$LESSONS_DEVICE``, else the best available.

    Raises ValueError when the requested device does not exist here, naming what does.
    """
    if isinstance(name, torch.device):
        name = str(name)
    requested = name or os.environ.get("LESSONS_DEVICE", "").strip() or None
    if requested is None:
        return torch.device(available_devices()[0])
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ValueError(f"unknown device {requested!r}; allowed: {', '.join(DEVICE_TYPES)} (or 'cuda:N')") from err
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device {requested!r}; allowed: {', '.join(DEVICE_TYPES)} (or 'cuda:N')")
    if device.type not in available_devices():
        raise ValueError(f"device {requested!r} is not available here; available: {', '.join(available_devices())}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {requested!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype for ``device``: bf16 on CUDA where supported, else fp16; None on CPU.

    Inference on the CPU stays in fp32, so a seed gives the same image there as in the lessons' figures; the
    trainer uses :func:`training_autocast_dtype`, which adds bf16 on CPUs that multiply it in hardware.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16): there bf16 autocast trains
    the course's U-Net 1.7x faster than fp32 (benchmarks/train_throughput.py); elsewhere it is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def training_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The trainer's ``amp='auto'``: :func:`autocast_dtype` on accelerators, and bf16 on CPUs with
    :func:`cpu_has_fast_bf16` (the weights and the optimizer stay fp32; sampling stays fp32 on CPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return autocast_dtype(device)


def autocast(device: torch.device | str) -> AbstractContextManager:
    """``torch.autocast`` with the dtype of :func:`autocast_dtype`; a no-op on CPU."""
    device = torch.device(device)
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for code that uses the global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the one source of noise in the library."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator("cpu").manual_seed(int(seed))


def sample_generators(seed: int | Sequence[int], batch_size: int) -> list[torch.Generator]:
    """One generator per sample: seeds ``seed, seed+1, ...`` or the given list of seeds."""
    seeds = [int(seed) + i for i in range(batch_size)] if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != batch_size:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch_size}; give one seed per sample")
    return [make_generator(s) for s in seeds]


def randn(
    shape: Sequence[int],
    *,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn on the CPU and moved to ``device``.

    - ``seed`` (int or one per sample): each sample gets its own generator, so sample ``i`` is the
      same whatever the batch size.
    - ``generator``: a single CPU generator for the whole tensor, or a list with one per sample
      (the form samplers use to keep drawing per-sample noise step after step).
    - neither: torch's global generator.
    """
    shape = tuple(int(s) for s in shape)
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is not None:
        generator = sample_generators(seed, shape[0])
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per sample")
        noise = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=device or "cpu", dtype=dtype)
