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


def test_lab_opens_the_first_lesson_from_the_repository_root_and_says_why_widgets_are_static(monkeypatch, capsys):

    from lessons_lib import cli
    from lessons_lib.config import REPO_ROOT

    assert cli.lab_command("jupyter", False) == ["jupyter", "lab", "notebooks/00_welcome_and_data.ipynb"]
    assert cli.lab_command("jupyter", True)[-1] == "--allow-root"  # JupyterLab refuses to run as root without it
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, cwd: calls.append((command, cwd)) or 0)
    monkeypatch.setenv("LESSONS_SMOKE", "1")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LESSONS_HEADLESS", raising=False)
    assert cli.main(["lab"]) == 0
    assert "LESSONS_SMOKE=1 is set" in capsys.readouterr().err and calls[0][1] == REPO_ROOT


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


def test_record_runtimes_keeps_other_modes_and_skips_failures(tmp_path):
    path = tmp_path / "runtimes.json"
    path.write_text('{"00_a": {"full": {"seconds": 9.0}, "gpu_full": {"estimate": "< 15 s"}}}')
    course.record_runtimes([course.LessonResult("00_a", True, 12.34, None), course.LessonResult("01_b", False, 2.0, None)],
                           smoke=True, path=path)
    runtimes = course.read_runtimes(path)
    assert set(runtimes) == {"00_a"} and runtimes["00_a"]["smoke"]["seconds"] == 12.3
    assert runtimes["00_a"]["full"] == {"seconds": 9.0} and course.runtime_text("00_a", "gpu_full", runtimes) == "< 15 s"
    assert course.runtime_text("00_a", "smoke", runtimes) == "10 s"
    with pytest.raises(ValueError, match="no 'full' entry for 01_b"):
        course.runtime_text("01_b", "full", runtimes)
    with pytest.raises(ValueError, match="no parameters with --record-times"):
        course.run_course(smoke=True, only=["01"], parameters={"T": 200}, record_times=True)


