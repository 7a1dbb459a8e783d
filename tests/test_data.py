"""Data loading: IDX parsing, the search order, checksums, clear errors, RGB paths and loaders."""

import gzip
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from lessons_lib import config, data

REAL = data.find_fashion_mnist("train") is not None and data.find_fashion_mnist("test") is not None
needs_real = pytest.mark.skipif(not REAL, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array in the IDX format, written independently of the parser under test."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty $LESSONS_DATA and no Debian folder: nothing is found unless a test puts it there."""
    monkeypatch.setenv("LESSONS_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


# --------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    raw = idx_bytes(images)
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    np.testing.assert_array_equal(data.read_idx(path), images)
    labels = np.arange(7, dtype=">i4")
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(labels)), labels)


@pytest.mark.parametrize("raw, message", [
    (b"", "not an IDX file"),
    (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "not an IDX file"),
    (b"\x00\x00\x07\x01", "not an IDX file"),
    (b"\x00\x00\x08\x03" + (2).to_bytes(4, "big"), "header is truncated"),
    (b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"abc", r"shape \(10,\) \(10 bytes of data\) but the file holds 3"),
    (idx_bytes(np.zeros((2, 2), np.uint8)) + b"extra", "holds 9"),
])
def test_corrupt_idx_gives_clear_error(raw, message):
    with pytest.raises(data.IdxFormatError, match=message):
        data.parse_idx(raw, "f")


def test_truncated_gzip_gives_clear_error(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((100, 28, 28), np.uint8)))[:50])
    with pytest.raises(data.IdxFormatError, match="cannot read it"):
        data.read_idx(path)


def test_checksum_mismatch(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8)))
    with pytest.raises(data.IdxFormatError, match="checksum mismatch"):
        data.read_idx(path, expected_sha256="0" * 64)


# ------------------------------------------------------------------------------------- search order
def test_search_order(isolated, tmp_path):
    dirs = data.candidate_dirs()
    assert dirs == [isolated / "FashionMNIST" / "raw", isolated / "fashion-mnist", isolated, tmp_path / "no-debian"]
    assert data.candidate_dirs(tmp_path) == [tmp_path]


