"""Export: each format and precision agrees with the eager U-Net at batch sizes it was not traced at, and
samples in a fresh process that imports no lessons_lib code, equal to the library's DDIM samples."""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

from lessons_lib import export as E
from lessons_lib.cli import main
from lessons_lib.data import find_fashion_mnist
from lessons_lib.device import randn
from lessons_lib.pipeline import DiffusionPipeline
from lessons_lib.samplers import get_sampler, sample
from lessons_lib.schedules import get_schedule
from lessons_lib.standalone_sampler import ddim_sample
from lessons_lib.train import preset
from lessons_lib.unet import UNet

# max |exported - eager fp32| / max |eager fp32| for one network call, on a random tiny U-Net
NET_TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 3e-2, "int8": 0.25}
# standalone sample vs library sample after 10 DDIM steps with guidance 2 (images in [-1, 1]): fp32, max |diff|;
# lower precisions, mean |diff|: a random net's samples are ~90% saturated at -1 or 1, so single pixels flip sign
IMAGE_TOLERANCE = {"fp32": 1e-3, "fp16": 0.02, "bf16": 0.02, "int8": 0.1}
STEPS, GUIDANCE, LABELS = 10, 2.0, [0, 3, 10, 7]  # 10 = the null class


def tiny_pipe(prediction: str = "eps") -> DiffusionPipeline:
    torch.manual_seed(0)
    return DiffusionPipeline(UNet(preset("tiny").model).eval(), get_schedule("cosine", 100), prediction)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny U-Net in every CPU format and precision (AOTInductor has its own test: it compiles for minutes)."""
    pipe, out = tiny_pipe(), tmp_path_factory.mktemp("export")
    artifacts = {("torch_export", p): E.export_torch_export(pipe, out / E.artifact_name("torch_export", p), p, "cpu")
                 for p in ("fp32", "bf16")}
    artifacts["onnx", "fp32"] = E.export_onnx(pipe, out / E.artifact_name("onnx", "fp32"), device="cpu")
    artifacts["onnx", "int8"] = E.quantize_int8(pipe, out / E.artifact_name("onnx", "int8"), artifacts["onnx", "fp32"])
    with pytest.warns(FutureWarning, match="TorchScript is deprecated"):
        artifacts["torchscript", "fp32"] = E.export_torchscript(pipe, out / E.artifact_name("torchscript", "fp32"), device="cpu")
    return pipe, artifacts


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("key", [("torch_export", "fp32"), ("torch_export", "bf16"), ("onnx", "fp32"), ("onnx", "int8"),
                                 ("torchscript", "fp32")], ids="-".join)
def test_exported_network_matches_eager_at_other_batch_sizes(exported, key):
    pipe, artifacts = exported
    net = E.load_exported(artifacts[key])
    assert (net.format, net.precision) == key
    for batch in (1, 5):
        assert batch != E.EXAMPLE_BATCH
        g = torch.Generator().manual_seed(batch)
        x, t = torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 100, (batch,), generator=g)
        labels = torch.randint(0, 11, (batch,), generator=g)
        with torch.no_grad():
            want = pipe.model(x, t, labels)
        got = net(x, t, labels)
        assert got.shape == want.shape and got.dtype == x.dtype
        assert relative_error(got, want) < NET_TOLERANCE[key[1]], key


def library_samples(pipe: DiffusionPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    x_T = randn((len(LABELS), 1, 28, 28), seed=0)
    sampler = get_sampler("ddim", pipe.schedule, STEPS, spacing="trailing", prediction=pipe.prediction)
    return x_T, sample(pipe.model, x_T, sampler, torch.tensor(LABELS), guidance_scale=GUIDANCE, progress=False).images


def run_standalone(paths, tmp_path, shape=(1, 28, 28)) -> list[np.ndarray]:
    """Sample with the copied standalone_sampler.py from each artifact, all in ONE fresh process (ONNX ones first),
    checking that the ONNX runs needed no torch and that nothing imported lessons_lib."""
    np.save(tmp_path / "x_T.npy", randn((len(LABELS), *shape), seed=0).numpy())
    paths = sorted(paths, key=lambda p: p.suffix != ".onnx")
    jobs = [[str(p), "--noise", str(tmp_path / "x_T.npy"), "--class", *map(str, LABELS), "--steps", str(STEPS),
             "--guidance", str(GUIDANCE), "--out", str(tmp_path / f"out{i}.npy")] for i, p in enumerate(paths)]
    script = textwrap.dedent("""
        import json, runpy, sys
        runner, jobs = sys.argv[1], json.loads(sys.argv[2])
        for args in jobs:
            sys.argv = [runner, *args]
            try:
                runpy.run_path(runner, run_name="__main__")
            except SystemExit as done:
                assert not done.code, (args, done.code)
            if args[0].endswith(".onnx"):
                assert "torch" not in sys.modules, "the ONNX path imported torch"
        assert not [m for m in sys.modules if m.startswith("lessons_lib")], "the runner imported lessons_lib"
    """)
    runner = paths[0].parent / "standalone_sampler.py"
    done = subprocess.run([sys.executable, "-c", script, str(runner), json.dumps(jobs)], cwd=tmp_path,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [np.load(tmp_path / f"out{i}.npy") for i in range(len(paths))]


def test_standalone_sampler_in_a_fresh_process_equals_library_ddim(exported, tmp_path):
    pipe, artifacts = exported
    keys = sorted(artifacts, key=lambda k: k[0] != "onnx")
    _, want = library_samples(pipe)
    for key, images in zip(keys, run_standalone([artifacts[k] for k in keys], tmp_path), strict=True):
        assert images.shape == tuple(want.shape), key
        diff = np.abs(images - want.numpy())
        assert (diff.max() if key[1] == "fp32" else diff.mean()) < IMAGE_TOLERANCE[key[1]], key


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
def test_standalone_ddim_is_the_library_ddim(prediction):
    """The runner's numpy DDIM with guidance, driven by the eager model, reproduces samplers.DDIMSampler exactly."""
    pipe = tiny_pipe(prediction)
    x_T, want = library_samples(pipe)
    meta = {"alpha_bar": pipe.schedule.alpha_bar.tolist(), "num_classes": 10, "prediction": prediction}
    with torch.no_grad():
        net = lambda x, t, y: pipe.model(*map(torch.from_numpy, (x, t, y))).numpy()
        got = ddim_sample(net, meta, x_T.numpy(), np.array(LABELS), STEPS, GUIDANCE)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


