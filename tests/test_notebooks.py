"""The committed lessons, read as files: what GitHub, nbviewer or an unrun JupyterLab shows a reader."""

import json
import re

import pytest

from lessons_lib import course

LESSONS = course.lessons()


def _code_cells(nb):
    return [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("nb", LESSONS, ids=[nb.stem for nb in LESSONS])
def test_parameters_first_then_their_check(nb):
    first, second, *_ = _code_cells(nb)
    assert "parameters" in first["metadata"].get("tags", []), "the first code cell holds the papermill parameters"
    assert f'check_running_lesson("{nb.name[:2]}", globals())' in "".join(second["source"])


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


@pytest.mark.parametrize("nb", LESSONS, ids=[nb.stem for nb in LESSONS])
def test_every_widget_output_can_be_displayed(nb):
    """A widget view saved without its model's state shows "model not found" when the notebook is reopened
    (a notebook saved from a live JupyterLab session): every view has its state (progress bars from papermill
    do), and the cells of the lessons' live widgets store their static figure."""
    saved = json.loads(nb.read_text())
    state = saved["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in _code_cells(nb):
        kinds = {kind for output in cell["outputs"] for kind in output.get("data", {})}
        for output in cell["outputs"]:
            view = output.get("data", {}).get(WIDGET_VIEW)
            assert view is None or view["model_id"] in state, f"{nb.name}: a widget view without its state"
        if any(f"widgets.{name}(" in "".join(cell["source"]) for name in ("noising_explorer", "schedule_explorer",
                                                                          "flow_paths_explorer", "generation_studio")):
            assert "image/png" in kinds, f"{nb.name}: a live widget's cell without its static figure"


RUNTIMES = course.read_runtimes()
README_ROWS = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[1:-1]]
               for line in (course.NOTEBOOKS_DIR.parent / "README.md").read_text().splitlines()
               if re.match(r"\| \d\d \|", line)}  # the lesson table's rows: "| 00 |" ... "| 10 |"


@pytest.mark.parametrize("nb", LESSONS, ids=[nb.stem for nb in LESSONS])
def test_runtimes_come_from_one_source(nb):
    """The README's lesson table and the lesson's header print the runtimes of notebooks/runtimes.json (written by
    ``course --record-times``): a re-timed lesson changes them everywhere or the suite says where."""
    text = {mode: course.runtime_text(nb.stem, mode, RUNTIMES) for mode in ("smoke", "full", "gpu_smoke", "gpu_full")}
    header = "".join(json.loads(nb.read_text())["cells"][0]["source"])
    assert f"| 2-core CPU | {text['smoke']} | {text['full']} |" in header, f"{nb.name}: header runtimes"
    assert f"| GPU (estimated) | {text['gpu_smoke']} | {text['gpu_full']} |" in header, f"{nb.name}: header GPU row"
    row = README_ROWS[nb.name[:2]]
    assert row[-2:] == [f"{text['smoke']} / {text['full']}", text["gpu_full"]], f"README's row for lesson {nb.name[:2]}"


def test_format_runtime():
    assert [course.format_runtime(s) for s in (2, 12, 57, 58, 89, 91, 709)] == \
        ["5 s", "10 s", "55 s", "1 min", "1 min", "2 min", "12 min"]
