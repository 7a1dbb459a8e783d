"""How fast is each exported network? A table of format x precision x batch size, against eager PyTorch.

For every batch size, all the networks (eager included) are timed in turns of a few consecutive calls
each, so that a machine busy with other work slows them alike and the ratios stay fair. Columns:

- ``ms/call``: median wall time of one network call over ``repeats`` calls (after a warm-up call, and one
  untimed call at the start of each turn);
- ``img/s``: images per second of a full ``steps``-step DDIM sample (the library's sampling loop);
- ``peak MB``: on CUDA, ``torch.cuda.max_memory_allocated`` over one call above what was allocated
  before (torch formats only); on CPU, how far a fresh process's peak RSS rises above its RSS after
  imports when it loads the network and runs it at each batch size in ascending order (so the value
  for batch b covers every batch up to b; tracemalloc cannot see torch's or onnxruntime's allocations);
- ``max err``: max |output - eager fp32 output| on the same inputs: points of the model's own DDIM sampling
  path (every noise level; another seed than the int8 calibration's), the inputs a network meets in use;
- ``speedup``: eager fp32 ms/call divided by this row's, measured in the same run;
- ``FID`` (with ``fid_images=N``): the course's FID (:mod:`lessons_lib.metrics`, against the Fashion-MNIST test
  split) of N class-balanced ``steps``-step DDIM samples drawn with this network from the same seeds as eager
  fp32's, and its change relative to eager fp32's: what a precision costs in quality.

``python -m lessons_lib bench --random-preset cpu`` measures the cpu preset's U-Net with random weights
(speed does not depend on the weights); ``--json`` prints the rows as JSON.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import save_pretrained
from .device import get_device, randn
from .export import DTYPES, FORMATS, calibration_inputs, export_all, load_exported, supported
from .pipeline import DiffusionPipeline
from .samplers import get_sampler, sample

EAGER = "eager"
CALLS_PER_TURN = 5  # consecutive timed calls of one network before the next network's turn


@dataclass
class BenchRow:
    format: str
    precision: str
    batch: int
    ms_per_call: float
    images_per_s: float
    peak_mb: float | None
    max_abs_err: float
    speedup: float
    fid: float | None = None  # of fid_images samples drawn with this network (None: not measured)
    fid_change: float | None = None  # fid / eager fp32's fid - 1


def default_precisions(device: torch.device) -> tuple[str, ...]:
    """fp32 and int8 on CPU (bf16 runs there but slower than fp32 without native bf16 units); fp32/fp16/bf16 on CUDA."""
    return ("fp32", "fp16", "bf16") if device.type == "cuda" else ("fp32", "int8")


def _eager(model: torch.nn.Module, precision: str, device: torch.device):
    """A copy of the U-Net in ``precision``, called like an exported network (x in its dtype, output back in x's)."""
    model = copy.deepcopy(model).to(device, DTYPES[precision]).eval()

    def call(x, t, labels=None):
        with torch.no_grad():
            return model(x.to(DTYPES[precision]), t, labels).to(x.dtype)

    call.config = model.config
    return call


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn, *args, **kwargs) -> float:
    """Seconds taken by ``fn(*args, **kwargs)``, with CUDA work finished on both sides."""
    _synchronize(device)
    start = time.perf_counter()
    fn(*args, **kwargs)
    _synchronize(device)
    return time.perf_counter() - start


def _inputs(pipe: DiffusionPipeline, batch: int, device: torch.device, seed: int = 1000):
    """(x, t, labels) the network meets while sampling: image i at step i % 10 of a 10-step DDIM run of its own."""
    steps = calibration_inputs(pipe, n=batch, steps=10, seed=seed)  # not the int8 calibration's seed (0)
    chosen = [steps[i % len(steps)] for i in range(batch)]
    x, t, labels = (torch.from_numpy(np.stack([c[key][i] for i, c in enumerate(chosen)])) for key in ("x", "t", "class_labels"))
    return x.to(device), t.long().to(device), labels.long().to(device) if pipe.model.config.num_classes else None


def _fids(nets: dict, pipe: DiffusionPipeline, n: int, sampler, batch_size: int = 100) -> dict:
    """The course's FID of ``n`` samples of every network: image i of class i % 10 from seed i, the same for all."""
    from .metrics import evaluate  # the classifier and the test split are loaded only when asked for

    cfg, device = pipe.model.config, next(pipe.model.parameters()).device
    labels = torch.arange(n) % cfg.num_classes if cfg.num_classes else None
    x_T, ae = randn((n, *pipe.sample_shape), seed=0), pipe.autoencoder
    fids = {}
    for key, net in nets.items():
        parts = [sample(net, x_T[i:i + batch_size].to(device), sampler,
                        None if labels is None else labels[i:i + batch_size].to(device), progress=False,
                        clip=ae is None).images for i in range(0, n, batch_size)]
        if ae is not None:  # a latent model: the same decoder turns every network's latents into images
            with torch.no_grad():
                parts = [ae.from_latent(z.to(next(ae.parameters()).device)).clamp(-1, 1) for z in parts]
        fids[key] = evaluate(torch.cat([p.cpu() for p in parts]), reference="test", labels=labels).fid
    return fids


