"""Figures and widgets, tested without a browser: callbacks must change what the figure shows."""

import ipywidgets as W
import numpy as np
import pytest
import torch

from lessons_lib import data, viz, widgets
from lessons_lib.device import randn
from lessons_lib.noising import q_sample
from lessons_lib.schedules import SCHEDULES, get_schedule


@pytest.fixture
def ds():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 28, 28), generator=g, dtype=torch.uint8)
    return data.ImageDataset(images, torch.tensor([0, 1, 2, 3, 9]), data.FASHION_MNIST_CLASSES, "synthetic")


def test_to_display_shapes_and_range():
    grey = viz.to_display(torch.zeros(1, 5, 6))
    rgb = viz.to_display(torch.ones(3, 5, 6) * 2)
    assert grey.shape == (5, 6) and np.allclose(grey, 0.5)
    assert rgb.shape == (5, 6, 3) and rgb.max() == 1.0
    with pytest.raises(ValueError, match="one image"):
        viz.to_display(torch.zeros(2, 1, 5, 5))


def test_figures_render_to_png(ds):
    x, _ = ds.batch(slice(0, 5))
    s = get_schedule("linear", 100)
    figs = [
        viz.show_grid(x, nrow=3, title="grid", row_labels=["a", "b"]),
        viz.show_images(x, titles=list("abcde"), ncols=3),
        viz.noising_strip(x[0], s, [0, 50, 99]),
        viz.plot_schedules([get_schedule(n, 100) for n in SCHEDULES]),
        viz.pixel_histograms(x, s, [0, 99]),
    ]
    for fig in figs:
        assert isinstance(fig, viz.Figure)
        assert fig._repr_png_().startswith(b"\x89PNG")
    assert [t.get_text() for t in figs[0].axes[0].get_yticklabels()] == ["a", "b"]
    assert len(figs[3].axes[0].lines) == len(SCHEDULES)
    assert figs[2].axes[2].get_title().startswith("t=99")
    with pytest.raises(ValueError, match="got 1 row labels for 2 rows"):
        viz.show_grid(x, nrow=3, row_labels=["a"])


def test_noisy_view_is_q_sample_with_seeded_noise(ds):
    s = get_schedule("cosine", 1000)
    x0 = ds[2][0]
    expected = q_sample(x0[None], 400, randn((1, *x0.shape), seed=7), s)[0]
    torch.testing.assert_close(widgets.noisy_view(x0, 400, s, seed=7), expected, rtol=0, atol=0)


def test_schedule_curves_match_schedule():
    c = widgets.schedule_curves("linear", 50, zero_terminal_snr=True)
    s = get_schedule("linear", 50, zero_terminal_snr=True)
    np.testing.assert_allclose(c["alpha_bar"], s.alpha_bar.numpy())
    np.testing.assert_allclose(c["log10_snr"][:-1], np.log10(s.snr.numpy()[:-1]))
    assert c["log10_snr"][-1] == -np.inf and c["u"][-1] == 1.0


def test_noising_explorer_update_swaps_image_data(ds):
    ex = widgets.NoisingExplorer(ds, index=1, t=10, schedule="linear", seed=0)
    fig_before, im_before = ex.fig, ex.im_xt
    before = np.array(ex.im_xt.get_array())
    ex.update(t=900)
    after = np.array(ex.im_xt.get_array())
    assert ex.fig is fig_before and ex.im_xt is im_before  # same figure, same artist: data swapped in place
    assert not np.allclose(before, after)
    expected = viz.to_display(widgets.noisy_view(ds[1][0], 900, get_schedule("linear"), 0))
    np.testing.assert_allclose(after, expected)
    assert ex.marker.get_xdata()[0] == 900
    ex.update(schedule="cosine")
    np.testing.assert_allclose(ex.curve.get_ydata(), get_schedule("cosine").alpha_bar.numpy())
    assert "Trouser" in ex.ax_x0.get_title()


def test_noising_explorer_errors(ds):
    ex = widgets.NoisingExplorer(ds)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        ex.update(t=1000)
    with pytest.raises(TypeError, match="unknown setting"):
        ex.update(colour="red")
    with pytest.raises(ValueError, match=r"image index must lie in \[0, 4\]"):
        ex.update(t=5, index=5)


def test_live_widget_slider_changes_figure(ds, monkeypatch):
    monkeypatch.setenv("LESSONS_HEADLESS", "0")
    monkeypatch.delenv("LESSONS_SMOKE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    ex = widgets.NoisingExplorer(ds, t=0)
    box = ex.widget()
    controls = {c.description: c for c in box.children[0].children}
    before = np.array(ex.im_xt.get_array())
    controls["t"].value = 999  # what dragging the slider does
    assert not np.allclose(before, np.array(ex.im_xt.get_array()))
    controls["schedule"].value = "sigmoid"
    assert ex.state["schedule"] == "sigmoid"
    assert isinstance(widgets.noising_explorer(ds), W.VBox)


def test_callback_errors_are_shown_not_swallowed(capsys):
    out = W.Output()

    def fails():
        raise RuntimeError("boom")

    widgets._guarded(fails, out)()  # outside a kernel the Output widget lets the text through to stdout
    assert "RuntimeError: boom" in capsys.readouterr().out


def test_headless_returns_static_figures(ds, monkeypatch):
    monkeypatch.setenv("LESSONS_HEADLESS", "1")
    assert isinstance(widgets.noising_explorer(ds), viz.Figure)
    assert isinstance(widgets.schedule_explorer(), viz.Figure)


def test_schedule_explorer_update(monkeypatch):
    ex = widgets.ScheduleExplorer(num_steps=100)
    line_ab, _ = ex.lines["linear"]
    assert len(line_ab.get_xdata()) == 100
    ex.update(num_steps=20, zero_terminal_snr=True)
    assert len(line_ab.get_xdata()) == 20 and line_ab.get_ydata()[-1] == 0
    monkeypatch.setenv("LESSONS_HEADLESS", "0")
    monkeypatch.delenv("LESSONS_SMOKE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    box = ex.widget()
    box.children[0].children[0].value = 300
    assert len(line_ab.get_xdata()) == 300
