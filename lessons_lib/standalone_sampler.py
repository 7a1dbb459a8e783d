"""Sample images from an exported U-Net without lessons_lib: only numpy, json and torch or onnxruntime.

``lessons_lib.export`` copies this file next to the artifacts it writes; each artifact ``A`` has a sidecar
``A.json`` holding what sampling needs (alpha_bar, prediction type, image size, number of classes, input
dtype). Run it in any environment that has numpy plus torch (``.pt2``, TorchScript) or onnxruntime (``.onnx``)::

    python standalone_sampler.py unet_onnx_fp32.onnx --n 8 --class 3 --steps 20 --seed 0 --out samples.npy

It runs DDIM (Song et al. 2021, eq. 12, eta = 0) over "trailing" timesteps with x0 clipped to [-1, 1],
the same arithmetic as ``lessons_lib.samplers.DDIMSampler``, with optional classifier-free guidance
(Ho & Salimans 2022, eq. 6). Starting noise: ``--noise x_T.npy`` (e.g. the library's seeded x_T, for
identical images), else numpy's ``default_rng(seed + i)`` for image i (not the library's torch streams).
The output is a float32 array (N, C, H, W) in [-1, 1]. For a latent diffusion model the sidecar names the
decoder exported beside the network (ONNX, run with onnxruntime): DDIM runs on latents, without clipping, and the
decoder turns them into images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SUFFIXES = {"torch_export": ".pt2", "aoti": ".pt2", "onnx": ".onnx", "torchscript": ".pt"}


def read_sidecar(artifact: str | Path) -> dict:
    """The JSON written next to ``artifact`` by the exporter."""
    sidecar = Path(f"{artifact}.json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"{sidecar} not found: every exported network has a JSON sidecar next to it")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{sidecar} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") not in SUFFIXES:
        raise ValueError(f"{sidecar}: unknown format {meta.get('format')!r}; allowed: {', '.join(SUFFIXES)}")
    return meta


def open_network(artifact: str | Path, meta: dict, threads: int | None = None):
    """The artifact's own callable: torch tensors in and out for torch formats, numpy arrays for ONNX."""
    fmt, path = meta["format"], str(artifact)
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # fusions + NCHWc conv layout
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep (busy machines)
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider"] if meta["device"] == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(path, options, providers=providers)
        return lambda x, t, y: session.run(None, {"x": x, "t": t, "class_labels": y})[0]
    import torch

    if fmt == "torch_export":
        return torch.export.load(path).module()
    if fmt == "aoti":
        return torch._inductor.aoti_load_package(path)
    return torch.jit.load(path, map_location=meta["device"])  # TorchScript (legacy)


def numpy_network(artifact: str | Path, meta: dict, threads: int | None = None):
    """``net(x, t, y)`` on numpy arrays (float32, float32, int64) returning float32, whatever the format."""
    net = open_network(artifact, meta, threads)
    if meta["format"] == "onnx":
        dtype = np.dtype(meta["x_dtype"])
        return lambda x, t, y: net(x.astype(dtype), t.astype(np.float32), y.astype(np.int64)).astype(np.float32)
    import torch

    device, dtype = torch.device(meta["device"]), getattr(torch, meta["x_dtype"])

    def call(x, t, y):
        with torch.no_grad():
            out = net(torch.from_numpy(x).to(device, dtype), torch.from_numpy(t.astype(np.float32)).to(device),
                      torch.from_numpy(y.astype(np.int64)).to(device))
        return out.float().cpu().numpy()

    return call


