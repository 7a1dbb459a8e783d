"""Playing: ipywidgets explorers for the forward process, the noise schedules and flow paths, and a generation studio.

Each explorer builds its figure once and, when a control moves, swaps the data of the existing
artists (``set_data``) and redraws. The pure functions they draw from (:func:`noisy_view`,
:func:`schedule_curves`) are tested on their own. Errors raised in a callback are printed under the
widget instead of vanishing into the kernel log. In a headless run (papermill, nbval, CI — see
:func:`lessons_lib.config.headless`) the explorers return a static figure, so nothing waits for a user.

The generation studio (:class:`GenerationStudio`) is different: nothing runs until its Generate button
is pressed, each press adds a row to a gallery, and Save writes the gallery as PNGs plus a JSON of the
settings. Headless, it generates once with the given settings and returns the gallery's figure.
"""

from __future__ import annotations

import html
import io
import json
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from .checkpoint import atomic_write
from .config import BUILD_DIR, REPO_ROOT, headless, headless_because
from .data import ImageDataset
from .device import randn
from .editing import img2img_steps
from .flow import FLOW_SOLVERS, flow_solve
from .noising import q_sample
from .pipeline import PRESETS, DiffusionPipeline, GenerationConfig, load_image, save_image
from .samplers import SAMPLERS, get_sampler
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
    return W.VBox([_row(*controls.values()), plot_out, error_out])


def _say_static() -> None:
    """Under a static figure: which variables made it static, so a learner who expected a live widget knows why."""
    flags = headless_because()
    print(f"(A static figure: {' and '.join(flags)} {'is' if len(flags) == 1 else 'are'} set where this kernel runs. "
          f"Open the lesson in JupyterLab without {'it' if len(flags) == 1 else 'them'} for the live widget.)")


def _widget_or_figure(explorer):
    """An explorer's live widget, or its static figure (and why) when the notebook runs headless."""
    if not headless():
        return explorer.widget()
    _say_static()
    return explorer.fig


def _row(*items):
    """Controls side by side; on a narrow window they move to a second row instead of shrinking."""
    import ipywidgets as W

    return W.HBox(list(items), layout=W.Layout(flex_flow="row wrap"))


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
        (self.marker,) = ax_ab.plot([], [], "o", color="tab:red", clip_on=False)  # whole at t = 0 and t = T - 1
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
            "t": W.IntSlider(value=s["t"], min=0, max=self.num_steps - 1, description="t", continuous_update=True,
                             layout=W.Layout(width="420px")),
            "index": W.IntSlider(value=s["index"], min=0, max=min(len(self.dataset), max_index) - 1, description="image",
                                 layout=W.Layout(width="320px")),
            "schedule": W.Dropdown(options=list(SCHEDULES), value=s["schedule"], description="schedule"),
            "seed": W.IntText(value=s["seed"], description="seed", layout=W.Layout(width="150px")),
        }
        return _live(self.fig, controls, self.update)


def noising_explorer(dataset: ImageDataset, **settings):
    """A live noising explorer, or its static figure when the notebook runs headless."""
    explorer = NoisingExplorer(dataset, **settings)
    return _widget_or_figure(explorer)


T_CHOICES = (2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)  # the schedule explorer's T: every value a stop


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
            for line in (line_ab, line_snr):  # a few steps: dots, so one finite point still shows
                line.set_marker("o" if self.state["num_steps"] <= 20 else "")
            finite = c["log10_snr"][np.isfinite(c["log10_snr"])]
            lo, hi = min(lo, finite.min()), max(hi, finite.max())
        self.ax_snr.set_ylim(lo - 0.5, hi + 0.5)
        ztsnr = ", zero terminal SNR" if self.state["zero_terminal_snr"] else ""
        self.fig.suptitle(f"Noise schedules against t/T (T={self.state['num_steps']}{ztsnr})")

    def widget(self):
        import ipywidgets as W

        controls = {
            "num_steps": W.SelectionSlider(options=sorted({*T_CHOICES, self.state["num_steps"]}),
                                           value=self.state["num_steps"], description="T", layout=W.Layout(width="420px")),
            "zero_terminal_snr": W.Checkbox(value=self.state["zero_terminal_snr"], description="zero terminal SNR"),
        }
        return _live(self.fig, controls, self.update)


def schedule_explorer(**settings):
    """A live schedule explorer, or its static figure when the notebook runs headless."""
    explorer = ScheduleExplorer(**settings)
    return _widget_or_figure(explorer)


FLOW_STEP_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)  # the flow-path explorer's steps


