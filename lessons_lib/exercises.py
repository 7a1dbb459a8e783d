"""Self-checks for the "Your turn" exercises: they say *what* is wrong, not just ``False``.

A check prints one verdict and returns True/False; it never raises, so a notebook with an unfinished
exercise still runs top to bottom (papermill, nbval).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _diagnose(answer, expected: torch.Tensor, rtol: float, atol: float) -> str | None:
    """Why ``answer`` is not ``expected``, or None when it matches."""
    if answer is Ellipsis:
        return "there is no answer yet: replace the `...` with your code"
    if answer is None:
        return "there is no answer yet (got None): fill in the stub so it returns your result"
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and expected.numel() == 1:
        answer = torch.as_tensor(answer, dtype=expected.dtype).reshape(expected.shape)  # a plain number is fine
    if not isinstance(answer, torch.Tensor):
        return f"expected a torch.Tensor, got {type(answer).__name__}"
    if answer.shape != expected.shape:
        return f"the shape is {tuple(answer.shape)}, expected {tuple(expected.shape)}"
    if not answer.dtype.is_floating_point and expected.dtype.is_floating_point:
        return f"the dtype is {answer.dtype}; expected floating point ({expected.dtype})"
    a, e = answer.detach().double().cpu(), expected.detach().double().cpu()
    stray = ~torch.isfinite(a) & ~((a == e) | (a.isnan() & e.isnan()))  # inf/NaN the expected value lacks
    if stray.any():
        return f"{int(stray.sum())} values are NaN or infinite where a number is expected (a division by zero?)"
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        return (f"{int(bad.sum())} of {a.numel()} values differ (largest error {float((a - e).abs().max()):.3g}); "
                f"first at index {first}: got {float(a[first]):.4g}, expected {float(e[first]):.4g}")
    return None


def check(answer, expected: torch.Tensor, what: str, hint: str = "", rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Compare an exercise's answer with the expected tensor and print a verdict naming the problem."""
    problem = _diagnose(answer, expected, rtol, atol)
    if problem is None:
        print(f"Correct: {what} matches.")
        return True
    print(f"Not yet — {what}: {problem}." + (f"\nHint: {hint}" if hint else ""))
    return False


def check_function(fn: Callable, reference: Callable, cases: list[tuple], what: str, hint: str = "",
                   rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Call ``fn`` and ``reference`` on each tuple of arguments in ``cases`` and check they agree."""
    for args in cases:
        try:
            answer = fn(*args)
        except Exception as err:  # the learner's code: report, don't crash the notebook
            print(f"Not yet — {what} raised {type(err).__name__}: {err}" + (f"\nHint: {hint}" if hint else ""))
            return False
        problem = _diagnose(answer, reference(*args), rtol, atol)
        if problem is not None:
            print(f"Not yet — {what}: {problem}." + (f"\nHint: {hint}" if hint else ""))
            return False
    print(f"Correct: {what} matches the library on {len(cases)} case(s).")
    return True
