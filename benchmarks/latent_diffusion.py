"""Latent diffusion against pixel diffusion on a laptop CPU, measured.

- ``autoencoder NAME --epochs E``: trains one autoencoder of ``AUTOENCODERS`` into ``build/runs/latent/ae-NAME-Eep``
  and measures what it keeps: reconstruction MSE and PSNR (posterior mean, decoded) over the 10,000 test images, and the course
  FID of the reconstructions of the 1,000 training images whose own FID against the test set is the course's floor
  (3.0). That FID is the floor of every latent model built on this autoencoder: a perfect latent model would make
  exactly such reconstructions.
- ``diffusion NAME --minutes M``: trains the ``cpu`` preset's U-Net for M minutes on pixels (``NAME`` = ``pixel``) or
  on the latents of the autoencoder run ``NAME`` (e.g. ``f4c4-5ep``; the network takes its latent channels), then
  scores its EMA weights with the course metric (1,000 class-balanced images, DPM-Solver++ 2M, 20 steps on the
  Karras grid) and measures the cost of one network evaluation and the sampling speed (images/s at 20 steps, the
  decoder included). Equal minutes is the fair comparison here: one step of the two networks costs very
  differently. Run the pixel and the latent run at the same time pinned one core each (``taskset -c 0 ... &
  taskset -c 1 ...``): both see the same machine.
- ``table``: gathers the finished runs into ``benchmarks/results/latent_diffusion.json`` and prints both tables.

Run from the repository root:
  python benchmarks/latent_diffusion.py autoencoder f4c4 --epochs 5
  taskset -c 0 python benchmarks/latent_diffusion.py autoencoder f4c4 --epochs 1 &
  taskset -c 1 python benchmarks/latent_diffusion.py autoencoder f2c2 --epochs 1
  taskset -c 0 python benchmarks/latent_diffusion.py diffusion pixel --minutes 30 &
  taskset -c 1 python benchmarks/latent_diffusion.py diffusion f4c4-5ep --minutes 30
  python benchmarks/latent_diffusion.py table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from time_to_quality import balanced_samples, cpu_model

from lessons_lib import metrics
from lessons_lib import train as T
from lessons_lib.autoencoder import AutoencoderConfig, load_autoencoder
from lessons_lib.autoencoder_train import AutoencoderTrainConfig, train_autoencoder
from lessons_lib.checkpoint import atomic_write
from lessons_lib.config import BUILD_DIR, REPO_ROOT
from lessons_lib.data import load_fashion_mnist, to_model
from lessons_lib.device import randn
from lessons_lib.pipeline import DiffusionPipeline, GenerationConfig

RUNS = BUILD_DIR / "runs" / "latent"
RESULT = REPO_ROOT / "benchmarks" / "results" / "latent_diffusion.json"
FLOOR_N = 1000  # the course metric's sample count; the floor is this many training images against the test set
SAMPLER, STEPS = "dpmpp_2m", 20  # the balanced preset (Karras grid)
# f = downsampling factor per side, c = latent channels: f4c4 is 4x7x7 (196 numbers for 784 pixels), f2c2 2x14x14.
AUTOENCODERS = {
    "f4c4": AutoencoderConfig(channel_mults=(1, 2, 2), latent_channels=4),
    "f4c8": AutoencoderConfig(channel_mults=(1, 2, 2), latent_channels=8),
    "f2c2": AutoencoderConfig(channel_mults=(1, 2), latent_channels=2),
    "f4c4+feature": AutoencoderConfig(channel_mults=(1, 2, 2), latent_channels=4, feature_weight=0.1),
    "f4c4+kl1e-6": AutoencoderConfig(channel_mults=(1, 2, 2), latent_channels=4, kl_weight=1e-6),
}


def autoencoder_dir(name: str, epochs: float) -> Path:
    return RUNS / f"ae-{name}-{epochs:g}ep"


def _save(path: Path, entry: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(entry, indent=2) + "\n"))


def _machine() -> dict:
    return {"cpu_model": cpu_model(), "threads": torch.get_num_threads(), "cores": sorted(os.sched_getaffinity(0))}


@torch.no_grad()
def reconstruction_scores(folder: Path) -> dict:
    """Test-split MSE / PSNR of mean reconstructions (images in [-1, 1], PSNR with peak-to-peak 2) and the FID,
    precision and recall of the floor's 1,000 training images reconstructed, with the floor itself beside it."""
    model = load_autoencoder(folder)
    test, train = load_fashion_mnist("test"), load_fashion_mnist("train")

    def reconstruct(images_uint8):
        return torch.cat([model.decode(model.encode(to_model(x)).mode()).clamp(-1, 1) for x in images_uint8.split(500)])

    x = to_model(test.images)
    mse = (reconstruct(test.images) - x).square().flatten(1).mean(1)
    idx = metrics.reference_indices(len(train), FLOOR_N)
    real = to_model(train.images[idx])
    recon = metrics.evaluate(reconstruct(train.images[idx]), reference="test", labels=train.labels[idx])
    floor = metrics.evaluate(real, reference="test", labels=train.labels[idx])
    return {"test_mse": mse.mean().item(), "test_psnr_db": (10 * torch.log10(4 / mse)).mean().item(),
            "recon_fid": recon.fid, "recon_precision": recon.precision, "recon_recall": recon.recall,
            "recon_class_agreement": recon.accuracy, "floor_fid": floor.fid, "n": FLOOR_N}


