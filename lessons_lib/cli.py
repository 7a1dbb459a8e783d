"""The command line: ``python -m lessons_lib <command>`` (also installed as ``lessons``)."""

from __future__ import annotations

import argparse
import sys

from .config import PRETRAINED_DIR


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


def _course(args) -> int:
    from .course import run_course

    results = run_course(smoke=args.smoke, inplace=args.inplace, only=args.only)
    return 0 if all(r.ok for r in results) else 1


def _train(args) -> int:
    from .train import preset, train

    overrides = {k: v for k, v in {
        "out_dir": args.out_dir, "max_steps": args.max_steps, "epochs": args.epochs, "minutes": args.minutes,
        "batch_size": args.batch_size, "lr": args.lr, "prediction": args.prediction, "loss": args.loss,
        "weighting": args.weighting, "schedule": args.schedule, "device": args.device, "seed": args.seed,
        "checkpoint_every": args.checkpoint_every, "ema_decay": args.ema_decay,
    }.items() if v is not None}
    if args.compile:
        overrides["compile"] = True
    if args.channels_last:
        overrides["channels_last"] = True
    if args.max_steps is not None or args.epochs is not None:
        overrides.setdefault("minutes", None)  # an explicit length replaces the preset's time budget
    result = train(preset(args.preset, **overrides), resume=not args.no_resume, progress=not args.no_progress)
    if result.step and result.history:
        print(f"step {result.step}: loss {result.history[-1][1]:.4f}; EMA weights in {result.out_dir}")
    return 130 if result.interrupted else 0


def _sample(args) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from .checkpoint import CheckpointError
    from .data import to_uint8
    from .pipeline import DiffusionPipeline
    from .viz import show_grid

    try:
        pipe = DiffusionPipeline.from_pretrained(args.checkpoint, device=args.device)
    except CheckpointError as err:
        print(f"cannot load {args.checkpoint}: {err}", file=sys.stderr)
        return 1
    label = int(args.class_name) if args.class_name is not None and args.class_name.isdigit() else args.class_name
    images, labels = pipe(args.n, label, steps=args.steps, sampler=args.sampler, seed=args.seed,
                          guidance_scale=args.guidance, progress=not args.no_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        labels = labels if labels is not None else torch.full((len(images),), -1)  # -1: unconditional
        np.savez_compressed(out, images=to_uint8(images)[:, 0].cpu().numpy(), labels=labels.cpu().numpy())
    elif out.suffix in (".png", ".jpg", ".pdf", ".svg"):
        title = f"{args.n} samples, {args.sampler} {args.steps} steps, seed {args.seed}"
        show_grid(images.cpu(), nrow=min(8, args.n), title=title).savefig(out, dpi=150)
    else:
        print(f"--out must end in .png, .jpg, .pdf, .svg or .npz, got {out.name}", file=sys.stderr)
        return 2
    print(f"wrote {len(images)} images to {out}")
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


def _evaluate(args) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from .data import DataNotFoundError, to_model
    from .metrics import evaluate, load_classifier

    if (args.npz is None) == (args.checkpoint is None):
        print("give exactly one of --npz FILE and --checkpoint DIR", file=sys.stderr)
        return 2
    if args.npz is not None:
        if not Path(args.npz).is_file():
            print(f"--npz {args.npz}: no such file", file=sys.stderr)
            return 2
        with np.load(args.npz) as f:
            if "images" not in f:
                print(f"{args.npz} holds {sorted(f.files)}; expected uint8 'images' (N, 28, 28)", file=sys.stderr)
                return 2
            images = torch.from_numpy(f["images"][: args.n])
            labels = torch.from_numpy(f["labels"][: args.n]).long() if "labels" in f else None
        if images.dtype != torch.uint8 or images.ndim != 3:
            print(f"{args.npz}: 'images' must be uint8 (N, 28, 28), got {images.dtype} {tuple(images.shape)}",
                  file=sys.stderr)
            return 2
        images = to_model(images.unsqueeze(1))
        source = f"{len(images)} images from {args.npz}"
    else:
        from .pipeline import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(args.checkpoint, device=args.device)
        except ValueError as err:  # CheckpointError, unknown device
            print(err, file=sys.stderr)
            return 1
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
    try:
        classifier = load_classifier(args.classifier) if args.classifier else None
        result = evaluate(images, reference=args.reference, classifier=classifier, n_reference=args.n_reference,
                          labels=labels if labels is not None and (labels >= 0).all() else None)
    except (ValueError, DataNotFoundError) as err:  # CheckpointError is a ValueError
        print(err, file=sys.stderr)
        return 1
    print(source)
    print(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lessons_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="print versions, device, data location and known problems")
    p.set_defaults(run=_doctor)

    p = sub.add_parser("data", help="find (or download) Fashion-MNIST and verify it")
    p.add_argument("--root", default=None, help="look only in this folder")
    p.add_argument("--no-download", action="store_true", help="never use the network")
    p.set_defaults(run=_data)

    p = sub.add_parser("train", help="train (or resume) a diffusion model; also runs under torchrun")
    p.add_argument("--preset", default="cpu", choices=["cpu", "gpu", "tiny"], help="sizes and defaults to start from")
    p.add_argument("--out-dir", help="where checkpoints go (resumes from out-dir/resume.pt if present)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--minutes", type=float, help="wall-clock budget of this run")
    p.add_argument("--batch-size", type=int, help="global batch, split across processes")
    p.add_argument("--lr", type=float)
    p.add_argument("--ema-decay", type=float, help="EMA decay; ~1 - 1/(steps averaged), e.g. 0.999 for runs of 5k+ steps")
    p.add_argument("--prediction", choices=["eps", "v", "x0"])
    p.add_argument("--loss", choices=["l2", "l1", "huber"])
    p.add_argument("--weighting", choices=["uniform", "min_snr"])
    p.add_argument("--schedule", choices=["linear", "scaled_linear", "cosine", "sigmoid"])
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_train)

    p = sub.add_parser("sample", help="generate images from a saved model folder")
    p.add_argument("--checkpoint", required=True, help="folder with model.safetensors + config.json")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim"])
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i, whatever --n")
    p.add_argument("--class", dest="class_name", help="class name (e.g. sneaker) or index; default: unconditional")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--device")
    p.add_argument("--out", default="samples.png", help=".png grid or .npz (uint8 images (N, 28, 28) and labels)")
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
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim"])
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("course", help="run every lesson headless with papermill and print a table")
    p.add_argument("--smoke", action="store_true", help="shrunk parameters (LESSONS_SMOKE=1)")
    p.add_argument("--inplace", action="store_true", help="write outputs into notebooks/ (to commit them)")
    p.add_argument("--only", nargs="*", default=None, help="lesson name prefixes, e.g. 00 01")
    p.set_defaults(run=_course)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
