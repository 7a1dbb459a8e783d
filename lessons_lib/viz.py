"""Seeing: image grids, noising strips, schedule curves and pixel histograms.

Every function returns a :class:`Figure` (a matplotlib Figure not registered with pyplot), so a
notebook shows it exactly once (as the cell's value or with ``display(fig)``), nothing leaks when
many are made, and a script can call ``fig.savefig(path)``. Images come in as model tensors in [-1, 1];
[0, 1] exists only here, at the edge.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib.figure
import numpy as np
import torch
from torchvision.utils import make_grid

from .data import to_unit
from .device import randn
from .noising import q_sample
from .schedules import NoiseSchedule


class Figure(matplotlib.figure.Figure):
    """A matplotlib Figure that renders itself as PNG in a notebook, with no pyplot state involved."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


def to_display(x: torch.Tensor) -> np.ndarray:
    """One image (C, H, W) in [-1, 1] -> an array for ``imshow``: (H, W) for grey, (H, W, 3) for RGB, in [0, 1]."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected one image of shape (1 or 3, H, W), got {tuple(x.shape)}")
    img = to_unit(x.cpu()).permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def _imshow(ax, x: torch.Tensor):
    ax.set_xticks([]), ax.set_yticks([])
    return ax.imshow(to_display(x), cmap="gray", vmin=0, vmax=1, interpolation="nearest")


def show_grid(
    images: torch.Tensor,
    nrow: int = 8,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    scale: float = 0.6,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> Figure:
    """A grid of images (B, C, H, W) in [-1, 1], ``nrow`` per row, with optional row labels and axis labels."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(images.shape)}")
    grid = make_grid(to_unit(images.cpu()), nrow=nrow, padding=2, pad_value=1.0)
    rows = -(-len(images) // nrow)
    fig = Figure(figsize=(scale * min(nrow, len(images)) + 1.5, scale * rows + 0.6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(to_display(grid * 2 - 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    h = images.shape[-2] + 2
    if row_labels is not None:
        if len(row_labels) != rows:
            raise ValueError(f"got {len(row_labels)} row labels for {rows} rows")
        ax.set_yticks([2 + h * (i + 0.5) for i in range(rows)], list(row_labels))
    else:
        ax.set_yticks([])
    ax.set(title=title or "", xlabel=xlabel or "", ylabel=ylabel or "")
    return fig


def show_images(images: torch.Tensor, titles: Sequence[str] | None = None, ncols: int = 8,
                suptitle: str | None = None, scale: float = 1.3) -> Figure:
    """Images side by side, each with its own small title (e.g. its class name)."""
    n = len(images)
    rows = -(-n // ncols)
    fig = Figure(figsize=(scale * min(ncols, n), scale * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, min(ncols, n), squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i < n:
            _imshow(ax, images[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
        else:
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def noising_strip(x0: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], seed: int = 0,
                  title: str | None = None) -> Figure:
    """One image (C, H, W) noised to each of ``timesteps`` with the same eps: x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""
    ts = torch.as_tensor(list(timesteps))
    xs = x0.unsqueeze(0).expand(len(ts), *x0.shape)
    eps = randn((1, *x0.shape), seed=seed).expand_as(xs)  # the same noise for every t, so only t changes
    xt = q_sample(xs, ts, eps, schedule)
    fig = Figure(figsize=(1.4 * len(ts), 1.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(ts)))
    for ax, img, t in zip(axes, xt, ts.tolist(), strict=True):
        _imshow(ax, img)
        ax.set_title(f"t={t}\n" + r"$\bar\alpha$=" + f"{schedule.alpha_bar[t]:.2f}", fontsize=8)
    fig.suptitle(title or f"One image under the {schedule.name} schedule (T={schedule.num_steps})")
    return fig


def plot_schedules(schedules: Mapping[str, NoiseSchedule] | Sequence[NoiseSchedule]) -> Figure:
    r"""alpha_bar (linear scale) and SNR (log scale) against t/T, one line per schedule, on shared axes."""
    if not isinstance(schedules, Mapping):
        schedules = {s.name: s for s in schedules}
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_ab, ax_snr = fig.subplots(1, 2)
    for label, s in schedules.items():
        u = (torch.arange(s.num_steps) + 1) / s.num_steps
        ax_ab.plot(u, s.alpha_bar, label=label)
        ax_snr.plot(u, s.snr, label=label)
    ax_ab.set(xlabel="t / T", ylabel=r"$\bar\alpha_t$ (signal variance kept)", title=r"$\bar\alpha_t$", ylim=(-0.02, 1.02))
    ax_snr.set(xlabel="t / T", ylabel=r"SNR $=\bar\alpha_t/(1-\bar\alpha_t)$", title="signal-to-noise ratio", yscale="log")
    ax_ab.legend()
    ax_snr.grid(True, which="major", alpha=0.3)
    return fig


def pixel_histograms(x0: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], seed: int = 0,
                     bins: int = 60, title: str | None = None) -> Figure:
    """Histograms of the pixel values of x_t for a batch x0, one panel per t, against the N(0, 1) density."""
    fig = Figure(figsize=(3 * len(timesteps), 2.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(timesteps), sharey=True))
    eps = randn(x0.shape, seed=seed)
    grid = np.linspace(-4, 4, 200)
    for ax, t in zip(axes, timesteps, strict=True):
        xt = q_sample(x0, int(t), eps, schedule)
        ax.hist(xt.flatten().numpy(), bins=bins, range=(-4, 4), density=True, color="tab:blue", alpha=0.7)
        ax.plot(grid, np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi), color="k", lw=1, label="N(0, 1)")
        ax.set(title=f"t={int(t)}", xlabel="pixel value of $x_t$")
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"Pixel values of $x_t$ under the {schedule.name} schedule drift to N(0, 1)")
    return fig
