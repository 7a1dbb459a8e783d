"""Bad input, tried as a careless user would: every case ends with one clear line and a non-zero exit, never a
traceback (in-process: an escaping exception fails the test) and never a wrong result with exit code 0.
Then the worst interruption of all: a training process killed with SIGKILL at several points."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lessons_lib import course
from lessons_lib import train as T
from lessons_lib.checkpoint import load_pretrained, save_pretrained
from lessons_lib.cli import main
from lessons_lib.data import find_fashion_mnist
from lessons_lib.pipeline import GenerationConfig
from lessons_lib.unet import UNet

needs_data = pytest.mark.skipif(find_fashion_mnist("train") is None, reason="Fashion-MNIST not installed")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder and the broken files the cases below hand to the command line."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    model = root / "model"
    save_pretrained(UNet(T.preset("tiny").model).eval(), model, metadata={"train": T.preset("tiny").to_dict()})
    cfg = json.loads((model / "config.json").read_text())
    breaks = {"no_prediction": lambda t: t.pop("prediction"), "bad_schedule": lambda t: t.update(schedule="zigzag")}
    for name, change in breaks.items():
        folder = root / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
        broken = json.loads(json.dumps(cfg))
        change(broken["train"])
        (folder / "config.json").write_text(json.dumps(broken))
    (root / "text.npz").write_text("not an archive")
    np.savez(root / "objects.npz", images=np.array([{"a": 1}], dtype=object))
    np.savez(root / "one.npz", images=np.zeros((1, 28, 28), np.uint8))
    np.savez(root / "labels.npz", images=np.zeros((8, 28, 28), np.uint8), labels=np.full(8, 12))
    np.save(root / "single.npy", np.zeros((3, 28, 28), np.uint8))
    np.savez(root / "no_images.npz", x=np.zeros(3))
    (root / "a_file").write_text("x")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "img.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "mask64.png")
    only_resume = root / "only_resume"
    only_resume.mkdir()
    (only_resume / "resume.pt").write_bytes(b"")
    truncated = root / "truncated_run"
    truncated.mkdir()
    (truncated / "resume.pt").write_bytes(b"PK\x03\x04 cut short")
    bad_data = root / "bad_data"
    bad_data.mkdir()
    (bad_data / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 8)[:20])
    (bad_data / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    return root


M = "{model}"
CASES = [  # (id, argv, extra environment, words the message must hold)
    ("batch 0", ["train", "--preset", "tiny", "--batch-size", "0"], {}, ["batch_size must be >= 1"]),
    ("checkpoint-every 0", ["train", "--preset", "tiny", "--checkpoint-every", "0"], {}, ["checkpoint_every must be >= 1"]),
    ("lr nan", ["train", "--preset", "tiny", "--lr", "nan"], {}, ["lr must be a finite number"]),
    ("lr negative", ["train", "--preset", "tiny", "--lr", "-1"], {}, ["lr must be > 0"]),
    ("ema-decay 1.5", ["train", "--preset", "tiny", "--ema-decay", "1.5"], {}, ["ema_decay must lie in [0, 1)"]),
    ("max-steps 0", ["train", "--preset", "tiny", "--max-steps", "0"], {}, ["max_steps must be >= 1", "random weights"]),
    ("seed 2**64", ["train", "--preset", "tiny", "--seed", str(2**64)], {}, ["seed must lie in [0, 2**63)"]),
    ("device tpu", ["train", "--preset", "tiny", "--device", "tpu"], {}, ["unknown device 'tpu'"]),
    ("device cuda:7", ["train", "--preset", "tiny", "--device", "cuda:7"], {}, ["cuda:7"]),
    ("LESSONS_DEVICE=gpu", ["train", "--preset", "tiny"], {"LESSONS_DEVICE": "gpu"}, ["unknown device 'gpu'"]),
    ("amp fp16 on cpu", ["train", "--preset", "tiny", "--amp", "fp16", "--device", "cpu"], {}, ["amp='fp16' needs a GPU"]),
    ("out-dir is a file", ["train", "--preset", "tiny", "--out-dir", "{root}/a_file"], {}, ["is a file"]),
    ("out-dir under a file", ["train", "--preset", "tiny", "--out-dir", "{root}/a_file/run"], {}, ["is a file"]),
    ("truncated resume.pt", ["train", "--preset", "tiny", "--out-dir", "{root}/truncated_run"], {},
     ["cannot be read", "--no-resume"]),
    ("init-from a file", ["train", "--preset", "tiny", "--init-from", "{root}/a_file"], {}, ["is a file", "model folder"]),
    ("init-from another objective", ["train", "--preset", "tiny", "--init-from", "{root}/model", "--prediction", "v"], {},
     ["does not fit this run", "prediction: 'eps' there, 'v' here"]),
    ("corrupt IDX files", ["data", "--root", "{root}/bad_data", "--no-download"], {}, ["train-"]),
    ("course --only 99", ["course", "--smoke", "--only", "99"], {}, ["no lesson matches"]),
    ("course misspelt parameter", ["course", "--smoke", "--only", "01", "-p", "N_DRAW", "500"], {},
     ["has no parameter N_DRAW", "N_DRAWS"]),
    ("course wrong type", ["course", "--smoke", "--only", "01", "-p", "N_DRAWS", "lots"], {}, ["takes int values"]),
    ("config lacks prediction", ["sample", "--checkpoint", "{root}/no_prediction", "--n", "1"], {}, ["lacks 'prediction'"]),
    ("unknown schedule in config", ["sample", "--checkpoint", "{root}/bad_schedule", "--n", "1"], {}, ["zigzag"]),
    ("only resume.pt", ["sample", "--checkpoint", "{root}/only_resume", "--n", "1"], {}, ["only a trainer's resume.pt"]),
    ("guidance inf", ["sample", "--checkpoint", M, "--n", "1", "--guidance", "inf"], {}, ["finite number"]),
    ("seed 2**64 sample", ["sample", "--checkpoint", M, "--n", "1", "--seed", str(2**64)], {}, ["seed must be an int in"]),
    ("mask of another size", ["sample", "--checkpoint", M, "--n", "1", "--init-image", "{root}/img.png", "--mask",
                              "{root}/mask64.png"], {}, ["64x64", "28x28"]),
    ("out is a file's child", ["sample", "--checkpoint", M, "--n", "1", "--out", "{root}/a_file/x.png"], {}, ["is a file"]),
    ("evaluate n=1", ["evaluate", "--npz", "{root}/one.npz"], {}, ["more than k = 3 images"]),
    ("evaluate text npz", ["evaluate", "--npz", "{root}/text.npz"], {}, ["not a readable .npz"]),
    ("evaluate object npz", ["evaluate", "--npz", "{root}/objects.npz"], {}, ["object arrays"]),
    ("evaluate a .npy", ["evaluate", "--npz", "{root}/single.npy"], {}, ["single .npy array"]),
    ("evaluate npz without images", ["evaluate", "--npz", "{root}/no_images.npz"], {}, ["holds ['x']"]),
    ("evaluate labels 12", ["evaluate", "--npz", "{root}/labels.npz"], {}, ["'labels' must lie in 0-9"]),
    ("evaluate n -1", ["evaluate", "--npz", "{root}/labels.npz", "--n", "-1"], {}, ["--n must be >= 1"]),
    ("evaluate steps 0", ["evaluate", "--checkpoint", M, "--steps", "0"], {}, ["--steps must be >= 1"]),
]


@pytest.mark.parametrize("argv, env, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(files, capsys, monkeypatch, argv, env, words):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = [a.format(root=files, model=files / "model") for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, f"accepted: {argv}"
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="lr must be > 0"):
        main(["--debug", "train", "--preset", "tiny", "--lr", "-1"])


def test_the_entry_point_prints_no_traceback():
    result = subprocess.run([sys.executable, "-m", "lessons_lib", "train", "--preset", "tiny", "--lr", "-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "error: lr must be > 0, got -1.0"


def test_any_case_suffix_is_an_image_file(files, tmp_path):
    out = tmp_path / "x.PNG"
    assert main(["sample", "--checkpoint", str(files / "model"), "--n", "1", "--steps", "2", "--no-progress",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from lessons_lib.pipeline import load_image

    grey = np.full((28, 28), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = load_image(tmp_path / "g16.png")
    assert x.shape == (1, 28, 28) and abs(x.mean().item()) < 0.01  # 128/255 in [-1, 1], not white (1.0)


@pytest.mark.parametrize("fields, message", [
    ({"prompt": 3.0}, "prompt must be a class name"),
    ({"guidance_scale": float("inf")}, "finite number"),
    ({"seed": 2**64}, "seed must be an int in"),
])
def test_generation_config_refuses(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        GenerationConfig(**fields)


def test_standalone_sampler_refuses_a_file_that_is_not_its_artifact(tmp_path, capsys):
    from lessons_lib import standalone_sampler

    pickle = tmp_path / "resume.pt"
    torch.save({"a": 1}, pickle)
    assert standalone_sampler.main([str(pickle)]) == 1
    assert "sidecar" in capsys.readouterr().err
    (tmp_path / "resume.pt.json").write_text(json.dumps({"format": "onnx"}))
    assert standalone_sampler.main([str(pickle)]) == 1
    assert "files end in .onnx" in capsys.readouterr().err


def test_course_refuses_unknown_and_mistyped_parameters():
    nb = course.lessons(["01"])[0]
    course.check_parameters(nb, {"N_DRAWS": 500, "T": 200})
    with pytest.raises(ValueError, match="has no parameter N_DRAW; its parameters: .*N_DRAWS"):
        course.check_parameters(nb, {"N_DRAW": 500})
    with pytest.raises(ValueError, match="takes int values"):
        course.check_parameters(nb, {"T": 0.5})
    assert course.parse_value("200") == 200 and course.parse_value("lots") == "lots"
    course.check_parameters(course.lessons(["05"])[0], {"DEVICE": "cpu", "N_REFERENCE": 2000})  # None: optional, any type


def test_a_lesson_run_with_papermill_refuses_a_mistyped_parameter_before_any_work(tmp_path):
    """papermill itself injects any value; the lesson's first cell after its parameters checks them."""
    import papermill

    nb = course.lessons(["01"])[0]
    with pytest.raises(ValueError, match="parameter N_DRAWS takes int values"):
        course.check_running_lesson("01", {"N_DRAWS": "lots", "T": 1000})
    course.check_running_lesson("01", {"N_DRAWS": 500, "T": 200, "SEED": 3})
    course.check_running_lesson("04", {"MINUTES": None, "MAX_STEPS": 200})  # the smoke values of optional ones
    with pytest.raises(papermill.PapermillExecutionError, match="parameter N_DRAWS takes int values") as err:
        papermill.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), cwd=str(tmp_path), kernel_name="python3",
                                   parameters={"N_DRAWS": "lots"}, progress_bar=False)
    assert err.value.exec_count <= 3  # stopped in the cell after the parameters, before the lesson's work