def test_sidecar_holds_what_sampling_needs(exported):
    pipe, artifacts = exported
    meta = json.loads(artifacts["onnx", "int8"].with_name(artifacts["onnx", "int8"].name + ".json").read_text())
    assert meta["alpha_bar"] == pipe.schedule.alpha_bar.tolist()  # exact through JSON
    assert (meta["format"], meta["precision"], meta["x_dtype"], meta["prediction"]) == ("onnx", "int8", "float32", "eps")
    assert (meta["num_classes"], meta["image_size"], meta["in_channels"]) == (10, 28, 1)
    assert (artifacts["onnx", "int8"].parent / "standalone_sampler.py").is_file()


def test_unsupported_combinations_and_bad_input_are_clear_errors(exported, tmp_path):
    pipe, artifacts = exported
    assert "CUDA" in E.supported("torch_export", "fp16", "cpu")
    assert "onnx on cpu" in E.supported("aoti", "int8", "cpu")
    assert "bf16" in E.supported("onnx", "bf16", "cpu")
    with pytest.raises(ValueError, match="unknown format 'tflite'; allowed: torch_export, aoti, onnx, torchscript"):
        E.supported("tflite", "fp32")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        E.supported("onnx", "fp8")
    with pytest.raises(ValueError, match="cannot export torch_export at fp16 on cpu: fp16 needs CUDA"):
        E.export_torch_export(pipe, tmp_path / "a.pt2", "fp16", "cpu")
    with pytest.raises(ValueError, match="quantize_int8"):
        E.export_onnx(pipe, tmp_path / "a.onnx", "int8", "cpu")
    (tmp_path / "lonely.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lonely.onnx.json not found"):
        E.load_exported(tmp_path / "lonely.onnx")
    net = E.load_exported(artifacts["onnx", "fp32"])
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\]"):
        net(torch.zeros(2, 1, 28, 28), torch.zeros(2), torch.tensor([0, 11]))