def test_fake_files_fail_the_checksum(isolated):
    """Files in the right place and format, but not Fashion-MNIST: rejected by checksum, never half-loaded."""
    (isolated / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    (isolated / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    assert data.find_fashion_mnist("test") == isolated
    with pytest.raises(data.IdxFormatError, match="checksum mismatch"):
        data.load_fashion_mnist("test", download=False)


def test_nothing_found_names_all_three_ways(isolated):
    with pytest.raises(data.DataNotFoundError) as err:
        data.load_fashion_mnist("test", download=False)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "python -m lessons_lib data" in message
    assert "copy" in message and "LESSONS_DATA" in message


def test_failed_download_names_all_three_ways(isolated, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(data.DataNotFoundError, match=r"(?s)apt-get.*lessons_lib data.*by hand.*download failed.*no network"):
        data.load_fashion_mnist("train")


def test_bad_split():
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\)"):
        data.load_fashion_mnist("validation")


@needs_real
def test_real_fashion_mnist():
    train, test = data.load_fashion_mnist("train"), data.load_fashion_mnist("test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.classes[9] == "Ankle boot" and len(train.classes) == 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.min() >= -1 and x.max() <= 1 and y == 9
    xb, yb = test.batch(slice(0, 5))
    assert xb.shape == (5, 1, 28, 28) and yb.shape == (5,)


@needs_real
def test_torchvision_layout_in_data_dir_is_preferred(isolated):
    source = data.find_fashion_mnist("test")
    assert source is None  # isolated
    raw = isolated / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    real = Path("/usr/share/datasets/fashion-mnist")
    if not (real / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("needs the Debian copy to build a torchvision layout")
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(real / f"{name}.gz") as src, open(raw / name, "wb") as dst:  # torchvision unpacks them
            shutil.copyfileobj(src, dst)
    ds = data.load_fashion_mnist("test", download=False)
    assert ds.source == str(raw) and len(ds) == 10000


@needs_real
def test_truncated_real_file_is_a_clear_error(isolated):
    real = data.find_fashion_mnist("test", root="/usr/share/datasets/fashion-mnist")
    if real is None:
        pytest.skip("needs the Debian copy")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        blob = (real / name).read_bytes()
        (isolated / name).write_bytes(blob[: len(blob) // 2] if "images" in name else blob)
    with pytest.raises(data.IdxFormatError, match="cannot read it"):
        data.load_fashion_mnist("test", download=False)


def test_paths_resolve_from_repo_root_not_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("LESSONS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert config.data_dir() == config.REPO_ROOT / "data"
    assert (config.REPO_ROOT / "pyproject.toml").exists()


# ------------------------------------------------------------------------------------ scaling
def test_scaling_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = data.to_model(u8)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(data.to_uint8(x), u8)
    torch.testing.assert_close(data.to_unit(x), u8.float() / 255)
    assert data.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clipped


# ------------------------------------------------------------------------------------ RGB paths
def _write_images(folder: Path, colours, size=(48, 64)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", size, colour).save(folder / f"img{i}.png")


def test_image_folder_with_classes(tmp_path):
    _write_images(tmp_path / "reds", [(255, 0, 0), (255, 0, 0)], size=(64, 48))
    _write_images(tmp_path / "blues", [(0, 0, 255)], size=(40, 90))
    (tmp_path / "reds" / "notes.txt").write_text("not an image")
    ds = data.load_image_folder(tmp_path, size=32)
    assert ds.classes == ["blues", "reds"] and len(ds) == 3
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0
    torch.testing.assert_close(x, torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 32, 32))
    x, y = ds[2]
    assert y == 1 and torch.allclose(x[0], torch.ones(32, 32))


def test_flat_image_folder_grey(tmp_path):
    _write_images(tmp_path / "flat", [(255, 255, 255), (0, 0, 0)])
    ds = data.load_image_folder(tmp_path / "flat", size=16, channels=1)
    assert ds.classes == ["flat"] and len(ds) == 2
    x, _ = ds[0]
    assert x.shape == (1, 16, 16)
    batch, _ = next(iter(data.make_dataloader(ds, 2, shuffle=False, num_workers=0)))
    assert batch.shape == (2, 1, 16, 16) and batch.max() == 1 and batch.min() == -1


def test_image_folder_errors(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="does not exist"):
        data.load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataNotFoundError, match="no images"):
        data.load_image_folder(tmp_path / "empty")
    _write_images(tmp_path / "one", [(1, 2, 3)])
    with pytest.raises(ValueError, match="channels must be 1"):
        data.load_image_folder(tmp_path / "one", channels=4)
    with pytest.raises(ValueError, match="size must be an int >= 8"):
        data.load_image_folder(tmp_path / "one", size=4)


def test_cifar10_wrapper(tmp_path, monkeypatch):
    import torchvision

    class FakeCIFAR:
        def __init__(self, root, train, download):
            self.data = np.full((4, 32, 32, 3), (255, 0, 128), dtype=np.uint8)
            self.targets = [0, 1, 2, 9]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    ds = data.load_cifar10("test", root=tmp_path)
    assert ds.images.shape == (4, 3, 32, 32) and ds.classes[9] == "truck"
    x, y = ds[3]
    assert y == 9 and x[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)


def test_cifar10_missing_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision

    def missing(*args, **kwargs):
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", missing)
    with pytest.raises(data.DataNotFoundError, match=r"(?s)CIFAR-10 was not found.*download=True.*cifar-10-batches-py"):
        data.load_cifar10(root=tmp_path, download=False)


# ---------------------------------------------------------------------------------- DataLoader
def test_dataloader_settings_and_seeded_shuffle(tmp_path):
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    ds = data.ImageDataset(images, torch.arange(20), [str(i) for i in range(20)], "test")
    loader = data.make_dataloader(ds, 4, device="cpu", seed=3)
    assert loader.num_workers == 0 and loader.pin_memory is False and loader.drop_last
    order = lambda: torch.cat([y for _, y in data.make_dataloader(ds, 4, seed=3)])  # noqa: E731
    assert torch.equal(order(), order()) and not torch.equal(order(), torch.arange(20))
    _write_images(tmp_path / "f", [(0, 0, 0)])
    assert data.default_num_workers(data.load_image_folder(tmp_path / "f")) == min(4, max(0, (os.cpu_count() or 1) - 1))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        data.make_dataloader(ds, 0)


def test_image_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        data.ImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2), ["a"], "x")
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        data.ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3), ["a"], "x")
