"""Time-to-quality: which training recipe gets furthest on a laptop CPU, measured.

Each candidate is a set of changes to one starting recipe (``FLAGS_ONLY``: the ``cpu`` preset's network with v
prediction, min-SNR-5, bf16 autocast, batch 128, lr 2e-3, EMA 0.999: the flags-only recipe a new user
can type). ``run NAME`` trains one candidate into ``build/runs/ttq/NAME`` for a budget of images seen, or with
``--minutes M`` into ``build/runs/ttq/NAME-Mmin`` for a budget of wall-clock, keeps its EMA weights every
``--every`` steps (``snapshot_every``), and scores them:

- every snapshot: FID of ``--curve-n`` class-balanced samples (DDIM, ``--curve-steps`` steps), for the
  FID-against-images (or minutes) curve; a snapshot's minutes are its images over the run's images/s;
- the last weights: the course metric, 1,000 class-balanced samples against the 10k test images, with the
  samplers of ``--final`` (DDIM at 50 steps and DPM-Solver++ 2M at 20 by default) and, with ``--ddpm``,
  1000-step ancestral DDPM;
- ``fewstep NAME``: the same metric at 1 to 50 network evaluations (``FEW_STEP``), for comparing objectives
  (eps, v, rectified flow) as few-step models: the table's second part and the figure's second panel.

Candidates that cost the same per step (objective, weighting, how t is drawn, LR schedule, EMA) are
compared at equal images seen, which a busy machine cannot bias; each run also records its images/s, so
minutes follow for all of them from one machine. Candidates that change the cost of a step (width, depth,
batch) and diffusers' recipe from the Hugging Face course (``hf_course``, benchmarks/hf_course_recipe.py:
its own network, scheduler, optimiser and loop) are compared at equal minutes. Run two at a time pinned one
core each (``taskset -c 0 ... & taskset -c 1 ...``): both see the same conditions. ``table`` gathers every
finished run (or those ``--names`` names, by folder) into ``benchmarks/results/time_to_quality.json`` (or
``--out``) and draws the curves. A run stopped with Ctrl-C continues when the same command runs again: a
constant-rate candidate trains what is left of its minutes, a decaying one ends at the step it planned.

Run from the repository root:
  taskset -c 0 python benchmarks/time_to_quality.py run cosine --images 100000
  taskset -c 1 python benchmarks/time_to_quality.py run hf_course --minutes 30   # wall-clock budget: NAME-30min
  python benchmarks/time_to_quality.py table --names flags-30min hf_course-30min --out recipe_30min
  python benchmarks/time_to_quality.py fewstep flow   # then: table --names flags eps flow ... --out flow_objectives
  python benchmarks/time_to_quality.py score data/pretrained/ddpm_fmnist --sampler plms --steps 19
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from lessons_lib import metrics
from lessons_lib import train as T
from lessons_lib.checkpoint import atomic_write
from lessons_lib.config import BUILD_DIR, REPO_ROOT
from lessons_lib.pipeline import DiffusionPipeline
from lessons_lib.samplers import get_sampler
from lessons_lib.schedules import get_schedule

RUNS = BUILD_DIR / "runs" / "ttq"
RESULTS = REPO_ROOT / "benchmarks" / "results"
# The starting point: the flags a new user typed on the old cpu preset (constant lr after the warm-up, EMA 0.999).
# amp "auto" is the bf16 they typed on a CPU with AMX / AVX512-BF16, and fp32 on one without (where bf16 autocast
# is emulated: 12x slower on an AVX2-only EPYC); each run records which it got.
FLAGS_ONLY = dict(prediction="v", weighting="min_snr", amp="auto", batch_size=128, lr=2e-3, ema_decay=0.999,
                  lr_schedule="constant", ema_sigma_rel=None, timesteps="uniform")
DECAY_EMA = dict(lr_schedule="cosine", ema_sigma_rel=0.1)  # the two changes that suit any run length, combined
# rectified flow (lessons_lib.flow) with logit-normal t (Esser et al. 2024: t = sigmoid(n), n ~ N(0, 1), which is
# log-SNR = -2 n ~ N(0, 2) on the flow path)
FLOW_LOGIT_NORMAL = dict(prediction="flow", schedule="flow", weighting="uniform", timesteps="logsnr_normal",
                         logsnr_mean=0.0, logsnr_std=2.0)
CANDIDATES = {
    "flags": {},  # the starting point: every other row changes one or more things
    # one change each
    "cosine": dict(lr_schedule="cosine"),
    "power_ema": dict(ema_sigma_rel=0.1),
    "eps": dict(prediction="eps"),
    "logsnr_normal": dict(weighting="uniform", timesteps="logsnr_normal"),
    # combined, then one more change on top
    "cosine+power_ema": DECAY_EMA,
    "cosine+power_ema+eps": {**DECAY_EMA, "prediction": "eps"},
    "cosine+power_ema+uniform": {**DECAY_EMA, "weighting": "uniform"},
    "cosine+power_ema+logsnr_normal": {**DECAY_EMA, "weighting": "uniform", "timesteps": "logsnr_normal"},
    "cosine+power_ema+lr4e-3": {**DECAY_EMA, "lr": 4e-3},
    "cosine+power_ema+ema0.05": {**DECAY_EMA, "ema_sigma_rel": 0.05},
    # rectified flow: velocity target, straight path, t uniform or logit-normal
    "flow": dict(prediction="flow", schedule="flow", weighting="uniform"),
    "flow+logit_normal": FLOW_LOGIT_NORMAL,
    # v on the cosine schedule, t drawn as flow+logit_normal draws it (log-SNR ~ N(0, 2)), the v loss unweighted:
    # its one-loss weighting over log-SNR (train.objective_density) is nearly flow+logit_normal's, so the pair
    # separates the weighting from the straight path
    "v+logit_normal": dict(weighting="uniform", timesteps="logsnr_normal", logsnr_mean=0.0, logsnr_std=2.0),
    # the network's size and the batch: they change the cost of a step, so compare them at equal minutes
    # (``run NAME --minutes M``); keys that are UNetConfig fields change the network
    "base48": dict(base_channels=48),
    "res2": dict(num_res_blocks=2),
    "batch64": dict(batch_size=64),
    "batch64+lr1e-3": dict(batch_size=64, lr=1e-3),
    "batch32": dict(batch_size=32),
    "batch64+cosine": dict(batch_size=64, lr_schedule="cosine"),  # decays over the steps planned from the clock
    "batch64+flow": {**FLOW_LOGIT_NORMAL, "batch_size": 64},
    # the long preset's question at 150 minutes: does the wider network pay once the run is five times longer?
    # (both decay over the steps planned from the clock, so a run resumed after a pause ends where it would have)
    "batch64+cosine+power_ema": {**DECAY_EMA, "batch_size": 64},
    "base48+batch64+cosine+power_ema": {**DECAY_EMA, "batch_size": 64, "base_channels": 48},
    # the cpu preset's questions at 30 minutes: do the decay and the power EMA pay in a short run, and does a rate
    # that decays to 0, or a constant one, take a higher peak?
    "batch64+cosine+power_ema+lr4e-3": {**DECAY_EMA, "batch_size": 64, "lr": 4e-3},
    "batch64+lr4e-3": dict(batch_size=64, lr=4e-3),
    # diffusers' recipe from the first unit of the Hugging Face course (benchmarks/hf_course_recipe.py): its own
    # network, scheduler, optimiser and loop, unconditional; only with --minutes
    "hf_course": {"recipe": "hf_course"},
}
# Few-step scoring (``fewstep``): DDIM, which on the flow path is exactly Euler in t (lessons_lib.flow), at every
# budget, and DPM-Solver++ 2M where it differs from DDIM (from 2 evaluations); the best of them per budget.
FEW_STEP = [("ddim", n) for n in (1, 2, 4, 10, 20, 50)] + [("dpmpp_2m", n) for n in (2, 4, 10, 20, 50)]


def run_dir(name: str, minutes: float | None) -> Path:
    """Runs with a budget of images live under their name, runs with a budget of minutes under ``NAME-Mmin``."""
    return RUNS / (name if minutes is None else f"{name}-{minutes:g}min")


def candidate_config(name: str, images: int | None, every: int, minutes: float | None = None) -> T.TrainConfig:
    """The cpu preset with the candidate's changes, for ``images`` seen or ``minutes`` of training."""
    if name not in CANDIDATES or "recipe" in CANDIDATES[name]:
        trainable = [n for n, c in CANDIDATES.items() if "recipe" not in c]
        raise SystemExit(f"no course recipe named {name!r}; known: {', '.join(trainable)}")
    if (images is None) == (minutes is None):
        raise SystemExit("give the budget as images or as minutes, not both")
    changes = {**FLAGS_ONLY, **CANDIDATES[name]}
    base = T.preset("cpu")
    network = {k: changes.pop(k) for k in list(changes) if hasattr(base.model, k)}
    length = dict(max_steps=images // changes["batch_size"]) if images else dict(max_steps=None)
    return T.preset("cpu", **changes, **length, minutes=minutes, model=replace(base.model, **network),
                    out_dir=str(run_dir(name, minutes)), snapshot_every=every, checkpoint_every=every)


def balanced_samples(pipe: DiffusionPipeline, n: int, sampler: str, steps: int, seed: int = 0):
    """n samples, n // 10 per class (+1 for the first n % 10 classes), as ``lessons_lib evaluate --checkpoint``."""
    images, labels, start = [], [], 0
    for c in range(len(pipe.classes)):
        n_c = n // len(pipe.classes) + (c < n % len(pipe.classes))
        if n_c:
            x, y = pipe(n_c, c, steps=steps, sampler=sampler, seed=seed + start, progress=False)
            images.append(x.cpu())
            labels.append(y.cpu())
            start += n_c
    return torch.cat(images), torch.cat(labels)


def pipeline_samples(folder: Path, n: int, sampler: str, steps: int):
    """Class-balanced samples and their labels from a course model folder."""
    return balanced_samples(DiffusionPipeline.from_pretrained(folder, device="cpu"), n, sampler, steps)


def score(weights: Path, n: int, sampler: str, steps: int, draw=pipeline_samples) -> dict:
    """The course metric of ``n`` samples that ``draw(weights, n, sampler, steps)`` returns as (images, labels);
    labels None (an unconditional model): no class agreement."""
    start = time.perf_counter()
    images, labels = draw(weights, n, sampler, steps)
    seconds = time.perf_counter() - start
    r = metrics.evaluate(images, reference="test", labels=labels)
    return {"sampler": sampler, "steps": steps, "n": r.n, "fid": r.fid, "precision": r.precision, "recall": r.recall,
            "class_agreement": r.accuracy, "sampling_s": seconds}


def fid_curve(args, snapshots: list[tuple[int, Path]], batch_size: int, images_per_s: float,
              draw=pipeline_samples) -> list[dict]:
    """FID of ``--curve-n`` samples (DDIM ``--curve-steps``) of each (step, weights) snapshot, with its minutes."""
    curve = []
    for step, weights in snapshots:
        r = score(weights, args.curve_n, "ddim", args.curve_steps, draw)
        images = step * batch_size
        curve.append({"step": step, "images": images, "minutes": images / images_per_s / 60, "fid": r["fid"]})
        print(f"{args.name}: step {step}: FID({args.curve_n}, DDIM {args.curve_steps}) {r['fid']:.2f}", flush=True)
    return curve


def run(args) -> None:
    if CANDIDATES[args.name].get("recipe") == "hf_course":
        return run_hf_course(args)
    cfg = candidate_config(args.name, None if args.minutes else args.images, args.every, args.minutes)
    out = Path(cfg.out_dir)
    ledger_path = out / "ttq.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {"train_s": 0.0}
    # a planned run ends at its planned step, which its clock may reach a few seconds early or late
    unfinished = (ledger.get("step", 0) < cfg.max_steps if not cfg.minutes
                  else not ledger.get("finished") if cfg.plans_from_clock()
                  else ledger.get("train_s", 0.0) < 60 * cfg.minutes)
    if not (out / T.RESUME).exists() or unfinished:
        start = time.time()
        ledger.setdefault("started", start)
        # the clock bounds a constant-rate run: resumed, it trains what is left of the budget (a planned run keeps
        # its budget and ends at its planned step)
        left = (replace(cfg, minutes=cfg.minutes - ledger["train_s"] / 60) if cfg.minutes and not cfg.plans_from_clock()
                else cfg)
        result = T.train(left, progress=not args.no_progress)
        ledger.update(train_s=ledger["train_s"] + time.time() - start, step=result.step, finished=not result.interrupted)
        atomic_write(ledger_path, lambda tmp: tmp.write_text(json.dumps(ledger, indent=2)))
        if result.interrupted:
            raise SystemExit("interrupted; run the same command to continue")
    ledger["images_per_s"] = cfg.batch_size * ledger["step"] / ledger["train_s"]
    snapshots = [(int(p.name.removeprefix("step_")), p) for p in sorted((out / T.SNAPSHOTS_DIR).glob("step_*"))]
    curve = fid_curve(args, snapshots, cfg.batch_size, ledger["images_per_s"])
    final = [score(out, args.final_n, sampler, steps) for sampler, steps in final_samplers(args)]
    amp = T.training_autocast_dtype("cpu") if cfg.amp == "auto" else {"bf16": torch.bfloat16, "off": None}[cfg.amp]
    write_result(args, out, cfg.to_dict(), ledger, cfg.batch_size, str(amp).removeprefix("torch.") if amp else "fp32",
                 curve, final)


def final_samplers(args) -> list[tuple[str, int]]:
    """The samplers that score the last weights: ``--final`` (``sampler:steps`` each), and DDPM 1000 with ``--ddpm``."""
    pairs = [(f.split(":")[0], int(f.split(":")[1])) for f in args.final]
    return pairs + [("ddpm", 1000)] * args.ddpm


def write_result(args, out: Path, config: dict, ledger: dict, batch_size: int, autocast: str, curve: list,
                 final: list) -> None:
    for r in final:
        agree = f"{r['class_agreement']:.3f}" if r["class_agreement"] is not None else "-"
        print(f"{args.name}: {r['sampler']} {r['steps']}: FID {r['fid']:.2f} P {r['precision']:.3f} R {r['recall']:.3f} "
              f"agree {agree}", flush=True)
    entry = {"name": args.name, "changes": CANDIDATES[args.name], "config": config, "steps": ledger["step"],
             "cpu_model": cpu_model(), "autocast": autocast, "images": ledger["step"] * batch_size,
             "budget": {"minutes": args.minutes} if args.minutes else {"images": args.images},
             "train_s": ledger["train_s"], "images_per_s": ledger["images_per_s"], "threads": torch.get_num_threads(),
             "cores": sorted(os.sched_getaffinity(0)), "curve": curve, "final": final, "curve_n": args.curve_n,
             "curve_steps": args.curve_steps}
    atomic_write(out / "result.json", lambda tmp: tmp.write_text(json.dumps(entry, indent=2)))


def run_hf_course(args) -> None:
    """Diffusers' HF-course recipe (benchmarks/hf_course_recipe.py) for ``--minutes``, scored like the others."""
    import hf_course_recipe as hf

    if not args.minutes:
        raise SystemExit("hf_course trains its own loop for a wall-clock budget: give --minutes")
    out = run_dir(args.name, args.minutes)
    ledger = hf.train(out, args.minutes, args.every, progress=not args.no_progress)
    ledger["images_per_s"] = hf.RECIPE["batch_size"] * ledger["step"] / ledger["train_s"]
    draw = lambda weights, n, sampler, steps: (hf.samples(weights, n, sampler, steps), None)  # noqa: E731
    snapshots = [(int(p.stem.removeprefix("step_")), p) for p in sorted((out / "snapshots").glob("step_*.safetensors"))]
    curve = fid_curve(args, snapshots, hf.RECIPE["batch_size"], ledger["images_per_s"], draw)
    final = [score(out / "model.safetensors", args.final_n, s, n, draw) for s, n in final_samplers(args)]
    write_result(args, out, hf.config(), ledger, hf.RECIPE["batch_size"], "fp32", curve, final)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def fewstep(args) -> None:
    """Score a finished run's last weights at few network evaluations (``FEW_STEP``) into its result.json."""
    path = RUNS / args.name / "result.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: finish `run {args.name}` first")
    entry = json.loads(path.read_text())
    done = {(r["sampler"], r["steps"]) for r in entry.get("few_step", []) + entry["final"]}
    for sampler, steps in FEW_STEP:
        if (sampler, steps) not in done:
            r = score(path.parent, args.n, sampler, steps)
            entry.setdefault("few_step", []).append(r)
            print(f"{args.name}: {sampler} {steps}: FID {r['fid']:.2f}", flush=True)
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(entry, indent=2)))