def test_export_all_skips_what_the_device_cannot_hold(tmp_path, monkeypatch):
    exported_here = []
    monkeypatch.setitem(E.EXPORTERS, "torch_export", lambda pipe, path, *a: exported_here.append(path.name) or path)
    result = E.export_all(tiny_pipe(), tmp_path, ["torch_export"], ["fp32", "fp16", "int8"], "cpu")
    assert exported_here == ["unet_torch_export_fp32.pt2"]
    assert set(result.skipped) == {("torch_export", "fp16"), ("torch_export", "int8")}


@pytest.mark.parametrize("channels, groups", [(96, 16), (128, 32), (16, 4), (8, 1)])
def test_moment_group_norm_is_group_norm(channels, groups):
    """Against nn.GroupNorm in float64, on inputs far from zero mean (E[x^2] - mu^2 loses digits there)."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, channels)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = 20 + 3 * torch.randn(4, channels, 7, 5)
    want = norm.double()(x.double())
    moment = E.MomentGroupNorm(norm.float())
    for layout in (torch.contiguous_format, torch.channels_last):
        got = moment(x.contiguous(memory_format=layout))
        assert got.dtype == torch.float32 and float((got.double() - want).abs().max()) < 1e-4, layout
    assert relative_error(E.MomentGroupNorm(norm.bfloat16())(x.bfloat16()), want.float()) < NET_TOLERANCE["bf16"]
    with pytest.raises(ValueError, match="affine"):
        E.MomentGroupNorm(torch.nn.GroupNorm(groups, channels, affine=False))


@pytest.mark.parametrize("fmt", E.FORMATS)
def test_cpu_rewrites_keep_the_network_and_leave_the_original_alone(fmt):
    """Each format's rewritten copy (CPU_REWRITES) gives the U-Net's output; the pipeline's own model is untouched."""
    pipe = tiny_pipe()
    net, (x, t, labels), _ = E._signature(pipe, "fp32", torch.device("cpu"), fmt)
    norms = [type(m) for m in net.modules() if isinstance(m, (torch.nn.GroupNorm, E.MomentGroupNorm))]
    assert norms and set(norms) == {E.MomentGroupNorm if "moment_norms" in E.CPU_REWRITES[fmt] else torch.nn.GroupNorm}
    assert net.channels_last == ("channels_last" in E.CPU_REWRITES[fmt])
    assert not any(isinstance(m, E.MomentGroupNorm) for m in pipe.model.modules())
    with torch.no_grad():
        got, want = net(x, t, labels), pipe.model(x, t, labels)
    assert got.is_contiguous() and relative_error(got, want) < 1e-5


