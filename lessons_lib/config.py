"""Where the course lives on disk and which mode it runs in.

Paths resolve from the repository root, never from the working directory, so a notebook opened from
any folder finds the same data. ``LESSONS_ROOT`` overrides the root (e.g. for a non-editable install).
"""

from __future__ import annotations

import os
from pathlib import Path


def _find_repo_root() -> Path:
    if "LESSONS_ROOT" in os.environ:
        return Path(os.environ["LESSONS_ROOT"]).expanduser().resolve()
    package_parent = Path(__file__).resolve().parent.parent
    if (package_parent / "pyproject.toml").exists():
        return package_parent
    return Path.home() / ".cache" / "lessons_lib"  # installed as a plain package: cache beside the user


REPO_ROOT = _find_repo_root()
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = REPO_ROOT / "build"
PRETRAINED_DIR = REPO_ROOT / "data" / "pretrained"
PRETRAINED_MODEL = PRETRAINED_DIR / "ddpm_fmnist"  # the shipped class-conditional model (see its model card)


def data_dir() -> Path:
    """The folder where datasets are cached: ``$LESSONS_DATA`` if set, else ``<repo>/data``."""
    return Path(os.environ.get("LESSONS_DATA", REPO_ROOT / "data")).expanduser().resolve()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def smoke_mode() -> bool:
    """True when ``LESSONS_SMOKE=1``: lessons shrink their parameters so CI runs them in seconds."""
    return _flag("LESSONS_SMOKE")


HEADLESS_FLAGS = ("LESSONS_SMOKE", "LESSONS_HEADLESS", "CI")


def headless_because() -> list[str]:
    """The environment variables that turn the widgets into static figures (empty: live widgets)."""
    return [name for name in HEADLESS_FLAGS if _flag(name)]


def headless() -> bool:
    """True when nobody is looking (papermill, nbval, CI): widgets draw a static figure instead."""
    return bool(headless_because())
