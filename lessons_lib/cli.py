"""The command line: ``python -m lessons_lib <command>`` (also installed as ``lessons``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import BUILD_DIR, PRETRAINED_DIR, PRETRAINED_MODEL, REPO_ROOT


def _doctor(args) -> int:
    from .doctor import doctor

    report = doctor()
    print(report)
    return 1 if report.problems else 0


def _data(args) -> int:
    from .data import DataNotFoundError, load_fashion_mnist

    try:
        for split in ("train", "test"):
            ds = load_fashion_mnist(split, root=args.root, download=not args.no_download)
            print(f"{split}: {len(ds)} images, checksums OK, from {ds.source}")
    except DataNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


def lab_command(jupyter: str, is_root: bool) -> list[str]:
    """JupyterLab run from the repository root (README and data in its file browser) with the first lesson open."""
    from .course import lessons

    return [jupyter, "lab", str(lessons()[0].relative_to(REPO_ROOT)), *(["--allow-root"] if is_root else [])]


def _lab(args) -> int:
    import subprocess

    from .config import headless_because

    flags = headless_because()
    if flags:
        print(f"note: {', '.join(f'{f}={os.environ[f]}' for f in flags)} is set, so the lessons' widgets will draw static "
              f"figures; unset {' and '.join(flags)} for live widgets", file=sys.stderr)
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if is_root:
        print("note: running as root (a container?): JupyterLab needs --allow-root, passed", file=sys.stderr)
    return subprocess.call(lab_command(str(Path(sys.executable).with_name("jupyter")), is_root), cwd=REPO_ROOT)


def _course(args) -> int:
    from .course import parse_value, run_course

    parameters = {name: parse_value(value) for name, value in args.parameter or []}
    results = run_course(smoke=args.smoke, inplace=args.inplace, only=args.only, parameters=parameters,
                         record_times=args.record_times)
    return 0 if all(r.ok for r in results) else 1


def _export_source(args):
    """The pipeline to export or bench: ``--checkpoint`` folder, or ``--random-preset`` weights; None after an error."""
    from .pipeline import DiffusionPipeline

    if getattr(args, "random_preset", None):
        from .schedules import get_schedule
        from .train import preset
        from .unet import UNet

        cfg = preset(args.random_preset)
        return DiffusionPipeline(UNet(cfg.model).eval(), get_schedule(cfg.schedule, cfg.num_steps), cfg.prediction)
    if args.checkpoint is None:
        print("give --checkpoint DIR (a model folder)" + (" or --random-preset NAME" if hasattr(args, "random_preset") else ""),
              file=sys.stderr)
        return None
    try:
        return DiffusionPipeline.from_pretrained(args.checkpoint, device=args.device or "cpu")
    except ValueError as err:  # CheckpointError, unknown device
        print(f"cannot load {args.checkpoint}: {err}", file=sys.stderr)
        return None


def _export(args) -> int:
    from .export import export_all

    pipe = _export_source(args)
    if pipe is None:
        return 1
    result = export_all(pipe, args.out_dir, args.formats, args.precisions, pipe.device)
    for (fmt, precision), path in result.artifacts.items():
        print(f"{fmt:>12} {precision:>4}  {path}")
    for (fmt, precision), why in result.skipped.items():
        print(f"{fmt:>12} {precision:>4}  skipped: {why}", file=sys.stderr)
    if result.artifacts:
        first = next(iter(result.artifacts.values()))
        print(f"sample without lessons_lib: python {first.parent / 'standalone_sampler.py'} {first} --steps 20 --out samples.npy")
    return 0 if result.artifacts else 1


def _bench(args) -> int:
    import torch

    from .bench import bench, table, to_json
    from .device import get_device

    pipe = _export_source(args)
    if pipe is None:
        return 1
    try:
        device = get_device(args.device)
        rows = bench(pipe, args.formats, args.precisions, args.batch_sizes, args.repeats, args.steps, device, args.threads,
                     memory=not args.no_memory, work_dir=args.out_dir, log=lambda line: print(line, file=sys.stderr),
                     fid_images=args.fid_images)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if args.json:
        print(to_json(rows))
        return 0
    source = f"{args.random_preset} preset, random weights" if args.random_preset else args.checkpoint
    print(f"U-Net: {source}, {sum(p.numel() for p in pipe.model.parameters()):,} parameters; {device.type}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} calls and "
          f"{max(1, args.repeats // 5)} DDIM {args.steps}-step samples per row, taken in turns\n")
    print(table(rows))
    return 0


def _train(args) -> int:
    from .train import preset, train

    overrides = {k: v for k, v in {
        "out_dir": args.out_dir, "max_steps": args.max_steps, "epochs": args.epochs, "minutes": args.minutes,
        "batch_size": args.batch_size, "lr": args.lr, "prediction": args.prediction, "loss": args.loss,
        "weighting": args.weighting, "schedule": args.schedule, "device": args.device, "seed": args.seed,
        "checkpoint_every": args.checkpoint_every, "ema_decay": args.ema_decay, "sample_every": args.sample_every,
        "amp": args.amp, "lr_schedule": args.lr_schedule, "warmup_steps": args.warmup_steps,
        "ema_sigma_rel": args.ema_sigma_rel, "timesteps": args.timesteps, "init_from": args.init_from,
        "logsnr_mean": args.logsnr_mean, "logsnr_std": args.logsnr_std,
    }.items() if v is not None}
    if args.compile:
        overrides["compile"] = True
    if args.channels_last:
        overrides["channels_last"] = True
    if args.max_steps is not None or args.epochs is not None:
        overrides.setdefault("minutes", None)  # an explicit length replaces the preset's time budget
    if args.autoencoder:
        from dataclasses import replace

        from .autoencoder import load_autoencoder

        channels = load_autoencoder(args.autoencoder).config.latent_channels  # the network takes the latents
        overrides.update(autoencoder=args.autoencoder, model=replace(preset(args.preset).model, in_channels=channels))
    result = train(preset(args.preset, **overrides), resume=not args.no_resume, progress=not args.no_progress)
    if result.step and result.history:
        print(f"step {result.step}: loss {result.history[-1][1]:.4f}; EMA weights in {result.out_dir}")
    return 130 if result.interrupted else 0


def _autoencoder(args) -> int:
    from .autoencoder import AutoencoderConfig
    from .autoencoder_train import AutoencoderTrainConfig, train_autoencoder

    levels = {1: (1,), 2: (1, 2), 4: (1, 2, 2)}[args.downsampling]
    model = AutoencoderConfig(base_channels=args.base_channels, channel_mults=levels, latent_channels=args.latent_channels,
                              kl_weight=args.kl_weight, reconstruction=args.reconstruction, feature_weight=args.feature_weight)
    length = {"epochs": args.epochs} if args.max_steps is None else {"max_steps": args.max_steps}
    cfg = AutoencoderTrainConfig(model=model, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                                 out_dir=args.out_dir, **length)
    result = train_autoencoder(cfg, resume=not args.no_resume, progress=not args.no_progress)
    if result.step and result.history:
        print(f"step {result.step}: loss {result.history[-1][1]:.4f}, scale_factor {result.model.config.scale_factor:.4f}; "
              f"autoencoder in {result.out_dir} (train a latent model on it: train --autoencoder {result.out_dir})")
    return 130 if result.interrupted else 0


def _class_arg(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.isdigit() else value


def _sample(args) -> int:
    import numpy as np
    import torch

    from .checkpoint import CheckpointError, writable_folder
    from .data import to_uint8
    from .pipeline import DiffusionPipeline, GenerationConfig, check_mask_fits, load_image, save_image
    from .viz import show_grid

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in ("", ".npz", ".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        print(f"--out must end in .png, .jpg, .pdf, .svg or .npz, or be a folder (no suffix), got {out.name}", file=sys.stderr)
        return 2
    writable_folder(out if suffix == "" else out.parent, "--out" if suffix == "" else "the folder of --out")
    if suffix and out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name ending in {suffix} or a new folder name (no suffix)")
    if args.interpolate is None and (args.to_seed is not None or args.to_class is not None):
        print("--to-seed / --to-class go with --interpolate FRAMES", file=sys.stderr)
        return 2
    try:
        pipe = DiffusionPipeline.from_pretrained(args.checkpoint, device=args.device)
    except CheckpointError as err:
        print(f"cannot load {args.checkpoint}: {err}", file=sys.stderr)
        return 1
    try:
        init = load_image(args.init_image, pipe.image_shape) if args.init_image else None
        if args.mask and args.init_image:
            check_mask_fits(args.init_image, args.mask)
        mask = load_image(args.mask, pipe.image_shape, mask=True) if args.mask else None
        config = GenerationConfig(
            prompt=_class_arg(args.class_name), negative=_class_arg(args.negative), num_images=args.n, seed=args.seed,
            preset=args.preset, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
            init_image=init, strength=args.strength, mask=mask, jump_length=args.jump_length, resample=args.resample)
        if args.interpolate is not None:
            result = pipe.interpolate(config, args.interpolate, to_seed=args.to_seed, to_class=_class_arg(args.to_class),
                                      progress=not args.no_progress)
        else:
            result = pipe.generate(config, progress=not args.no_progress)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    images, c = result.images, result.config
    if suffix == ".npz":
        labels = result.labels if result.labels is not None else torch.full((len(images),), -1)  # -1: no class
        np.savez_compressed(out, images=to_uint8(images)[:, 0].numpy(), labels=labels.numpy(),
                            seeds=np.array(result.seeds))
    elif suffix == "":
        for i, image in enumerate(images):
            save_image(image, out / f"{i:04d}.png")
    else:
        title = f"{len(images)} images, {c.sampler} {result.steps} steps, seed {c.seed}"
        show_grid(images, nrow=min(8, len(images)), title=title).savefig(out, format=suffix[1:], dpi=150)
    print(f"wrote {len(images)} images to {out} ({c.sampler}, {result.steps} steps, {result.nfe} network calls, "
          f"{result.seconds:.1f} s)")
    return 0


def _classifier(args) -> int:
    import torch

    from .metrics import count_parameters, train_classifier

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = train_classifier(epochs=args.epochs, seed=args.seed, out_dir=args.out, device=args.device,
                              progress=not args.no_progress)
    size = (result.out_dir / "model.safetensors").stat().st_size
    print(f"test accuracy {result.test_accuracy:.2%}, {count_parameters(result.model):,} parameters "
          f"({size / 1e6:.2f} MB), {result.wall_time_s / 60:.1f} min; saved to {result.out_dir}")
    return 0


def _read_samples_npz(path: str, n: int | None):
    """uint8 'images' (N, 28, 28) and optional int 'labels' in 0-9 from a ``sample --out x.npz`` file, checked."""
    import zipfile

    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in ("images", "labels") if name in f.files}
            names = sorted(f.files)
    except TypeError:  # np.load gave an ndarray, which is no context manager: a single .npy file
        raise ValueError(f"{path} is a single .npy array, not an .npz archive with 'images' (and 'labels')") from None
    except ValueError as err:
        if "Object arrays" not in str(err):  # numpy's words for an object array refused without allow_pickle
            raise ValueError(f"{path} is not a readable .npz file; write one with `sample --out x.npz`") from None
        raise ValueError(f"{path} holds object arrays, which are not loaded (they could run code); "
                         "expected uint8 'images' (N, 28, 28) and int 'labels'") from None
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err}); write one with `sample --out x.npz`") from None
    if "images" not in arrays:
        raise ValueError(f"{path} holds {names}; expected uint8 'images' (N, 28, 28)")
    images, labels = arrays["images"][:n], (arrays["labels"][:n] if "labels" in arrays else None)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) == 0:
        raise ValueError(f"{path}: 'images' must be uint8 (N, 28, 28) with N >= 1, got {images.dtype} {images.shape}")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
            raise ValueError(f"{path}: 'labels' must be integers, one per image, got {labels.dtype} {labels.shape}")
        if ((labels < -1) | (labels > 9)).any():
            raise ValueError(f"{path}: 'labels' must lie in 0-9 (or -1: no class), got values in "
                             f"[{labels.min()}, {labels.max()}]")
    return torch.from_numpy(images), (torch.from_numpy(labels).long() if labels is not None else None)


def _evaluate(args) -> int:
    import torch

    from .data import to_model
    from .metrics import evaluate, load_classifier

    if (args.npz is None) == (args.checkpoint is None):
        print("give exactly one of --npz FILE and --checkpoint DIR", file=sys.stderr)
        return 2
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.npz is not None:
        if not Path(args.npz).is_file():
            print(f"--npz {args.npz}: no such file", file=sys.stderr)
            return 2
        images, labels = _read_samples_npz(args.npz, args.n)
        images = to_model(images.unsqueeze(1))
        source = f"{len(images)} images from {args.npz}"
    else:
        from .pipeline import DiffusionPipeline, GenerationConfig

        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        pipe = DiffusionPipeline.from_pretrained(args.checkpoint, device=args.device)
        chosen = pipe.resolve(GenerationConfig(preset=args.preset, sampler=args.sampler, steps=args.steps))  # as `sample`
        args.sampler, args.steps = chosen.sampler, chosen.steps
        n = args.n or 1000
        conditional = pipe.model.config.num_classes is not None
        parts, labels, start = [], [], 0
        for c in range(10) if conditional else [None]:  # one call per class: n // 10 each (+1 for the first n % 10)
            n_c = n // 10 + (c < n % 10) if conditional else n
            if n_c == 0:
                continue
            x, y = pipe(n_c, c, steps=args.steps, sampler=args.sampler, seed=args.seed + start,
                        guidance_scale=args.guidance, progress=not args.no_progress)
            parts.append(x.cpu())
            labels.append(y.cpu() if y is not None else torch.full((n_c,), -1))
            start += n_c
        images, labels = torch.cat(parts), torch.cat(labels)
        source = f"{len(images)} samples of {Path(args.checkpoint).name}, {args.sampler} {args.steps} steps, seed {args.seed}"
    classifier = load_classifier(args.classifier) if args.classifier else None
    result = evaluate(images, reference=args.reference, classifier=classifier, n_reference=args.n_reference,
                      labels=labels if labels is not None and (labels >= 0).all() else None)
    print(source)
    print(result)
    return 0


class LazyChoices:
    """The keys of ``lessons_lib.<module>.<name>`` as argparse choices, imported on first use: building the
    parser must not import torch (seconds), or every command, even ``--help`` and typos, would wait for it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def _names(self) -> list[str]:
        from importlib import import_module

        return list(getattr(import_module(f"lessons_lib.{self.module}"), self.name))

    def __contains__(self, value) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())


