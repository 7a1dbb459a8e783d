"""Run every lesson headless with papermill (``make course``) and report status and time per lesson."""

from __future__ import annotations

import ast
import datetime
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_write
from .config import BUILD_DIR, NOTEBOOKS_DIR, REPO_ROOT

# Seconds per lesson measured by ``course --record-times`` (``--inplace`` records too): the one source of the
# runtimes the README's lesson table and every lesson's header quote (a test keeps them equal).
RUNTIMES = NOTEBOOKS_DIR / "runtimes.json"
README = REPO_ROOT / "README.md"


@dataclass
class LessonResult:
    name: str
    ok: bool
    seconds: float
    output: Path
    error: str = ""


def lessons(only: Sequence[str] | None = None) -> list[Path]:
    """The lesson notebooks in order (``NN_name.ipynb``), optionally only those whose name starts with ``only``."""
    found = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [nb for nb in found if any(nb.name.startswith(prefix) for prefix in only)]
        if not found:
            raise ValueError(f"no lesson matches {list(only)}; lessons: {[nb.stem for nb in lessons()]}")
    return found


def lesson_parameters(nb: Path) -> dict[str, str]:
    """The names in a lesson's ``parameters`` cell and the source text of their defaults (papermill reads them)."""
    import logging

    import papermill

    translators = logging.getLogger("papermill.translators")  # it warns about lines that assign no literal (SMOKE = ...)
    level = translators.level
    translators.setLevel(logging.ERROR)
    try:
        return {name: p["default"] for name, p in papermill.inspect_notebook(str(nb)).items()}
    finally:
        translators.setLevel(level)


def _literal_type(default: str) -> tuple[type | None, bool]:
    """The type of a default's literals and whether it may be None. The type is int, float, str or bool when every
    constant in the expression has it (``2_000 if SMOKE else 20_000``: int; a None branch, as in ``None if SMOKE
    else 30``, makes the parameter optional and is left out), None when it cannot be told (a call, a tuple of mixed
    values, no constant at all, a default of None)."""
    try:
        tree = ast.parse(default, mode="eval")
    except SyntaxError:
        return None, False
    constants = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]
    optional = any(value is None for value in constants)
    if any(isinstance(node, ast.Call) for node in ast.walk(tree)):
        return None, optional
    kinds = {type(value) for value in constants if value is not None}
    top = tree.body.body if isinstance(tree.body, ast.IfExp) else tree.body
    return (kinds.pop() if len(kinds) == 1 and isinstance(top, ast.Constant | ast.IfExp) else None), optional


def check_parameters(nb: Path, values: dict) -> None:
    """Refuse a parameter the lesson does not have, or a value of another type than its default, before running:
    papermill itself only warns about an unknown name and then runs the lesson with its defaults."""
    known = lesson_parameters(nb)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{nb.stem} has no parameter {', '.join(unknown)}; its parameters: {', '.join(known)}")
    for name, value in values.items():
        expected, optional = _literal_type(known[name])
        if value is None and optional:  # MINUTES = None if SMOKE else 30
            continue
        ok = expected is None or isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ValueError(f"{nb.stem}: parameter {name} takes {expected.__name__} values (default {known[name]}), "
                             f"got {type(value).__name__} {value!r}")


def check_running_lesson(prefix: str, namespace: dict) -> None:
    """Called by a lesson right after its parameters: the values papermill put there (``papermill ... -p N 500``)
    have their defaults' types, or one clear ValueError before any work starts."""
    (nb,) = lessons([prefix])
    check_parameters(nb, {name: namespace[name] for name in lesson_parameters(nb) if name in namespace})


def parse_value(text: str):
    """A parameter given on the command line: a Python literal (200, 0.5, True, (0, 10)) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _strip_run_metadata(path: Path) -> None:
    """Drop papermill's timestamps so a committed notebook changes only when its outputs do."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


def format_runtime(seconds: float) -> str:
    """A measured runtime as lessons and the README print it: 40 s, 3 min (rounded to 5 s below a minute)."""
    if seconds < 57.5:
        return f"{max(5, 5 * round(seconds / 5))} s"
    return f"{max(1, round(seconds / 60))} min"


def read_runtimes(path: Path = RUNTIMES) -> dict:
    """``{lesson: {mode: entry}}`` from ``notebooks/runtimes.json``; modes ``smoke`` and ``full`` (a 2-core CPU) and
    ``gpu_smoke`` and ``gpu_full``; an entry is a measurement ``{"seconds", "date", "machine"}`` or ``{"estimate"}``."""
    return json.loads(path.read_text()) if path.exists() else {}


def runtime_text(lesson: str, mode: str, runtimes: dict | None = None) -> str:
    """What the README and the lesson's header print for ``lesson`` in ``mode``: the measurement or the estimate."""
    entry = (read_runtimes() if runtimes is None else runtimes).get(lesson, {}).get(mode)
    if entry is None:
        raise ValueError(f"notebooks/runtimes.json has no {mode!r} entry for {lesson}: run "
                         f"`python -m lessons_lib course --only {lesson[:2]} --record-times` (add --smoke for smoke)")
    return format_runtime(entry["seconds"]) if "seconds" in entry else entry["estimate"]


def runtime_rows(lesson: str, runtimes: dict | None = None) -> tuple[str, str]:
    """The CPU and GPU rows of a lesson header's runtime table (columns: smoke, full lesson)."""
    text = {mode: runtime_text(lesson, mode, runtimes) for mode in ("smoke", "full", "gpu_smoke", "gpu_full")}
    return (f"| 2-core CPU | {text['smoke']} | {text['full']} |",
            f"| GPU (estimated) | {text['gpu_smoke']} | {text['gpu_full']} |")


