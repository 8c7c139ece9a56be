"""lessons_lib.scaling: parameter and FLOP formulas against counting (PyTorch's FlopCounterMode),
power-law fits that recover what they were given, compute-optimal sizing against the closed
form, a deterministic sweep, and every ValueError."""

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from lessons_lib.attention import attention_with_weights
from lessons_lib.model import GPT, GPTConfig, count_parameters
from lessons_lib.scaling import (BESIROGLU_2024, CHINCHILLA_2022, KAPLAN_2020, compute_optimal,
                                 fit_loss_surface, fit_power_law, isoflop_minimum, loss_surface,
                                 non_embedding_params, power_law, sweep, train_flops)

CONFIGS = [GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64),
           GPTConfig(vocab_size=97, block_size=16, n_layer=3, n_head=2, n_embd=32, tie_weights=False),
           GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, bias=False),
           GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, positions="sinusoidal")]


# -- counting parameters -------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS + [GPTConfig.gpt2("small"), GPTConfig.gpt3("175b")])
def test_params_equal_counting_the_tensors_of_a_model(config):
    with torch.device("meta"):
        model = GPT(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    embedding = {"wte.weight", "wpe.weight"} | ({"lm_head.weight"} if not config.tie_weights else set())
    outside = sum(p.numel() for name, p in model.named_parameters() if name not in embedding)
    assert non_embedding_params(config) == outside


def test_non_embedding_params_are_about_12_layers_d_squared():
    config = GPTConfig.gpt3("175b")
    assert non_embedding_params(config) == pytest.approx(12 * 96 * 12288 ** 2, rel=1e-3)
    assert count_parameters(config) == pytest.approx(175e9, rel=0.01)


# -- counting FLOPs ------------------------------------------------------------------------

def counted_training_flops(model, batch, T, vocab):
    idx = torch.randint(vocab, (batch, T), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        _, loss = model(idx, torch.roll(idx, -1, dims=1))
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("config", CONFIGS[:3])
def test_six_flops_per_matrix_parameter_per_token_as_pytorch_counts_them(config):
    """PyTorch counts the matrix multiplies of a forward and backward pass (its CPU fused attention
    kernel is not counted, so this isolates the 6 N D part): every weight matrix in the blocks
    costs exactly 6 FLOPs per token, and so does the output head, which 6 N D leaves out."""
    torch.manual_seed(0)
    model = GPT(config)
    B, T = 3, config.block_size
    D = B * T
    counted = counted_training_flops(model, B, T, config.vocab_size)
    matrices = sum(p.numel() for p in model.h.parameters() if p.dim() == 2)
    vectors = non_embedding_params(config) - matrices          # biases and LayerNorm gains
    head = 6 * D * config.vocab_size * config.n_embd
    assert counted == train_flops(config, D) - 6 * D * vectors + head
    # for these tiny models biases, gains and the head are small but not negligible
    assert abs(counted / train_flops(config, D) - 1) < 0.25


def test_the_attention_term_is_the_causal_half_of_what_pytorch_counts():
    config = CONFIGS[0]
    B, T, H, d = 2, config.block_size, config.n_head, config.n_embd
    q, k, v = (torch.randn(B, H, T, d // H, requires_grad=True) for _ in range(3))
    counter = FlopCounterMode(display=False)
    with counter:
        out, _ = attention_with_weights(q, k, v)
        out.sum().backward()
    full_per_token_and_layer = counter.get_total_flops() / (B * T)
    assert full_per_token_and_layer == 12 * T * d                 # 4 T d forward, twice that backward
    D = 1000
    extra = train_flops(config, D, attention=True) - train_flops(config, D)
    assert extra == pytest.approx(config.n_layer * D * full_per_token_and_layer / 2)
    shorter = train_flops(config, D, attention=True, context=8) - train_flops(config, D)
    assert shorter == pytest.approx(extra * 8 / T)


def test_counting_every_parameter_adds_the_embedding_tables():
    config = CONFIGS[0]
    extra = train_flops(config, 1000, embeddings=True) - train_flops(config, 1000)
    assert extra == 6 * 1000 * (config.vocab_size + config.block_size) * config.n_embd
    big = GPTConfig.gpt3("175b")
    assert train_flops(big, 300e9, embeddings=True) / train_flops(big, 300e9) < 1.01


def test_gpt3_175b_on_300b_tokens_costs_what_its_paper_says():
    # Brown et al. (2020), table D.1: 3.14e23 training FLOPs for GPT-3 175B
    C = train_flops(GPTConfig.gpt3("175b"), 300e9)
    assert C == pytest.approx(3.14e23, rel=0.01)
    with_attention = train_flops(GPTConfig.gpt3("175b"), 300e9, attention=True)
    assert 1.01 < with_attention / C < 1.02


# -- power-law fits ------------------------------------------------------------------------

@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(E=st.floats(0.5, 3.0), ratio=st.floats(0.5, 5.0), alpha=st.floats(0.1, 0.8),
       lo=st.floats(2.0, 5.0), decades=st.floats(2.0, 4.0), n=st.integers(5, 12))
def test_fit_recovers_noise_free_parameters(E, ratio, alpha, lo, decades, n):
    x = np.geomspace(10 ** lo, 10 ** (lo + decades), n)
    A = ratio * E * x[0] ** alpha                     # the reducible part starts at ratio * E
    fit = fit_power_law(x, E + A * x ** -alpha)
    assert fit["E"] == pytest.approx(E, rel=1e-3)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-3)
    assert fit["A"] == pytest.approx(A, rel=1e-2)
    assert fit["r2"] > 0.999999


@settings(max_examples=40, deadline=None)
@given(A=st.floats(0.1, 1e4), alpha=st.floats(-0.5, 1.0), lo=st.floats(-3.0, 8.0))
def test_fit_without_irreducible_term_is_a_line_in_log_log(A, alpha, lo):
    x = np.geomspace(10 ** lo, 10 ** (lo + 3), 6)
    fit = fit_power_law(x, A * x ** -alpha, irreducible=False)
    assert fit["E"] == 0.0
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9)
    assert fit["A"] == pytest.approx(A, rel=1e-8)
    slope, _ = np.polyfit(np.log(x), np.log(A * x ** -alpha), 1)      # numpy's line agrees
    assert fit["alpha"] == pytest.approx(-slope, abs=1e-9)


def test_fit_with_noise_lands_near_the_truth():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e7, 40)
    E, A, alpha = 1.7, 400.0, 0.34
    loss = (E + A * x ** -alpha) * np.exp(rng.normal(0, 0.005, x.shape))    # 0.5% noise
    fit = fit_power_law(x, loss)
    assert abs(fit["alpha"] - alpha) < 0.05 and abs(fit["E"] - E) < 0.1
    assert 0.95 < fit["r2"] < 1.0
    assert np.max(np.abs(power_law(x, fit) / loss - 1)) < 0.03
    pure = fit_power_law(x, loss, irreducible=False)
    assert 0 < pure["alpha"] < alpha and pure["r2"] < fit["r2"]      # a line misses the bend
    assert isinstance(power_law(10.0, fit), float)


def test_fit_accepts_tensors_and_lists():
    x = [1e3, 1e4, 1e5, 1e6]
    y = [1.0 + 30 * v ** -0.5 for v in x]
    a = fit_power_law(torch.tensor(x), torch.tensor(y, dtype=torch.float64))
    b = fit_power_law(x, y)
    assert a["alpha"] == pytest.approx(b["alpha"]) == pytest.approx(0.5, rel=1e-4)


def test_fit_loss_surface_recovers_chinchilla_and_its_optimum():
    N = np.geomspace(1e7, 1e10, 7)
    D = np.geomspace(1e9, 1e12, 7)
    NN, DD = (a.ravel() for a in np.meshgrid(N, D))
    truth = {"E": 1.8, "A": 480.0, "B": 2000.0, "alpha": 0.35, "beta": 0.37}
    fit = fit_loss_surface(NN, DD, loss_surface(NN, DD, truth))
    for key, value in truth.items():
        assert fit[key] == pytest.approx(value, rel=1e-3), key
    assert fit["r2"] > 0.999999
    assert compute_optimal(1e22, fit)["N"] == pytest.approx(compute_optimal(1e22, truth)["N"], rel=1e-3)


# -- compute-optimal sizing ----------------------------------------------------------------

def closed_form(C, fit):
    a, b = fit["alpha"], fit["beta"]
    G = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b))
    N = G * (C / 6) ** (b / (a + b))
    return N, C / (6 * N)


