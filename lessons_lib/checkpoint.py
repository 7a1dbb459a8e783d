"""Persistence: inference weights as safetensors + a JSON config, and atomic writes for everything.

Inference weights (``model.safetensors`` + ``config.json``) are separate from the resume checkpoint
(``resume.pt``, written by the trainer): the first is small, safe to share and loads without pickle; the
second holds the optimizer and RNG state and is read with ``torch.load(weights_only=True)``.
Every file is written to a temporary name and renamed into place, so an interrupted save never
destroys the last good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import __version__
from .schedules import NoiseSchedule, schedule_record
from .unet import UNet, UNetConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"
AUTOENCODER_WEIGHTS, AUTOENCODER = "autoencoder.safetensors", "autoencoder"  # a latent model's decoder: file, config section
_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DistributedDataParallel


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the saved file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_all(contents: dict[Path, bytes]) -> None:
    """Write every file to a temporary name first, then rename them all at once: a process killed while
    saving leaves the old set or the new one (bar the instant between two renames), never a half-written file."""
    temps = {}
    try:
        for path, data in contents.items():
            temps[path] = tmp = Path(path).parent / f".{Path(path).name}.{os.getpid()}.tmp"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``_orig_mod.`` / ``module.`` prefixes, nested in any order, and move tensors to contiguous CPU memory."""
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):  # e.g. module._orig_mod. (DDP around a compiled model)
            key = key.split(".", 1)[1]
        out[key] = value.detach().to("cpu").contiguous()
    return out


def pipeline_record(schedule: NoiseSchedule, prediction: str, image_size: int, classes) -> dict:
    """The ``pipeline`` section of a model's config.json: what sampling needs besides the network."""
    return {"schedule": schedule_record(schedule), "prediction": prediction, "image_size": int(image_size),
            "classes": list(classes)}


def writable_folder(path: str | Path, what: str = "folder") -> Path:
    """``path`` as a folder that exists and can be written, created if needed; checked before any work starts,
    so a long run or a batch of samples is never lost for want of a place to save it."""
    path = Path(path).expanduser()
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{what} {path} cannot be a folder: {blocking} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be created: {err.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} is not writable")
    return path


def save_pretrained(model: UNet, path: str | Path, metadata: dict | None = None,
                    autoencoder: torch.nn.Module | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` (architecture, metadata, sha256 of the weights).

    With ``autoencoder`` (a latent diffusion model), its weights go beside the network's in the same folder
    (``autoencoder.safetensors``) and its config and sha256 into the ``autoencoder`` section of the same config.json:
    one folder, one config, written together."""
    path = Path(path)
    weights = save(clean_state_dict(model.state_dict()))  # the safetensors file's bytes
    config = {
        "model": model.config.to_dict(),
        "lessons_lib_version": __version__,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        **(metadata or {}),
    }
    files = {path / WEIGHTS: weights}
    if autoencoder is not None:
        files[path / AUTOENCODER_WEIGHTS] = ae_weights = save(clean_state_dict(autoencoder.state_dict()))
        config[AUTOENCODER] = autoencoder_record(autoencoder, ae_weights)
    files[path / CONFIG] = (json.dumps(config, indent=2) + "\n").encode()
    atomic_write_all(files)
    return path


def autoencoder_record(autoencoder: torch.nn.Module, weights: bytes) -> dict:
    """The ``autoencoder`` section of a config.json: its config (scale factor included) and its weights' sha256."""
    return {"config": autoencoder.config.to_dict(), "weights_sha256": hashlib.sha256(weights).hexdigest()}


def read_config(path: str | Path) -> dict:
    """The JSON config of a saved model folder, with a clear error when it is missing or malformed."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file; give the model folder that holds {WEIGHTS} and {CONFIG} "
                              "(for a trainer's resume.pt, that is the folder it lies in)")
    file = path / CONFIG
    if not file.is_file() and (path / "resume.pt").is_file():
        raise CheckpointError(f"{path} holds only a trainer's resume.pt, no {CONFIG}: run the same "
                              f"`python -m lessons_lib train ... --out-dir {path}` command again; it resumes and writes "
                              "the model folder (EMA weights) with its first checkpoint")
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a model folder holds {WEIGHTS} and {CONFIG}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def read_verified(path: str | Path, weights_name: str = WEIGHTS) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a saved folder, after checking the weights' sha256 against the config
    (``weights_name``: the network's file, or :data:`AUTOENCODER_WEIGHTS` checked against the ``autoencoder`` section)."""
    path = Path(path)
    config = read_config(path)
    weights = path / weights_name
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found")
    section = config.get(AUTOENCODER, {}) if weights_name == AUTOENCODER_WEIGHTS else config
    expected = section.get("weights_sha256") if isinstance(section, dict) else None
    if not expected:
        raise CheckpointError(f"{path / CONFIG} has no weights_sha256 for {weights_name}: cannot verify {weights}")
    actual = sha256_file(weights)
    if actual != expected:
        raise CheckpointError(f"{weights}: sha256 {actual[:12]}... does not match {expected[:12]}... in {CONFIG} "
                              "(truncated or replaced file; restore it with git or retrain)")
    try:
        return config, clean_state_dict(load_file(str(weights), device="cpu"))  # no device is stored: CUDA saves load anywhere
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({err})") from err


def load_pretrained(path: str | Path, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Rebuild the model saved by :func:`save_pretrained`; returns ``(model in eval mode, config)``.

    Checks the weights' sha256 against the config (a truncated or replaced file), that the weights are
    safetensors and the config a JSON object with a valid ``model`` section, and reports missing or
    unexpected keys and shape mismatches by name. Weights saved on CUDA, or from a compiled or DDP
    model (``_orig_mod.`` / ``module.`` prefixes), load on any device.
    """
    config, state = read_verified(path)
    model = UNet(model_config(config, Path(path) / CONFIG))
    load_state(model, state)
    return model.to(device).eval(), config


def model_config(config: dict, source: str | Path = CONFIG) -> UNetConfig:
    """The :class:`UNetConfig` in ``config["model"]``, naming unknown or invalid fields."""
    fields = config.get("model")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{source} has no 'model' section describing the network")
    unknown = sorted(set(fields) - set(UNetConfig.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"{source}: unknown model fields {unknown}; allowed: {', '.join(UNetConfig.__dataclass_fields__)}")
    try:
        return UNetConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: invalid model config ({err})") from err


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` with one error listing every missing key, unexpected key and shape mismatch."""
    own = model.state_dict()
    state = clean_state_dict(state)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}" if missing else "",
                 f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}" if unexpected else "",
                 f"shape mismatches {shapes[:8]}" if shapes else ""]
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state)
