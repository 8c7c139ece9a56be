"""lessons_lib.recurrent: the LSTM baseline against PyTorch's own LSTM, and the measuring tools."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lessons_lib.recurrent import (LSTMLanguageModel, _run_child, attention_peak_memory, loglog_fit,
                                   loglog_slope, lstm_cell_from, lstm_step_by_step, time_call)


# -----------------------------------------------------------------------------
# the language model

def test_lstm_language_model_shapes_and_parameters():
    torch.manual_seed(0)
    m = LSTMLanguageModel(vocab_size=17, n_embd=64, hidden_size=132)
    idx = torch.randint(17, (3, 11))
    logits, loss = m(idx)
    assert logits.shape == (3, 11, 17) and loss is None
    targets = torch.randint(17, (3, 11))
    logits2, loss = m(idx.int(), targets)                       # any integer dtype
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 17), targets.reshape(-1)))
    targets[0, :4] = -100                                       # ignored positions
    keep = targets.reshape(-1) != -100
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 17)[keep], targets.reshape(-1)[keep])
    torch.testing.assert_close(m(idx, targets)[1], want)
    # embedding + LSTM (4 gates: input and hidden weights, two biases) + output layer
    want = 17 * 64 + 4 * 132 * (64 + 132) + 2 * 4 * 132 + 132 * 17 + 17
    assert sum(p.numel() for p in m.parameters()) == want


def test_lstm_language_model_is_causal():
    torch.manual_seed(1)
    m = LSTMLanguageModel(10, 8, 12, n_layer=2)
    a = torch.randint(10, (2, 9))
    b = a.clone()
    b[:, 5:] = (b[:, 5:] + 1) % 10                              # change only the future
    with torch.no_grad():
        la, lb = m(a)[0], m(b)[0]
        torch.testing.assert_close(la[:, :5], lb[:, :5])
        assert not torch.allclose(la[:, 5:], lb[:, 5:])


def test_lstm_language_model_errors():
    m = LSTMLanguageModel(5, 4, 4)
    for bad in (torch.zeros(3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 0, dtype=torch.long),
                torch.full((1, 3), 5), torch.full((1, 3), -1), [[1, 2]]):
        with pytest.raises(ValueError, match="idx|token ids|position"):
            m(bad)
    idx = torch.zeros(2, 3, dtype=torch.long)
    for bad in (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3), [[0, 1, 2]] * 2):
        with pytest.raises(ValueError, match="targets"):
            m(idx, bad)
    for kwargs in ({"vocab_size": 0, "n_embd": 4, "hidden_size": 4}, {"vocab_size": 5, "n_embd": 4.0, "hidden_size": 4},
                   {"vocab_size": 5, "n_embd": 4, "hidden_size": True}, {"vocab_size": 5, "n_embd": 4, "hidden_size": 4, "n_layer": 0}):
        with pytest.raises(ValueError, match="positive int"):
            LSTMLanguageModel(**kwargs)


# -----------------------------------------------------------------------------
# the step-by-step recurrence equals PyTorch's fused LSTM

@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 12), n_in=st.integers(1, 6), H=st.integers(1, 6),
       seed=st.integers(0, 1000), with_state=st.booleans())
def test_step_by_step_equals_torch_lstm(B, T, n_in, H, seed, with_state):
    torch.manual_seed(seed)
    lstm = nn.LSTM(n_in, H, batch_first=True)
    x = torch.randn(B, T, n_in)
    state = (torch.randn(B, H), torch.randn(B, H)) if with_state else None
    with torch.no_grad():
        want, (h_n, c_n) = lstm(x, None if state is None else (state[0][None], state[1][None]))
        got, (h, c) = lstm_step_by_step(lstm_cell_from(lstm), x, state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_n[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_n[0], rtol=1e-5, atol=1e-6)


def test_lstm_cell_from_without_bias():
    torch.manual_seed(2)
    lstm = nn.LSTM(3, 5, batch_first=True, bias=False)
    cell = lstm_cell_from(lstm)
    assert cell.bias_ih is None
    x = torch.randn(2, 4, 3)
    with torch.no_grad():
        torch.testing.assert_close(lstm_step_by_step(cell, x)[0], lstm(x)[0])


def test_step_by_step_and_cell_from_errors():
    cell = nn.LSTMCell(3, 4)
    for bad in (torch.randn(2, 3), torch.randn(2, 5, 4), torch.randn(2, 0, 3), "x"):
        with pytest.raises(ValueError, match="x must"):
            lstm_step_by_step(cell, bad)
    with pytest.raises(ValueError, match="state"):
        lstm_step_by_step(cell, torch.randn(2, 5, 3), (torch.zeros(3, 4), torch.zeros(3, 4)))
    with pytest.raises(ValueError, match="LSTMCell"):
        lstm_step_by_step(nn.GRUCell(3, 4), torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="nn.LSTM"):
        lstm_cell_from(cell)
    for lstm in (nn.LSTM(3, 4, num_layers=2), nn.LSTM(3, 4, bidirectional=True), nn.LSTM(3, 4, proj_size=2)):
        with pytest.raises(ValueError, match="one-layer"):
            lstm_cell_from(lstm)


# -----------------------------------------------------------------------------
# the stopwatch

def test_time_call_is_the_fastest_call_after_the_warmup(monkeypatch):
    import lessons_lib.recurrent as recurrent
    clock, calls = [0.0], []
    # a clock that moves only when fn runs: the answer does not depend on the machine's load
    monkeypatch.setattr(recurrent.time, "perf_counter", lambda: clock[0])

    def fn():                                    # warm-up 1 ms, then 60 ms, 20 ms, 40 ms
        calls.append(1)
        clock[0] += [0.001, 0.06, 0.02, 0.04][len(calls) - 1]

    t = time_call(fn, repeats=3, warmup=1)
    assert len(calls) == 4
    assert t == pytest.approx(0.02)                              # the fastest timed call, not the warm-up


def test_time_call_measures_sleep():
    import time
    t = time_call(lambda: time.sleep(0.02), repeats=3, warmup=0)
    assert t >= 0.015                 # a sleep never ends early; a busy machine only adds time


def test_time_call_errors():
    with pytest.raises(ValueError, match="callable"):
        time_call(3)
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        time_call(lambda: None, warmup=-1)


# -----------------------------------------------------------------------------
# peak memory of attention, measured by the operating system

@pytest.mark.slow
def test_attention_peak_memory_grows_as_n_squared():
    """The explicit path holds a few N x N float32 matrices per head at its peak; the fused path
    does not hold even one."""
    sizes = [512, 1024]
    explicit = attention_peak_memory(sizes, n_heads=4, head_dim=16)
    # measured largest first, the smaller size still reports its own peak (the earlier one does not hide it)
    assert attention_peak_memory(sizes[::-1], n_heads=4, head_dim=16)[1] > 1.5 * 4 * 512 * 512 * 4
    fused = attention_peak_memory([1024], n_heads=4, head_dim=16, fused=True)[0]
    matrix = [4 * n * n * 4 for n in sizes]                      # heads * N * N * 4 bytes
    for got, one in zip(explicit, matrix):
        assert 1.5 * one < got < 5 * one
    assert 3.0 < explicit[1] / explicit[0] < 5.5                 # about 4x per doubling
    assert fused < 0.5 * matrix[1]


@pytest.mark.slow
def test_peak_memory_without_a_resettable_peak():
    """Where the peak cannot be reset (macOS, Windows), the measuring process asks for one process
    per size, and the peak so far serves as the baseline."""
    settings = {"n_heads": 4, "head_dim": 16, "batch_size": 1, "fused": False, "no_reset": True}
    assert _run_child([256, 512], settings) == {"separate": True}
    got = _run_child([1024], settings)["extra_bytes"][0]
    assert 1.5 * 4 * 1024 * 1024 * 4 < got < 5 * 4 * 1024 * 1024 * 4


def test_attention_peak_memory_errors():
    for bad in (512, [], [0], [True], "512", [2.5]):
        with pytest.raises(ValueError, match="sizes|every size"):
            attention_peak_memory(bad)
    with pytest.raises(ValueError, match="n_heads"):
        attention_peak_memory([8], n_heads=0)
    with pytest.raises(ValueError, match="fused"):
        attention_peak_memory([8], fused="yes")


@pytest.mark.slow
def test_attention_peak_memory_reports_a_failing_child():
    # head_dim too large to allocate makes the child fail; the error says so
    with pytest.raises(RuntimeError, match="failed"):
        attention_peak_memory([2 ** 20], n_heads=2 ** 12, head_dim=2 ** 12)


# -----------------------------------------------------------------------------
# power-law slopes

@given(p=st.floats(-3, 3), a=st.floats(0.1, 10), xs=st.lists(st.floats(1, 1e4), min_size=2, max_size=8, unique=True))
def test_loglog_slope_recovers_a_power_law(p, a, xs):
    assume(max(xs) / min(xs) >= 1.5)
    ys = [a * x ** p for x in xs]
    assert math.isclose(loglog_slope(xs, ys), p, abs_tol=1e-6)
    slope, prefactor = loglog_fit(xs, ys)
    assert math.isclose(slope, p, abs_tol=1e-6) and math.isclose(prefactor, a, rel_tol=1e-5)


def test_loglog_slope_matches_numpy():
    import numpy as np
    xs, ys = [128, 256, 512, 1024], [1.0, 3.5, 17.0, 60.0]
    want_slope, want_intercept = np.polyfit(np.log(xs), np.log(ys), 1)
    assert math.isclose(loglog_slope(xs, ys), want_slope, rel_tol=1e-9)
    assert math.isclose(math.log(loglog_fit(xs, ys)[1]), want_intercept, rel_tol=1e-9)


def test_loglog_slope_errors():
    with pytest.raises(ValueError, match="same length"):
        loglog_slope([1, 2], [1])
    with pytest.raises(ValueError, match="at least 2"):
        loglog_slope([1], [1])
    with pytest.raises(ValueError, match="positive"):
        loglog_slope([1, 2], [0, 1])
    with pytest.raises(ValueError, match="positive"):
        loglog_slope([1, float("inf")], [1, 2])
    with pytest.raises(ValueError, match="all equal"):
        loglog_slope([2, 2], [1, 2])
