"""Quality per model evaluation: FID, precision, recall and wall time of every sampler at a few NFE budgets.

For each sampler of ``lessons_lib.samplers.SAMPLERS`` and each budget of model evaluations (NFE, default
10, 20 and 50) the step count is the largest whose ``sampler.nfe`` fits the budget: Heun evaluates the
model twice per step except the last, PNDM's Runge-Kutta warm-up costs 4 evaluations per step, PLMS's 2.
The reference row is DDPM with all ``--reference-steps`` (1000) steps. Every row draws ``--n``
class-balanced images from the pretrained model with ``DiffusionPipeline`` (image i: class i % 10, seed
``seed + i``, so every sampler starts from the same noises; no guidance), times the
sampling, and scores the images with ``lessons_lib.metrics.evaluate`` against the 10,000 Fashion-MNIST
test images. The table gives FID / FID(reference) too. Every sampler runs on trailing timesteps, or on
``--spacing`` (e.g. ``karras``); a row records its spacing, so one file can hold both.

Rows are written to ``--out`` as each finishes. Running again with the same configuration (n, seed,
model weights) skips the rows already there, and a row stopped mid-way resumes at its next batch of images
(kept in ``<out>.<sampler>-<spacing>-<steps>.partial.pt`` until the row is done), so an interrupted run (the full grid
takes hours on a 2-core CPU, 1000-step DDPM alone over two) continues where it stopped.

Run from the repository root:  python benchmarks/quality_per_nfe.py [--n 1000] [--nfe 10 20 50] [--samplers ddim heun]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lessons_lib import metrics
from lessons_lib.checkpoint import atomic_write
from lessons_lib.config import PRETRAINED_MODEL, REPO_ROOT
from lessons_lib.pipeline import DiffusionPipeline, GenerationConfig
from lessons_lib.samplers import SAMPLERS, SPACINGS, get_sampler
from lessons_lib.schedules import NoiseSchedule

RESULTS = REPO_ROOT / "benchmarks" / "results" / "quality_per_nfe.json"
SPACING = "trailing"  # the rows' timestep spacing unless --spacing says otherwise
NFE_BUDGETS = (10, 20, 50)
SUMMARY_NFE = (20, 10)  # the budgets summary() reports the best sampler at


def steps_for_nfe(name: str, schedule: NoiseSchedule, nfe: int, spacing: str = SPACING) -> int:
    """The most steps of sampler ``name`` whose number of model evaluations is at most ``nfe``."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"an NFE budget must be an int >= 1, got {nfe!r}")
    steps = 1  # one step costs one evaluation with every sampler
    while steps < schedule.num_steps and get_sampler(name, schedule, steps + 1, spacing).nfe <= nfe:
        steps += 1
    return steps


def machine() -> str:
    """Where the timings were taken, in one line."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}"


def balanced_samples(pipe: DiffusionPipeline, sampler: str, steps: int, n: int, seed: int = 0, batch_size: int = 100,
                     progress: bool = True, partial: Path | None = None,
                     spacing: str = SPACING) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """``n`` images, image i of class i % 10 from seed ``seed + i``, in batches; also the seconds and NFE per image.

    ``partial``: a file that keeps the finished batches, so a row interrupted mid-way (1000-step DDPM: over ten
    minutes a batch on a CPU) resumes at its next batch; it is ignored if it holds another row's batches."""
    classes = len(pipe.classes)
    key = {"sampler": sampler, "steps": steps, "spacing": spacing, "n": n, "seed": seed, "batch_size": batch_size,
           "model_sha256": (pipe.metadata or {}).get("weights_sha256")}
    state = {"key": key, "images": [], "labels": [], "seconds": 0.0, "nfe": []}
    if partial is not None and partial.is_file():
        saved = torch.load(partial, weights_only=True)  # tensors, numbers and strings only
        state = saved if saved["key"] == key else state
    starts = range(len(state["images"]) * batch_size, n, batch_size)
    for start in tqdm(starts, desc=f"{sampler}, {steps} steps", disable=not progress, leave=False):
        configs = [GenerationConfig(prompt=i % classes, seed=seed + i, sampler=sampler, steps=steps, spacing=spacing)
                   for i in range(start, min(start + batch_size, n))]
        results = pipe.generate_batch(configs, progress=False)
        state["images"].append(torch.cat([r.images for r in results]))
        state["labels"].append(torch.cat([r.labels for r in results]))
        state["seconds"] += results[0].seconds  # the configs ran as one batch: the time is shared
        state["nfe"].append(results[0].nfe)
        if partial is not None:
            atomic_write(partial, lambda tmp: torch.save(state, tmp))
    (nfe,) = set(state["nfe"])  # every batch makes the same number of network calls
    return torch.cat(state["images"]), torch.cat(state["labels"]), state["seconds"], nfe