def _cuda_peak_mb(net, args, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    net(*args)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _cpu_peak_mb(target: Path, precision: str, size: int, batch_sizes: list[int], threads: int | None) -> dict[int, float]:
    """Peak RSS growth (MB) of a fresh process that loads ``target`` and runs it at each batch size, ascending."""
    child = ("import json, sys; from lessons_lib.bench import _memory_child; "
             "print(json.dumps(_memory_child(*json.loads(sys.argv[1]))))")
    args = json.dumps([str(target), precision, size, sorted(batch_sizes), threads])
    done = subprocess.run([sys.executable, "-c", child, args], capture_output=True, text=True, check=True)
    return {int(b): mb for b, mb in json.loads(done.stdout.splitlines()[-1]).items()}


def _peak_rss_mb(reset: bool = False) -> float:
    """This process's peak RSS in MB. On Linux ``reset`` first lowers the peak (VmHWM) to the current RSS,
    so the transient peaks of imports do not hide the network's; elsewhere it is ``ru_maxrss`` since start."""
    status = Path("/proc/self/status")
    if not status.exists():
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
    return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) / 1024


def _memory_child(target: str, precision: str, size: int, batch_sizes: list[int], threads: int | None) -> dict[int, float]:
    from .checkpoint import load_pretrained

    if target.endswith(".onnx"):
        import onnxruntime  # noqa: F401  (imported before the baseline, like torch: only the network counts)
    if threads:
        torch.set_num_threads(threads)
    base = _peak_rss_mb(reset=True)
    net = _eager(load_pretrained(target)[0], precision, torch.device("cpu")) if Path(target).is_dir() else \
        load_exported(target, threads)
    peaks = {}
    for b in batch_sizes:
        labels = torch.zeros(b, dtype=torch.long) if net.config.num_classes else None
        net(torch.zeros(b, net.config.in_channels, size, size), torch.full((b,), 10), labels)
        peaks[b] = _peak_rss_mb() - base
    return peaks


def _networks(pipe: DiffusionPipeline, formats, precisions, device: torch.device, threads: int | None, out_dir: Path,
              log) -> tuple[dict, dict]:
    """Every network to time, by (format, precision), and what a fresh process loads to measure its memory."""
    exported = [f for f in formats if f != EAGER]
    log(f"exporting {', '.join(exported) or 'nothing'} at {', '.join(precisions)} on {device.type} ...")
    result = export_all(pipe, out_dir, exported, precisions, device)
    for (fmt, precision), why in result.skipped.items():
        log(f"  skip {fmt} {precision}: {why}")
    eager_dir = save_pretrained(pipe.model, out_dir / "eager")
    eager = [p for p in ("fp32", *precisions) if EAGER in formats or p == "fp32"]  # eager fp32 is the baseline
    nets = {(EAGER, p): _eager(pipe.model, p, device) for p in dict.fromkeys(eager)
            if supported("torch_export", p, device) is None}  # eager runs where torch's own kernels do
    targets = dict.fromkeys(nets, eager_dir)
    for key, path in result.artifacts.items():
        nets[key], targets[key] = load_exported(path, threads), path
    return nets, targets


