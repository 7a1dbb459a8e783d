"""Deployment: the U-Net as a file that runs without this library.

Every artifact holds the same network signature, ``net(x, t, class_labels) -> prediction`` with
``x`` (B, C, H, W) in the artifact's precision, ``t`` float32 (B,) (integer steps are exact; fractional
ones are allowed) and ``class_labels`` int64 (B,) (ignored by an unconditional model), and a dynamic
batch size. Next to each artifact ``A`` the exporter writes ``A.json`` (format, precision, alpha_bar,
prediction type, image size, classes) and a copy of ``standalone_sampler.py``, which samples from it
with only numpy and torch or onnxruntime. A latent diffusion model's network takes latents; its
autoencoder's decoder is exported beside it as ONNX (``decoder_onnx_fp32.onnx``, ``decode(z)`` =
``decoder(z / scale_factor)``), named in the sidecar, and the runner decodes with it.

Formats (one function each):

- ``torch_export``: a ``torch.export`` program (``.pt2``, ``torch.export.save`` / ``load``); runs the
  same ATen kernels as eager PyTorch without the Python model code.
- ``aoti``: the program compiled ahead of time by AOTInductor into a C++/C shared library packaged in a
  ``.pt2`` (``torch._inductor.aoti_load_package``); compiling takes ~30 s on 2 CPU cores.
- ``onnx``: the dynamo ONNX exporter (``torch.onnx.export(..., dynamo=True)``), run with onnxruntime.
- ``torchscript``: ``torch.jit.trace``. **Legacy**: TorchScript is deprecated in current PyTorch; it is
  here for old C++ deployments only, and exporting warns. Use ``torch_export`` / ``aoti`` instead.

Precisions: ``fp32`` everywhere; ``fp16`` on CUDA; ``bf16`` for the torch formats on CUDA and on CPU
(it runs there, but without native bf16 instructions it is slower than fp32); ``int8`` for CPU via
onnxruntime quantization (see :func:`quantize_int8`). :func:`supported` says why a combination is not.
For a CPU, each format traces a copy of the U-Net rewritten for speed with the same outputs
(:data:`CPU_REWRITES`: channels_last, GroupNorm from per-channel moments).
Agreement with the eager model (tests/test_export.py, random tiny U-Net, max abs error relative to the
output's max abs): fp32 1e-4, fp16 / bf16 3e-2, int8 0.25 (int8 is a speed/size trade, checked loosely).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import atomic_write, model_config
from .device import get_device, randn
from .pipeline import DiffusionPipeline
from .samplers import get_sampler, sample
from .standalone_sampler import SUFFIXES, open_network, read_sidecar

FORMATS = tuple(SUFFIXES)  # torch_export, aoti, onnx, torchscript
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INPUT_NAMES, OUTPUT_NAMES = ("x", "t", "class_labels"), ("prediction",)
DECODER_FILE = "decoder_onnx_fp32.onnx"  # a latent model's decoder, beside its network
EXAMPLE_BATCH = 2  # traced at 2 (a batch of 1 would be specialised); every batch size >= 1 runs


class NetSignature(nn.Module):
    """The exported signature: ``forward(x, t, class_labels)``, with labels an input even for unconditional nets.

    Labels go in as their looked-up embedding: the U-Net's label range check reads tensor values, which
    an export cannot trace (out-of-range labels still fail in the lookup, and the runner checks them).
    """

    channels_last = False  # NHWC activations inside (set by _signature on CPU); the output is NCHW either way

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = None if self.unet.class_emb is None else self.unet.class_emb(class_labels)
        out = self.unet(x, t) if emb is None else self.unet(x, t, class_embedding=emb)
        return out.contiguous()


class MomentGroupNorm(nn.Module):
    """``nn.GroupNorm`` (Wu & He 2018, eq. 1-2) computed from per-channel moments: same weights, same output.

    Per-channel means of x and x^2 over H x W come first, then a (C, G) matrix averages them within
    each group and Var = E[x^2] - E[x]^2. On a CPU the usual kernels are slow for this U-Net's narrow
    groups (4 to 6 channels each): onnxruntime runs GroupNorm as Reshape + InstanceNormalization outside
    its blocked convolution layout, and inductor's channels_last kernel reduces runs of 4 to 6 contiguous
    floats. Here the two big reductions and the scale-and-shift run along whole rows of channels.
    Moments are taken in fp32 whatever the dtype of x.
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        if not norm.affine:
            raise ValueError("MomentGroupNorm replaces an affine GroupNorm (the U-Net's are all affine)")
        c, g = norm.num_channels, norm.num_groups
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        member = (torch.arange(c, device=norm.weight.device)[:, None] // (c // g)
                  == torch.arange(g, device=norm.weight.device)).float()  # (C, G): is channel c in group g
        self.register_buffer("to_group", member / (c // g), persistent=False)  # channel means -> group means
        self.register_buffer("to_channel", member.T.contiguous(), persistent=False)  # group values -> channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = xf.mean((2, 3)) @ self.to_group  # (B, G): mu of each group
        var = ((xf * xf).mean((2, 3)) @ self.to_group - mean * mean).clamp_min(0)  # sigma^2 = E[x^2] - mu^2
        scale = (torch.rsqrt(var + self.eps) @ self.to_channel) * self.weight  # (B, C): gamma / sqrt(sigma^2 + eps)
        shift = self.bias - (mean @ self.to_channel) * scale  # beta - mu gamma / sqrt(sigma^2 + eps)
        return (xf * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)


def use_moment_group_norms(module: nn.Module) -> nn.Module:
    """Replace every ``nn.GroupNorm`` inside ``module`` (in place) by a :class:`MomentGroupNorm` sharing its weights."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, MomentGroupNorm(child))
        else:
            use_moment_group_norms(child)
    return module


def artifact_name(fmt: str, precision: str) -> str:
    """The file name :func:`export_all` gives an artifact, e.g. ``unet_onnx_int8.onnx``."""
    return f"unet_{fmt}_{precision}{SUFFIXES[fmt]}"


def supported(fmt: str, precision: str, device: str | torch.device = "cpu") -> str | None:
    """None when ``fmt`` can hold ``precision`` on ``device``, else the reason it cannot."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"export targets cpu or cuda, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here"
    if precision == "int8":
        return None if (fmt, kind) == ("onnx", "cpu") else "int8 is onnxruntime quantization: format onnx on cpu"
    if precision == "fp16" and kind == "cpu":
        return "fp16 needs CUDA (CPU fp16 kernels are missing or slow)"
    if fmt == "onnx" and kind == "cpu" and precision != "fp32":
        return f"onnxruntime's CPU provider has no {precision} convolutions"
    if fmt == "onnx" and kind == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDA provider here (install onnxruntime-gpu)"
        if precision == "bf16":
            return "onnxruntime has no bf16 convolutions"
    return None


def _check_supported(fmt: str, precision: str, device: torch.device) -> None:
    reason = supported(fmt, precision, device)
    if reason:
        raise ValueError(f"cannot export {fmt} at {precision} on {device.type}: {reason}")


# Rewrites of the network for CPU deployment, per format: the outputs stay the same (to ~1e-6, checked by
# tests/test_export.py); measured on the shipped U-Net, batch 16, 2 cores, ms per call against eager.
# - "channels_last": NHWC weights and activations. oneDNN's NCHW convolutions reorder their input to
#   a blocked layout and back at every call; NHWC ones do not. ONNX has no memory order (onnxruntime
#   picks its own layouts), so it is not applied there.
# - "moment_norms": GroupNorm as MomentGroupNorm. Faster where a compiler fuses its steps (AOTInductor,
#   onnxruntime: ~10% of the call); slower where each step is its own kernel call (torch.export's
#   program, TorchScript), so not applied there.
# benchmarks/export_rewrites.py, two runs: AOTInductor 0.6-1.1x eager -> 1.7x with both; ONNX 1.2-1.4x ->
# 1.4-1.5x; torch.export 0.9x -> 1.2x; TorchScript 1.1x -> 1.3-1.4x. On CUDA the network is exported as it is.
CPU_REWRITES = {"torch_export": ("channels_last",), "aoti": ("channels_last", "moment_norms"),
                "onnx": ("moment_norms",), "torchscript": ("channels_last",)}


def _signature(pipe: DiffusionPipeline, precision: str, device: torch.device,
               fmt: str) -> tuple[NetSignature, tuple, tuple]:
    """An eval-mode copy of the pipeline's U-Net for ``fmt`` in ``precision`` on ``device`` (with its
    :data:`CPU_REWRITES` on a CPU), example inputs, dynamic shapes."""
    cfg = pipe.model.config
    net = NetSignature(copy.deepcopy(pipe.model)).to(device, DTYPES[precision]).eval()
    rewrites = CPU_REWRITES[fmt] if device.type == "cpu" else ()
    if "moment_norms" in rewrites:
        use_moment_group_norms(net)
    if "channels_last" in rewrites:
        net.unet.to(memory_format=torch.channels_last)
        net.channels_last = True
    x = randn((EXAMPLE_BATCH, *pipe.sample_shape), seed=0, device=device, dtype=DTYPES[precision])
    t = torch.tensor([pipe.schedule.num_steps - 1, 0], dtype=torch.float32, device=device)
    labels = torch.tensor([0, cfg.num_classes or 0], device=device)
    batch = torch.export.Dim("batch", min=1)
    return net, (x, t, labels), ({0: batch}, {0: batch}, {0: batch})


def _exported_program(pipe: DiffusionPipeline, precision: str, device: torch.device,
                      fmt: str) -> torch.export.ExportedProgram:
    net, example, dynamic = _signature(pipe, precision, device, fmt)
    with torch.no_grad():
        return torch.export.export(net, example, dynamic_shapes=dynamic)


class DecoderSignature(nn.Module):
    """A latent model's decoder as exported: ``decode(z) = decoder(z / scale_factor)``, z the diffusion-scale latent."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.decoder, self.scale_factor = autoencoder.decoder, autoencoder.config.scale_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.scale_factor)


def export_decoder(pipe: DiffusionPipeline, path: str | Path) -> Path:
    """The autoencoder's decoder of a latent model as fp32 ONNX (runs on the CPU with onnxruntime, any batch size)."""
    if pipe.autoencoder is None:
        raise ValueError("this pipeline has no autoencoder: only a latent diffusion model has a decoder to export")
    net = DecoderSignature(copy.deepcopy(pipe.autoencoder).float().cpu()).eval()
    z = randn((EXAMPLE_BATCH, *pipe.sample_shape), seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*The axis name: batch will not be used")
        program = torch.onnx.export(net, (z,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                    input_names=("z",), output_names=("image",), external_data=False, verbose=False)
    return atomic_write(path, lambda tmp: program.save(tmp, external_data=False))


def _write_companions(path: Path, pipe: DiffusionPipeline, fmt: str, precision: str, device: torch.device) -> Path:
    """The JSON sidecar ``path.json`` and a copy of ``standalone_sampler.py`` beside the artifact (and a latent
    model's decoder)."""
    cfg = pipe.model.config
    decoder = None
    if pipe.autoencoder is not None:
        decoder = {"file": DECODER_FILE, "format": "onnx", "scale_factor": pipe.autoencoder.config.scale_factor,
                   "signature": "decode(z (B, C, h, w) float32) -> images (B, C, H, W) float32"}
        export_decoder(pipe, path.parent / DECODER_FILE)
    meta = {
        "format": fmt, "precision": precision, "device": device.type, "file": path.name,
        "x_dtype": str(DTYPES.get(precision, torch.float32)).removeprefix("torch."),
        "signature": "net(x (B, C, H, W) x_dtype, t float32 (B,), class_labels int64 (B,)) -> (B, C, H, W)",
        "image_size": pipe.image_shape[-1], "sample_size": pipe.sample_shape[-1], "in_channels": cfg.in_channels,
        "image_channels": pipe.image_shape[0], "num_classes": cfg.num_classes, "decoder": decoder,
        "clip_x0": pipe.autoencoder is None,  # pixels live in [-1, 1], latents do not
        "prediction": pipe.prediction, "schedule": pipe.schedule.name,
        "alpha_bar": pipe.schedule.alpha_bar.tolist(),  # float64, exact through JSON
        "model": cfg.to_dict(), "torch_version": torch.__version__, "lessons_lib_version": __version__,
    }
    atomic_write(f"{path}.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    runner = Path(__file__).with_name("standalone_sampler.py")
    atomic_write(path.parent / runner.name, lambda tmp: shutil.copyfile(runner, tmp))
    return path


def export_torch_export(pipe: DiffusionPipeline, path: str | Path, precision: str = "fp32",
                        device: str | torch.device | None = None) -> Path:
    """Save the network as a ``torch.export`` program (``.pt2``)."""
    path, device = Path(path), get_device(device)
    _check_supported("torch_export", precision, device)
    program = _exported_program(pipe, precision, device, "torch_export")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: torch.export.save warns about names not ending in .pt2
            torch.export.save(program, f)

    atomic_write(path, write)
    return _write_companions(path, pipe, "torch_export", precision, device)


def export_aoti(pipe: DiffusionPipeline, path: str | Path, precision: str = "fp32",
                device: str | torch.device | None = None) -> Path:
    """Compile the network with AOTInductor into a ``.pt2`` package (~30 s for the shipped U-Net on 2 CPU cores)."""
    path, device = Path(path), get_device(device)
    _check_supported("aoti", precision, device)
    program = _exported_program(pipe, precision, device, "aoti")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch._inductor.aoti_compile_and_package(program, package_path=f)

    atomic_write(path, write)
    return _write_companions(path, pipe, "aoti", precision, device)


def export_onnx(pipe: DiffusionPipeline, path: str | Path, precision: str = "fp32",
                device: str | torch.device | None = None) -> Path:
    """Save the network as ONNX with the dynamo exporter (one file, weights inside)."""
    path, device = Path(path), get_device(device)
    if precision == "int8":
        raise ValueError("int8 ONNX is made by quantize_int8 (onnxruntime quantization of an fp32 export)")
    _check_supported("onnx", precision, device)
    net, example, dynamic = _signature(pipe, precision, device, "onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*The axis name: batch will not be used")  # x, t and labels share one batch Dim
        program = torch.onnx.export(net, example, dynamo=True, dynamic_shapes=dynamic, input_names=INPUT_NAMES,
                                    output_names=OUTPUT_NAMES, external_data=False, verbose=False)
    atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    return _write_companions(path, pipe, "onnx", precision, device)


def export_torchscript(pipe: DiffusionPipeline, path: str | Path, precision: str = "fp32",
                       device: str | torch.device | None = None) -> Path:
    """Legacy: trace the network to TorchScript. Deprecated in current PyTorch; prefer :func:`export_torch_export`."""
    warnings.warn("TorchScript is deprecated in current PyTorch and kept here as a legacy format; "
                  "prefer export_torch_export or export_aoti", FutureWarning, stacklevel=2)
    path, device = Path(path), get_device(device)
    _check_supported("torchscript", precision, device)
    net, example, _ = _signature(pipe, precision, device, "torchscript")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's own deprecation warnings: said once above
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the U-Net's input checks, traced as constants
        traced = torch.jit.trace(net, example)
        atomic_write(path, lambda tmp: torch.jit.save(traced, tmp))
    return _write_companions(path, pipe, "torchscript", precision, device)


def calibration_inputs(pipe: DiffusionPipeline, n: int = 8, steps: int = 10, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The inputs the network sees while sampling: (x_t, t, labels) along DDIM trajectories of ``n`` images.

    Data-free calibration for int8: activation ranges come from the model's own sampling path, every
    noise level included; labels cycle through the classes and the null class.
    """
    cfg = pipe.model.config
    model = copy.deepcopy(pipe.model).float().cpu().eval()
    labels = torch.arange(n) % (cfg.num_classes + 1) if cfg.num_classes else torch.zeros(n, dtype=torch.long)
    sampler = get_sampler("ddim", pipe.schedule, steps, spacing="trailing", prediction=pipe.prediction,
                          clip_x0=pipe.autoencoder is None)
    x_T = randn((n, *pipe.sample_shape), seed=seed)
    run = sample(model, x_T, sampler, labels if cfg.num_classes else None, progress=False, return_trajectory=True,
                 clip=pipe.autoencoder is None)
    return [{"x": x.numpy(), "t": np.full(n, t, dtype=np.float32), "class_labels": labels.numpy()}
            for x, t in zip(run.trajectory[:-1], sampler.timesteps.tolist(), strict=True)]


def quantize_int8(pipe: DiffusionPipeline, path: str | Path, fp32_onnx: str | Path | None = None,
                  calibration: list[dict[str, np.ndarray]] | None = None) -> Path:
    """int8 ONNX for the CPU: onnxruntime static quantization in the QDQ format.

    Why this route (measured on the cpu preset's U-Net, 2 cores, see ``python -m lessons_lib bench``):
    ``quantize_dynamic`` turns convolutions into ConvInteger, which onnxruntime runs ~4x slower than its
    fp32 convolutions here. Static QDQ quantizes weights per channel and activations with ranges
    calibrated once (:func:`calibration_inputs`), and onnxruntime fuses DequantizeLinear -> Conv ->
    QuantizeLinear into int8 QLinearConv kernels. Only convolutions are quantized (~70% of the time;
    GroupNorm, SiLU and attention stay float), and not the first and last: the first reads x_t, whose
    noise at small t is below an int8 step (the network must see it to predict eps), and the last writes
    the prediction, which calibration ranges would clip. ``fp32_onnx``: an fp32 export to start from
    (else one is made beside ``path`` and removed).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    path = Path(path)
    _check_supported("onnx", "int8", torch.device("cpu"))
    batches = iter(calibration if calibration is not None else calibration_inputs(pipe))

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    def write(tmp: Path) -> None:
        source = Path(fp32_onnx) if fp32_onnx else export_onnx(pipe, tmp.with_suffix(".fp32.onnx"), device="cpu")
        advice = logging.Filter()
        advice.filter = lambda record: "pre-process" not in record.getMessage()  # its shape inference breaks attention here
        logging.getLogger().addFilter(advice)
        try:
            graph = onnx.load(source).graph  # the first and last convolutions stay float (see above)
            ends = [n.name for n in graph.node if n.op_type == "Conv" and ("x" in n.input or "prediction" in n.output)]
            quantize_static(source, tmp, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                            nodes_to_exclude=ends, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().removeFilter(advice)
            if not fp32_onnx:
                source.unlink(missing_ok=True)
                Path(f"{source}.json").unlink(missing_ok=True)

    atomic_write(path, write)
    return _write_companions(path, pipe, "onnx", "int8", torch.device("cpu"))


EXPORTERS = {"torch_export": export_torch_export, "aoti": export_aoti, "onnx": export_onnx, "torchscript": export_torchscript}


@dataclass
class ExportResult:
    artifacts: dict[tuple[str, str], Path] = field(default_factory=dict)  # (format, precision) -> file
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)  # (format, precision) -> why not


def export_all(pipe: DiffusionPipeline, out_dir: str | Path, formats=FORMATS, precisions=("fp32",),
               device: str | torch.device | None = None) -> ExportResult:
    """Every supported (format, precision) into ``out_dir`` as :func:`artifact_name`, with sidecars and the runner."""
    out_dir, device, result = Path(out_dir), get_device(device), ExportResult()
    for fmt in formats:
        for precision in precisions:
            reason = supported(fmt, precision, device)
            if reason:
                result.skipped[fmt, precision] = reason
                continue
            path = out_dir / artifact_name(fmt, precision)
            if precision == "int8":
                result.artifacts[fmt, precision] = quantize_int8(pipe, path, result.artifacts.get((fmt, "fp32")))
            elif fmt == "torchscript":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # asked for by name: no need to warn
                    result.artifacts[fmt, precision] = export_torchscript(pipe, path, precision, device)
            else:
                result.artifacts[fmt, precision] = EXPORTERS[fmt](pipe, path, precision, device)
    return result


class ExportedNet:
    """An exported network called like the U-Net: ``net(x, t, class_labels=None)`` on torch tensors.

    ``class_labels=None`` means the null class (unconditional). The output has the dtype and device of
    ``x``; ``config`` is the U-Net's :class:`~lessons_lib.unet.UNetConfig` (guidance reads ``num_classes``).
    """

    training = False  # samplers warn about models in training mode; an artifact never is

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.meta = read_sidecar(self.path)
        self.config = model_config(self.meta, f"{self.path}.json")
        self.format, self.precision = self.meta["format"], self.meta["precision"]
        self.device = torch.device(self.meta["device"])
        self.dtype = getattr(torch, self.meta["x_dtype"])
        self._net = open_network(self.path, self.meta, threads)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        t = t.expand(len(x)) if t.ndim == 0 else t
        null = self.config.num_classes
        if class_labels is None:
            class_labels = torch.full((len(x),), null or 0)
        elif null is not None and (class_labels.min() < 0 or class_labels.max() > null):
            raise ValueError(f"class labels must lie in [0, {null}] ({null} = null class), "
                             f"got [{int(class_labels.min())}, {int(class_labels.max())}]")
        args = (x.to(self.device, self.dtype), t.to(self.device), class_labels.to(self.device, torch.long))
        if self.format == "onnx":
            out = torch.from_numpy(self._net(*(a.cpu().numpy() for a in args)))
        else:
            with torch.no_grad():
                out = self._net(*args)
        return out.to(x.device, x.dtype)

    def __repr__(self) -> str:
        return f"ExportedNet({self.path.name}: {self.format}, {self.precision}, {self.device.type})"


def load_exported(path: str | Path, threads: int | None = None) -> ExportedNet:
    """Load an artifact written by this module (its ``.json`` sidecar says how); ``threads``: onnxruntime intra-op threads."""
    return ExportedNet(path, threads)