def test_aoti_package_matches_eager_and_samples_standalone(tmp_path):
    """AOTInductor compiles C++ for a minute or two: one test, tiny model, fp32."""
    pipe = tiny_pipe()
    path = E.export_aoti(pipe, tmp_path / "export" / E.artifact_name("aoti", "fp32"), device="cpu")
    net = E.load_exported(path)
    for batch in (1, 5):
        x, t = torch.randn(batch, 1, 28, 28), torch.randint(0, 100, (batch,))
        with torch.no_grad():
            want = pipe.model(x, t, torch.full((batch,), 3))
        assert relative_error(net(x, t, torch.full((batch,), 3)), want) < NET_TOLERANCE["fp32"]
    (images,) = run_standalone([path], tmp_path)
    assert np.abs(images - library_samples(pipe)[1].numpy()).max() < IMAGE_TOLERANCE["fp32"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_exports_match_eager(tmp_path, precision):
    pipe = tiny_pipe()
    x, t = torch.randn(5, 1, 28, 28, device="cuda"), torch.randint(0, 100, (5,), device="cuda")
    labels = torch.arange(5, device="cuda")
    with torch.no_grad():
        want = pipe.model.cuda()(x, t, labels)
    paths = [E.export_torch_export(pipe, tmp_path / E.artifact_name("torch_export", precision), precision, "cuda")]
    with pytest.warns(FutureWarning):
        paths.append(E.export_torchscript(pipe, tmp_path / E.artifact_name("torchscript", precision), precision, "cuda"))
    for path in paths:
        got = E.load_exported(path)(x, t, labels)
        assert got.device.type == "cuda" and relative_error(got, want) < NET_TOLERANCE[precision], path.name


def test_export_command_writes_artifacts_and_names_what_it_skips(tmp_path, capsys):
    pipe = tiny_pipe()
    pipe.save_pretrained(tmp_path / "model")
    code = main(["export", "--checkpoint", str(tmp_path / "model"), "--out-dir", str(tmp_path / "out"),
                 "--formats", "torchscript", "--precisions", "fp32", "fp16"])
    out, err = capsys.readouterr()
    assert code == 0 and (tmp_path / "out" / "unet_torchscript_fp32.pt").is_file()
    assert "standalone_sampler.py" in out and "fp16  skipped: fp16 needs CUDA" in err
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out")]) == 1
    assert "config.json not found" in capsys.readouterr().err


@pytest.mark.skipif(find_fashion_mnist("test") is None, reason="the FID column needs the Fashion-MNIST test split")
def test_bench_command_reports_every_row_as_json(capsys):
    code = main(["bench", "--random-preset", "tiny", "--formats", "eager", "torch_export", "--precisions", "fp32",
                 "--batch-sizes", "1", "3", "--repeats", "2", "--steps", "2", "--fid-images", "40", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and [(r["format"], r["batch"]) for r in rows] == [("eager", 1), ("torch_export", 1), ("eager", 3),
                                                                      ("torch_export", 3)]
    for r in rows:
        assert r["ms_per_call"] > 0 and r["images_per_s"] > 0 and r["peak_mb"] >= 0 and r["max_abs_err"] < 1e-4
        assert r["speedup"] == 1.0 if r["format"] == "eager" else r["speedup"] > 0
        assert r["fid"] > 0 and abs(r["fid_change"]) < 1e-3  # the same network (up to 1e-4) draws the same images
    assert [r["fid"] for r in rows[:2]] == [r["fid"] for r in rows[2:]]  # one FID per network, whatever the batch


def test_a_latent_model_exports_its_decoder_and_the_runner_decodes(tmp_path):
    """A latent model's ONNX network and decoder, run by the standalone runner in a fresh process, give the images of
    the library's DDIM on latents (no clipping) decoded by the autoencoder."""
    from lessons_lib.autoencoder import Autoencoder

    torch.manual_seed(0)
    autoencoder = Autoencoder(base_channels=8, channel_mults=(1, 2), latent_channels=2, scale_factor=0.7).eval()
    unet = UNet(replace(preset("tiny").model, in_channels=2)).eval()
    pipe = DiffusionPipeline(unet, get_schedule("cosine", 100), autoencoder=autoencoder)
    path = E.export_onnx(pipe, tmp_path / E.artifact_name("onnx", "fp32"), device="cpu")
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert (meta["sample_size"], meta["image_size"], meta["in_channels"], meta["clip_x0"]) == (14, 28, 2, False)
    assert (tmp_path / meta["decoder"]["file"]).is_file() and meta["decoder"]["scale_factor"] == 0.7
    (images,) = run_standalone([path], tmp_path, shape=(2, 14, 14))
    x_T = randn((len(LABELS), 2, 14, 14), seed=0)
    sampler = get_sampler("ddim", pipe.schedule, STEPS, spacing="trailing", clip_x0=False)
    with torch.no_grad():
        z = sample(unet, x_T, sampler, torch.tensor(LABELS), guidance_scale=GUIDANCE, progress=False, clip=False).images
        want = autoencoder.decode(z / 0.7).clamp(-1, 1)
    assert images.shape == (len(LABELS), 1, 28, 28)
    np.testing.assert_allclose(images, want.numpy(), rtol=0, atol=1e-3)
