"""The live widgets in a real browser: lessons 01, 02, 08 and 09 run in JupyterLab, driven by headless Chromium.

The unit tests call the widgets' callbacks in Python; only a browser shows that the front end renders them
(the JupyterLab widgets extension is installed and enabled, the kernel is not headless) and that moving a
control reaches the kernel and redraws the figure. Screenshots of each widget at three window widths and
the width of every slider track go to ``build/browser/``.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from lessons_lib.config import BUILD_DIR, HEADLESS_FLAGS, NOTEBOOKS_DIR

pytestmark = pytest.mark.browser

INSTALL = "the browser test needs `apt-get install chromium` and `pip install playwright`"


def _find_chromium() -> str | None:
    """The first Chromium (or Chrome) on PATH, else Debian's /usr/bin/chromium."""
    on_path = (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome"))
    return next(filter(None, on_path), "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


CHROMIUM = _find_chromium()
if CHROMIUM is None:
    pytest.skip(f"no Chromium executable: {INSTALL}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason=f"the playwright package is missing: {INSTALL}")
expect = sync_api.expect

OUT = BUILD_DIR / "browser"
WIDTHS = (1024, 1280, 1400)
MIN_TRACK = 100  # px of slider track: about 10 positions per 100 px of a 1000-step t slider stay reachable by mouse
STUDIO_CELLS = ("DiffusionPipeline.from_pretrained", "widgets.generation_studio(")  # lesson 08's copy keeps these
FLOW_CELLS = ("check_running_lesson(", "def eight_gaussians(", "class VelocityMLP(", "def euler_by_hand(",
              "widgets.flow_paths_explorer(")  # lesson 09's copy: the toy flow and its path explorer
# Seconds, sized for a quiet 2-core machine with room to spare.
SERVER_START, KERNEL_START, NOTEBOOK_RUN, RENDER, REDRAW = 60, 60, 180, 20, 30
WIDGET_ERROR = re.compile(r"Error displaying widget|model not found|Class \S+ not found", re.IGNORECASE)


@dataclass
class Lab:
    url: str
    token: str

    def api(self, path: str, method: str = "GET"):
        """Call the server's REST API; the decoded JSON answer, or None for an empty one."""
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None


def _prepare_lessons(root: Path) -> None:
    """Copy lessons 01, 02, 08 and 09 without outputs (a stale static figure must not pass for a live one).
    Lessons 08 and 09 are copied with ``SMOKE = True`` in their parameters cell and keep only that cell and the
    ones their widget needs (the studio; the toy flow): the rest of them (exports, fresh processes, benchmarks,
    the Fashion-MNIST models) takes CPU minutes and nbval runs it already."""
    keep = {"08_deployment": STUDIO_CELLS, "09_flow_matching": FLOW_CELLS}
    for name in ("01_forward_noising", "02_noise_schedules", *keep):
        nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
        if name in keep:
            parameters = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
            parameters.source, count = re.subn(r"^SMOKE = .*$", "SMOKE = True", parameters.source, flags=re.MULTILINE)
            assert count == 1, f"lesson {name[:2]}'s parameters cell no longer sets SMOKE on a line of its own"
            nb.cells = [parameters, *(c for c in nb.cells if any(s in c.source for s in keep[name]))]
            assert len(nb.cells) == 1 + len(keep[name]), f"lesson {name[:2]}'s widget cells were not found"
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, root / f"{name}.ipynb")


def _lab_settings(folder: Path) -> None:
    """Fresh JupyterLab settings: no news pop-up over the notebook, nothing from the user's own settings."""
    notification = folder / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(lab: Lab, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START
    while time.monotonic() < deadline:
        assert server.poll() is None, f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}"
        try:
            lab.api("status")
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer within {SERVER_START} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One JupyterLab server for the module, on a free local port with a random token, serving copies of
    the lessons, with live widgets (no headless flag in its environment). Its process group is ended at
    teardown, whatever the tests did."""
    tmp = tmp_path_factory.mktemp("lab")
    root, settings = tmp / "root", tmp / "settings"
    root.mkdir()
    _prepare_lessons(root)
    _lab_settings(settings)
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "jupyterlab.log"
    lab = Lab(f"http://127.0.0.1:{_free_port()}", secrets.token_hex(16))
    env = {k: v for k, v in os.environ.items() if k not in HEADLESS_FLAGS}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp / "runtime")
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={lab.url.rsplit(':', 1)[1]}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={lab.token}", f"--ServerApp.root_dir={root}",
               f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
               *(["--allow-root"] if os.geteuid() == 0 else [])]
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(lab, server, log)
        yield lab
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server shuts its kernels down
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def slider_tracks():
    """Widget -> window width -> slider label -> track width in px; written to build/browser/slider_tracks.json."""
    tracks = {}
    yield tracks
    (OUT / "slider_tracks.json").write_text(json.dumps(tracks, indent=1) + "\n")


@pytest.fixture
def page(browser, lab):
    """A fresh browser tab; the lesson's kernel is shut down afterwards."""
    context = browser.new_context(viewport={"width": WIDTHS[1], "height": 900})
    yield context.new_page()
    context.close()
    for session in lab.api("sessions"):
        lab.api(f"sessions/{session['id']}", method="DELETE")


@pytest.fixture
def console(page, request) -> list[str]:
    """The tab's console messages and uncaught errors, as "type: text"; kept in build/browser/<test>.console.log."""
    messages = []
    page.on("console", lambda message: messages.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: messages.append(f"pageerror: {error}"))
    yield messages
    (OUT / f"{request.node.name}.console.log").write_text("\n".join(messages) + "\n")


def run_lesson(page, lab: Lab, name: str) -> None:
    """Open a lesson in its own JupyterLab workspace and run it with the menu's Run > Run All Cells, then wait
    until its last code cell has run (fails with the notebook's first error output if it never does)."""
    page.goto(f"{lab.url}/lab/workspaces/{name[:2]}/tree/{name}.ipynb?token={lab.token}")
    kernel_idle = page.get_by_text(re.compile(r"^(?!No Kernel).+ \| Idle$"))  # the status bar: "Python 3 (ipykernel) | Idle"
    expect(kernel_idle).to_be_visible(timeout=KERNEL_START * 1000)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.locator(".lm-Menu-item", has_text=re.compile(r"^Run All Cells")).click()
    last_prompt = page.locator(".jp-CodeCell .jp-InputPrompt").last
    try:
        expect(last_prompt).to_have_text(re.compile(r"\[\d+\]"), timeout=NOTEBOOK_RUN * 1000)
    except AssertionError:
        errors = page.locator("[data-mime-type='application/vnd.jupyter.stderr']")
        shown = errors.first.inner_text()[-2000:] if errors.count() else "(no error output)"
        raise AssertionError(f"{name} did not finish within {NOTEBOOK_RUN} s; first error output:\n{shown}") from None


def live_widget(page, call: str):
    """The widget shown by the code cell containing ``call``, once it renders as a live widget: a widget view
    with its figure in an Output widget, not a text repr ("VBox(children=...)") or a static PNG."""
    cell = page.locator(".jp-CodeCell", has_text=call).first
    widget = cell.locator(".jp-Cell-outputArea .jupyter-widgets.widget-vbox").first
    try:
        expect(widget.locator(".widget-output img").first).to_be_visible(timeout=RENDER * 1000)
    except AssertionError:
        output = cell.locator(".jp-Cell-outputArea")
        hint = " a static figure (is LESSONS_HEADLESS, LESSONS_SMOKE or CI set for the kernel?)"
        static = hint if output.locator("img").count() else ""
        raise AssertionError(f"{call}...) did not render as a live widget; its output shows{static}:\n"
                             f"{output.inner_text()[:500]}") from None
    widget.scroll_into_view_if_needed()
    return widget


def control(widget, kind: str, label: str):
    """The control of class ``widget-<kind>`` with the description ``label``."""
    return widget.locator(f".widget-{kind}", has=widget.page.locator("label.widget-label", has_text=re.compile(f"^{label}$")))


def press_right(slider) -> None:
    """Focus a slider's handle and press the right arrow key; its readout must change."""
    readout = slider.locator(".widget-readout")
    before = readout.inner_text()
    slider.locator(".noUi-handle").focus()
    slider.page.keyboard.press("ArrowRight")
    expect(readout).not_to_have_text(before)


def assert_redraws(widget, action) -> None:
    """After ``action``, the figure's image data (the src of its <img>) changes within REDRAW seconds and no
    traceback is printed under the widget: the control reached the kernel and the callback redrew."""
    image = widget.locator(".widget-output img").first
    before = image.get_attribute("src")
    action()
    try:
        expect(image).not_to_have_attribute("src", before, timeout=REDRAW * 1000)
    except AssertionError:
        raise AssertionError(f"the figure did not change within {REDRAW} s; the widget shows:\n"
                             f"{widget.inner_text()[-1500:]}") from None
    assert "Traceback" not in widget.inner_text(), widget.inner_text()[-1500:]


def document(widget, name: str, slider_tracks: dict) -> None:
    """Screenshot the widget at each of WIDTHS into build/browser/ and record its slider tracks' widths; every
    track must stay usable (MIN_TRACK px) with JupyterLab's file browser open, from a 1024 px window up."""
    page, tracks = widget.page, slider_tracks.setdefault(name, {})
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        widget.scroll_into_view_if_needed()
        widget.screenshot(path=OUT / f"{name}_{width}.png")
        sliders = widget.locator(".widget-slider")
        tracks[width] = {sliders.nth(i).locator("label.widget-label").inner_text():
                         round(sliders.nth(i).locator(".noUi-target").bounding_box()["width"])
                         for i in range(sliders.count())}
        print(f"{name} at {width} px: slider tracks {tracks[width]}")
        narrow = {label: px for label, px in tracks[width].items() if px < MIN_TRACK}
        assert not narrow, f"{name} at a {width} px window: slider tracks under {MIN_TRACK} px: {narrow}"
        for i in range(widget.locator(".widget-toggle-buttons").count()):  # a label sits beside its buttons
            group = widget.locator(".widget-toggle-buttons").nth(i)
            label, first = group.locator("label.widget-label").bounding_box(), group.locator("button").first.bounding_box()
            assert abs(label["y"] - first["y"]) < first["height"] / 2, \
                f"{name} at a {width} px window: a toggle-buttons label sits above its buttons ({label}, {first})"


def assert_no_widget_errors(console: list[str]) -> None:
    """The browser console shows no widget-manager errors and no uncaught exception mentioning widgets."""
    errors = [m for m in console if WIDGET_ERROR.search(m) or (m.startswith("pageerror") and "widget" in m.lower())]
    assert not errors, "\n".join(errors)


def test_lesson01_noising_explorer(page, console, lab, slider_tracks):
    """Lesson 01's noising explorer redraws when its t slider moves one step by keyboard."""
    run_lesson(page, lab, "01_forward_noising")
    explorer = live_widget(page, "widgets.noising_explorer(")
    assert_redraws(explorer, lambda: press_right(control(explorer, "slider", "t")))
    document(explorer, "01_noising_explorer", slider_tracks)
    assert_no_widget_errors(console)


def test_lesson02_schedule_and_noising_explorers(page, console, lab, slider_tracks):
    """Lesson 02's schedule explorer redraws when its T slider moves; its noising explorer, on a new schedule."""
    run_lesson(page, lab, "02_noise_schedules")
    schedules = live_widget(page, "widgets.schedule_explorer(")
    assert_redraws(schedules, lambda: press_right(control(schedules, "slider", "T")))
    document(schedules, "02_schedule_explorer", slider_tracks)
    noising = live_widget(page, "widgets.noising_explorer(")
    assert_redraws(noising, lambda: control(noising, "dropdown", "schedule").locator("select").select_option("linear"))
    document(noising, "02_noising_explorer", slider_tracks)
    assert_no_widget_errors(console)


def test_lesson08_generation_studio(page, console, lab, slider_tracks):
    """Lesson 08's generation studio draws a gallery row when Generate is pressed (smoke parameters)."""
    run_lesson(page, lab, "08_deployment")
    studio = live_widget(page, "widgets.generation_studio(")
    assert_redraws(studio, lambda: studio.get_by_role("button", name="Generate", exact=True).click())
    document(studio, "08_generation_studio", slider_tracks)
    assert_no_widget_errors(console)


def test_lesson09_flow_paths_explorer(page, console, lab, slider_tracks):
    """Lesson 09's flow-path explorer redraws when its steps slider moves and when the solver changes."""
    run_lesson(page, lab, "09_flow_matching")
    explorer = live_widget(page, "widgets.flow_paths_explorer(")
    assert_redraws(explorer, lambda: press_right(control(explorer, "slider", "steps")))
    assert_redraws(explorer, lambda: explorer.get_by_role("button", name="heun", exact=True).click())
    document(explorer, "09_flow_paths_explorer", slider_tracks)
    assert_no_widget_errors(console)