def table(args) -> None:
    entries = [{**json.loads(p.read_text()), "run": p.parent.name} for p in sorted(RUNS.glob("*/result.json"))]
    entries = [e for e in entries if not args.names or e["run"] in args.names]
    if not entries:
        raise SystemExit(f"no finished runs under {RUNS}" + (f" named {', '.join(args.names)}" if args.names else ""))
    base = next((e for e in entries if e["name"] == "flags"), entries[0])
    by_minutes = all("minutes" in e.get("budget", {}) for e in entries)
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "flags_only": FLAGS_ONLY,
            "preset_network": T.preset("cpu").model.to_dict(), "runs": entries}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.out}.json"
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    best = lambda e: min(e["final"], key=lambda r: r["fid"])  # noqa: E731  (the best sampler each run was scored with)
    print(f"| candidate | changes | images | img/s | best FID (sampler) | vs {base['run']} | P | R | class agreement | all |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for e in sorted(entries, key=lambda e: best(e)["fid"]):
        d = best(e)
        agree = f"{d['class_agreement']:.3f}" if d["class_agreement"] is not None else "-"
        scores = ", ".join(f"{r['sampler']}-{r['steps']} {r['fid']:.2f}" for r in e["final"])
        print(f"| {e['run']} | {e['changes'] or '-'} | {e['images']:,} | {e['images_per_s']:.0f} | {d['fid']:.2f} "
              f"({d['sampler']}-{d['steps']}) | {d['fid'] / best(base)['fid']:.2f}x | {d['precision']:.3f} | "
              f"{d['recall']:.3f} | {agree} | {scores} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    few = {e["run"]: best_per_budget(e) for e in entries if "few_step" in e}
    fig, axes = plt.subplots(1, 1 + bool(few), figsize=(7 + 5 * bool(few), 4), layout="constrained", squeeze=False)
    ax = axes[0, 0]
    for e in entries:
        c = e["curve"]
        x = [p["minutes"] for p in c] if by_minutes else [p["images"] / 1e3 for p in c]
        ax.plot(x, [p["fid"] for p in c], marker="o", ms=3, label=e["run"])
    ax.set(xlabel="minutes of training" if by_minutes else "thousand images seen",
           ylabel=f"FID ({entries[0]['curve_n']} samples, DDIM {entries[0]['curve_steps']})", yscale="log",
           title=f"FID against training {'time' if by_minutes else 'images'} (one core each)")
    ax.legend(fontsize=7, ncol=2)
    if few:
        budgets = sorted({n for best in few.values() for n in best})
        print("\n| candidate | " + " | ".join(f"{n} NFE" for n in budgets) + " |")
        print("|---|" + "---:|" * len(budgets))
        for name, best in few.items():
            print(f"| {name} | " + " | ".join(f"{best[n]['fid']:.1f} ({best[n]['sampler']})" if n in best else "-"
                                              for n in budgets) + " |")
            axes[0, 1].plot(list(best), [r["fid"] for r in best.values()], marker="o", ms=3, label=name)
        axes[0, 1].set(xscale="log", yscale="log", xlabel="network evaluations", xticks=budgets, xticklabels=budgets,
                       ylabel="FID (1,000 samples, best sampler)", title="FID against network evaluations")
        axes[0, 1].legend(fontsize=7)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"\nwrote {out} and {out.with_suffix('.png').name}")


def best_per_budget(entry: dict) -> dict[int, dict]:
    """The lowest-FID sampler at each number of network evaluations, over the run's final and few-step scores."""
    schedule = get_schedule(entry["config"]["schedule"], entry["config"]["num_steps"])
    best: dict[int, dict] = {}
    for r in entry["final"] + entry.get("few_step", []):
        n = get_sampler(r["sampler"], schedule, r["steps"]).nfe  # the sampler counts its own network evaluations
        if n not in best or r["fid"] < best[n]["fid"]:
            best[n] = r
    return dict(sorted(best.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train and score one candidate (resumable)")
    p.add_argument("name", choices=list(CANDIDATES))
    p.add_argument("--images", type=int, default=100_000, help="training images seen (the budget)")
    p.add_argument("--minutes", type=float, help="a wall-clock budget instead of --images (for candidates that cost "
                   "more or less per step); the run goes to build/runs/ttq/NAME-Mmin")
    p.add_argument("--final", nargs="+", default=["ddim:50", "dpmpp_2m:20"], metavar="SAMPLER:STEPS",
                   help="samplers that score the last weights")
    p.add_argument("--every", type=int, default=130, help="steps between snapshots on the curve")
    p.add_argument("--curve-n", type=int, default=250, help="samples per point of the curve")
    p.add_argument("--curve-steps", type=int, default=20, help="DDIM steps per point of the curve")
    p.add_argument("--final-n", type=int, default=1000, help="samples scored for the last weights (the course metric: 1000)")
    p.add_argument("--ddpm", action="store_true", help="also score 1000-step ancestral DDPM (slow)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)
    p = sub.add_parser("fewstep", help="score a finished run at 1 to 50 network evaluations (resumable)")
    p.add_argument("name", choices=list(CANDIDATES))
    p.add_argument("--n", type=int, default=1000, help="class-balanced samples (the course metric: 1000)")
    p.set_defaults(run=fewstep)
    p = sub.add_parser("table", help="gather the finished runs into the results table and figure")
    p.add_argument("--names", nargs="+", help="only these runs, by folder name (default: every finished run)")
    p.add_argument("--out", default="time_to_quality", help="results file name under benchmarks/results/")
    p.set_defaults(run=table)
    p = sub.add_parser("score", help="score one model folder with the course metric (as the model cards' tables)")
    p.add_argument("folder", type=Path)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n", type=int, default=1000, help="class-balanced samples (the course metric: 1000)")
    p.set_defaults(run=lambda args: print(json.dumps(score(args.folder, args.n, args.sampler, args.steps))))
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    args.run(args)


if __name__ == "__main__":
    main()
