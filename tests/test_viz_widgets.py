"""Figures and widgets, tested without a browser: callbacks must change what the figure shows."""

import ipywidgets as W
import numpy as np
import pytest
import torch

from lessons_lib import data, viz, widgets
from lessons_lib.device import randn
from lessons_lib.noising import q_sample
from lessons_lib.pipeline import PRESETS
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


def test_headless_returns_static_figures_and_says_why(ds, monkeypatch, capsys):
    for name in ("LESSONS_SMOKE", "CI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LESSONS_HEADLESS", "1")
    assert isinstance(widgets.noising_explorer(ds), viz.Figure)
    assert "(A static figure: LESSONS_HEADLESS is set" in capsys.readouterr().out
    monkeypatch.setenv("CI", "true")
    assert isinstance(widgets.schedule_explorer(), viz.Figure)
    assert "LESSONS_HEADLESS and CI are set" in capsys.readouterr().out


def test_flow_paths_explorer_draws_the_solver_path(monkeypatch):
    """The velocity u(x, t) = x - c carries every point x1 to c in one Euler step; the lines are the solver's path."""
    c = torch.tensor([[1.0, -2.0]])
    x1 = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    ex = widgets.FlowPathsExplorer(lambda x, t, y=None: x - c, x1, torch.zeros(3, 2), steps=1, paths=10)
    torch.testing.assert_close(torch.as_tensor(ex.end.get_offsets()).float(), c.expand(50, 2))
    assert len(ex.lines.get_segments()) == 10 and len(ex.lines.get_segments()[0]) == 2
    assert "euler, 1 step (1 network evaluations)" in ex.ax.get_title()
    monkeypatch.setenv("LESSONS_HEADLESS", "0")
    monkeypatch.delenv("LESSONS_SMOKE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    controls = {ctrl.description: ctrl for ctrl in ex.widget().children[0].children}
    controls["steps"].value, controls["solver"].value = 4, "heun"  # what the slider and the buttons do
    assert len(ex.lines.get_segments()[0]) == 5 and "heun, 4 steps (8 network evaluations)" in ex.ax.get_title()
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        widgets.FlowPathsExplorer(lambda x, t, y=None: x, torch.zeros(4, 3), torch.zeros(3, 2))


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
    slider = box.children[0].children[0]
    assert {10, 20, 1000} <= set(slider.options)  # every T the lesson asks for is a stop of the slider
    slider.value = 200
    assert len(line_ab.get_xdata()) == 200
    ex.update(num_steps=2, zero_terminal_snr=True)  # one finite SNR: drawn as a dot, not an empty panel
    assert ex.lines["linear"][1].get_marker() == "o"


# ---------------------------------------------------------------------------------------------------
# The generation studio (a tiny random U-Net: the images are noise, the wiring is what is tested)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    from lessons_lib.pipeline import DiffusionPipeline
    from lessons_lib.train import preset
    from lessons_lib.unet import UNet

    torch.manual_seed(0)
    return DiffusionPipeline(UNet(preset("tiny").model).eval(), get_schedule("cosine", 100))


@pytest.fixture
def live(monkeypatch):
    monkeypatch.setenv("LESSONS_HEADLESS", "0")
    monkeypatch.delenv("LESSONS_SMOKE", raising=False)
    monkeypatch.delenv("CI", raising=False)


def _find(box, description):
    """The widget with this description (or button label) anywhere inside ``box``."""
    for child in box.children:
        if getattr(child, "description", None) == description:
            return child
        if hasattr(child, "children") and (found := _find(child, description)) is not None:
            return found
    return None


def test_studio_generate_click_adds_gallery_entry_with_its_settings(pipe, ds, live):
    from lessons_lib.pipeline import GenerationConfig

    studio = widgets.GenerationStudio(pipe, ds, num_images=2)
    box = studio.widget()
    assert _find(box, "preset").value == "fast"  # the preset it was built with, not a blank
    assert _find(box, "folder").value == "build/studio"  # relative to the repository, where save() writes it
    edit_only = ("source", "image #", "upload", "strength", "repaint")
    assert all(_find(box, name).disabled for name in edit_only)  # generate mode uses none of them
    _find(box, "mode").value = "inpaint"
    assert [_find(box, name).disabled for name in edit_only] == [False, False, False, True, False]
    _find(box, "mode").value = "generate"
    _find(box, "class").value = "Sneaker"
    _find(box, "sampler").value = "ddim"
    _find(box, "steps").value = 4
    _find(box, "seed").value = 7
    _find(box, "Generate").click()  # what pressing the button does
    assert len(studio.gallery) == 1
    entry = studio.gallery[0]
    s = entry.settings
    ran = (s["prompt"], s["sampler"], s["steps"], s["seeds"], s["guidance_scale"], s["nfe"])
    assert ran == ("Sneaker", "ddim", 4, [7, 8], 3.0, 4)
    expected = pipe.generate(GenerationConfig(prompt="Sneaker", num_images=2, seed=7, sampler="ddim", steps=4,
                                              guidance_scale=3.0), progress=False)
    torch.testing.assert_close(entry.images, expected.images, rtol=0, atol=0)
    progress = _find(box, "progress")
    assert progress.value == progress.max == 4  # one network call per DDIM step (both guidance branches in one batch)
    assert "Sneaker" in box.children[5].value  # the status line shows the caption
    _find(box, "preset").value = "balanced"
    assert (_find(box, "sampler").value, _find(box, "steps").value) == PRESETS["balanced"][:2]


def test_studio_save_writes_pngs_and_reproducible_settings(pipe, ds, tmp_path):
    import json

    from PIL import Image

    from lessons_lib.data import to_uint8
    from lessons_lib.pipeline import GenerationConfig

    studio = widgets.GenerationStudio(pipe, ds, num_images=2, steps=3, seed=3)
    studio.generate()
    studio.generate(mode="inpaint", mask="left half", index=4, num_images=1)
    folder = studio.save(tmp_path / "out")
    records = json.loads((folder / "settings.json").read_text())
    assert [r["files"] for r in records] == [["000_seed3.png", "000_seed4.png"], ["001_seed3.png"]]
    assert records[1]["mode"] == "inpaint" and records[1]["mask"] == "left half"
    assert records[1]["source"] == {"dataset": "synthetic", "index": 4}
    for entry, record in zip(studio.gallery, records, strict=True):
        for image, name in zip(entry.images, record["files"], strict=True):
            pixels = torch.from_numpy(np.array(Image.open(folder / name)))
            torch.testing.assert_close(pixels, to_uint8(image)[0], rtol=0, atol=0)
    fields = set(GenerationConfig.__dataclass_fields__)
    again = pipe.generate(GenerationConfig(**{k: v for k, v in records[0].items() if k in fields}), progress=False)
    torch.testing.assert_close(again.images, studio.gallery[0].images, rtol=0, atol=0)  # the JSON is enough to redo it


def test_studio_inpaints_an_uploaded_image_keeping_known_pixels(pipe, tmp_path):
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    studio = widgets.GenerationStudio(pipe, steps=3, num_images=2)  # no dataset: uploads only
    uploaded = studio.load_upload(buffer.getvalue())
    assert studio.state["source"] == "upload"
    torch.testing.assert_close(uploaded[0], data.to_model(pixels), rtol=0, atol=0)
    entry = studio.generate(mode="inpaint", mask="top half")
    keep = ~widgets.region_mask("top half", (1, 28, 28))
    assert keep[0, :14].sum() == 0 and keep[0, 14:].all()
    for image in entry.images:
        torch.testing.assert_close(image[keep], uploaded[keep], rtol=0, atol=0)
    assert entry.settings["source"] == "upload"


def test_studio_bad_settings_show_an_error_instead_of_raising(pipe, ds, live):
    studio = widgets.GenerationStudio(pipe, ds, steps=2, num_images=1)
    box = studio.widget()
    status = box.children[5]
    _find(box, "not class").value = "Bag"
    _find(box, "guidance").value = 1.0
    _find(box, "Generate").click()
    assert "negative class acts through guidance" in status.value and studio.gallery == []
    _find(box, "not class").value = "(none)"
    _find(box, "mode").value = "image-to-image"
    _find(box, "image #").value = 99
    _find(box, "Generate").click()
    assert "image index must lie in [0, 4], got 99" in status.value and studio.gallery == []
    _find(box, "source").value = "upload"
    _find(box, "Generate").click()
    assert "no uploaded image yet" in status.value
    with pytest.raises(TypeError, match="unknown setting"):
        studio.generate(colour="red")
    with pytest.raises(ValueError, match="unknown mask 'middle'; allowed: left half"):
        widgets.region_mask("middle", (1, 28, 28))


def test_studio_headless_returns_a_static_figure(pipe, ds, monkeypatch):
    monkeypatch.setenv("LESSONS_HEADLESS", "1")
    fig = widgets.generation_studio(pipe, ds, prompt="Bag", steps=2, num_images=3)
    assert isinstance(fig, viz.Figure) and fig._repr_png_().startswith(b"\x89PNG")
    assert len(fig.axes) == 1 and fig.axes[0].get_title(loc="left").startswith(f"Bag · {PRESETS['fast'][0]} 2 steps")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["seed 0", "seed 1", "seed 2"]
