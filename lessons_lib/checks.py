"""The argument checks lessons_lib shares: one wording for each mistake.

* :func:`positive_int`, :func:`non_negative_int` -- an ``int`` (not a ``bool``) >= 1 or >= 0;
* :func:`positive_number` -- a finite real number > 0;
* :func:`number_in` -- a finite real number in an interval, e.g. [0, 1) or >= 0;
* :func:`token_ids` -- an integer tensor of token ids: its type, dtype, number of dimensions
  and, given a vocabulary size, its range;
* :func:`float_tensor` -- a floating-point tensor, optionally of a number of dimensions;
* :func:`bool_mask` -- a bool mask of a shape (or one that broadcasts to it) with a True in
  every row (an attention mask, a response mask);
* :func:`eval_mode` -- run a block with a model in eval mode, then put it back in the mode it
  was in, even if the block raises.

Each check raises ``ValueError`` with a message that names the argument and shows what it got.
"""

from __future__ import annotations

import contextlib
import math
from numbers import Real

import torch

__all__ = ["is_int", "positive_int", "non_negative_int", "positive_number", "number_in",
           "is_integer_dtype", "shape_of", "float_tensor", "finite", "same_shape",
           "token_ids", "bool_mask", "eval_mode"]


def is_int(value) -> bool:
    """True for an ``int`` that is not a ``bool`` (``True`` is an int to Python, not to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1, else ``ValueError("<name> must be a positive int, ...")``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value) -> int:
    """``value`` if it is an int >= 0, else ``ValueError("<name> must be a non-negative int, ...")``."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def positive_number(name: str, value) -> float:
    """``float(value)`` if it is a finite real number > 0 (not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number, got {value!r}")
    return float(value)


def number_in(name: str, value, low: float | None = None, high: float | None = None, *,
              low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` if it is a finite real number (not a bool) in the interval from ``low``
    to ``high`` (None: unbounded; ``*_open``: the end itself excluded), else ``ValueError``
    naming the interval, e.g. "dropout must be a number in [0, 1), got 1.0"."""
    ok = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        if low is not None and high is not None:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            where = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            where = f"{'<' if high_open else '<='} {high:g}"
        else:
            where = "that is finite"
        raise ValueError(f"{name} must be a number {where}, got {value!r}")
    return float(value)


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for torch's integer dtypes (uint8 ... int64); False for bool, floats and complex."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def shape_of(x) -> str:
    """A tensor's shape as ``(2, 3)``, or the type's name of anything else, for messages."""
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def float_tensor(name: str, x, ndim: int | None = None, shape: str | None = None) -> torch.Tensor:
    """Check that ``x`` is a floating-point tensor (with ``ndim`` dimensions, described as
    ``shape`` in the message, e.g. "(batch, T, channels)") and return it unchanged."""
    if not isinstance(x, torch.Tensor) or (ndim is not None and x.dim() != ndim):
        want = (f"a {shape} tensor" if shape else "a floating-point tensor"
                + (f" with {ndim} dimension(s)" if ndim is not None else ""))
        raise ValueError(f"{name} must be {want}, got {_describe(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Check that every entry of the tensor ``x`` is finite (no NaN, no inf); return it."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values: every entry must be finite")
    return x


def same_shape(**tensors: torch.Tensor) -> None:
    """Check that the tensors, given by name, all have one shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


def token_ids(ids, name: str = "idx", *, ndim: int | None = 2, shape: str = "(batch, T)",
              vocab_size: int | None = None) -> torch.Tensor:
    """Check that ``ids`` is a tensor of token ids and return it unchanged.

    ``ndim``: the number of dimensions it must have (None: any), described as ``shape`` in the
    message, e.g. "(batch, T)" or "1-D". Any integer dtype passes (uint8 ... int64); bool, float
    and complex do not. With ``vocab_size`` every id must lie in ``0 .. vocab_size - 1``: checked
    for ids on the CPU only, where reading them is free. On a GPU the check would wait for the
    device on every forward pass; there an id out of range stops the embedding lookup instead.
    """
    if not isinstance(ids, torch.Tensor) or (ndim is not None and ids.dim() != ndim):
        raise ValueError(f"{name} must be a {shape} tensor of token ids, got {_describe(ids)}")
    if not is_integer_dtype(ids.dtype):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if vocab_size is not None and ids.numel() and ids.device.type == "cpu":
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in 0..{vocab_size - 1}, got ids from {lo} to {hi}")
    return ids


def bool_mask(name: str, mask, shape, *, broadcast: bool = False, of: str = "",
              meaning: str = "", empty_row: str = "") -> torch.Tensor:
    """Check that ``mask`` is a bool tensor of ``shape`` (with ``broadcast``: one that
    broadcasts to ``shape``) with at least one True in every row, i.e. along its last
    dimension, and return it unchanged.

    For the messages: ``of`` names what has ``shape`` (e.g. "the attention scores
    (..., T_q, T_k)"), ``meaning`` what a True means (e.g. "True = may attend"), and
    ``empty_row`` what an all-False row would be and why it is refused."""
    shape = tuple(shape)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of dtype torch.bool"
                         + (f" ({meaning})" if meaning else "") + f", got {got}"
                         + ("; convert a 0/1 mask with `.bool()`, an additive one (0 and -inf) "
                            "with `== 0`" if isinstance(mask, torch.Tensor) else ""))
    of = f" of {of}" if of else ""
    if broadcast:
        try:
            fits = torch.broadcast_shapes(mask.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to the "
                             f"shape {shape}{of}")
    elif tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have the shape {shape}{of}, got {tuple(mask.shape)}")
    empty = ~mask.any(dim=-1)
    if bool(empty.any()):
        rows = empty.nonzero()[:5]
        rows = rows.flatten() if empty.dim() == 1 else rows
        raise ValueError(f"{name} of shape {tuple(mask.shape)} has rows with no True entry, "
                         f"e.g. at {rows.tolist()}: "
                         + (empty_row or "every row needs at least one True entry"))
    return mask


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``with eval_mode(model): ...`` runs the block in eval mode (no dropout) and then restores
    the mode the model was in, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
