"""The command line and the doctor."""

import subprocess
import sys

import pytest

from lessons_lib import course, data
from lessons_lib.doctor import doctor, find_problems

OK_VERSIONS = {"ipywidgets": "8.1.5", "jupyterlab_widgets": "3.0.13", "jupyterlab": "4.2.0"}
DATA_OK = {"train": "/d", "test": "/d"}


def test_find_problems_known_bad_combinations():
    assert find_problems(OK_VERSIONS, DATA_OK) == []
    assert "ipywidgets is missing" in find_problems({**OK_VERSIONS, "ipywidgets": None}, DATA_OK)[0]
    assert "front end) is missing" in find_problems({**OK_VERSIONS, "jupyterlab_widgets": None}, DATA_OK)[0]
    assert "needs jupyterlab_widgets >= 3" in find_problems({**OK_VERSIONS, "jupyterlab_widgets": "1.1.1"}, DATA_OK)[0]
    old = {**OK_VERSIONS, "ipywidgets": "7.8.1", "jupyterlab_widgets": "1.1.7"}
    assert "does not render in JupyterLab 4.2.0" in find_problems(old, DATA_OK)[0]
    assert "apt-get install dataset-fashion-mnist" in find_problems(OK_VERSIONS, {"train": None, "test": "/d"})[0]


def test_doctor_report():
    report = doctor()
    text = str(report)
    for name in ("torch", "ipywidgets", "jupyterlab_widgets", "jupyterlab", "CUDA", "MPS", "device", "data (train)"):
        assert name in text
    assert report.device in {"cpu", "cuda", "mps"} or report.device.startswith("cuda:")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lessons_lib", *args], capture_output=True, text=True, timeout=120)


def test_cli_doctor_runs():
    result = _run("doctor")
    assert "lessons_lib" in result.stdout and "device" in result.stdout
    assert result.returncode in (0, 1)


def test_cli_data_reports_missing_data(tmp_path):
    result = _run("data", "--root", str(tmp_path), "--no-download")
    assert result.returncode == 1
    assert "no Fashion-MNIST train files" in result.stderr and "apt-get install" in result.stderr


@pytest.mark.skipif(data.find_fashion_mnist("train") is None, reason="Fashion-MNIST not installed")
def test_cli_data_verifies_real_data():
    result = _run("data", "--no-download")
    assert result.returncode == 0 and "train: 60000 images, checksums OK" in result.stdout


def test_cli_rejects_unknown_command():
    result = _run("fly")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_lessons_are_ordered_and_filterable():
    names = [nb.name for nb in course.lessons()]
    assert names == sorted(names) and all(n[:2].isdigit() for n in names)
    with pytest.raises(ValueError, match="no lesson matches"):
        course.lessons(["99"])
    with pytest.raises(ValueError, match="full run"):
        course.run_course(smoke=True, inplace=True)


def test_course_table():
    results = [course.LessonResult("00_a", True, 1.23, None), course.LessonResult("01_b", False, 2.0, None, "boom")]
    table = course.format_table(results, smoke=True)
    assert "00_a" in table and "FAILED" in table and "boom" in table and "1/2 ok" in table and "smoke" in table


def test_cli_sample_reports_a_missing_model_folder(tmp_path):
    result = _run("sample", "--checkpoint", str(tmp_path / "none"), "--n", "1")
    assert result.returncode == 1 and "cannot load" in result.stderr and "config.json not found" in result.stderr