def trailing_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """``num_steps`` of T steps, descending, ending near 0 and starting at T - 1 (Lin et al. 2023, table 2)."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"steps must lie in [1, {num_train_steps}], got {num_steps}")
    ts = np.round(num_train_steps - np.arange(num_steps) * num_train_steps / num_steps) - 1
    return sorted(set(ts.astype(np.int64).tolist()), reverse=True)


def ddim_sample(net, meta: dict, x_T: np.ndarray, labels: np.ndarray, steps: int = 20,
                guidance_scale: float = 1.0) -> np.ndarray:
    """Deterministic DDIM from ``x_T`` with ``net(x, t, y)`` (numpy), guided with scale w when w != 1.
    Images (clipped to [-1, 1]), or a latent model's latents (not clipped: ``meta["clip_x0"]`` is false)."""
    clip = meta.get("clip_x0", True)
    alpha_bar, null = np.asarray(meta["alpha_bar"], dtype=np.float64), meta["num_classes"]
    if null is not None and (labels.min() < 0 or labels.max() > null):
        raise ValueError(f"class labels must lie in [0, {null}] ({null} = null class), got [{labels.min()}, {labels.max()}]")
    timesteps = trailing_timesteps(len(alpha_bar), steps)
    x = x_T.astype(np.float32)
    for i, t in enumerate(timesteps):
        ab, ab_prev = alpha_bar[t], alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        t_batch = np.full(len(x), t, dtype=np.float32)
        if null is None or guidance_scale == 1.0:
            out = net(x, t_batch, labels)
        else:  # both branches in one batch of 2B: uncond + w (cond - uncond)  (eq. 6)
            cond, uncond = np.split(net(np.concatenate([x, x]), np.concatenate([t_batch, t_batch]),
                                        np.concatenate([labels, np.full_like(labels, null)])), 2)
            out = uncond + np.float32(guidance_scale) * (cond - uncond)
        signal, noise = np.float32(np.sqrt(ab)), np.float32(np.sqrt(1 - ab))
        if meta["prediction"] == "eps":
            x0 = (x - noise * out) / signal  # x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
        elif meta["prediction"] == "v":
            x0 = signal * x - noise * out  # x0 = sqrt(ab) x_t - sqrt(1 - ab) v
        elif meta["prediction"] == "flow":
            x0 = (x - noise * out) / (signal + noise)  # the velocity u = eps - x0 (rectified flow)
        else:
            x0 = out
        if clip:
            x0 = np.clip(x0, -1, 1)
        eps = (x - signal * x0) / noise  # eps re-derived from x0 (the clipped one, if clipped)
        x = np.float32(np.sqrt(ab_prev)) * x0 + np.float32(np.sqrt(1 - ab_prev)) * eps  # eq. 12 with sigma = 0
    return np.clip(x, -1, 1) if clip else x


def decode(artifact: str | Path, meta: dict, latents: np.ndarray, threads: int | None = None) -> np.ndarray:
    """A latent model's latents as images in [-1, 1], through the ONNX decoder named in the sidecar."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("a latent model's decoder is ONNX: decoding its samples needs onnxruntime "
                         "(pip install onnxruntime), whatever the network's format") from None

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(Path(artifact).parent / meta["decoder"]["file"]), options,
                                   providers=["CPUExecutionProvider"])
    return np.clip(session.run(None, {"z": latents.astype(np.float32)})[0], -1, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="exported network (.pt2 / .onnx / .pt) with its .json sidecar beside it")
    parser.add_argument("--n", type=int, default=8, help="number of images (ignored with --noise)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="image i starts from numpy default_rng(seed + i)")
    parser.add_argument("--noise", help=".npy with x_T (N, C, H, W) float32, instead of --seed / --n")
    parser.add_argument("--class", dest="labels", type=int, nargs="+",
                        help="class index for every image, or one per image (default: the null class)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    parser.add_argument("--out", default="samples.npy", help=".npy file for the images (N, C, H, W) in [-1, 1]")
    args = parser.parse_args(argv)
    if args.n < 1 or not np.isfinite(args.guidance) or args.guidance < 0:
        parser.error(f"--n must be >= 1 and --guidance a finite number >= 0, got {args.n} and {args.guidance}")
    try:
        return run(args, parser)
    except (OSError, ValueError, KeyError) as err:  # a missing sidecar, a bad .npy, a file that is not the artifact
        print(f"error: {err}", file=sys.stderr)
        return 1


def run(args, parser) -> int:
    meta = read_sidecar(args.artifact)
    suffix = SUFFIXES[meta["format"]]
    if Path(args.artifact).suffix != suffix:
        raise ValueError(f"{args.artifact}: its sidecar says {meta['format']}, whose files end in {suffix}")
    side = meta.get("sample_size", meta["image_size"])  # a latent model denoises latents smaller than its images
    shape = (meta["in_channels"], side, side)
    if args.noise:
        x_T = np.load(args.noise)
        if x_T.shape[1:] != shape:
            parser.error(f"--noise holds shape {x_T.shape}; expected (N, {', '.join(map(str, shape))})")
    else:
        x_T = np.stack([np.random.default_rng(args.seed + i).standard_normal(shape) for i in range(args.n)])
    labels = np.array(args.labels if args.labels is not None else [meta["num_classes"] or 0], dtype=np.int64)
    if len(labels) not in (1, len(x_T)):
        parser.error(f"--class takes one class or one per image ({len(x_T)}), got {len(labels)}")
    labels = np.broadcast_to(labels, (len(x_T),)).copy()
    try:
        net = numpy_network(args.artifact, meta, args.threads)
    except Exception as err:  # each runtime has its own error for a damaged file: say which file, not the runtime's stack
        raise ValueError(f"{args.artifact} cannot be opened as {meta['format']} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None
    images = ddim_sample(net, meta, x_T, labels, args.steps, args.guidance)
    if meta.get("decoder"):
        images = decode(args.artifact, meta, images, args.threads)
    np.save(args.out, images)
    print(f"wrote {len(images)} images {images.shape[1:]} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