@pytest.mark.parametrize("C", [1e18, 3.15e23, 5.76e23, 1e26])
@pytest.mark.parametrize("fit", [None, BESIROGLU_2024, {"A": 1.0, "B": 50.0, "alpha": 0.5, "beta": 0.2}])
def test_compute_optimal_equals_the_closed_form(C, fit):
    got = compute_optimal(C, fit)
    N, D = closed_form(C, fit or CHINCHILLA_2022)
    assert got["N"] == pytest.approx(N, rel=1e-6)
    assert got["D"] == pytest.approx(D, rel=1e-6)
    assert 6 * got["N"] * got["D"] == pytest.approx(C)
    assert got["tokens_per_param"] == pytest.approx(D / N, rel=1e-6)
    f = fit or CHINCHILLA_2022
    for step in (0.9, 1.1):                     # moving along the budget only makes it worse
        assert loss_surface(got["N"] * step, got["D"] / step, f) > got["loss"]


def test_rounded_chinchilla_constants_overshoot_20_tokens_per_parameter():
    gopher = 5.76e23
    rounded = compute_optimal(gopher)
    refit = compute_optimal(gopher, BESIROGLU_2024)
    assert 85 < rounded["tokens_per_param"] < 100 and 25e9 < rounded["N"] < 40e9
    assert 15 < refit["tokens_per_param"] < 25 and 60e9 < refit["N"] < 80e9
    assert KAPLAN_2020["alpha_N"] == 0.076


