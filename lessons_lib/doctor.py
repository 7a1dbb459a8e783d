"""``python -m lessons_lib doctor``: what this machine has, and what is known not to work together."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata

import torch

from . import __version__
from .data import HOW_TO_GET_DATA, data_status
from .device import autocast_dtype, get_device

PACKAGES = ("torch", "torchvision", "numpy", "matplotlib", "jupyterlab", "ipykernel", "ipywidgets",
            "jupyterlab_widgets", "widgetsnbextension", "tqdm", "safetensors")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _major(version: str | None) -> int | None:
    return int(version.split(".")[0]) if version else None


@dataclass
class Report:
    versions: dict[str, str | None]
    device: str
    autocast: str
    cuda: str
    mps: bool
    data: dict[str, str | None]
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"lessons_lib {__version__} on Python {platform.python_version()} ({sys.platform})"]
        lines += [f"  {name:<20} {version or 'not installed'}" for name, version in self.versions.items()]
        lines += [f"  {'CUDA':<20} {self.cuda}", f"  {'MPS':<20} {'available' if self.mps else 'not available'}",
                  f"  {'device':<20} {self.device} (mixed precision: {self.autocast})"]
        lines += [f"  {'data (' + split + ')':<20} {where or 'NOT FOUND'}" for split, where in self.data.items()]
        lines += ["", "No known problems." if not self.problems else "Problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def find_problems(versions: dict[str, str | None], data: dict[str, str | None]) -> list[str]:
    """Known-bad combinations, each with the command that fixes it."""
    problems = []
    widgets, lab_widgets, lab = (versions.get(k) for k in ("ipywidgets", "jupyterlab_widgets", "jupyterlab"))
    if widgets is None:
        problems.append("ipywidgets is missing: the explorers cannot run (pip install 'ipywidgets>=8.1').")
    elif lab is not None and lab_widgets is None:
        problems.append("jupyterlab_widgets (the widgets front end) is missing: sliders show as text in "
                        "JupyterLab (pip install 'jupyterlab_widgets>=3').")
    elif _major(widgets) == 8 and lab_widgets is not None and _major(lab_widgets) < 3:
        problems.append(f"ipywidgets {widgets} needs jupyterlab_widgets >= 3, found {lab_widgets}.")
    elif _major(widgets) == 7 and _major(lab) and _major(lab) >= 4:
        problems.append(f"ipywidgets {widgets} does not render in JupyterLab {lab}: pip install 'ipywidgets>=8.1'.")
    if not all(data.values()):
        problems.append(HOW_TO_GET_DATA.replace("\n", "\n    "))
    return problems


def doctor() -> Report:
    """Collect versions, the chosen device and where the data is; the report prints as a table."""
    versions = {name: _version(name) for name in PACKAGES}
    device = get_device()
    status = data_status()
    data = {"train": status.train and str(status.train), "test": status.test and str(status.test)}
    if torch.cuda.is_available():
        cuda = f"{torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
    else:
        build = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        cuda = f"not available ({build})"
    return Report(
        versions=versions,
        device=str(device),
        autocast=str(autocast_dtype(device)).replace("torch.", "") if autocast_dtype(device) else "off (fp32)",
        cuda=cuda,
        mps=torch.backends.mps.is_available(),
        data=data,
        problems=find_problems(versions, data),
    )