def autoencoder(args) -> None:
    if args.name not in AUTOENCODERS:
        raise SystemExit(f"unknown autoencoder {args.name!r}; known: {', '.join(AUTOENCODERS)}")
    out = autoencoder_dir(args.name, args.epochs)
    cfg = AutoencoderTrainConfig(model=replace(AUTOENCODERS[args.name]), epochs=args.epochs, out_dir=str(out))
    ledger_path = out / "ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {"train_s": 0.0, "step": 0}
    total = cfg.total_steps(60_000)
    if ledger["step"] < total:
        start = time.time()
        result = train_autoencoder(cfg, progress=not args.no_progress)
        ledger.update(train_s=ledger["train_s"] + time.time() - start, step=result.step)
        _save(ledger_path, ledger)
        if result.interrupted:
            raise SystemExit("interrupted; run the same command to continue")
    ae = load_autoencoder(out)
    entry = {"name": args.name, "config": ae.config.to_dict(), "epochs": args.epochs, "steps": ledger["step"],
             "latent_shape": list(ae.config.latent_shape(28)), "parameters": sum(p.numel() for p in ae.parameters()),
             "train_s": ledger["train_s"], "images_per_s": cfg.batch_size * ledger["step"] / ledger["train_s"],
             **_machine(), **reconstruction_scores(out)}
    _save(out / "result.json", entry)
    print(json.dumps({k: v for k, v in entry.items() if k != "config"}, indent=1))