def test_write_runtime_texts_rewrites_header_rows_and_readme_cells(tmp_path):
    import nbformat

    runtimes = {"01_b": {"smoke": {"seconds": 8.5}, "full": {"seconds": 700.0}, "gpu_smoke": {"estimate": "< 20 s"},
                         "gpu_full": {"estimate": "~1 min"}}}
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        "# 01\n\n| expected runtime | smoke | full lesson |\n|---|---|---|\n| 2-core CPU | 1 s | 2 s |\n"
        "| GPU (estimated) | 3 s | 4 s |\n\nAfter the table.")])
    nbformat.write(nb, tmp_path / "01_b.ipynb")
    readme = tmp_path / "README.md"
    readme.write_text("| # | lesson | you will | cpu | gpu |\n| 01 | [B](b) | write q(x_t \\| x_0) | 1 s / 2 s | 4 s |\nend\n")
    course.write_runtime_texts(["01_b"], runtimes, readme=readme, notebooks_dir=tmp_path)
    header = nbformat.read(tmp_path / "01_b.ipynb", as_version=4).cells[0].source
    assert "| 2-core CPU | 10 s | 12 min |\n| GPU (estimated) | < 20 s | ~1 min |\n\nAfter the table." in header
    assert readme.read_text() == ("| # | lesson | you will | cpu | gpu |\n"
                                  "| 01 | [B](b) | write q(x_t \\| x_0) | 10 s / 12 min | ~1 min |\nend\n")
    (tmp_path / "01_b.ipynb").write_text(nbformat.writes(nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# no table")])))
    with pytest.raises(ValueError, match="no '\\| 2-core CPU \\|' runtime row"):
        course.write_runtime_texts(["01_b"], runtimes, readme=readme, notebooks_dir=tmp_path)


def test_cli_sample_reports_a_missing_model_folder(tmp_path):
    result = _run("sample", "--checkpoint", str(tmp_path / "none"), "--n", "1")
    assert result.returncode == 1 and "cannot load" in result.stderr and "config.json not found" in result.stderr


# ----------------------------------------------------------------------------------------------------------
# sample: generation, guidance, editing and interpolation from the command line (in-process: fast)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from lessons_lib.checkpoint import save_pretrained
    from lessons_lib.train import preset
    from lessons_lib.unet import UNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(UNet(preset("tiny").model).eval(), path, metadata={"train": preset("tiny").to_dict()})
    return path


def _sample(model, *args):
    from lessons_lib.cli import main

    return main(["sample", "--checkpoint", str(model), "--sampler", "ddim", "--steps", "3", "--no-progress", *args])


def test_cli_sample_writes_a_grid_with_guidance_and_a_negative_class(tiny_model, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["--n", "4", "--class", "sneaker", "--guidance", "2", "--negative", "sandal", "--out", str(out)]
    assert _sample(tiny_model, *args) == 0
    assert out.stat().st_size > 1000 and "wrote 4 images" in capsys.readouterr().out


def test_cli_sample_edits_png_files_and_keeps_unmasked_pixels(tiny_model, tmp_path):
    import numpy as np
    from PIL import Image

    assert _sample(tiny_model, "--n", "2", "--class", "bag", "--out", str(tmp_path / "frames")) == 0
    first = tmp_path / "frames" / "0000.png"
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["0000.png", "0001.png"]
    pixels = np.asarray(Image.open(first))
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    hole = np.zeros((28, 28), np.uint8)
    hole[10:18, 6:22] = 255
    Image.fromarray(hole).save(tmp_path / "hole.png")
    out = tmp_path / "filled.npz"
    assert _sample(tiny_model, "--n", "2", "--init-image", str(first), "--mask", str(tmp_path / "hole.png"),
                   "--out", str(out)) == 0
    with np.load(out) as f:
        images, labels, seeds = f["images"], f["labels"], f["seeds"]
    assert images.shape == (2, 28, 28) and labels.tolist() == [-1, -1] and seeds.tolist() == [0, 1]
    assert (images[:, hole == 0] == pixels[hole == 0]).all() and (images[:, hole > 0] != pixels[hole > 0]).any()
    assert _sample(tiny_model, "--n", "1", "--init-image", str(first), "--strength", "0", "--out", str(out)) == 0
    with np.load(out) as f:
        assert (f["images"][0] == pixels).all()


def test_cli_sample_interpolates_between_classes_and_seeds(tiny_model, tmp_path):
    import numpy as np

    out = tmp_path / "morph.npz"
    assert _sample(tiny_model, "--class", "sneaker", "--interpolate", "4", "--to-class", "ankle boot", "--out", str(out)) == 0
    with np.load(out) as f:
        assert f["images"].shape == (4, 28, 28)
    assert _sample(tiny_model, "--interpolate", "3", "--to-seed", "5", "--out", str(out)) == 0
    with np.load(out) as f:
        assert f["images"].shape == (3, 28, 28)


@pytest.mark.parametrize("args, message", [
    (["--strength", "0.5"], "give init_image too"),
    (["--class", "spaceship"], "unknown class 'spaceship'"),
    (["--steps", "101"], r"steps must lie in [1, 100]"),
    (["--init-image", "missing.png"], "missing.png: no such file"),
    (["--to-seed", "3"], "go with --interpolate"),
    (["--out", "x.gif"], "--out must end in"),
])
def test_cli_sample_reports_bad_values(tiny_model, capsys, args, message):
    assert _sample(tiny_model, "--n", "1", *args) == 2
    assert message in capsys.readouterr().err


def test_cli_sample_lists_the_samplers_and_presets(tiny_model, capsys):
    from lessons_lib.samplers import SAMPLERS

    for flag, allowed in (("--sampler", SAMPLERS), ("--preset", ("fast", "balanced", "high"))):
        with pytest.raises(SystemExit):
            _sample(tiny_model, flag, "warp")
        err = capsys.readouterr().err
        assert "invalid choice: 'warp'" in err and all(name in err for name in allowed)


@pytest.mark.skipif(data.find_fashion_mnist("train") is None, reason="Fashion-MNIST not installed")
def test_cli_trains_an_autoencoder_then_a_latent_model_that_samples(tmp_path, capsys):
    from lessons_lib.cli import main
    from lessons_lib.pipeline import DiffusionPipeline

    ae, ldm, out = tmp_path / "ae", tmp_path / "ldm", tmp_path / "grid.png"
    assert main(["autoencoder", "--out-dir", str(ae), "--base-channels", "8", "--latent-channels", "3", "--max-steps", "2",
                 "--batch-size", "16", "--no-progress"]) == 0
    assert "scale_factor" in capsys.readouterr().out
    assert main(["train", "--preset", "tiny", "--autoencoder", str(ae), "--max-steps", "2", "--out-dir", str(ldm),
                 "--no-progress"]) == 0
    pipe = DiffusionPipeline.from_pretrained(ldm)
    assert pipe.sample_shape == (3, 7, 7) and pipe.image_shape == (1, 28, 28)
    assert _sample(ldm, "--n", "2", "--class", "bag", "--out", str(out)) == 0 and out.stat().st_size > 500
    assert main(["autoencoder", "--out-dir", str(tmp_path / "bad"), "--kl-weight", "-1", "--max-steps", "1"]) == 2
    assert "kl_weight must be a finite number >= 0" in capsys.readouterr().err