def run_row(pipe: DiffusionPipeline, sampler: str, steps: int, n: int, seed: int = 0, batch_size: int = 100,
            progress: bool = True, n_reference: int | None = None, partial: Path | None = None,
            spacing: str = SPACING) -> dict:
    """Sample, time and score one (sampler, steps, spacing) cell of the table (against ``n_reference`` test images;
    None: all)."""
    images, labels, seconds, nfe = balanced_samples(pipe, sampler, steps, n, seed, batch_size, progress, partial, spacing)
    score = metrics.evaluate(images, reference="test", labels=labels, n_reference=n_reference)
    return {"sampler": sampler, "steps": steps, "spacing": spacing, "nfe": nfe, "fid": score.fid, "precision": score.precision,
            "recall": score.recall, "accuracy": score.accuracy, "seconds_per_1000": 1000 * seconds / n,
            "device": str(pipe.device), "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def load_results(path: str | Path = RESULTS) -> dict | None:
    """The results file written by this script, or None if there is none (rows of files from before rows kept
    their spacing get the file's one spacing)."""
    path = Path(path)
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    for row in results["rows"]:
        row.setdefault("spacing", results["config"].get("spacing", "trailing"))
    return results


def label(row: dict) -> str:
    """A row's sampler, with its spacing where it is not the default (trailing)."""
    return row["sampler"] + ("" if row["spacing"] == SPACING else f" ({row['spacing']})")


def reference_row(results: dict) -> dict | None:
    """The reference row (DDPM with ``reference_steps`` steps) of a results dict, if it has been run."""
    steps = results["config"]["reference_steps"]
    return next((r for r in results["rows"] if r["sampler"] == "ddpm" and r["steps"] == steps), None)


def format_table(results: dict) -> str:
    """The results as a markdown table: the reference first, then each sampler by NFE (no ratio column without it)."""
    ref = reference_row(results)
    rows = sorted(results["rows"], key=lambda r: (r is not ref, list(SAMPLERS).index(r["sampler"]), r["spacing"], r["nfe"]))
    ratio = f" FID / FID(DDPM-{ref['steps']}) |" if ref else ""
    lines = [f"| sampler | spacing | steps | NFE | FID |{ratio} precision | recall | s / 1000 images |",
             "|---|---|---:|---:|---:|" + ("---:|" if ref else "") + "---:|---:|---:|"]
    for r in rows:
        ratio = f" {r['fid'] / ref['fid']:.2f} |" if ref else ""
        lines.append(f"| {r['sampler']} | {r['spacing']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} |{ratio} "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['seconds_per_1000']:.0f} |")
    return "\n".join(lines)


def best_at(results: dict, nfe: int) -> dict | None:
    """The row with the lowest FID among those using at most ``nfe`` evaluations (the reference excluded)."""
    ref = reference_row(results)
    rows = [r for r in results["rows"] if r is not ref and r["nfe"] <= nfe]
    return min(rows, key=lambda r: r["fid"]) if rows else None


def summary(results: dict) -> list[str]:
    """One line per budget of SUMMARY_NFE: the best sampler there, and its FID against 1000-step DDPM's when run."""
    ref = reference_row(results)
    lines = []
    for nfe in SUMMARY_NFE:
        best = best_at(results, nfe)
        if best is not None:
            against = (f" = {best['fid'] / ref['fid']:.2f} x DDPM-{ref['steps']} (FID {ref['fid']:.2f})" if ref
                       else " (no DDPM reference row in this table)")
            lines.append(f"best at <= {nfe} NFE: {best['sampler']} ({best['steps']} {best['spacing']} steps), "
                         f"FID {best['fid']:.2f}{against}")
    return lines


def _relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside (the results file is committed)."""
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images per row (compare FIDs only at equal n)")
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFE_BUDGETS), help="budgets of model evaluations")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--spacing", choices=SPACINGS, default=SPACING, help="timestep spacing of every row")
    parser.add_argument("--reference-steps", type=int, default=1000, help="steps of the DDPM reference row (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON file of results (read to resume)")
    parser.add_argument("--model", type=Path, default=PRETRAINED_MODEL, help="a saved model folder")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", help="default: cuda > mps > cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--fresh", action="store_true", help="replace the results in --out instead of resuming")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.n < 10:
        parser.error(f"--n must be >= 10 (one image per class at least), got {args.n}")
    if any(b < 1 for b in args.nfe):
        parser.error(f"--nfe budgets must be >= 1, got {args.nfe}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.spacing == "karras" and {"pndm", "plms"} & set(args.samplers):
        parser.error("pndm and plms need evenly spaced steps: leave them out of --samplers with --spacing karras")

    pipe = DiffusionPipeline.from_pretrained(args.model, device=args.device)
    T = pipe.schedule.num_steps
    if not 0 <= args.reference_steps <= T:
        parser.error(f"--reference-steps must lie in [0, {T}], got {args.reference_steps}")
    config = {"n": args.n, "seed": args.seed, "spacing": "per row", "reference": "test (10,000 images)",
              "reference_steps": args.reference_steps, "model": _relative(args.model),
              "model_sha256": pipe.metadata["weights_sha256"]}
    results = None if args.fresh else load_results(args.out)
    if results is not None and any(results["config"].get(k) != config[k] for k in ("n", "seed", "model_sha256")):
        raise SystemExit(f"{args.out} holds results of another configuration ({results['config']}); "
                         f"use --fresh to replace them or --out to write elsewhere")
    results = results or {"config": config, "rows": []}
    results["config"]["spacing"] = "per row"  # older files had one spacing for all rows: load_results copied it
    if args.reference_steps:
        results["config"]["reference_steps"] = args.reference_steps

    plan = [("ddpm", args.reference_steps, SPACING)] if args.reference_steps else []  # all T steps: any spacing
    plan += [(name, steps_for_nfe(name, pipe.schedule, b, args.spacing), args.spacing)
             for name in args.samplers for b in args.nfe]
    done = {(r["sampler"], r["steps"], r["spacing"]) for r in results["rows"]}
    todo = [cell for cell in dict.fromkeys(plan) if cell not in done]
    print(f"# quality per NFE: {len(plan) - len(todo)} of {len(set(plan))} rows already in {args.out}, {len(todo)} to run")
    print(f"# {machine()}, device {pipe.device}; {args.n} images per row, seed {args.seed}", flush=True)
    for name, steps, spacing in todo:
        partial = args.out.with_name(f"{args.out.stem}.{name}-{spacing}-{steps}.partial.pt")  # its finished batches
        row = run_row(pipe, name, steps, args.n, args.seed, args.batch_size, not args.no_progress, partial=partial,
                      spacing=spacing)
        partial.unlink(missing_ok=True)
        results["rows"].append(row)
        results["date"] = row["date"]
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
        print(f"  {name:<16} {spacing:<9} {steps:5d} steps  {row['nfe']:5d} NFE  FID {row['fid']:8.2f}  "
              f"{row['seconds_per_1000']:8.0f} s / 1000 images", flush=True)

    where = sorted({f"{r['machine']}, device {r['device']}" for r in results["rows"]})
    print(f"\n# {args.n} images per row vs the 10,000 test images (k = 3); model sha256 {config['model_sha256'][:12]}; "
          f"seconds measured on: {'; '.join(where)}\n")
    print(format_table(results))
    print("\n" + "\n".join(summary(results)))


if __name__ == "__main__":
    main()