class FlowPathsExplorer:
    """2-D points carried from noise ``x1`` (N, 2) to data by a velocity field ``velocity(x, t)``: the solver's
    path of each point (the first ``paths`` of them drawn as lines), its end points over the ``data`` (M, 2)."""

    def __init__(self, velocity, x1: torch.Tensor, data: torch.Tensor, steps: int = 4, solver: str = "euler",
                 paths: int = 120):
        if x1.dim() != 2 or x1.shape[1] != 2 or data.dim() != 2 or data.shape[1] != 2:
            raise ValueError(f"x1 and data must be 2-D point sets of shape (N, 2), got {tuple(x1.shape)} and "
                             f"{tuple(data.shape)}")
        from matplotlib.collections import LineCollection

        self.velocity, self.x1, self.paths = velocity, x1, paths
        self.state = {"steps": steps, "solver": solver}
        self.fig = Figure(figsize=(5.2, 5), layout="constrained")
        self.ax = self.fig.subplots()
        self.ax.scatter(*data.T.numpy(), s=3, c="0.75", label="data")
        self.lines = LineCollection([], colors="tab:blue", linewidths=0.6, alpha=0.6)
        self.ax.add_collection(self.lines)
        self.start = self.ax.scatter(*x1[:paths].T.numpy(), s=5, c="k", label="noise $x_1$")
        self.end = self.ax.scatter([], [], s=5, c="tab:red", label="end $x_0$")
        lim = float(max(data.abs().max(), x1.abs().max())) * 1.1
        self.ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="$x^{(1)}$", ylabel="$x^{(2)}$", aspect="equal")
        self.ax.legend(loc="upper right", fontsize=7)
        self.update()

    def update(self, **changes) -> None:
        _merge(self.state, changes)
        steps, solver = self.state["steps"], self.state["solver"]
        end, path = flow_solve(self.velocity, self.x1, steps, solver, return_path=True)
        self.lines.set_segments(path[:, : self.paths].permute(1, 0, 2).numpy())
        self.end.set_offsets(end.numpy())
        evals = steps * (2 if solver == "heun" else 1)
        self.ax.set_title(f"{solver}, {steps} step{'s' * (steps > 1)} ({evals} network evaluations)")

    def widget(self):
        import ipywidgets as W

        controls = {
            "steps": W.SelectionSlider(options=sorted({*FLOW_STEP_CHOICES, self.state["steps"]}),
                                       value=self.state["steps"], description="steps", layout=W.Layout(width="360px")),
            "solver": W.ToggleButtons(options=list(FLOW_SOLVERS), value=self.state["solver"], description="solver",
                                      layout=W.Layout(display="flex", align_items="center")),  # label beside buttons
        }
        return _live(self.fig, controls, self.update)


def flow_paths_explorer(velocity, x1: torch.Tensor, data: torch.Tensor, **settings):
    """A live flow-path explorer, or its static figure when the notebook runs headless."""
    return _widget_or_figure(FlowPathsExplorer(velocity, x1, data, **settings))


