"""What each CPU rewrite of the exporter buys: every format with and without ``channels_last`` and
``moment_norms`` (see ``lessons_lib.export.CPU_REWRITES``), against eager PyTorch in the same run.

For each format, every combination of the two rewrites (ONNX has no memory order, so ``channels_last`` is not
tried there) is exported from the shipped model and checked against eager fp32. Then all networks and eager
are timed in turns of a few calls each, as ``python -m lessons_lib bench`` does (``bench.time_in_turns``).
The table gives the median ms per call, the speedup over eager and the max |output - eager|; ``*`` marks the
combination the library uses.

Run from the repository root:  python benchmarks/export_rewrites.py [--batch-size 16] [--repeats 20] [--no-aoti]
(AOTInductor compiles C++ for each combination: about half a minute each on 2 cores.)
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import torch

from lessons_lib import export as E
from lessons_lib.bench import CALLS_PER_TURN, _eager, _inputs, time_in_turns
from lessons_lib.config import PRETRAINED_MODEL
from lessons_lib.pipeline import DiffusionPipeline

REWRITES = ("channels_last", "moment_norms")


def combinations(fmt: str) -> list[tuple[str, ...]]:
    """Every subset of the rewrites that applies to ``fmt``, the empty one (the network as written) first."""
    usable = [r for r in REWRITES if not (fmt == "onnx" and r == "channels_last")]
    return [c for n in range(len(usable) + 1) for c in itertools.combinations(usable, n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per network (the median is reported)")
    parser.add_argument("--no-aoti", action="store_true", help="skip AOTInductor (it compiles C++ per combination)")
    args = parser.parse_args()

    pipe = DiffusionPipeline.from_pretrained(PRETRAINED_MODEL)
    device = torch.device("cpu")
    formats = [f for f in E.FORMATS if not (args.no_aoti and f == "aoti")]
    x, t, labels = _inputs(pipe, args.batch_size, device)
    eager = _eager(pipe.model, "fp32", device)
    nets, errors = {("eager", ()): eager}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        want = eager(x, t, labels)
        for fmt in formats:
            for rewrites in combinations(fmt):
                print(f"exporting {fmt} with {', '.join(rewrites) or 'no rewrite'} ...", flush=True)
                path = Path(tmp) / f"{fmt}_{'_'.join(rewrites) or 'plain'}{E.SUFFIXES[fmt]}"
                with mock.patch.dict(E.CPU_REWRITES, {fmt: rewrites}), warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # TorchScript is legacy: known, asked for
                    E.EXPORTERS[fmt](pipe, path, "fp32", device)
                nets[fmt, rewrites] = E.load_exported(path)
                errors[fmt, rewrites] = float((nets[fmt, rewrites](x, t, labels) - want).abs().max())
        ms = {key: seconds * 1e3 for key, seconds in time_in_turns(nets, (x, t, labels), args.repeats, device).items()}
    base = ms["eager", ()]
    print(f"\nshipped U-Net, batch {args.batch_size}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}; "
          f"medians of {args.repeats} calls, in turns of {CALLS_PER_TURN}\n")
    print("| format | rewrites | ms/call | speedup vs eager | max err |")
    print("|---|---|---:|---:|---:|")
    for (fmt, rewrites), value in ms.items():
        used = "*" if fmt != "eager" and tuple(E.CPU_REWRITES[fmt]) == rewrites else ""
        err = f"{errors[fmt, rewrites]:.1e}" if fmt != "eager" else "-"
        print(f"| {fmt} | {' + '.join(rewrites) or 'none'}{used} | {value:.1f} | {base / value:.2f}x | {err} |")


if __name__ == "__main__":
    main()
