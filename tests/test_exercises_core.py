"""The checkers' shared machinery: chained tracebacks, reproducible failing cases, coercion."""

import math

import numpy as np
import pytest
import torch

from lessons_lib.exercises._core import (Case, CheckFailed, as_int, as_number, randn, randn_call,
                                          run_cases)


def test_a_learner_error_keeps_its_traceback():
    def broken(x):
        return x.nonexistent_attribute

    with pytest.raises(CheckFailed) as info:
        run_cases("check_demo", broken, [Case("a tensor", (torch.zeros(2),), None)])
    assert isinstance(info.value.__cause__, AttributeError)
    assert "nonexistent_attribute" in str(info.value)


def test_a_failing_random_case_says_how_to_rebuild_it():
    x = randn(3, 4, seed=11)
    line = randn_call(3, 4, seed=11)
    assert torch.equal(eval(line, {"torch": torch}), x)
    with pytest.raises(CheckFailed, match=r"To rerun this case: x = torch\.randn\(3, 4, generator"):
        run_cases("check_demo", lambda t: t.sum(), [Case("random", (x,), 0.0, rebuild=f"x = {line}")])


def test_a_failing_small_case_prints_its_inputs():
    with pytest.raises(CheckFailed, match=r"Inputs: \(2, 3\)"):
        run_cases("check_demo", lambda a, b: a - b, [Case("two ints", (2, 3), 5)])


def test_success_prints_the_count(capsys):
    run_cases("check_demo", lambda a, b: a + b, [Case("two ints", (2, 3), 5)] * 3)
    assert "all 3 checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("got, want", [(3, 3.0), (2.5, 2.5), (torch.tensor([1.5]), 1.5),
                                       (np.float32(0.25), 0.25), (np.array([[4]]), 4.0)])
def test_as_number_accepts_every_kind_of_scalar(got, want):
    assert as_number(got) == (want, None)


@pytest.mark.parametrize("got, word", [(torch.ones(3), "shape (3,)"), ("1", "'1'"),
                                       (True, "True"), (math.nan, "nan"), (math.inf, "inf")])
def test_as_number_explains_what_came(got, word):
    value, problem = as_number(got)
    assert value is None and word in problem


def test_as_int():
    assert as_int(4.0) == (4, None)
    assert as_int(torch.tensor(7)) == (7, None)
    assert as_int(np.int64(9)) == (9, None)
    assert as_int(4.5)[0] is None and "4.5" in as_int(4.5)[1]
    assert as_int(True)[0] is None


def test_randint_call_rebuilds_randint():
    from lessons_lib.exercises._core import randint, randint_call
    assert torch.equal(eval(randint_call(7, 50, seed=3), {"torch": torch}), randint(7, 50, seed=3))