# ---------------------------------------------------------------------------------------------------
# The generation studio
# ---------------------------------------------------------------------------------------------------
MODES = ("generate", "image-to-image", "inpaint")
SOURCES = ("dataset", "upload")
NONE = "(none)"  # the dropdown entry for "no class"
MASKS = {  # region name -> (rows, cols, H, W) -> bool (H, W)
    "left half": lambda r, c, h, w: (c < w // 2).expand(h, w),
    "right half": lambda r, c, h, w: (c >= w // 2).expand(h, w),
    "top half": lambda r, c, h, w: (r < h // 2).expand(h, w),
    "bottom half": lambda r, c, h, w: (r >= h // 2).expand(h, w),
    "centre square": lambda r, c, h, w: ((r - h / 2 + 0.5).abs() < h / 4) & ((c - w / 2 + 0.5).abs() < w / 4),
}


def region_mask(name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """An inpainting mask (C, H, W), True where the studio repaints: one of :data:`MASKS` by name."""
    if name not in MASKS:
        raise ValueError(f"unknown mask {name!r}; allowed: {', '.join(MASKS)}")
    _, h, w = shape
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return MASKS[name](rows, cols, h, w).expand(shape)


@dataclass
class StudioEntry:
    """One Generate click: the images, the input of an edit (repainted region greyed), and JSON-ready settings."""

    images: torch.Tensor  # (num_images, C, H, W) in [-1, 1]
    settings: dict  # the GenerationConfig fields as run, plus mode, source, mask, seeds, steps run, nfe, seconds
    source: torch.Tensor | None = None  # (C, H, W): the edited image, as shown next to the results

    @property
    def caption(self) -> str:
        s = self.settings
        what = s["prompt"] if s["prompt"] is not None else "any class"
        what += f", not {s['negative']}" if s["negative"] is not None else ""
        edit = ""
        if s["mode"] == "image-to-image":
            edit = f" · img2img strength {s['strength']:.2f}"
        elif s["mode"] == "inpaint":
            edit = f" · inpaint {s['mask']}"
        return (f"{what} · {s['sampler']} {s['steps']} steps · w={s['guidance_scale']:g}{edit}\n"
                f"seeds {s['seeds'][0]}-{s['seeds'][-1]} · {s['nfe']} network calls · {s['seconds']:.1f} s")


class GenerationStudio:
    """Generate, edit and collect images from a :class:`~lessons_lib.pipeline.DiffusionPipeline`.

    Settings (``state``): ``prompt`` and ``negative`` (class names or None), ``sampler``, ``steps``,
    ``guidance_scale``, ``seed``, ``num_images``, ``mode`` (one of :data:`MODES`), ``source`` ("dataset":
    image ``index`` of ``dataset``; "upload": the image given to :meth:`load_upload`), ``strength``
    (image-to-image) and ``mask`` (inpainting, one of :data:`MASKS`). :meth:`generate` runs the current
    settings and adds the result to ``gallery``; :meth:`save` writes every result as PNGs plus a JSON of
    settings; :meth:`figure` draws the gallery; :meth:`widget` puts controls around all three.
    """

    def __init__(self, pipe: DiffusionPipeline, dataset: ImageDataset | None = None, preset: str = "fast",
                 max_rows: int = 4, **settings):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
        self.pipe, self.dataset, self.max_rows = pipe, dataset, max_rows
        sampler, steps, _ = PRESETS[preset]  # the pipeline gives this pair the preset's spacing
        conditional = pipe.model.config.num_classes is not None
        self.state = {"prompt": pipe.classes[0] if conditional else None, "negative": None, "sampler": sampler,
                      "steps": min(steps, pipe.schedule.num_steps), "guidance_scale": 3.0 if conditional else 1.0,
                      "seed": 0, "num_images": 4, "mode": "generate", "source": "dataset", "index": 0,
                      "strength": 0.6, "mask": "right half"}
        _merge(self.state, settings)
        self.uploaded: torch.Tensor | None = None
        self.gallery: list[StudioEntry] = []
        self.on_call = None  # called with the number of network calls so far (the widget's progress bar)

    def load_upload(self, content: bytes) -> torch.Tensor:
        """An image file's bytes (PNG, JPEG, ...) as the source of edits: grey, resized to the model's size."""
        self.uploaded = load_image(io.BytesIO(bytes(content)), self.pipe.image_shape)
        self.state["source"] = "upload"
        return self.uploaded

    def source_image(self) -> torch.Tensor:
        """The (C, H, W) image an edit starts from: dataset image ``index`` or the uploaded one."""
        s = self.state
        if s["source"] not in SOURCES:
            raise ValueError(f"unknown source {s['source']!r}; allowed: {', '.join(SOURCES)}")
        if s["source"] == "upload":
            if self.uploaded is None:
                raise ValueError("no uploaded image yet: upload one, or pick source='dataset'")
            return self.uploaded
        if self.dataset is None:
            raise ValueError("this studio has no dataset to pick from: pass dataset=, or upload an image")
        if not 0 <= s["index"] < len(self.dataset):
            raise ValueError(f"image index must lie in [0, {len(self.dataset) - 1}], got {s['index']}")
        return self.dataset[s["index"]][0]

    def config(self) -> GenerationConfig:
        """The :class:`~lessons_lib.pipeline.GenerationConfig` of the current settings."""
        s = self.state
        if s["mode"] not in MODES:
            raise ValueError(f"unknown mode {s['mode']!r}; allowed: {', '.join(MODES)}")
        init = self.source_image() if s["mode"] != "generate" else None
        return GenerationConfig(
            prompt=s["prompt"], negative=s["negative"], num_images=s["num_images"], seed=s["seed"], sampler=s["sampler"],
            steps=s["steps"], guidance_scale=s["guidance_scale"], init_image=init,
            strength=s["strength"] if s["mode"] == "image-to-image" else None,
            mask=region_mask(s["mask"], init.shape) if s["mode"] == "inpaint" else None)

    def generate(self, **changes) -> StudioEntry:
        """Apply ``changes`` to the settings, run them, and add the result to the gallery."""
        _merge(self.state, changes)
        config = self.config()
        calls = []

        def count(_module, _args):
            calls.append(1)
            if self.on_call is not None:
                self.on_call(len(calls))

        hook = self.pipe.model.register_forward_pre_hook(count)
        try:
            result = self.pipe.generate(config, progress=False)
        finally:
            hook.remove()
        c, s = result.config, self.state
        settings = {k: v for k, v in vars(c).items() if k not in ("init_image", "mask", "device", "preset")}
        settings.update(mode=s["mode"], source=None, mask=None, seeds=result.seeds, steps_run=result.steps,
                        nfe=result.nfe, seconds=round(result.seconds, 3))
        source = None
        if config.init_image is not None:
            settings["source"] = "upload" if s["source"] == "upload" else {"dataset": self.dataset.source, "index": s["index"]}
            source = config.init_image
            if config.mask is not None:
                settings["mask"] = s["mask"]
                source = torch.where(config.mask, torch.zeros_like(source), source)  # repainted region shown grey
        entry = StudioEntry(result.images, settings, source)
        self.gallery.append(entry)
        return entry

    def expected_calls(self) -> int:
        """Roughly how many network calls :meth:`generate` will make (the progress bar's length)."""
        c = self.pipe.resolve(self.config())
        nfe = get_sampler(c.sampler, self.pipe.schedule, c.steps, c.spacing).nfe
        return max(1, img2img_steps(nfe, c.strength) if c.init_image is not None else nfe)

    def save(self, folder: str | Path) -> Path:
        """Every gallery image as ``NNN_seedS.png`` and ``settings.json`` (one record per Generate, with its files).
        A relative ``folder`` is taken from the repository root, wherever the notebook runs."""
        folder = REPO_ROOT / folder
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for k, entry in enumerate(self.gallery):
            files = []
            for image, seed in zip(entry.images, entry.settings["seeds"], strict=True):
                files.append(save_image(image, folder / f"{k:03d}_seed{seed}.png").name)
            records.append({**entry.settings, "files": files})
        atomic_write(folder / "settings.json", lambda tmp: tmp.write_text(json.dumps(records, indent=1) + "\n"))
        return folder

    def figure(self) -> Figure:
        """The last ``max_rows`` results, newest first: one row each (the edited input first), captioned with its settings."""
        entries = self.gallery[::-1][: self.max_rows]
        width = max((len(e.images) + (e.source is not None) for e in entries), default=4)
        fig = Figure(figsize=(max(width + 1, 7.5), 1.7 * max(len(entries), 1) + 0.5), layout="constrained")
        fig.suptitle(f"Generation studio: {len(self.gallery)} result(s), newest first")
        axes = np.atleast_1d(fig.subplots(max(len(entries), 1), 1))
        if not entries:
            axes[0].axis("off")
            axes[0].text(0.5, 0.5, "no results yet: press Generate", ha="center", va="center")
            return fig
        for ax, entry in zip(axes, entries, strict=True):
            strip = entry.images if entry.source is None else torch.cat([entry.source[None], entry.images])
            ax.imshow(to_display(make_grid(strip.cpu(), nrow=len(strip), padding=2, pad_value=1.0)), cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")
            size = strip.shape[-1] + 2
            labels = (["input"] if entry.source is not None else []) + [f"seed {s}" for s in entry.settings["seeds"]]
            ax.set_xticks([2 + size * (i + 0.5) for i in range(len(strip))], labels, fontsize=7)
            ax.set_yticks([])
            ax.set_anchor("W")  # strips of different lengths start at the same left edge, under their caption
            ax.set_title(entry.caption, fontsize=8, loc="left")
        return fig

    def widget(self):
        """Controls, a Generate button with a progress bar, the gallery, and a Save button."""
        import ipywidgets as W
        from IPython.display import display

        s, T = self.state, self.pipe.schedule.num_steps
        classes = [NONE, *self.pipe.classes] if self.pipe.model.config.num_classes is not None else [NONE]
        short = W.Layout(width="230px")
        controls = {
            "prompt": W.Dropdown(options=classes, value=s["prompt"] or NONE, description="class", layout=short),
            "negative": W.Dropdown(options=classes, value=s["negative"] or NONE, description="not class", layout=short),
            "sampler": W.Dropdown(options=list(SAMPLERS), value=s["sampler"], description="sampler", layout=short),
            "steps": W.IntSlider(value=s["steps"], min=1, max=T, description="steps"),
            "guidance_scale": W.FloatSlider(value=s["guidance_scale"], min=0, max=10, step=0.5, description="guidance"),
            "seed": W.IntText(value=s["seed"], description="seed", layout=W.Layout(width="160px")),
            "num_images": W.IntSlider(value=s["num_images"], min=1, max=8, description="images"),
            "mode": W.ToggleButtons(options=list(MODES), value=s["mode"], description="mode",  # ToggleButtons is a block:
                                    layout=W.Layout(display="flex", align_items="center"),  # its label goes beside
                                    style={"button_width": "132px"}),  # the buttons, and "image-to-image" fits
            "source": W.Dropdown(options=list(SOURCES), value=s["source"], description="source", layout=short),
            "index": W.IntText(value=s["index"], description="image #", layout=W.Layout(width="160px")),
            "strength": W.FloatSlider(value=s["strength"], min=0, max=1, step=0.05, description="strength"),
            "mask": W.Dropdown(options=list(MASKS), value=s["mask"], description="repaint", layout=short),
        }
        built_with = next((name for name, value in PRESETS.items() if value[:2] == (s["sampler"], s["steps"])), None)
        preset = W.Dropdown(options=list(PRESETS), value=built_with, description="preset", layout=short)
        upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        generate, save = W.Button(description="Generate", button_style="primary"), W.Button(description="Save")
        folder = W.Text(value=str((BUILD_DIR / "studio").relative_to(REPO_ROOT)), description="folder",
                        layout=W.Layout(width="420px"))
        progress = W.IntProgress(value=0, min=0, max=1, description="progress")
        status, gallery_out, error_out = W.HTML(), W.Output(), W.Output()

        def show_gallery():
            with gallery_out:
                gallery_out.clear_output(wait=True)
                display(self.figure())

        def settings_error(action):  # bad settings: a message under the buttons, not a traceback
            def run(_button=None):
                try:
                    action()
                except (ValueError, TypeError) as err:
                    status.value = f"<span style='color:#b00'>&#9888; {html.escape(str(err))}</span>"
            return _guarded(run, error_out)

        def on_generate():
            _merge(self.state, {name: None if c.value == NONE else c.value for name, c in controls.items()})
            progress.value, progress.max = 0, self.expected_calls()
            status.value = "generating..."
            self.on_call = lambda n: setattr(progress, "value", min(n, progress.max))
            try:
                entry = self.generate()
            finally:
                self.on_call = None
            progress.value = progress.max
            status.value = html.escape(entry.caption).replace("\n", " · ")
            show_gallery()

        def on_save():
            path = self.save(folder.value)
            status.value = f"saved {sum(len(e.images) for e in self.gallery)} PNGs and settings.json to {html.escape(str(path))}"

        def on_upload():
            if upload.value:
                self.load_upload(upload.value[0]["content"])
                controls["source"].value = "upload"
                status.value = f"uploaded {html.escape(upload.value[0]['name'])}"

        def on_preset():
            if preset.value is not None:
                controls["sampler"].value, steps, _ = PRESETS[preset.value]
                controls["steps"].value = min(steps, T)

        def on_mode(_change=None):  # controls that the chosen mode does not use are greyed out
            mode = controls["mode"].value
            for control in (controls["source"], controls["index"], upload):
                control.disabled = mode == "generate"
            controls["strength"].disabled = mode != "image-to-image"
            controls["mask"].disabled = mode != "inpaint"

        on_mode()
        controls["mode"].observe(on_mode, names="value")
        generate.on_click(settings_error(on_generate))
        save.on_click(settings_error(on_save))
        upload.observe(settings_error(on_upload), names="value")
        preset.observe(settings_error(on_preset), names="value")
        show_gallery()
        c = controls
        return W.VBox([
            _row(c["prompt"], c["negative"], preset, c["sampler"]),
            _row(c["steps"], c["guidance_scale"], c["num_images"], c["seed"]),
            _row(c["mode"]),
            _row(c["source"], c["index"], upload, c["strength"], c["mask"]),
            _row(generate, progress, save, folder),
            status, gallery_out, error_out,
        ])


def generation_studio(pipe: DiffusionPipeline, dataset: ImageDataset | None = None, **settings):
    """A live generation studio, or, when the notebook runs headless, the figure of one Generate with ``settings``."""
    studio = GenerationStudio(pipe, dataset, **settings)
    if not headless():
        return studio.widget()
    _say_static()
    studio.generate()
    return studio.figure()
