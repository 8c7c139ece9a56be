"""lessons_lib.checks: the argument checks every module shares, and their messages."""

import math

import pytest
import torch

from lessons_lib.checks import (eval_mode, is_int, is_integer_dtype, non_negative_int, number_in,
                                positive_int, positive_number, token_ids)

INTEGER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
OTHER_DTYPES = [torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64,
                torch.complex64]


def test_is_int_refuses_bools_and_floats():
    assert is_int(0) and is_int(-3) and is_int(10**30)
    assert not any(is_int(v) for v in (True, False, 1.0, "1", None, torch.tensor(1)))


@pytest.mark.parametrize("value", [1, 2, 10**12])
def test_positive_int_returns_the_value(value):
    assert positive_int("n", value) == value


@pytest.mark.parametrize("value", [0, -1, True, 1.0, "1", None, 2.5])
def test_positive_int_message(value):
    with pytest.raises(ValueError, match=rf"^n_head must be a positive int, got {value!r}$".replace("(", r"\(")):
        positive_int("n_head", value)


def test_non_negative_int():
    assert non_negative_int("start", 0) == 0 and non_negative_int("start", 7) == 7
    for value in (-1, False, 0.0, "0"):
        with pytest.raises(ValueError, match="start must be a non-negative int"):
            non_negative_int("start", value)


def test_positive_number():
    assert positive_number("lr", 3) == 3.0 and isinstance(positive_number("lr", 3), float)
    assert positive_number("lr", 1e-300) == 1e-300
    for value in (0, -1.0, math.nan, math.inf, True, "1", None):
        with pytest.raises(ValueError, match="lr must be a positive, finite number"):
            positive_number("lr", value)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_every_integer_dtype_is_token_ids(dtype):
    ids = torch.tensor([[0, 1, 2]], dtype=dtype)
    assert is_integer_dtype(dtype)
    assert token_ids(ids, vocab_size=3) is ids


@pytest.mark.parametrize("dtype", OTHER_DTYPES)
def test_other_dtypes_are_not_token_ids(dtype):
    assert not is_integer_dtype(dtype)
    with pytest.raises(ValueError, match=f"idx must hold integer token ids, got dtype {dtype}"):
        token_ids(torch.zeros(1, 3, dtype=dtype))


def test_token_ids_shape_and_range_messages():
    with pytest.raises(ValueError, match=r"idx must be a \(batch, T\) tensor of token ids, got shape \(3,\)"):
        token_ids(torch.arange(3))
    with pytest.raises(ValueError, match="ids must be a 1-D tensor of token ids, got list"):
        token_ids([0, 1], "ids", ndim=1, shape="1-D")
    with pytest.raises(ValueError, match=r"targets must lie in 0\.\.4, got ids from -1 to 2"):
        token_ids(torch.tensor([[-1, 2]]), "targets", vocab_size=5)
    with pytest.raises(ValueError, match=r"idx must lie in 0\.\.4, got ids from 0 to 5"):
        token_ids(torch.tensor([[0, 5]]), vocab_size=5)
    # any number of dimensions with ndim=None; an empty tensor has no ids out of range
    token_ids(torch.zeros(2, 3, 4, dtype=torch.long), ndim=None, vocab_size=1)
    token_ids(torch.zeros(2, 0, dtype=torch.long), vocab_size=1)


def test_token_ids_never_read_values_off_the_cpu():
    """A range check reads every id: on a GPU that waits for the device at every forward pass.
    Ids off the CPU (here on the meta device, which holds no values) get the shape and dtype
    checks only."""
    from lessons_lib.checks import token_ids
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    assert token_ids(ids, vocab_size=3) is ids
    with pytest.raises(ValueError, match="integer token ids"):
        token_ids(torch.zeros(2, 5, device="meta"), vocab_size=3)


def test_sampling_never_reads_logits_off_the_cpu():
    from lessons_lib.generate import _check_logits
    _check_logits(torch.zeros(2, 7, device="meta"))          # no values read, nothing raised
    with pytest.raises(ValueError, match="NaN"):
        _check_logits(torch.tensor([[0.0, float("nan")]]))


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_even_after_an_error(training):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train(training)
    with eval_mode(model) as inside:
        assert inside is model and not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert model.training is training and model[1].training is training


