"""Self-checks say what is wrong and never raise."""

import torch

from lessons_lib.exercises import check, check_function


def test_check_correct(capsys):
    assert check(torch.ones(2), torch.ones(2), "the answer")
    assert capsys.readouterr().out.startswith("Correct: the answer matches")


def test_check_explains_each_failure(capsys):
    cases = [
        (None, "no answer yet (got None)"),
        (..., "no answer yet"),
        ([1.0, 2.0], "expected a torch.Tensor, got list"),
        (torch.ones(3), "the shape is (3,), expected (2,)"),
        (torch.ones(2, dtype=torch.long), "dtype is torch.int64"),
        (torch.tensor([1.0, float("nan")]), "NaN or infinite where a number is expected"),
        (torch.tensor([1.0, 3.0]), "1 of 2 values differ (largest error 1); first at index (1,): got 3, expected 2"),
    ]
    for answer, message in cases:
        assert not check(answer, torch.tensor([1.0, 2.0]), "x", hint="think")
        out = capsys.readouterr().out
        assert message in out and "Hint: think" in out, out


def test_check_function(capsys):
    ref = lambda x: 2 * x  # noqa: E731
    assert check_function(lambda x: x + x, ref, [(torch.ones(2),), (torch.arange(3.0),)], "double")
    assert "on 2 case(s)" in capsys.readouterr().out
    assert not check_function(lambda x: x, ref, [(torch.ones(2),)], "double")
    assert "values differ" in capsys.readouterr().out

    def broken(x):
        raise ZeroDivisionError("oops")

    assert not check_function(broken, ref, [(torch.ones(2),)], "double")
    assert "raised ZeroDivisionError: oops" in capsys.readouterr().out


def test_matching_infinities_are_accepted(capsys):
    expected = torch.tensor([1.0, float("-inf")])
    assert check(torch.tensor([1.0, float("-inf")]), expected, "log SNR")
    assert not check(torch.tensor([float("inf"), float("-inf")]), expected, "log SNR")
    assert "1 values are NaN or infinite where a number is expected" in capsys.readouterr().out


def test_plain_numbers_are_accepted_for_scalar_answers(capsys):
    assert check(259, torch.tensor(259), "the step")
    assert not check(258, torch.tensor(259), "the step")
    assert "got 258, expected 259" in capsys.readouterr().out
