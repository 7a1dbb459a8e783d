"""Playing: ipywidgets explorers for the forward process and the noise schedules.

Each explorer builds its figure once and, when a control moves, swaps the data of the existing
artists (``set_data``) and redraws. The pure functions they draw from (:func:`noisy_view`,
:func:`schedule_curves`) are tested on their own. Errors raised in a callback are printed under the
widget instead of vanishing into the kernel log. In a headless run (papermill, nbval, CI — see
:func:`lessons_lib.config.headless`) the explorers return a static figure, so nothing waits for a user.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from .config import headless
from .data import ImageDataset
from .device import randn
from .noising import q_sample
from .schedules import SCHEDULES, NoiseSchedule, get_schedule
from .viz import Figure, to_display


@lru_cache(maxsize=32)
def _schedule(name: str, num_steps: int, zero_terminal_snr: bool = False) -> NoiseSchedule:
    return get_schedule(name, num_steps, zero_terminal_snr=zero_terminal_snr)


def noisy_view(x0: torch.Tensor, t: int, schedule: NoiseSchedule, seed: int) -> torch.Tensor:
    """x_t for one image (C, H, W) at step t, with the noise of ``seed`` (what the explorer shows)."""
    eps = randn((1, *x0.shape), seed=seed)
    return q_sample(x0.unsqueeze(0), int(t), eps, schedule)[0]


def schedule_curves(name: str, num_steps: int = 1000, zero_terminal_snr: bool = False) -> dict[str, np.ndarray]:
    """t/T, alpha_bar and log10(SNR) of a schedule, as plotted by the schedule explorer."""
    s = _schedule(name, num_steps, zero_terminal_snr)
    return {
        "u": ((torch.arange(num_steps) + 1) / num_steps).numpy(),
        "alpha_bar": s.alpha_bar.numpy(),
        "log10_snr": torch.log10(s.snr).numpy(),  # -inf at a zero-terminal-SNR last step: matplotlib skips it
    }


def _guarded(callback, error_out):
    """Wrap a widget callback so an exception is shown in ``error_out`` instead of being swallowed."""
    def run(*args, **kwargs):
        error_out.clear_output()
        try:
            callback(*args, **kwargs)
        except Exception:
            with error_out:
                print(traceback.format_exc())
    return run


def _merge(state: dict, changes: dict) -> None:
    """Update an explorer's settings, refusing names it does not have."""
    unknown = set(changes) - set(state)
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}; allowed: {sorted(state)}")
    state.update(changes)


def _live(fig: Figure, controls: dict, update) -> object:
    """Lay out ``controls`` (setting name -> widget) above ``fig``; on any change call ``update(**values)`` and redraw."""
    import ipywidgets as W
    from IPython.display import display

    plot_out, error_out = W.Output(), W.Output()

    def redraw(_change=None):
        update(**{name: control.value for name, control in controls.items()})
        with plot_out:
            plot_out.clear_output(wait=True)
            display(fig)

    guarded = _guarded(redraw, error_out)
    for control in controls.values():
        control.observe(guarded, names="value")
    guarded()
    return W.VBox([W.HBox(list(controls.values())), plot_out, error_out])


