"""Saving and loading: sha256 checks, key/shape errors by name, prefixes, permissions."""

import json
import os

import pytest
import torch

from lessons_lib.checkpoint import CheckpointError, atomic_write, load_pretrained, load_state, save_pretrained
from lessons_lib.unet import UNet, UNetConfig

CFG = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2, num_res_blocks=1)


def test_round_trip_and_permissions(tmp_path):
    torch.manual_seed(0)
    model = UNet(CFG)
    save_pretrained(model, tmp_path, metadata={"note": "x"})
    loaded, config = load_pretrained(tmp_path)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert config["note"] == "x" and not loaded.training
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask


def test_corrupt_and_mismatched_files_are_clear_errors(tmp_path):
    save_pretrained(UNet(CFG), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        load_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weights_sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has no weights_sha256"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_pretrained(tmp_path / "nowhere")


def test_load_state_names_bad_keys_and_strips_prefixes():
    model = UNet(CFG)
    state = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}  # compiled DDP model
    load_state(model, state)
    state = dict(model.state_dict())
    state.pop("stem.weight")
    state["extra.weight"] = torch.zeros(1)
    state["head.2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"missing keys \['stem.weight'\].*unexpected keys \['extra.weight'\].*head.2.bias"):
        load_state(model, state)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("good")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == "good" and list(tmp_path.iterdir()) == [path]
