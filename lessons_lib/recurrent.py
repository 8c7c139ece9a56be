"""The recurrent baseline a Transformer is compared with, and the tools that time and weigh them.

Read top to bottom:

1. :class:`LSTMLanguageModel` -- Embedding -> ``torch.nn.LSTM`` -> Linear: the recurrent network
   that Transformers replaced, as a language model with the same interface as ours
   (token ids (batch, T) in, logits (batch, T, vocab) out).
2. :func:`lstm_step_by_step` -- the same recurrence written as a Python loop over positions with a
   ``torch.nn.LSTMCell``: each step needs the state the previous one produced, so ``T``
   positions cost ``T`` steps one after another. :func:`lstm_cell_from` copies an ``nn.LSTM``'s
   weights into a cell so the two can be compared.
3. :func:`time_call` -- the shortest wall time of a call (waiting for the GPU, if there is one).
4. :func:`attention_peak_memory` -- how much memory one attention call needs at its peak,
   measured as the rise of the peak resident set size (RSS) of a separate Python process.
   Python's ``tracemalloc`` cannot see PyTorch's buffers; the operating system can.
5. :func:`loglog_fit` / :func:`loglog_slope` -- the power law ``y = a * x^p`` that fits
   measurements best on a log-log plot, and its exponent ``p``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .checks import non_negative_int, positive_int, token_ids
from .model import next_token_loss

__all__ = ["LSTMLanguageModel", "lstm_step_by_step", "lstm_cell_from", "time_call",
           "attention_peak_memory", "loglog_fit", "loglog_slope"]


# -----------------------------------------------------------------------------
# 1. the recurrent language model

class LSTMLanguageModel(nn.Module):
    """Token ids (batch, T) -> logits (batch, T, vocab_size) through an LSTM.

    The LSTM reads the sequence left to right and carries everything it knows about the past in a
    state of ``hidden_size`` numbers (plus as many in its memory cell), so it is causal by
    construction: the logits at position t depend only on tokens 0..t.
    """

    def __init__(self, vocab_size: int, n_embd: int, hidden_size: int, n_layer: int = 1):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_embd", n_embd),
                            ("hidden_size", hidden_size), ("n_layer", n_layer)):
            positive_int(name, value)
        self.vocab_size = vocab_size
        self.block_size = None          # a recurrence reads any number of tokens
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.lstm = nn.LSTM(n_embd, hidden_size, num_layers=n_layer, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """``idx`` (batch, T) integer token ids -> ``(logits (batch, T, vocab_size), loss)``.

        The same protocol as every language model in lessons_lib: ``loss`` is the mean
        cross-entropy against ``targets`` (batch, T), -100 marking positions to ignore, or
        None without targets.
        """
        token_ids(idx, "idx", vocab_size=self.vocab_size)
        if idx.shape[1] == 0:
            raise ValueError("idx must hold at least one position, got T = 0")
        out, _ = self.lstm(self.embed(idx.long()))   # (batch, T, hidden_size)
        logits = self.head(out)                      # (batch, T, vocab_size)
        return logits, (None if targets is None else next_token_loss(logits, targets))


# -----------------------------------------------------------------------------
# 2. the recurrence, one step at a time

def lstm_step_by_step(cell: nn.LSTMCell, x: torch.Tensor,
                      state: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Run ``cell`` over ``x`` (batch, T, input_size) one position at a time.

    Returns ``(outputs, (h, c))``: the hidden state after every position (batch, T, hidden_size)
    and the final state. Step t needs the ``(h, c)`` of step t-1, so the loop cannot be
    parallelised over positions: this is the sequential cost of a recurrent network.
    """
    if not isinstance(cell, nn.LSTMCell):
        raise ValueError(f"cell must be a torch.nn.LSTMCell, got {type(cell).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != cell.input_size:
        raise ValueError(f"x must have shape (batch, T, input_size={cell.input_size}), "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] == 0:
        raise ValueError("x must hold at least one position, got T = 0")
    B, T, _ = x.shape
    if state is None:
        h = x.new_zeros(B, cell.hidden_size)
        c = x.new_zeros(B, cell.hidden_size)
    else:
        h, c = state
        if h.shape != (B, cell.hidden_size) or c.shape != (B, cell.hidden_size):
            raise ValueError(f"state must be (h, c), each of shape ({B}, {cell.hidden_size}), "
                             f"got {tuple(h.shape)} and {tuple(c.shape)}")
    outputs = []
    for t in range(T):                               # T dependent steps, one after another
        h, c = cell(x[:, t], (h, c))
        outputs.append(h)
    return torch.stack(outputs, dim=1), (h, c)


def lstm_cell_from(lstm: nn.LSTM) -> nn.LSTMCell:
    """An ``nn.LSTMCell`` holding the weights of a one-layer, one-directional ``nn.LSTM``
    (both use the gate order input, forget, cell, output)."""
    if not isinstance(lstm, nn.LSTM):
        raise ValueError(f"expected a torch.nn.LSTM, got {type(lstm).__name__}")
    if lstm.num_layers != 1 or lstm.bidirectional or lstm.proj_size:
        raise ValueError("expected a one-layer, one-directional nn.LSTM without projections, got "
                         f"num_layers={lstm.num_layers}, bidirectional={lstm.bidirectional}, "
                         f"proj_size={lstm.proj_size}")
    w = lstm.weight_ih_l0
    cell = nn.LSTMCell(lstm.input_size, lstm.hidden_size, bias=lstm.bias).to(w.device, w.dtype)
    with torch.no_grad():
        cell.weight_ih.copy_(lstm.weight_ih_l0)
        cell.weight_hh.copy_(lstm.weight_hh_l0)
        if lstm.bias:
            cell.bias_ih.copy_(lstm.bias_ih_l0)
            cell.bias_hh.copy_(lstm.bias_hh_l0)
    return cell


# -----------------------------------------------------------------------------
# 3. a stopwatch

def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """The shortest wall time of ``fn()`` in seconds, over ``repeats`` calls after ``warmup``
    untimed ones. Waits for queued CUDA work before and after each call, so GPU timings are
    honest. The shortest call is the best estimate of the cost itself: other programs on the
    machine can only ever add time, never take it away (the advice of Python's ``timeit``)."""
    if not callable(fn):
        raise ValueError(f"fn must be callable with no arguments, got {type(fn).__name__}")
    positive_int("repeats", repeats)
    non_negative_int("warmup", warmup)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


# -----------------------------------------------------------------------------
# 4. peak memory, measured by the operating system in a fresh process

# The measuring process is lessons_lib/_attention_memory_child.py, run with `python -m` (it
# explains how it measures). On Linux one process measures every length; elsewhere it answers
# {"separate": true} to a list of lengths, and the parent starts one process per length.
_CHILD_MODULE = "lessons_lib._attention_memory_child"


# The measuring process is started by a small Python process that imports nothing and only
# starts it. A process inherits the peak memory of the process it was forked from (on Linux,
# ``ru_maxrss`` survives fork and exec), and the parent here is often a notebook holding hundreds
# of megabytes; the small go-between keeps that inherited peak small.
_LAUNCHER = ("import subprocess, sys; "
             "sys.exit(subprocess.run([sys.executable] + sys.argv[1:]).returncode)")


# glibc (Linux) serves a large allocation straight from the operating system and hands it back
# when it is freed, but after such a free it raises that size limit, and later buffers come from
# memory it kept: a smaller length measured after a larger one would then show no rise at all.
# Fixing the limit keeps every buffer above 64 KiB visible. Other systems ignore the variable.
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _run_child(sizes: list[int], settings: dict) -> dict:
    args = json.dumps({"sizes": sizes, **settings})
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, "-m", _CHILD_MODULE, args],
                          capture_output=True, text=True, env={**os.environ, **_CHILD_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process for N={sizes} failed (exit code "
                           f"{done.returncode}):\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def attention_peak_memory(sizes: Sequence[int], n_heads: int = 8, head_dim: int = 32,
                          batch_size: int = 1, fused: bool = False) -> list[int]:
    """For each sequence length N in ``sizes``, the bytes by which one self-attention call on CPU
    raises the peak memory of a Python process.

    A separate Python process builds q, k, v of shape (batch_size, n_heads, N, head_dim) and
    calls either the explicit :func:`lessons_lib.attention.attention_with_weights`
    (``fused=False``: it builds the N x N score and weight matrices) or PyTorch's fused
    ``torch.nn.functional.scaled_dot_product_attention`` (``fused=True``: it works through the
    keys in blocks and never stores the whole matrix). The answer is the rise of that process's
    peak resident set size (RSS) during the one call, as the operating system reports it;
    Python's ``tracemalloc`` cannot see PyTorch's buffers. On Linux one process measures every
    length, resetting the kernel's peak before each; elsewhere each length gets a fresh process,
    so that an earlier, larger peak cannot hide a later one.
    """
    if isinstance(sizes, (int, bool)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise ValueError(f"sizes must be a non-empty list of sequence lengths, got {sizes!r}")
    for n in sizes:
        positive_int("every size", n)
    for name, value in (("n_heads", n_heads), ("head_dim", head_dim), ("batch_size", batch_size)):
        positive_int(name, value)
    if not isinstance(fused, bool):
        raise ValueError(f"fused must be True or False, got {fused!r}")
    settings = {"n_heads": n_heads, "head_dim": head_dim, "batch_size": batch_size, "fused": fused}
    answer = _run_child(list(sizes), settings)
    if answer.get("separate"):                       # no way to reset the peak: one process per size
        answer = {"extra_bytes": [_run_child([n], settings)["extra_bytes"][0] for n in sizes]}
    return [int(b) for b in answer["extra_bytes"]]


# -----------------------------------------------------------------------------
# 5. power-law fits

def loglog_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """The power law ``y = a * x^p`` that fits the points best in log-log space: the least-squares
    line through (log x, log y). Returns ``(p, a)``.

    p = 1 means y doubles when x doubles; p = 2 means it quadruples."""
    xs = [float(v) for v in x]
    ys = [float(v) for v in y]
    if len(xs) != len(ys):
        raise ValueError(f"x and y must have the same length, got {len(xs)} and {len(ys)}")
    if len(xs) < 2:
        raise ValueError(f"need at least 2 points to fit a slope, got {len(xs)}")
    if any(not (v > 0 and math.isfinite(v)) for v in xs + ys):
        raise ValueError("every x and y must be a positive finite number (their logarithms are fitted)")
    lx = [math.log(v) for v in xs]
    ly = [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        raise ValueError("the x values are all equal: a slope needs at least two different x")
    p = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    return p, math.exp(my - p * mx)


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """The exponent p of the power law ``y ~ x^p`` fitted by :func:`loglog_fit`."""
    return loglog_fit(x, y)[0]
