"""The command line: ``python -m lessons_lib <command>`` (also installed as ``lessons``)."""

from __future__ import annotations

import argparse
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lessons_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="print versions, device, data location and known problems")
    p.set_defaults(run=_doctor)

    p = sub.add_parser("data", help="find (or download) Fashion-MNIST and verify it")
    p.add_argument("--root", default=None, help="look only in this folder")
    p.add_argument("--no-download", action="store_true", help="never use the network")
    p.set_defaults(run=_data)

    p = sub.add_parser("course", help="run every lesson headless with papermill and print a table")
    p.add_argument("--smoke", action="store_true", help="shrunk parameters (LESSONS_SMOKE=1)")
    p.add_argument("--inplace", action="store_true", help="write outputs into notebooks/ (to commit them)")
    p.add_argument("--only", nargs="*", default=None, help="lesson name prefixes, e.g. 00 01")
    p.set_defaults(run=_course)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