def test_isoflop_minimum_finds_the_vertex():
    N = np.geomspace(1e4, 1e6, 5)
    loss = 2.0 + 0.3 * (np.log(N) - np.log(7e4)) ** 2
    got = isoflop_minimum(N, loss)
    assert got["N"] == pytest.approx(7e4, rel=1e-6)
    assert got["loss"] == pytest.approx(2.0) and got["curvature"] == pytest.approx(0.3)


# -- the sweep -----------------------------------------------------------------------------

def pattern_data():
    pattern = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 3, 5, 7])
    return pattern.repeat(100), pattern.repeat(10)


SMALL = [GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=16),
         GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)]


@pytest.fixture
def one_thread():
    """Models this small train fastest on one thread; on a busy machine two threads that wait for
    each other can be many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sweep_returns_a_deterministic_table(one_thread):
    kwargs = dict(batch_size=4, block_size=16, lr=1e-2, eval_batches=2, progress=False)
    start = time.perf_counter()
    a = sweep(SMALL, 640, pattern_data(), **kwargs)
    elapsed = time.perf_counter() - start
    b = sweep(SMALL, 640, pattern_data(), **kwargs)
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    for row, config in zip(a, SMALL):
        assert row["N"] == non_embedding_params(config) and row["params"] == count_parameters(config)
        assert row["steps"] == 10 and row["D"] == 10 * 4 * 16
        assert row["C"] == train_flops(config, row["D"]) == 6 * row["N"] * row["D"]
        assert row["C_all"] == train_flops(config, row["D"], embeddings=True) == 6 * row["params"] * row["D"]
        assert math.log(13) > row["val_loss"] > 0
    # seconds: each run's own training time, in one process, within the sweep's wall time
    assert all(r["seconds"] > 0 for r in a) and sum(r["seconds"] for r in a) <= elapsed
    c = sweep(SMALL, [320, 1280], pattern_data(), **{**kwargs, "lr": lambda cfg: 0.16 / cfg.n_embd})
    assert [r["D"] for r in c] == [320, 1280] and [r["lr"] for r in c] == [1e-2, 5e-3]


def test_sweep_cache_reuses_runs_but_never_across_data(one_thread):
    kwargs = dict(batch_size=4, block_size=16, lr=1e-2, eval_batches=2, progress=False)
    cache = {}
    first = sweep(SMALL, 640, pattern_data(), cache=cache, **kwargs)
    assert len(cache) == 2
    again = sweep(SMALL[::-1], [640, 320], pattern_data(), cache=cache, **kwargs)
    assert again[0] == first[1] and len(cache) == 3            # one stored run reused, one new
    other = (pattern_data()[0].flip(0), pattern_data()[1])
    sweep(SMALL[:1], 640, other, cache=cache, **kwargs)
    assert len(cache) == 4                                      # new data, new run


@pytest.mark.slow
def test_sweep_in_worker_processes_gives_the_same_table(one_thread):
    kwargs = dict(batch_size=4, block_size=16, lr=1e-2, eval_batches=2, progress=False)
    configs = SMALL + SMALL[:1]                                  # a repeated run is trained once
    alone = sweep(configs, [640, 640, 640], pattern_data(), **kwargs)
    cache = {}
    side_by_side = sweep(configs, [640, 640, 640], pattern_data(), workers=2, cache=cache, **kwargs)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(side_by_side) == strip(alone) and len(cache) == 2
    assert side_by_side[0] == side_by_side[2]


def test_sweep_workers_errors():
    kwargs = dict(batch_size=4, block_size=16, lr=1e-2, eval_batches=2, progress=False)
    with pytest.raises(ValueError, match="workers must be"):
        sweep(SMALL, 640, pattern_data(), workers=0, **kwargs)
    with pytest.raises(ValueError, match="workers must be"):
        sweep(SMALL, 640, pattern_data(), workers="many", **kwargs)
    train_ids, val_ids = pattern_data()
    batch_fn = lambda split, g: (train_ids[:16][None], train_ids[1:17][None])  # noqa: E731
    with pytest.raises(ValueError, match="batch function"):
        sweep(SMALL, 640, batch_fn, workers=2, **kwargs)


# -- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("x, loss, match", [
    ([1, 2], [3, 2], "at least 3 points"),
    ([1, 2, 3], [3, 2], "same length"),
    ([0, 2, 3], [3, 2, 1], "positive"),
    ([-1, 2, 3], [3, 2, 1], "positive"),
    ([1, 2, 3], [3, 0, 1], "positive"),
    ([1, 2, 3], [3, float("nan"), 1], "positive"),
    ([1, 2, float("inf")], [3, 2, 1], "positive"),
    ([1, 1, 2, 2], [3, 3, 2, 2], "distinct"),
    ([[1, 2, 3]], [[3, 2, 1]], "1-D"),
    ("abc", [3, 2, 1], "numbers"),
])
def test_fit_power_law_rejects_bad_input(x, loss, match):
    for irreducible in (True, False):
        with pytest.raises(ValueError, match=match):
            fit_power_law(x, loss, irreducible=irreducible)


def test_compute_optimal_rejects_bad_input():
    for C in (0, -1e20, float("nan"), float("inf"), "1e20", True):
        with pytest.raises(ValueError, match="C must be"):
            compute_optimal(C)
    with pytest.raises(ValueError, match="lacks"):
        compute_optimal(1e20, {"A": 1.0, "alpha": 0.3})
    with pytest.raises(ValueError, match="dict"):
        compute_optimal(1e20, [1.0, 2.0, 0.3, 0.3])
    with pytest.raises(ValueError, match="alpha"):
        compute_optimal(1e20, {**CHINCHILLA_2022, "alpha": -0.3})


def test_counting_rejects_bad_input():
    for fn in (count_parameters, non_embedding_params):
        with pytest.raises(ValueError, match="GPTConfig"):
            fn({"n_layer": 2})
    with pytest.raises(ValueError, match="GPTConfig"):
        train_flops("gpt2", 1000)
    for tokens in (0, -5, float("nan"), None):
        with pytest.raises(ValueError, match="tokens"):
            train_flops(CONFIGS[0], tokens)
    with pytest.raises(ValueError, match="context"):
        train_flops(CONFIGS[0], 1000, attention=True, context=0)


def test_isoflop_and_surface_reject_bad_input():
    with pytest.raises(ValueError, match="do not curve upwards"):
        isoflop_minimum([1e3, 1e4, 1e5], [2.0, 2.5, 2.0])
    with pytest.raises(ValueError, match="3 distinct"):
        isoflop_minimum([1e3, 1e3, 1e4], [2.0, 2.1, 2.2])
    with pytest.raises(ValueError, match="same length"):
        isoflop_minimum([1e3, 1e4, 1e5], [2.0, 2.1])
    with pytest.raises(ValueError, match="positive"):
        isoflop_minimum([1e3, 0, 1e5], [2.0, 2.1, 2.3])
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_loss_surface([1, 2, 3, 4], [1, 2, 3, 4], [4, 3, 2, 1])
    with pytest.raises(ValueError, match="same length"):
        fit_loss_surface([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [4, 3, 2, 1])


def test_sweep_rejects_bad_input():
    data = pattern_data()
    kw = dict(block_size=16, progress=False)
    with pytest.raises(ValueError, match="non-empty list"):
        sweep([], 640, data, **kw)
    with pytest.raises(ValueError, match="GPTConfig"):
        sweep(["small"], 640, data, **kw)
    with pytest.raises(ValueError, match="one per configuration"):
        sweep(SMALL, [640], data, **kw)
    with pytest.raises(ValueError, match="tokens"):
        sweep(SMALL, 0, data, **kw)
    with pytest.raises(ValueError, match="lr"):
        sweep(SMALL, 640, data, lr=[1e-2], **kw)
    with pytest.raises(ValueError, match="lr"):
        sweep(SMALL, 640, data, lr=-1.0, **kw)
    with pytest.raises(ValueError, match="warmup_fraction"):
        sweep(SMALL, 640, data, warmup_fraction=1.0, **kw)
    with pytest.raises(ValueError, match="block_size"):
        sweep(SMALL, 640, data, block_size=32)