@pytest.mark.parametrize("kwargs, value, message", [
    (dict(low=0.0, high=1.0, high_open=True), 1.0, r"p must be a number in \[0, 1\), got 1.0"),
    (dict(low=0.0, high=1.0, low_open=True), 0, r"p must be a number in \(0, 1\], got 0"),
    (dict(low=0.0), -0.5, r"p must be a number >= 0, got -0.5"),
    (dict(high=2.0, high_open=True), 2, r"p must be a number < 2, got 2"),
    (dict(low=0.0), float("nan"), r"p must be a number >= 0, got nan"),
    (dict(low=0.0), float("inf"), r"p must be a number >= 0, got inf"),
    (dict(), True, r"p must be a number that is finite, got True"),
    (dict(low=0.0), "1", r"p must be a number >= 0, got '1'"),
])
def test_number_in_names_the_interval(kwargs, value, message):
    with pytest.raises(ValueError, match=message):
        number_in("p", value, **kwargs)


def test_number_in_returns_a_float_inside():
    assert number_in("p", 0, low=0.0, high=1.0) == 0.0 and isinstance(number_in("p", 1, 0, 1), float)
    assert number_in("p", 0.999, 0.0, 1.0, high_open=True) == 0.999
    assert number_in("p", -3.5) == -3.5


def test_float_tensor_names_what_it_expected_and_what_came():
    from lessons_lib.checks import float_tensor, shape_of
    x = torch.zeros(2, 3)
    assert float_tensor("x", x, 2) is x and float_tensor("x", x) is x
    with pytest.raises(ValueError, match=r"x must be a \(batch, T, C\) tensor, got shape \(2, 3\)"):
        float_tensor("x", x, 3, "(batch, T, C)")
    with pytest.raises(ValueError, match=r"with 1 dimension\(s\), got shape \(2, 3\)"):
        float_tensor("x", x, 1)
    with pytest.raises(ValueError, match="got dtype torch.int64"):
        float_tensor("x", torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="got list"):
        float_tensor("x", [1.0])
    assert shape_of(x) == "(2, 3)" and shape_of(3) == "int"


def test_bool_mask_passes_a_good_mask_through():
    from lessons_lib.checks import bool_mask
    mask = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert bool_mask("mask", mask, (4, 4)) is mask
    assert bool_mask("mask", mask, (2, 3, 4, 4), broadcast=True) is mask
    padding = torch.tensor([[[True, True, False]]])                  # (1, 1, 3): keys 0 and 1
    assert bool_mask("mask", padding, (2, 3, 3), broadcast=True) is padding


@pytest.mark.parametrize("mask, shape, broadcast, message", [
    ([[True]], (2, 3), False,
     r"^m must be a tensor of dtype torch.bool \(True = kept\), got list$"),
    (torch.ones(2, 3), (2, 3), False,
     r"^m must be a tensor of dtype torch.bool \(True = kept\), got dtype torch.float32; "
     r"convert a 0/1 mask with `.bool\(\)`"),
    (torch.ones(2, 2, dtype=torch.bool), (2, 3), False,
     r"^m must have the shape \(2, 3\) of idx, got \(2, 2\)$"),
    (torch.ones(3, 3, dtype=torch.bool), (2, 3), True,
     r"^m of shape \(3, 3\) does not broadcast to the shape \(2, 3\) of idx$"),
    (torch.tensor([[True, False, False], [False, False, False]]), (2, 3), False,
     r"^m of shape \(2, 3\) has rows with no True entry, e.g. at \[1\]: row 1 is empty$"),
    (torch.zeros(2, 1, 3, dtype=torch.bool), (2, 2, 3), True,
     r"has rows with no True entry, e.g. at \[\[0, 0\], \[1, 0\]\]"),
])
def test_bool_mask_says_what_it_expected_and_what_came(mask, shape, broadcast, message):
    from lessons_lib.checks import bool_mask
    with pytest.raises(ValueError, match=message):
        bool_mask("m", mask, shape, broadcast=broadcast, of="idx", meaning="True = kept",
                  empty_row="row 1 is empty")