SAMPLE_EXAMPLES = """examples:
  sample --checkpoint M --class sneaker --guidance 3 --negative sandal --out sneakers.png
  sample --checkpoint M --init-image shoe.png --strength 0.6 --out variations/
  sample --checkpoint M --init-image shoe.png --mask hole.png --resample 5 --sampler ddpm --out filled.png
  sample --checkpoint M --class bag --interpolate 8 --seed 1 --to-seed 2 --out morph.png
  sample --checkpoint M --class sneaker --interpolate 8 --to-class ankle-boot --out morph.png
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lessons_lib", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: LESSONS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="print versions, device, data location and known problems")
    p.set_defaults(run=_doctor)

    p = sub.add_parser("lab", help="open JupyterLab at the repository root with the first lesson")
    p.set_defaults(run=_lab)

    p = sub.add_parser("data", help="find (or download) Fashion-MNIST and verify it")
    p.add_argument("--root", default=None, help="look only in this folder")
    p.add_argument("--no-download", action="store_true", help="never use the network")
    p.set_defaults(run=_data)

    p = sub.add_parser("train", help="train (or resume) a diffusion model; also runs under torchrun")
    p.add_argument("--preset", default="cpu", choices=["cpu", "long", "gpu", "tiny"], help="sizes and defaults to start from")
    p.add_argument("--out-dir", help="where checkpoints go (resumes from out-dir/resume.pt if present)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--minutes", type=float, help="wall-clock budget of this run")
    p.add_argument("--batch-size", type=int, help="global batch, split across processes")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warm-up")
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"],
                   help="after the warm-up; cosine/linear decay to 0 at the last step (a minutes budget plans the steps)")
    p.add_argument("--ema-decay", type=float, help="EMA decay; ~1 - 1/(steps averaged), e.g. 0.999 for runs of 5k+ steps")
    p.add_argument("--ema-sigma-rel", type=float,
                   help="power-function EMA of this relative width instead (Karras et al. 2024), e.g. 0.1: suits any run length")
    p.add_argument("--timesteps", choices=["uniform", "logsnr_normal"], help="how t is drawn in training")
    p.add_argument("--logsnr-mean", type=float, help="logsnr_normal: mean of log-SNR (default 2.4, EDM's)")
    p.add_argument("--logsnr-std", type=float,
                   help="logsnr_normal: its std (Esser et al.'s logit-normal t(0, 1) is log-SNR ~ N(0, 2^2))")
    p.add_argument("--prediction", choices=["eps", "v", "x0", "flow"])
    p.add_argument("--loss", choices=["l2", "l1", "huber"])
    p.add_argument("--weighting", choices=["uniform", "min_snr"])
    p.add_argument("--schedule", choices=["linear", "scaled_linear", "cosine", "sigmoid", "flow"])
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--sample-every", type=int, help="a grid of EMA samples to out-dir/samples/ every N steps and at the end")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision: auto = bf16/fp16 on CUDA, fp32 elsewhere; bf16 is 1.4-2x faster on CPUs with AMX")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--init-from", metavar="FOLDER",
                   help="start a new run from the weights of this model folder (same network, prediction, schedule)")
    p.add_argument("--autoencoder", metavar="FOLDER",
                   help="latent diffusion: learn this autoencoder's latents (the network takes its latent channels)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_train)

    p = sub.add_parser("autoencoder", help="train (or resume) the KL autoencoder of latent diffusion")
    p.add_argument("--out-dir", default=str(BUILD_DIR / "runs" / "autoencoder"),
                   help="run folder: resume.pt, loss.csv and the autoencoder (autoencoder.safetensors + config.json)")
    p.add_argument("--downsampling", type=int, choices=[1, 2, 4], default=4, help="f: 4 gives 7x7 latents, 2 gives 14x14")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of KL(q(z|x) || N(0, I)) per pixel")
    p.add_argument("--reconstruction", choices=["l1", "l2"], default="l1")
    p.add_argument("--feature-weight", type=float, default=0.0,
                   help="weight of a feature loss in the course classifier's feature space (0: none)")
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--max-steps", type=int, help="instead of --epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay to 0 after a 100-step warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_autoencoder)

    p = sub.add_parser("sample", help="generate, edit or interpolate images with a saved model folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SAMPLE_EXAMPLES)
    p.add_argument("--checkpoint", required=True, help="folder with model.safetensors + config.json")
    p.add_argument("--n", type=int, default=64, help="number of images (ignored with --interpolate)")
    p.add_argument("--preset", default="balanced", metavar="PRESET", choices=LazyChoices("pipeline", "PRESETS"),
                   help="%(choices)s: fills --sampler and --steps when not given (lessons_lib.pipeline.PRESETS)")
    p.add_argument("--sampler", metavar="NAME", choices=LazyChoices("samplers", "SAMPLERS"),
                   help="%(choices)s (default: from --preset)")
    p.add_argument("--steps", type=int, help="sampler steps, 1 to the model's T (default: from --preset)")
    p.add_argument("--eta", type=float, help="DDIM noise, 0 (deterministic) to 1 (ddim only)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i, whatever --n")
    p.add_argument("--class", dest="class_name", help="class name (e.g. sneaker) or index; default: unconditional")
    p.add_argument("--negative", help="class to steer away from (needs --guidance > 1)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--init-image", help="image-to-image / inpainting input (PNG etc., converted to the model's size)")
    p.add_argument("--strength", type=float, help="0 keeps --init-image, 1 ignores it (default 0.8; 1 with --mask)")
    p.add_argument("--mask", help="inpainting mask image: white = repaint, black = keep (needs --init-image)")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint: steps to jump back when resampling")
    p.add_argument("--resample", type=int, default=1, help="RePaint: times each jump is made (1 = no resampling)")
    p.add_argument("--interpolate", type=int, metavar="FRAMES",
                   help="FRAMES images morphing from --seed to --to-seed, or from --class to --to-class")
    p.add_argument("--to-seed", type=int, help="--interpolate: the seed of the last frame")
    p.add_argument("--to-class", help="--interpolate: the class of the last frame (same noise, blended class)")
    p.add_argument("--device")
    p.add_argument("--out", default="samples.png",
                   help=".png/.jpg/.pdf/.svg grid, .npz (uint8 images (N, 28, 28), labels, seeds) or a folder "
                        "(no suffix) of one PNG per image")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_sample)

    p = sub.add_parser("classifier", help="train the small Fashion-MNIST classifier behind FID / precision / recall")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(PRETRAINED_DIR / "fmnist_classifier"), help="folder for model.safetensors + config.json")
    p.add_argument("--device", default="cpu", help="cpu (default: the shipped weights were trained there), cuda, mps")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy or shared 2-core machine)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_classifier)

    p = sub.add_parser("evaluate", help="FID, precision / recall and class histogram of samples against real images")
    p.add_argument("--npz", help="uint8 'images' (N, 28, 28) and 'labels', as written by `sample --out x.npz`")
    p.add_argument("--checkpoint", help="or: a model folder to sample from first")
    p.add_argument("--n", type=int, help="use the first N images of --npz / draw N samples (default 1000)")
    p.add_argument("--reference", default="test", choices=["test", "train"], help="the real images to compare with")
    p.add_argument("--n-reference", type=int, help="a fixed seeded subset of the reference (default: all of it)")
    p.add_argument("--classifier", help="feature extractor folder (default: the shipped data/pretrained/fmnist_classifier)")
    p.add_argument("--preset", default="balanced", metavar="PRESET", choices=LazyChoices("pipeline", "PRESETS"),
                   help="%(choices)s: fills --sampler and --steps when not given (lessons_lib.pipeline.PRESETS)")
    p.add_argument("--sampler", metavar="NAME", choices=LazyChoices("samplers", "SAMPLERS"),
                   help="%(choices)s (default: from --preset)")
    p.add_argument("--steps", type=int, help="sampler steps (default: from --preset)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("course", help="run every lesson headless with papermill and print a table")
    p.add_argument("--smoke", action="store_true", help="shrunk parameters (LESSONS_SMOKE=1)")
    p.add_argument("--inplace", action="store_true", help="write outputs into notebooks/ (to commit them)")
    p.add_argument("--only", nargs="*", default=None, help="lesson name prefixes, e.g. 00 01")
    p.add_argument("--record-times", action="store_true",
                   help="store each lesson's seconds in notebooks/runtimes.json (--inplace does too)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override a parameter of the lessons run, e.g. -p N_DRAWS 500 (unknown names are refused)")
    p.set_defaults(run=_course)

    from .bench import EAGER
    from .export import FORMATS, PRECISIONS

    shipped = str(PRETRAINED_MODEL) if PRETRAINED_MODEL.is_dir() else None
    p = sub.add_parser("export", help="export a model folder to torch.export, AOTInductor, ONNX (+int8), TorchScript (legacy)")
    p.add_argument("--checkpoint", default=shipped, required=shipped is None,
                   help=f"model folder (default: {PRETRAINED_MODEL} when it exists)")
    p.add_argument("--out-dir", default=str(BUILD_DIR / "export"), help="artifacts, .json sidecars, standalone_sampler.py")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=["torch_export", "onnx"],
                   help="aoti compiles C++ (minutes on a CPU); torchscript is deprecated in PyTorch (legacy)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32"],
                   help="fp16 needs CUDA; bf16: torch formats; int8: onnx on cpu (unsupported pairs are skipped)")
    p.add_argument("--device", help="where the artifacts run: cpu (default) or cuda")
    p.set_defaults(run=_export)

    p = sub.add_parser("bench", help="ms per call, img/s, memory and error of exported networks vs eager, in one run")
    p.add_argument("--checkpoint", default=shipped, help=f"model folder (default: {PRETRAINED_MODEL} when it exists)")
    p.add_argument("--random-preset", choices=["cpu", "gpu", "tiny"],
                   help="random weights of a training preset's U-Net instead (speed does not depend on weights)")
    p.add_argument("--formats", nargs="+", choices=[EAGER, *FORMATS], default=[EAGER, *FORMATS])
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="default: fp32 int8 on cpu, fp32 fp16 bf16 on cuda")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (interleaved across rows)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the img/s sample")
    p.add_argument("--threads", type=int, help="torch and onnxruntime intra-op threads")
    p.add_argument("--device")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (CPU: one process per network)")
    p.add_argument("--fid-images", type=int, default=1000,
                   help="score this many DDIM samples of every network with the course's FID (0: skip; needs Fashion-MNIST)")
    p.add_argument("--out-dir", help="keep the artifacts here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(run=_bench)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What the library raises for a bad input or a missing file: a message for the user, not a bug.
    (CheckpointError, IdxFormatError and DataNotFoundError are among these: ValueError / OSError subclasses.)"""
    from .train import TrainingDivergedError

    return ValueError, TypeError, OSError, TrainingDivergedError


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every expected error becomes one line on stderr and a non-zero exit code: 2 for a bad
    value (ValueError, TypeError), 1 for a missing file or a failed run; ``--debug`` or ``LESSONS_DEBUG=1`` shows
    its traceback. Anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("LESSONS_DEBUG", "") not in ("", "0")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError | TypeError) else 1