def time_in_turns(nets: dict, args: tuple, repeats: int, device: torch.device) -> dict:
    """Median seconds per call of every network on ``args``: ``repeats`` timed calls each, in turns.

    A turn is one untimed call, then up to ``CALLS_PER_TURN`` timed consecutive calls of one network. A
    sampler calls one network again and again; the first call after another runtime ran also pays to wake
    this one's threads (onnxruntime's pool and OpenMP's are different threads on the same cores).
    """
    calls = {key: [] for key in nets}
    for turn in range(-(-repeats // CALLS_PER_TURN)):
        for key, net in nets.items():
            net(*args)  # untimed: the switch from the previous network
            for _ in range(min(CALLS_PER_TURN, repeats - turn * CALLS_PER_TURN)):
                calls[key].append(_timed(device, net, *args))
    return {key: statistics.median(v) for key, v in calls.items()}


def _measure(nets: dict, args: tuple, sampler, repeats: int, device: torch.device) -> tuple[dict, dict, dict]:
    """Max error vs eager fp32, seconds per call (:func:`time_in_turns`) and per sample of every network."""
    reference = nets[EAGER, "fp32"](*args).float()
    errors = {key: float((net(*args).float() - reference).abs().max()) for key, net in nets.items()}  # warm-up
    calls, samples = time_in_turns(nets, args, repeats, device), {key: [] for key in nets}
    for _ in range(max(1, repeats // 5)):
        for key, net in nets.items():
            samples[key].append(_timed(device, sample, net, args[0], sampler, args[2], progress=False))
    return errors, calls, {key: statistics.median(v) for key, v in samples.items()}


def bench(pipe: DiffusionPipeline, formats=(EAGER, *FORMATS), precisions=None, batch_sizes=(1, 16), repeats: int = 10,
          steps: int = 20, device: str | torch.device | None = None, threads: int | None = None, memory: bool = True,
          work_dir: str | Path | None = None, log=print, fid_images: int = 0) -> list[BenchRow]:
    """Export ``pipe`` to every supported (format, precision), then time everything against eager fp32.

    ``repeats`` timed calls per network and batch size (and ``repeats // 5`` samples, at least one).
    ``fid_images``: also score ``fid_images`` samples of every network with the course's FID (0: skip).
    ``threads``: torch and onnxruntime intra-op threads (default: their own). ``work_dir``: keep the
    artifacts there (default: a temporary folder). ``log``: progress lines (None: quiet).
    """
    device = get_device(device)
    precisions = tuple(precisions or default_precisions(device))
    unknown = sorted(set(formats) - {EAGER, *FORMATS})
    if unknown:
        raise ValueError(f"unknown formats {unknown}; allowed: {', '.join((EAGER, *FORMATS))}")
    if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"repeats and every batch size must be >= 1, got repeats={repeats}, batch sizes {list(batch_sizes)}")
    if fid_images < 0 or fid_images == 1:
        raise ValueError(f"fid_images must be 0 (skip) or at least 2 (a covariance needs two samples), got {fid_images}")
    log = log or (lambda *_: None)
    if threads:
        torch.set_num_threads(threads)
    sampler = get_sampler("ddim", pipe.schedule, steps, spacing="trailing", prediction=pipe.prediction,
                          clip_x0=pipe.autoencoder is None)  # latents have no [-1, 1] range
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        nets, targets = _networks(pipe, formats, precisions, device, threads, Path(work_dir or tmp), log)
        peaks = {}
        if memory and device.type == "cpu":
            log("measuring memory in fresh processes ...")
            size = pipe.sample_shape[-1]  # what the network takes: images, or a latent model's latents
            peaks = {key: _cpu_peak_mb(targets[key], key[1], size, list(batch_sizes), threads) for key in nets}
        fids = {}
        if fid_images:
            log(f"FID of {fid_images} samples of each of {len(nets)} networks ...")
            fids = _fids(nets, pipe, fid_images, sampler)
        for batch in batch_sizes:
            log(f"batch {batch}: {len(nets)} networks x {repeats} calls, then {steps}-step samples, in turns ...")
            args = _inputs(pipe, batch, device)
            errors, call_s, sample_s = _measure(nets, args, sampler, repeats, device)
            for key, net in nets.items():
                peak = peaks.get(key, {}).get(batch)
                if memory and device.type == "cuda" and key[0] != "onnx":
                    peak = _cuda_peak_mb(net, args, device)
                fid = fids.get(key)
                rows.append(BenchRow(key[0], key[1], batch, call_s[key] * 1e3, batch / sample_s[key], peak, errors[key],
                                     call_s[EAGER, "fp32"] / call_s[key], fid,
                                     None if fid is None else fid / fids[EAGER, "fp32"] - 1))
    return rows


def table(rows: list[BenchRow]) -> str:
    """The rows as a markdown table (FID columns only when they were measured)."""
    with_fid = any(r.fid is not None for r in rows)
    lines = ["| format | precision | batch | ms/call | img/s (DDIM) | peak MB | max err | speedup |"
             + (" FID | FID change |" if with_fid else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if with_fid else "")]
    for r in rows:
        peak = f"{r.peak_mb:.1f}" if r.peak_mb is not None else "-"
        fid = f" {r.fid:.2f} | {r.fid_change:+.1%} |" if r.fid is not None else (" - | - |" if with_fid else "")
        lines.append(f"| {r.format} | {r.precision} | {r.batch} | {r.ms_per_call:.1f} | {r.images_per_s:.1f} | {peak} | "
                     f"{r.max_abs_err:.1e} | {r.speedup:.2f}x |{fid}")
    return "\n".join(lines)


def to_json(rows: list[BenchRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1)