class NoisingExplorer:
    """One image, its noise, and x_t, with alpha_bar marked at t. ``update`` swaps the image data in place."""

    def __init__(self, dataset: ImageDataset, index: int = 0, t: int = 250, schedule: str = "linear",
                 seed: int = 0, num_steps: int = 1000):
        self.dataset, self.num_steps = dataset, num_steps
        self.state = {"index": index, "t": t, "schedule": schedule, "seed": seed}
        self.fig = Figure(figsize=(9, 2.8), layout="constrained")
        ax_x0, ax_xt, ax_ab = self.fig.subplots(1, 3, width_ratios=[1, 1, 1.6])
        x0 = self._x0()
        self.im_x0 = ax_x0.imshow(to_display(x0), cmap="gray", vmin=0, vmax=1)
        self.im_xt = ax_xt.imshow(to_display(x0), cmap="gray", vmin=0, vmax=1)
        for ax in (ax_x0, ax_xt):
            ax.set_xticks([]), ax.set_yticks([])
        self.ax_x0, self.ax_xt = ax_x0, ax_xt
        (self.curve,) = ax_ab.plot([], [], color="tab:blue")
        (self.marker,) = ax_ab.plot([], [], "o", color="tab:red")
        ax_ab.set(xlabel="t", ylabel=r"$\bar\alpha_t$", ylim=(-0.02, 1.02), xlim=(0, num_steps - 1))
        self.ax_ab = ax_ab
        self.fig.suptitle(r"Forward noising explorer: $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$")
        self.update()

    def _x0(self) -> torch.Tensor:
        index = self.state["index"]
        if not 0 <= index < len(self.dataset):
            raise ValueError(f"image index must lie in [0, {len(self.dataset) - 1}], got {index}")
        return self.dataset[index][0]

    def update(self, **changes) -> None:
        """Change any of ``index``, ``t``, ``schedule``, ``seed`` and redraw the artists' data."""
        _merge(self.state, changes)
        t, schedule = self.state["t"], _schedule(self.state["schedule"], self.num_steps)
        if not 0 <= t < self.num_steps:
            raise ValueError(f"t must lie in [0, {self.num_steps - 1}], got {t}")
        x0 = self._x0()
        self.im_x0.set_data(to_display(x0))
        self.im_xt.set_data(to_display(noisy_view(x0, t, schedule, self.state["seed"])))
        self.curve.set_data(np.arange(self.num_steps), schedule.alpha_bar.numpy())
        self.marker.set_data([t], [float(schedule.alpha_bar[t])])
        label = self.dataset.classes[self.dataset.labels[self.state["index"]]]
        self.ax_x0.set_title(f"$x_0$ (#{self.state['index']}, {label})", fontsize=9)
        self.ax_xt.set_title(f"$x_t$, t={t}", fontsize=9)
        self.ax_ab.set_title(rf"{self.state['schedule']}: $\bar\alpha_{{{t}}}$={float(schedule.alpha_bar[t]):.3f}", fontsize=9)

    def widget(self, max_index: int = 1000):
        """Sliders for t and the image index (the first ``max_index`` images), a schedule dropdown and a seed box."""
        import ipywidgets as W

        s = self.state
        controls = {
            "t": W.IntSlider(value=s["t"], min=0, max=self.num_steps - 1, description="t", continuous_update=True),
            "index": W.IntSlider(value=s["index"], min=0, max=min(len(self.dataset), max_index) - 1, description="image"),
            "schedule": W.Dropdown(options=list(SCHEDULES), value=s["schedule"], description="schedule"),
            "seed": W.IntText(value=s["seed"], description="seed", layout=W.Layout(width="150px")),
        }
        return _live(self.fig, controls, self.update)


def noising_explorer(dataset: ImageDataset, **settings):
    """A live noising explorer, or its static figure when the notebook runs headless."""
    explorer = NoisingExplorer(dataset, **settings)
    return explorer.fig if headless() else explorer.widget()


class ScheduleExplorer:
    """alpha_bar and log10 SNR of every schedule against t/T; choose T and zero-terminal-SNR."""

    def __init__(self, num_steps: int = 1000, zero_terminal_snr: bool = False, names: Sequence[str] = tuple(SCHEDULES)):
        self.names = list(names)
        self.state = {"num_steps": num_steps, "zero_terminal_snr": zero_terminal_snr}
        self.fig = Figure(figsize=(10, 3.4), layout="constrained")
        self.ax_ab, self.ax_snr = self.fig.subplots(1, 2)
        self.lines = {n: (self.ax_ab.plot([], [], label=n)[0], self.ax_snr.plot([], [], label=n)[0]) for n in self.names}
        self.ax_ab.set(xlabel="t / T", ylabel=r"$\bar\alpha_t$", xlim=(0, 1), ylim=(-0.02, 1.02),
                       title=r"$\bar\alpha_t$ (signal variance kept)")
        self.ax_snr.set(xlabel="t / T", ylabel=r"$\log_{10}$ SNR", xlim=(0, 1), title="signal-to-noise ratio")
        self.ax_ab.legend(fontsize=8)
        self.update()

    def update(self, **changes) -> None:
        _merge(self.state, changes)
        lo, hi = np.inf, -np.inf
        for name, (line_ab, line_snr) in self.lines.items():
            c = schedule_curves(name, self.state["num_steps"], self.state["zero_terminal_snr"])
            line_ab.set_data(c["u"], c["alpha_bar"])
            line_snr.set_data(c["u"], c["log10_snr"])
            finite = c["log10_snr"][np.isfinite(c["log10_snr"])]
            lo, hi = min(lo, finite.min()), max(hi, finite.max())
        self.ax_snr.set_ylim(lo - 0.5, hi + 0.5)
        ztsnr = ", zero terminal SNR" if self.state["zero_terminal_snr"] else ""
        self.fig.suptitle(f"Noise schedules against t/T (T={self.state['num_steps']}{ztsnr})")

    def widget(self):
        import ipywidgets as W

        controls = {
            "num_steps": W.IntSlider(value=self.state["num_steps"], min=2, max=2000, step=1, description="T"),
            "zero_terminal_snr": W.Checkbox(value=self.state["zero_terminal_snr"], description="zero terminal SNR"),
        }
        return _live(self.fig, controls, self.update)


def schedule_explorer(**settings):
    """A live schedule explorer, or its static figure when the notebook runs headless."""
    explorer = ScheduleExplorer(**settings)
    return explorer.fig if headless() else explorer.widget()