# ----------------------------------------------------------------------------------------------------------
# Resume: what may change and what may not
# ----------------------------------------------------------------------------------------------------------
def _dataset():
    from lessons_lib.data import ImageDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 16, 16), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.randint(0, 10, (32,), generator=g), [str(i) for i in range(10)], "synthetic")


def test_resume_refuses_a_changed_objective_and_applies_a_changed_lr(tmp_path, capsys):
    ds = _dataset()
    cfg = T.preset("tiny", out_dir=str(tmp_path), max_steps=3, checkpoint_every=100)
    T.train(cfg, ds, progress=False)
    with pytest.raises(ValueError, match=r"changed prediction: prediction: 'eps' in the checkpoint, 'v' now"):
        T.train(T.preset("tiny", out_dir=str(tmp_path), max_steps=6, prediction="v"), ds, progress=False)
    capsys.readouterr()
    result = T.train(T.preset("tiny", out_dir=str(tmp_path), max_steps=6, lr=1e-4), ds, progress=False)
    assert "lr: 0.001 -> 0.0001" in capsys.readouterr().out and result.step == 6
    state = torch.load(tmp_path / T.RESUME, weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # the advice "lower lr" works as written


# ----------------------------------------------------------------------------------------------------------
# kill -9: a run stopped any way leaves a folder that loads (or none yet), and the same command finishes it
# ----------------------------------------------------------------------------------------------------------
TRAIN = ["-m", "lessons_lib", "train", "--preset", "tiny", "--max-steps", "60", "--checkpoint-every", "3",
         "--device", "cpu", "--no-progress", "--amp", "off"]


def _spawn(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *TRAIN, "--out-dir", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(condition, proc, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.0005)
    return False


@needs_data
@pytest.mark.parametrize("when", ["start-up", "between checkpoints", "during a checkpoint write"])
def test_sigkill_leaves_a_loadable_folder_and_rerunning_finishes(tmp_path, when):
    out = tmp_path / "run"
    proc = _spawn(out)
    if when == "start-up":
        time.sleep(0.3)
    elif when == "between checkpoints":
        assert _wait_for(lambda: (out / "config.json").exists(), proc)
        time.sleep(0.05)
    else:
        assert _wait_for(lambda: any(out.glob(".*.tmp")), proc), "never saw a checkpoint being written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if (out / "config.json").exists():
        _, config = load_pretrained(out)  # the weights match their config: the pair was never half-written
        assert 0 < config["step"] <= 60
    else:
        assert not (out / "model.safetensors").exists()  # cleanly empty: nothing half-saved
    rerun = subprocess.run([sys.executable, *TRAIN, "--out-dir", str(out)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr
    _, config = load_pretrained(out)
    assert config["step"] == 60


def test_lesson_01_follows_its_T(tmp_path, monkeypatch):
    """The steps lesson 01 shows are derived from its parameter T, so a shorter schedule runs too."""
    monkeypatch.setenv("LESSONS_SMOKE", "1")
    monkeypatch.setenv("LESSONS_HEADLESS", "1")
    results = course.run_course(smoke=True, only=["01"], parameters={"T": 200})
    assert [r.ok for r in results] == [True], results[0].error