@torch.no_grad()
def speed(pipe: DiffusionPipeline, batch: int = 64, repeats: int = 5) -> dict:
    """Median ms of one network evaluation per image (batch 64), and images/s of 20-step sampling (decoder included)."""
    x = randn((batch, *pipe.sample_shape), seed=0)
    t, y = torch.full((batch,), 500), torch.zeros(batch, dtype=torch.long)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        pipe.model(x, t, y)
        times.append(time.perf_counter() - start)
    per_eval = sorted(times[1:])[repeats // 2] / batch * 1e3
    result = pipe.generate(GenerationConfig(prompt=0, num_images=batch, sampler=SAMPLER, steps=STEPS), progress=False)
    return {"ms_per_eval_per_image": per_eval, "sample_images_per_s": batch / result.seconds}


def diffusion(args) -> None:
    latent = args.name != "pixel"
    out = RUNS / f"ldm-{args.name}" if latent else RUNS / "pixel"
    source = RUNS / f"ae-{args.name}"  # the autoencoder run whose latents a latent model learns
    changes = {}
    if latent:
        if not (source / "result.json").exists():
            raise SystemExit(f"no finished autoencoder run {source}; run `autoencoder` first")
        channels = load_autoencoder(source).config.latent_channels
        changes = {"autoencoder": str(source), "model": replace(T.preset("cpu").model, in_channels=channels)}
    cfg = T.preset("cpu", minutes=args.minutes, out_dir=str(out), checkpoint_every=250, **changes)
    ledger_path = out / "ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {"train_s": 0.0, "step": 0}
    left = args.minutes - ledger["train_s"] / 60
    if left > 0.05:
        start = time.time()
        result = T.train(replace(cfg, minutes=left), progress=not args.no_progress)
        ledger.update(train_s=ledger["train_s"] + time.time() - start, step=result.step)
        _save(ledger_path, ledger)
        if result.interrupted:
            raise SystemExit("interrupted; run the same command to continue")
    pipe = DiffusionPipeline.from_pretrained(out, device="cpu")
    images, labels = balanced_samples(pipe, FLOOR_N, SAMPLER, STEPS)
    r = metrics.evaluate(images, reference="test", labels=labels)
    entry = {"name": args.name, "latent": latent, "minutes": args.minutes, "steps": ledger["step"],
             "images": ledger["step"] * cfg.batch_size, "train_s": ledger["train_s"],
             "images_per_s": cfg.batch_size * ledger["step"] / ledger["train_s"], "sample_shape": list(pipe.sample_shape),
             "parameters": sum(p.numel() for p in pipe.model.parameters()), "sampler": SAMPLER, "sampler_steps": STEPS,
             "fid": r.fid, "precision": r.precision, "recall": r.recall, "class_agreement": r.accuracy, "n": r.n,
             **speed(pipe), **_machine()}
    if latent:
        entry["autoencoder"] = json.loads((source / "result.json").read_text())
    _save(out / "result.json", entry)
    print(json.dumps({k: v for k, v in entry.items() if k != "autoencoder"}, indent=1))


def table(args) -> None:
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(RUNS.glob("*/result.json"))}
    autoencoders = [v for k, v in found.items() if k.startswith("ae-")]
    models = [v for k, v in found.items() if not k.startswith("ae-")]
    if not found:
        raise SystemExit(f"no finished runs in {RUNS}")
    _save(RESULT, {"autoencoders": autoencoders, "diffusion": models})
    print("| autoencoder | latent | params | epochs | train min | test MSE | PSNR dB | recon FID | floor FID |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for a in autoencoders:
        print(f"| {a['name']} | {'x'.join(map(str, a['latent_shape']))} | {a['parameters'] / 1e6:.2f}M | {a['epochs']:g} | "
              f"{a['train_s'] / 60:.1f} | {a['test_mse']:.4f} | {a['test_psnr_db']:.1f} | {a['recon_fid']:.2f} | "
              f"{a['floor_fid']:.2f} |")
    pixel = next((m for m in models if not m["latent"]), None)
    print("\n| model | denoises | minutes | images seen | img/s | ms/eval/img | FID | P | R | agree | sample img/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in models:
        ratio = f" ({m['ms_per_eval_per_image'] / pixel['ms_per_eval_per_image']:.2f}x)" if pixel and m is not pixel else ""
        print(f"| {m['name']} | {'x'.join(map(str, m['sample_shape']))} | {m['minutes']:g} | {m['images']:,} | "
              f"{m['images_per_s']:.0f} | {m['ms_per_eval_per_image']:.2f}{ratio} | {m['fid']:.2f} | {m['precision']:.3f} | "
              f"{m['recall']:.3f} | {m['class_agreement']:.3f} | {m['sample_images_per_s']:.1f} |")
    if any(math.isnan(m["fid"]) for m in models):
        print("(a NaN FID: the run's samples collapsed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("autoencoder", help="train one autoencoder candidate and measure its reconstructions")
    p.add_argument("name", choices=list(AUTOENCODERS))
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=autoencoder)
    p = sub.add_parser("diffusion", help="train the cpu preset on pixels or latents for a wall-clock budget, then score")
    p.add_argument("name", help="pixel, or an autoencoder name whose run has finished")
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=diffusion)
    sub.add_parser("table", help="gather the finished runs and print the tables").set_defaults(run=table)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
