"""Time-to-quality: the FID, precision and recall the cpu preset reaches within its time budget on this machine.

Trains ``lessons_lib.train.preset("cpu")`` for ``--minutes`` of wall-clock time in all (default: the
preset's 30) into ``build/runs/time_to_quality``. The run is resumable: the minutes already spent are kept
in ``time_to_quality.json`` beside ``resume.pt``, so running again after an interruption trains only what
is left of the budget (a run killed without Ctrl-C loses the time since its last checkpoint from the count,
not the steps). Then it draws ``--n`` samples from the EMA weights, balanced over the classes exactly as
``python -m lessons_lib evaluate --checkpoint DIR`` does (DDIM, trailing steps, image i from seed + i),
and scores them with ``lessons_lib.metrics.evaluate`` against the Fashion-MNIST test split. The floor
row scores n real training images the same way: the ``train (real)`` row of
``benchmarks/metric_calibration.py`` at the same n, what a perfect generator would get.

Run from the repository root:  python benchmarks/time_to_quality.py [--minutes 30] [--n 1000] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from metric_calibration import degraded_sets  # benchmarks/, the folder of this script

from lessons_lib import metrics
from lessons_lib import train as T
from lessons_lib.checkpoint import atomic_write
from lessons_lib.config import BUILD_DIR
from lessons_lib.pipeline import DiffusionPipeline

LEDGER = "time_to_quality.json"


def train_for(budget_minutes: float, out_dir: Path, device: str | None, fresh: bool, progress: bool) -> dict:
    """Train the cpu preset until ``budget_minutes`` have been spent on it in all; returns the ledger."""
    ledger_path = out_dir / LEDGER
    ledger = {"minutes": 0.0} if fresh or not ledger_path.exists() else json.loads(ledger_path.read_text())
    left = budget_minutes - ledger["minutes"]
    if left <= 0 and (out_dir / T.RESUME).exists():
        print(f"{ledger['minutes']:.1f} of {budget_minutes} minutes already trained in {out_dir}: evaluating only")
        return ledger
    cfg = T.preset("cpu", out_dir=str(out_dir), minutes=max(left, 0.0), device=device)
    start = time.perf_counter()
    result = T.train(cfg, resume=not fresh, progress=progress)
    ledger.update(minutes=ledger["minutes"] + (time.perf_counter() - start) / 60, step=result.step)
    atomic_write(ledger_path, lambda tmp: tmp.write_text(json.dumps(ledger, indent=2) + "\n"))
    if result.interrupted:
        raise SystemExit(f"interrupted after {ledger['minutes']:.1f} minutes; run again to continue")
    return ledger


def balanced_samples(pipe: DiffusionPipeline, n: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples, n // 10 per class (+1 for the first n % 10 classes), as ``lessons_lib evaluate --checkpoint``."""
    images, labels, start = [], [], 0
    for c in range(len(pipe.classes)):
        n_c = n // len(pipe.classes) + (c < n % len(pipe.classes))
        if n_c:
            x, y = pipe(n_c, c, steps=steps, sampler="ddim", seed=seed + start, progress=False)
            images.append(x.cpu())
            labels.append(y.cpu())
            start += n_c
    return torch.cat(images), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=T.preset("cpu").minutes, help="training budget in all (default 30)")
    parser.add_argument("--n", type=int, default=1000, help="samples to score (compare FIDs only at equal n)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per sample")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--out-dir", type=Path, default=BUILD_DIR / "runs" / "time_to_quality")
    parser.add_argument("--device", help="default: cuda > mps > cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--fresh", action="store_true", help="start training from scratch")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.n < 10:
        parser.error(f"--n must be >= 10 (one sample per class at least), got {args.n}")
    if args.threads:
        torch.set_num_threads(args.threads)

    ledger = train_for(args.minutes, args.out_dir, args.device, args.fresh, not args.no_progress)
    pipe = DiffusionPipeline.from_pretrained(args.out_dir, device=args.device)
    start = time.perf_counter()
    images, labels = balanced_samples(pipe, args.n, args.steps, args.seed)
    sampling_s = time.perf_counter() - start
    real = degraded_sets(args.n, args.seed)["train (real)"]
    scores = {"cpu preset (EMA)": metrics.evaluate(images, reference="test", labels=labels),
              "floor: n real training images": metrics.evaluate(real, reference="test")}

    print(f"\n# time to quality: the cpu preset after {ledger['minutes']:.1f} minutes ({ledger.get('step', '?')} steps) "
          f"in {args.out_dir}")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {pipe.device}; {args.n} samples, DDIM {args.steps} trailing steps, seed {args.seed} "
          f"({sampling_s:.0f} s); scored against the 10,000 test images (k = 3)\n")
    print("| images | n | FID | precision | recall | classifier agrees with the label |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in scores.items():
        agree = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
        print(f"| {name} | {r.n} | {r.fid:.2f} | {r.precision:.3f} | {r.recall:.3f} | {agree} |")


if __name__ == "__main__":
    main()