def readme_runtime_cells(lesson: str, runtimes: dict | None = None) -> list[str]:
    """The README lesson table's two runtime cells: "smoke / full" on a 2-core CPU, and the GPU's full run."""
    return [f"{runtime_text(lesson, 'smoke', runtimes)} / {runtime_text(lesson, 'full', runtimes)}",
            runtime_text(lesson, "gpu_full", runtimes)]


def write_runtime_texts(names: Sequence[str], runtimes: dict | None = None, readme: Path = README,
                        notebooks_dir: Path = NOTEBOOKS_DIR) -> None:
    """Rewrite the runtime rows of these lessons' headers and README rows from ``runtimes`` (what ``--record-times``
    just stored), so a re-timed lesson is quoted the same everywhere."""
    import nbformat

    runtimes = read_runtimes() if runtimes is None else runtimes
    lines = readme.read_text().splitlines(keepends=True)
    for name in names:
        nb_path = notebooks_dir / f"{name}.ipynb"
        nb = nbformat.read(nb_path, as_version=4)
        cpu, gpu = runtime_rows(name, runtimes)
        header = nb.cells[0].source.splitlines()
        if not any(line.startswith("| 2-core CPU |") for line in header):
            raise ValueError(f"{nb_path.name}: its first cell has no '| 2-core CPU |' runtime row to rewrite")
        nb.cells[0].source = "\n".join(cpu if line.startswith("| 2-core CPU |") else
                                       gpu if line.startswith("| GPU (estimated) |") else line for line in header)
        nbformat.write(nb, nb_path)
        for i, line in enumerate(lines):
            if line.startswith(f"| {name[:2]} |"):
                cells = line.rstrip("\n").split("|")  # the runtimes are the last two cells (a cell may hold \|)
                cells[-3:-1] = [f" {cell} " for cell in readme_runtime_cells(name, runtimes)]
                lines[i] = "|".join(cells) + "\n"
    atomic_write(readme, lambda tmp: tmp.write_text("".join(lines)))


def record_runtimes(results: Sequence[LessonResult], smoke: bool, path: Path = RUNTIMES) -> None:
    """Store the seconds of the lessons that ran to the end under their mode (on a GPU: ``gpu_smoke``, ``gpu_full``),
    keeping the other entries."""
    import torch

    runtimes = read_runtimes(path)
    gpu = torch.cuda.is_available()
    machine = torch.cuda.get_device_name() if gpu else f"{platform.machine()}, {os.cpu_count()} CPUs"
    mode = ("gpu_" if gpu else "") + ("smoke" if smoke else "full")
    for r in results:
        if r.ok:
            runtimes.setdefault(r.name, {})[mode] = {
                "seconds": round(r.seconds, 1), "date": datetime.date.today().isoformat(), "machine": machine}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(dict(sorted(runtimes.items())), indent=1) + "\n"))


def run_course(smoke: bool = False, inplace: bool = False, only: Sequence[str] | None = None,
               parameters: dict | None = None, record_times: bool = False) -> list[LessonResult]:
    """Execute the lessons in fresh kernels from ``build/`` (not their own folder) and print a table.

    ``inplace`` rewrites ``notebooks/`` with the outputs (for committing a full run); otherwise outputs
    go to ``build/full`` or ``build/smoke``. ``parameters`` override the lessons' defaults; every lesson
    run must have each of them (:func:`check_parameters`), checked before the first one starts.
    ``record_times`` (implied by ``inplace``) stores each lesson's seconds in ``notebooks/runtimes.json``.
    """
    import papermill

    if smoke and inplace:
        raise ValueError("committed notebooks hold the outputs of a full run: use --inplace without --smoke")
    if inplace and parameters:
        raise ValueError("committed notebooks hold the outputs of a full run with the defaults: no parameters with --inplace")
    if record_times and parameters:
        raise ValueError("recorded runtimes are those of the lessons' defaults: no parameters with --record-times")
    parameters = parameters or {}
    for nb in lessons(only):
        check_parameters(nb, parameters)
    os.environ["LESSONS_SMOKE"] = "1" if smoke else "0"
    os.environ["LESSONS_HEADLESS"] = "1"
    # Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads slow torch 5-30x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out_dir = BUILD_DIR / ("smoke" if smoke else "full")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for nb in lessons(only):
        output = nb if inplace else out_dir / nb.name
        print(f"running {nb.name} ({'smoke' if smoke else 'full'}) ...", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(nb), str(output), cwd=str(out_dir), progress_bar=False, kernel_name="python3",
                                       parameters=parameters)
            results.append(LessonResult(nb.stem, True, time.perf_counter() - start, output))
        except Exception as err:  # papermill.PapermillExecutionError and kernel failures alike
            results.append(LessonResult(nb.stem, False, time.perf_counter() - start, output, str(err).splitlines()[0]))
        if inplace:
            _strip_run_metadata(output)
    print(format_table(results, smoke))
    if inplace or record_times:
        record_runtimes(results, smoke)
        write_runtime_texts([r.name for r in results if r.ok])
    return results


def format_table(results: Sequence[LessonResult], smoke: bool) -> str:
    width = max([len(r.name) for r in results] + [6])
    lines = [f"\n{'lesson':<{width}}  status  seconds   ({'smoke' if smoke else 'full'} mode)", "-" * (width + 28)]
    for r in results:
        status = "ok" if r.ok else "FAILED"
        lines.append(f"{r.name:<{width}}  {status:<6}  {r.seconds:7.1f}" + (f"   {r.error}" if r.error else ""))
    lines.append(f"{'total':<{width}}  {sum(r.ok for r in results)}/{len(results)} ok  {sum(r.seconds for r in results):6.1f}")
    return "\n".join(lines)
