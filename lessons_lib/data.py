"""The data: Fashion-MNIST (the course default), CIFAR-10, and any folder of images.

Inside the library images are float tensors ``(B, C, H, W)`` in [-1, 1]; uint8 lives only here, at
the edge. Fashion-MNIST is looked for, in order, in

1. ``root`` if you pass one (then only there);
2. ``$LESSONS_DATA`` or ``<repo>/data`` — torchvision's layout (``FashionMNIST/raw``), a
   ``fashion-mnist/`` folder, or the IDX files directly, gzipped or not;
3. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package);
4. a download with torchvision into ``<repo>/data`` where a network exists.

Every file is checked: IDX header, item count, and the SHA-256 of its uncompressed bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import REPO_ROOT, data_dir

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
SPLITS = ("train", "test")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# name -> (item count, SHA-256 of the *uncompressed* IDX bytes): independent of how a mirror gzips them.
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": (60000, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": (60000, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": (10000, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": (10000, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET_DATA = f"""\
Fashion-MNIST was not found. Any one of these fixes it:
  1. Debian/Ubuntu:  sudo apt-get install dataset-fashion-mnist   (files land in {DEBIAN_DIR})
  2. with a network: python -m lessons_lib data                     (downloads into {REPO_ROOT / 'data'})
  3. by hand: copy train-/t10k-{{images-idx3,labels-idx1}}-ubyte[.gz] into {REPO_ROOT / 'data'}
     (or into the folder named by $LESSONS_DATA)"""


class DataNotFoundError(FileNotFoundError):
    """No copy of a dataset was found and none could be downloaded."""


class IdxFormatError(ValueError):
    """A file is not a valid IDX file (wrong magic, truncated, wrong count or checksum)."""


# ---------------------------------------------------------------------------------------------------
# IDX files (the format of MNIST and Fashion-MNIST: http://yann.lecun.com/exdb/mnist/)
# ---------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise IdxFormatError(f"{path}: cannot read it ({err}); delete it and get the data again") from err


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes: 2 zero bytes, a dtype code, the number of dimensions, big-endian uint32 sizes."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise IdxFormatError(f"{name}: not an IDX file (header bytes {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise IdxFormatError(f"{name}: IDX header is truncated or has {ndim} dimensions")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{name}: header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt — delete it and get the data again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: str | Path, expected_sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``), optionally checking the SHA-256 of its uncompressed bytes."""
    path = Path(path)
    raw = _read_bytes(path)
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise IdxFormatError(f"{path}: checksum mismatch (not the official file, or corrupt); delete it and get the data again")
    return parse_idx(raw, str(path))


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------
def to_model(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float in [-1, 1] (the range the model works in)."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 pixels, clipping what lies outside."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> float in [0, 1], for plotting and saving."""
    return ((x.detach().float() + 1) / 2).clamp(0, 1)


class ImageDataset(Dataset):
    """An in-memory image dataset: uint8 ``images`` (N, C, H, W), int64 ``labels``, class names.

    Indexing returns ``(x, y)`` with ``x`` a float tensor in [-1, 1].
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], source: str):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.classes, self.source = tuple(classes), source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_model(self.images[index]), int(self.labels[index])

    def batch(self, indices: Sequence[int] | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Several items at once: float images in [-1, 1] and their labels."""
        return to_model(self.images[indices]), self.labels[indices]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset({n} images of {c}x{h}x{w}, {len(self.classes)} classes, from {self.source})"


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def candidate_dirs(root: str | Path | None = None) -> list[Path]:
    """Folders searched for the IDX files, in order."""
    if root is not None:
        return [Path(root).expanduser()]
    base = data_dir()
    return [base / "FashionMNIST" / "raw", base / "fashion-mnist", base, DEBIAN_DIR]


def find_fashion_mnist(split: str = "train", root: str | Path | None = None) -> Path | None:
    """The first folder holding both IDX files of ``split``, or None (nothing is downloaded)."""
    _check_split(split)
    for folder in candidate_dirs(root):
        if all(_idx_file(folder, name) for name in _SPLIT_FILES[split]):
            return folder
    return None


def _download_fashion_mnist(split: str) -> Path:
    import torchvision

    target = data_dir()
    try:
        torchvision.datasets.FashionMNIST(str(target), train=split == "train", download=True)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError... all mean "no data"
        raise DataNotFoundError(f"{HOW_TO_GET_DATA}\n(the download failed: {err})") from err
    return target / "FashionMNIST" / "raw"


def load_fashion_mnist(split: str = "train", root: str | Path | None = None, download: bool = True) -> ImageDataset:
    """Fashion-MNIST as an :class:`ImageDataset` of 1x28x28 images with labels and class names.

    ``root`` restricts the search to one folder. With ``download=False`` nothing is fetched.
    """
    _check_split(split)
    folder = find_fashion_mnist(split, root)
    if folder is None:
        if root is not None:
            raise DataNotFoundError(f"no Fashion-MNIST {split} files in {root}.\n{HOW_TO_GET_DATA}")
        if not download:
            raise DataNotFoundError(HOW_TO_GET_DATA)
        folder = _download_fashion_mnist(split)
    images_name, labels_name = _SPLIT_FILES[split]
    arrays = {}
    for name in (images_name, labels_name):
        count, sha256 = FASHION_MNIST_FILES[name]
        arrays[name] = read_idx(_idx_file(folder, name), expected_sha256=sha256)
        if len(arrays[name]) != count:  # a valid IDX file of the wrong size: not Fashion-MNIST
            raise IdxFormatError(f"{folder / name}: {len(arrays[name])} items, expected {count}")
    images = torch.from_numpy(arrays[images_name].copy()).unsqueeze(1)  # (N, 1, 28, 28)
    labels = torch.from_numpy(arrays[labels_name].astype(np.int64))
    return ImageDataset(images, labels, FASHION_MNIST_CLASSES, source=str(folder))


# ---------------------------------------------------------------------------------------------------
# RGB data: CIFAR-10 and folders of images
# ---------------------------------------------------------------------------------------------------
def load_cifar10(split: str = "train", root: str | Path | None = None, download: bool = True) -> ImageDataset:
    """CIFAR-10 (3x32x32) through torchvision, from ``root``/``<repo>/data`` or downloaded there."""
    import torchvision

    _check_split(split)
    root = Path(root).expanduser() if root is not None else data_dir()
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
    except Exception as err:
        raise DataNotFoundError(
            f"CIFAR-10 was not found in {root} ({err}).\n"
            f"  with a network: load_cifar10(download=True) fetches it (170 MB);\n"
            f"  by hand: unpack cifar-10-python.tar.gz into {root}/cifar-10-batches-py"
        ) from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return ImageDataset(images, torch.tensor(ds.targets), CIFAR10_CLASSES, source=str(root))


class ImageFolderDataset(Dataset):
    """Any folder of images, resized (shorter side) and centre-cropped to ``size``, scaled to [-1, 1].

    Sub-folders are classes (torchvision's ``ImageFolder`` layout); a flat folder is one class.
    Images are read lazily, so large folders work; pair it with :func:`make_dataloader`.
    """

    def __init__(self, root: str | Path, size: int = 32, channels: int = 3):
        from torchvision import transforms
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataNotFoundError(f"image folder {self.root} does not exist")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an int >= 8, got {size!r}")
        subdirs = [d for d in self.root.iterdir() if d.is_dir()]
        if subdirs:
            self.classes, class_to_idx = find_classes(str(self.root))
            self.samples = make_dataset(str(self.root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        else:
            self.classes = [self.root.name]
            files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
            self.samples = [(str(p), 0) for p in files]
        if not self.samples:
            raise DataNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {self.root}")
        self.channels, self.size, self.source = channels, size, str(self.root)
        self.transform = transforms.Compose([
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.PILToTensor(),
        ])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            return to_model(self.transform(img)), label


def load_image_folder(root: str | Path, size: int = 32, channels: int = 3) -> ImageFolderDataset:
    """A folder of images as a dataset of ``channels x size x size`` tensors in [-1, 1]."""
    return ImageFolderDataset(root, size=size, channels=channels)


# ---------------------------------------------------------------------------------------------------
# Loading batches
# ---------------------------------------------------------------------------------------------------
def default_num_workers(dataset: Dataset) -> int:
    """Worker processes for a DataLoader: none for in-memory data, a few for images read from disk.

    In-memory tensors are indexed faster than workers can ship them; decoding files benefits from
    parallelism, except on Windows where spawning workers from a notebook is slow and fragile.
    """
    if isinstance(dataset, ImageDataset) or sys.platform == "win32":
        return 0
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    num_workers: int | None = None,
) -> DataLoader:
    """A DataLoader with sensible per-device settings and a seeded shuffle.

    ``pin_memory`` only for CUDA; ``num_workers`` from :func:`default_num_workers` unless given.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    workers = default_num_workers(dataset) if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


@dataclass(frozen=True)
class DataStatus:
    """Where Fashion-MNIST was found (for ``doctor``), or None per split."""

    train: Path | None
    test: Path | None


def data_status() -> DataStatus:
    return DataStatus(find_fashion_mnist("train"), find_fashion_mnist("test"))
