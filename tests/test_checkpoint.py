"""Saving and loading: sha256 checks, key/shape errors by name, prefixes, permissions, safe loading."""

import ast
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lessons_lib.checkpoint import (
    CheckpointError,
    atomic_write,
    clean_state_dict,
    load_pretrained,
    load_state,
    save_pretrained,
    sha256_file,
)
from lessons_lib.config import REPO_ROOT
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


def test_clean_state_dict_strips_nested_wrapper_prefixes_in_one_pass():
    value = torch.zeros(2)
    state = {"module._orig_mod.stem.weight": value, "_orig_mod.module._orig_mod.head.2.bias": value, "up.0.module": value}
    assert list(clean_state_dict(state)) == ["stem.weight", "head.2.bias", "up.0.module"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("good")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == "good" and list(tmp_path.iterdir()) == [path]


def test_a_file_instead_of_a_folder_and_malformed_configs_are_named(tmp_path):
    save_pretrained(UNet(CFG), tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors is a file; give the model folder"):
        load_pretrained(tmp_path / "model.safetensors")
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    for bad, message in [("[1, 2]", "must hold a JSON object, got list"), ("{", "is not valid JSON"),
                         (json.dumps({**config, "model": {**config["model"], "widht": 3}}), r"unknown model fields \['widht'\]"),
                         (json.dumps({**config, "model": {**config["model"], "variant": "huge"}}), "unknown variant 'huge'"),
                         (json.dumps({k: v for k, v in config.items() if k != "model"}), "no 'model' section")]:
        config_file.write_text(bad)
        with pytest.raises(CheckpointError, match=message):
            load_pretrained(tmp_path)


def test_a_file_of_another_type_is_a_clear_error_even_with_a_matching_sha256(tmp_path):
    model = UNet(CFG)
    save_pretrained(model, tmp_path)
    torch.save(model.state_dict(), tmp_path / "model.safetensors")  # a pickle under the safetensors name
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "weights_sha256": sha256_file(tmp_path / "model.safetensors")}))
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load_pretrained(tmp_path)


def test_weights_saved_with_compile_or_ddp_prefixes_load(tmp_path):
    model = UNet(CFG)
    save_pretrained(model, tmp_path)
    prefixed = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}  # as a raw save of a wrapped model
    save_file(prefixed, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "weights_sha256": sha256_file(tmp_path / "model.safetensors")}))
    loaded, _ = load_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_every_torch_load_in_the_project_is_weights_only():
    """Unpickling runs arbitrary code: every torch.load in the library, tests and benchmarks passes weights_only=True
    (lesson 08 calls weights_only=False on purpose, to show what a pickle can do)."""
    calls = 0
    for file in [f for d in ("lessons_lib", "tests", "benchmarks") for f in (REPO_ROOT / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                assert safe, f"{file.relative_to(REPO_ROOT)}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 1  # the trainer's resume


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_saved_model_loads_on_the_cpu(tmp_path):
    model = UNet(CFG).cuda()
    save_pretrained(model, tmp_path)
    loaded, _ = load_pretrained(tmp_path, device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert all(torch.equal(a.cpu(), b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))
