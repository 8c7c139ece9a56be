"""Scaling laws: count a model, train a family of them, fit power laws, size a model for a budget.

Read top to bottom:

1. Counting. :func:`params` (every parameter of ``GPT(config)``), :func:`non_embedding_params`
   (without the token and position tables and an untied output head: the ``N`` of Kaplan et
   al.'s laws) and :func:`train_flops` (``C = 6 N D``, optionally with the attention term).
2. The published fits: :data:`KAPLAN_2020`, :data:`CHINCHILLA_2022` (Hoffmann et al.'s
   approach 3, the rounded constants of their eq. 10) and :data:`BESIROGLU_2024` (its
   replication).
3. :func:`sweep` -- train each configuration on the same data for a token budget and return one
   row (a dict) per run: N, D, C, final train and validation loss, wall time.
4. :func:`fit_power_law` -- ``L(x) = E + A / x**alpha`` (or without ``E``) fitted in log space;
   :func:`power_law` evaluates a fit. :func:`fit_loss_surface` fits Chinchilla's
   ``L(N, D) = E + A / N**alpha + B / D**beta`` to many runs at once.
5. :func:`isoflop_minimum` -- the size with the lowest loss along one compute budget (a parabola
   in log N), and :func:`compute_optimal` -- the ``N`` and ``D`` that minimise a fitted
   ``L(N, D)`` subject to ``6 N D = C``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from scipy.optimize import least_squares, minimize_scalar
from tqdm.auto import tqdm

from .checks import is_int, positive_int, positive_number
from .model import GPT, GPTConfig, count_parameters
from .runtime import choose_device, cpu_cores
from .train import TrainConfig, train

__all__ = ["non_embedding_params", "train_flops", "KAPLAN_2020", "CHINCHILLA_2022",
           "BESIROGLU_2024", "sweep", "fit_power_law", "power_law", "fit_loss_surface",
           "loss_surface", "isoflop_minimum", "compute_optimal"]


def _check_config(config) -> None:
    if not isinstance(config, GPTConfig):
        raise ValueError(f"expected a lessons_lib.model.GPTConfig, got {type(config).__name__}")


# -----------------------------------------------------------------------------
# 1. counting parameters and FLOPs

def non_embedding_params(config: GPTConfig) -> int:
    """Parameters outside the token table, the position table and an untied output head.

    This is the ``N`` of Kaplan et al. (2020), who found that loss follows a clean power law in
    it while the embedding tables, which cost almost no compute per token, only blur the trend.
    It is about ``12 n_layer d_model**2``: per block ``4 d**2`` in attention and ``8 d**2`` in
    the MLP, plus biases and LayerNorm gains, counted exactly here.
    """
    _check_config(config)
    parts = count_parameters(config, split=True)
    return parts["total"] - parts["embeddings"] - parts["head"]


def train_flops(config: GPTConfig, tokens, attention: bool = False, context: int | None = None,
                embeddings: bool = False) -> float:
    """Floating-point operations to train ``GPT(config)`` on ``tokens`` tokens: ``C = 6 N D``.

    Each parameter takes part in one multiply-add (2 FLOPs) per token in the forward pass and in
    two in the backward pass (the gradients of the input and of the weight): 6 FLOPs per parameter
    per token, with ``N = non_embedding_params(config)`` (Kaplan et al., 2020, section 2.1).
    ``embeddings=True`` uses every parameter, ``N = count_parameters(config)``, as Hoffmann et al. (2022) did:
    for a tied model this adds the output head's ``6 V d`` FLOPs per token, which are real work
    (and the position table, which is not). For large models the two conventions differ by a
    percent; for tiny ones by tens of percent.

    ``attention=True`` adds the part that does not scale with ``N``: the scores ``Q K^T`` and the
    weighted sum of values, which cost ``4 n_ctx d_model`` FLOPs per token and layer in the
    forward pass for a full ``n_ctx x n_ctx`` matrix, half of that under a causal mask. Kaplan et
    al. count the causal half, ``2 n_layer n_ctx d_model`` forward, so the training total per
    token is ``6 N + 6 n_layer n_ctx d_model``. ``context`` is the training context ``n_ctx``
    (default ``config.block_size``). For GPT-3 175B this term adds about 1.4%.
    """
    _check_config(config)
    D = positive_number("tokens", tokens)
    flops = 6.0 * (count_parameters(config) if embeddings else non_embedding_params(config)) * D
    if attention:
        n_ctx = config.block_size if context is None else context
        positive_int("context", n_ctx)
        flops += 6.0 * config.n_layer * n_ctx * config.n_embd * D
    return flops


# -----------------------------------------------------------------------------
# 2. the published fits

#: Kaplan et al. (2020), "Scaling Laws for Neural Language Models": L(N) = (N_c / N)^alpha_N for
#: models trained to convergence, L(D) = (D_c / D)^alpha_D, and the compute-efficient frontier
#: N_opt ~ C^0.73 (non-embedding parameters, loss in nats per BPE token of WebText2).
KAPLAN_2020 = {"alpha_N": 0.076, "N_c": 8.8e13, "alpha_D": 0.095, "D_c": 5.4e13,
               "alpha_C": 0.050, "N_opt_exponent": 0.73}

#: Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models" ("Chinchilla"),
#: approach 3: L(N, D) = E + A / N^alpha + B / D^beta, the rounded constants of their eq. 10
#: (the unrounded exponents in their appendix are 0.3392 and 0.2849, E = 1.6934).
CHINCHILLA_2022 = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}

#: Besiroglu, Erdil, Barnett and You (2024), "Chinchilla Scaling: A replication attempt": approach 3
#: refitted on the data read back from Hoffmann et al.'s figure 4. It agrees with Chinchilla's
#: approaches 1 and 2 (about 20 tokens per parameter); the published approach-3 fit does not.
BESIROGLU_2024 = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


# -----------------------------------------------------------------------------
# 3. a sweep: the same data, the same recipe, many sizes or budgets

def _data_key(data):
    """A cheap fingerprint of the training data, so that a cache never mixes two data sets."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(hashlib.blake2b(t.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()
                     + f"{tuple(t.shape)}{t.dtype}" for t in data)
    return ("object", id(data))


def _train_run(config: GPTConfig, steps: int, rate: float, settings: dict, data) -> dict:
    """One run of a sweep: a fresh GPT trained for ``steps`` steps; its row of the table."""
    train_config = TrainConfig(max_steps=steps, lr=rate, warmup_steps=round(settings["warmup_fraction"] * steps),
                               eval_interval=steps, progress=False,
                               **{k: v for k, v in settings.items() if k != "warmup_fraction"})
    torch.manual_seed(train_config.seed)
    model = GPT(config)
    history = train(model, data, train_config)
    return {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "N": non_embedding_params(config), "params": count_parameters(config), "D": history.tokens,
            "C": train_flops(config, history.tokens),
            "C_all": train_flops(config, history.tokens, embeddings=True), "steps": steps, "lr": rate,
            "train_loss": history.eval_train_loss[-1], "val_loss": history.val_loss[-1],
            "seconds": history.seconds}


_pools: dict = {}


def _worker_start() -> None:
    torch.set_num_threads(1)          # one process per core, one thread per process


def _pool(workers: int):
    """A pool of ``workers`` processes, started once and reused by later sweeps."""
    if workers not in _pools:
        import atexit
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # "spawn": a fresh interpreter, safe beside PyTorch's threads and inside Jupyter
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_start)
        atexit.register(pool.shutdown, cancel_futures=True)
        _pools[workers] = pool
    return _pools[workers]


def _resolve_workers(workers, data, device) -> int:
    if workers == "auto":
        workers = cpu_cores()
    if not (is_int(workers) and workers >= 1):
        raise ValueError(f"workers must be a positive int or 'auto', got {workers!r}")
    if workers > 1 and callable(data):
        raise ValueError("workers > 1 needs data as (train_ids, val_ids) tensors: a batch function "
                         "cannot be sent to other processes")
    if choose_device(device).type != "cpu":
        return 1                      # one GPU: the runs take turns on it
    return workers


def sweep(configs, tokens, data, *, batch_size: int = 32, block_size: int = 64, lr=3e-3,
          warmup_fraction: float = 0.1, min_lr_ratio: float = 0.1, eval_batches: int = 20,
          seed: int = 0, device: str = "auto", progress: bool = True, desc: str = "sweep",
          cache: dict | None = None, workers: int | str = 1) -> list[dict]:
    """Train one fresh ``GPT`` per configuration and return a table, one dict per run.

    ``tokens`` is the training budget: one number for every run, or a list with one per
    configuration (an IsoFLOP sweep gives each size ``C / (6 N)`` tokens). It is rounded to whole
    steps of ``batch_size * block_size`` tokens. ``lr`` is one peak learning rate, a list, or a
    function ``lr(config) -> float``. The schedule is tied to each run's budget: a linear warmup
    over ``warmup_fraction`` of the steps, then a cosine down to ``min_lr_ratio * lr`` at the last
    step, as Hoffmann et al. (2022) found it should be.

    Every run starts from ``torch.manual_seed(seed)`` and sees the same batches in the same order
    and the same validation batches, so the sweep is deterministic for a seed on a CPU and runs
    differ only in what is swept. Each row holds ``n_layer, n_head, n_embd``, ``N``
    (non-embedding parameters), ``params`` (all), ``D`` (tokens trained on), ``C`` (``6 N D``),
    ``C_all`` (``6 params D``), ``steps``, ``lr``, ``train_loss`` and ``val_loss`` (at the end,
    on ``eval_batches`` fixed batches) and ``seconds`` (wall time of the training steps).

    ``cache``, a dict you keep between calls, remembers finished runs: a later sweep that asks for
    the same configuration, number of steps, settings and data gets the stored row instead of
    training again (an IsoFLOP sweep can reuse a point of a size sweep).

    ``workers``: the runs are independent, so on a CPU they can train side by side, each in its
    own process on one thread (``"auto"``: one process per core). A run gives the same numbers in
    a worker as in this process on one thread; only ``seconds`` depends on what else runs.
    """
    configs = list(configs) if isinstance(configs, (list, tuple)) else configs
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"configs must be a non-empty list of GPTConfig, got {configs!r}")
    for config in configs:
        _check_config(config)
        if config.block_size < block_size:
            raise ValueError(f"block_size={block_size} does not fit a model with "
                             f"config.block_size={config.block_size}")
    budgets = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens] * len(configs)
    if len(budgets) != len(configs):
        raise ValueError(f"tokens must be one number or one per configuration: got {len(budgets)} "
                         f"budgets for {len(configs)} configurations")
    budgets = [positive_number("tokens", t) for t in budgets]
    if callable(lr):
        rates = [lr(config) for config in configs]
    else:
        rates = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(configs)
    if len(rates) != len(configs):
        raise ValueError(f"lr must be one number, a function or one per configuration: got {len(rates)} "
                         f"for {len(configs)} configurations")
    rates = [positive_number("lr", r) for r in rates]
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    workers = _resolve_workers(workers, data, device)

    settings = dict(batch_size=batch_size, block_size=block_size, min_lr_ratio=min_lr_ratio,
                    warmup_fraction=warmup_fraction, eval_batches=eval_batches, seed=seed, device=device)
    data_key = _data_key(data) if cache is not None else None
    rows: list[dict | None] = [None] * len(configs)
    todo = {}                                       # key -> (config, steps, rate, [row indices])
    for i, (config, budget, rate) in enumerate(zip(configs, budgets, rates)):
        steps = max(1, round(budget / (batch_size * block_size)))
        key = (repr(config), steps, batch_size, block_size, rate, warmup_fraction, min_lr_ratio,
               eval_batches, seed, str(device), data_key)
        if cache is not None and key in cache:
            rows[i] = dict(cache[key])
        else:
            todo.setdefault(key, (config, steps, rate, []))[3].append(i)

    bar = tqdm(total=len(configs), initial=len(configs) - sum(len(j[3]) for j in todo.values()),
               desc=desc, disable=not progress)

    def finish(key, row):
        for i in todo[key][3]:
            rows[i] = dict(row)
        if cache is not None:
            cache[key] = dict(row)
        bar.update(len(todo[key][3]))
        bar.set_postfix(N=f"{row['N']:,}", D=f"{row['D']:,}", val=f"{row['val_loss']:.3f}")

    if workers > 1 and len(todo) > 1:
        from concurrent.futures import as_completed

        pool = _pool(workers)
        # the longest runs first, so that the last one to finish is short
        order = sorted(todo, key=lambda k: -todo[k][1] * count_parameters(todo[k][0]))
        futures = {pool.submit(_train_run, todo[k][0], todo[k][1], todo[k][2], settings, data): k
                   for k in order}
        for future in as_completed(futures):
            finish(futures[future], future.result())
    else:
        for key, (config, steps, rate, _) in todo.items():
            finish(key, _train_run(config, steps, rate, settings, data))
    bar.close()
    return rows


# -----------------------------------------------------------------------------
# 4. power-law fits

def _as_positive_array(name: str, values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        bad = array[~np.isfinite(array) | (array <= 0)][0]
        raise ValueError(f"{name} must hold positive, finite numbers (a power law lives in log space), "
                         f"got {bad!r}")
    return array


def _r2(log_y: np.ndarray, log_pred: np.ndarray) -> float:
    ss_res = float(np.sum((log_y - log_pred) ** 2))
    ss_tot = float(np.sum((log_y - log_y.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res < 1e-24 else 0.0
    return 1.0 - ss_res / ss_tot


def power_law(x, fit: dict):
    """Evaluate ``E + A / x**alpha`` for a fit from :func:`fit_power_law` (numbers or arrays)."""
    x = np.asarray(x, dtype=np.float64)
    value = fit.get("E", 0.0) + fit["A"] * x ** (-fit["alpha"])
    return float(value) if value.ndim == 0 else value


def fit_power_law(x, loss, irreducible: bool = True) -> dict:
    """Fit ``L(x) = E + A / x**alpha`` (or ``A / x**alpha`` with ``irreducible=False``).

    Residuals are measured in log space, ``log L_fit - log L``, so that every point counts by its
    relative error whatever its size, as in Hoffmann et al.'s approach 3. Without ``E`` the fit is
    a straight line in log-log axes, solved exactly by least squares. With ``E`` we first scan
    ``E`` over ``[0, min(loss))``, fitting the line ``log(L - E)`` against ``log x`` for each, and
    start a bounded non-linear least-squares fit (scipy's ``least_squares``) from the best one.
    ``x`` is rescaled by its geometric mean inside the fit, which keeps the problem well
    conditioned when ``x`` spans many decades.

    Returns ``{"E", "A", "alpha", "r2"}``: ``r2`` is the coefficient of determination of the fit
    in log space, ``1 - sum((log L - log L_fit)^2) / sum((log L - mean log L)^2)``.
    Needs at least 3 points at 3 or more distinct ``x``; ``x`` and ``loss`` must be positive.
    """
    x = _as_positive_array("x", x)
    y = _as_positive_array("loss", loss)
    if len(x) != len(y):
        raise ValueError(f"x and loss must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 3:
        raise ValueError(f"a power-law fit needs at least 3 points, got {len(x)}")
    if len(np.unique(x)) < 3:
        raise ValueError(f"a power-law fit needs at least 3 distinct x values, got {len(np.unique(x))}")
    scale = float(np.exp(np.mean(np.log(x))))
    u, log_y = np.log(x / scale), np.log(y)

    def line(target):                       # least squares for target = c - alpha * u
        slope, intercept = np.polyfit(u, target, 1)
        return -slope, intercept

    if not irreducible:
        alpha, c = line(log_y)
        log_pred = c - alpha * u
        return {"E": 0.0, "A": float(math.exp(c) * scale ** alpha), "alpha": float(alpha),
                "r2": _r2(log_y, log_pred)}

    # 1. initialise: the E whose straight line through log(L - E) fits best in log L
    best = None
    for E in y.min() * np.linspace(0.0, 0.999, 200):
        alpha, c = line(np.log(y - E))
        pred = E + np.exp(c - alpha * u)
        sse = float(np.sum((np.log(pred) - log_y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, E, c, alpha)
    _, E0, c0, alpha0 = best

    # 2. refine E, log A', alpha together (A' is A at the rescaled x)
    def residuals(p):
        E, c, alpha = p
        return np.log(E + np.exp(c - alpha * u)) - log_y

    lower, upper = [0.0, -np.inf, -np.inf], [float(y.min()), np.inf, np.inf]
    start = np.clip([E0, c0, alpha0], np.array(lower) + 0.0, np.nextafter(np.array(upper), -np.inf))
    result = least_squares(residuals, start, bounds=(lower, upper), method="trf",
                           xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=10_000)
    E, c, alpha = result.x
    if np.sum(result.fun ** 2) > best[0]:               # never worse than the scan
        E, c, alpha = E0, c0, alpha0
    log_pred = np.log(E + np.exp(c - alpha * u))
    return {"E": float(E), "A": float(math.exp(c) * scale ** alpha), "alpha": float(alpha),
            "r2": _r2(log_y, log_pred)}


def loss_surface(N, D, fit: dict):
    """Evaluate ``E + A / N**alpha + B / D**beta`` (numbers or arrays)."""
    N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
    value = fit.get("E", 0.0) + fit["A"] * N ** (-fit["alpha"]) + fit["B"] * D ** (-fit["beta"])
    return float(value) if value.ndim == 0 else value


def fit_loss_surface(N, D, loss) -> dict:
    """Fit Chinchilla's ``L(N, D) = E + A / N**alpha + B / D**beta`` to many runs (approach 3).

    Residuals in log space as in :func:`fit_power_law`; the fit starts from a small grid of
    exponents and keeps the best of the local fits. Needs at least 5 runs. Returns
    ``{"E", "A", "B", "alpha", "beta", "r2"}``, ready for :func:`compute_optimal`.
    """
    N, D, y = (_as_positive_array(name, v) for name, v in (("N", N), ("D", D), ("loss", loss)))
    if not len(N) == len(D) == len(y):
        raise ValueError(f"N, D and loss must have the same length, got {len(N)}, {len(D)}, {len(y)}")
    if len(y) < 5:
        raise ValueError(f"a fit of 5 constants needs at least 5 runs, got {len(y)}")
    sN, sD = float(np.exp(np.mean(np.log(N)))), float(np.exp(np.mean(np.log(D))))
    uN, uD, log_y = np.log(N / sN), np.log(D / sD), np.log(y)

    def residuals(p):
        E, a, b, alpha, beta = p
        return np.log(E + np.exp(a - alpha * uN) + np.exp(b - beta * uD)) - log_y

    lower = [0.0, -np.inf, -np.inf, 0.0, 0.0]
    upper = [float(y.min()), np.inf, np.inf, 5.0, 5.0]
    best = None
    for alpha0 in (0.1, 0.3, 0.6):
        for beta0 in (0.1, 0.3, 0.6):
            for e_frac in (0.0, 0.5, 0.9):
                E0 = e_frac * y.min()
                start = [E0, math.log(max(y.mean() - E0, 1e-6) / 2), math.log(max(y.mean() - E0, 1e-6) / 2),
                         alpha0, beta0]
                result = least_squares(residuals, start, bounds=(lower, upper), method="trf",
                                       xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=5_000)
                if best is None or result.cost < best.cost:
                    best = result
    E, a, b, alpha, beta = best.x
    return {"E": float(E), "A": float(math.exp(a) * sN ** alpha), "B": float(math.exp(b) * sD ** beta),
            "alpha": float(alpha), "beta": float(beta), "r2": _r2(log_y, log_y + best.fun)}


# -----------------------------------------------------------------------------
# 5. compute-optimal sizing

def isoflop_minimum(N, loss) -> dict:
    """The best size along one compute budget: fit ``loss = a (log N)^2 + b log N + c`` and return
    its vertex ``{"N": N_opt, "loss": loss at N_opt, "curvature": a}`` (approach 2 of Hoffmann et
    al.). Needs at least 3 distinct sizes and points that curve upwards (``a > 0``)."""
    N = _as_positive_array("N", N)
    y = _as_positive_array("loss", loss)
    if len(N) != len(y):
        raise ValueError(f"N and loss must have the same length, got {len(N)} and {len(y)}")
    if len(np.unique(N)) < 3:
        raise ValueError(f"a parabola needs at least 3 distinct sizes, got {len(np.unique(N))}")
    a, b, c = np.polyfit(np.log(N), y, 2)
    if a <= 0:
        raise ValueError("these losses do not curve upwards in log N, so they have no minimum inside "
                         "the range: add sizes on the side where the loss is still falling")
    log_n = -b / (2 * a)
    return {"N": float(math.exp(log_n)), "loss": float(c - b * b / (4 * a)), "curvature": float(a)}


def compute_optimal(C, fit: dict | None = None) -> dict:
    """The ``N`` and ``D`` with ``6 N D = C`` that minimise ``L(N, D) = E + A/N^alpha + B/D^beta``.

    ``fit`` defaults to :data:`CHINCHILLA_2022` (Hoffmann et al., 2022, approach 3: E = 1.69,
    A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28); pass :data:`BESIROGLU_2024` or your own
    :func:`fit_loss_surface`. Along the budget, ``D = C / (6 N)``, and the loss is a convex function
    of ``log N`` (one term falls with N, the other rises), minimised here numerically. The answer
    has a closed form (Hoffmann et al., eq. 4): ``N_opt = G (C/6)^(beta/(alpha+beta))`` with
    ``G = (alpha A / (beta B))^(1/(alpha+beta))``, and ``D_opt = (C/6) / N_opt``; ``E`` does not move
    it. Returns ``{"N", "D", "loss", "tokens_per_param"}``.

    With the rounded constants the optimum at Gopher's budget (5.76e23 FLOPs) is about 32B
    parameters on 3T tokens, some 90 tokens per parameter, far from the 20 the paper's other two
    approaches and its Chinchilla model (70B, 1.4T tokens) used; Besiroglu et al. (2024) traced the
    gap to the approach-3 fit itself, and their refit gives about 20.
    """
    C = positive_number("C", C)
    fit = CHINCHILLA_2022 if fit is None else fit
    if not isinstance(fit, dict):
        raise ValueError(f"fit must be a dict with A, B, alpha and beta, got {type(fit).__name__}")
    missing = [k for k in ("A", "B", "alpha", "beta") if k not in fit]
    if missing:
        raise ValueError(f"fit lacks {missing}: expected L(N, D) = E + A/N^alpha + B/D^beta")
    for k in ("A", "B", "alpha", "beta"):
        positive_number(f"fit[{k!r}]", fit[k])
    A, B, alpha, beta = (float(fit[k]) for k in ("A", "B", "alpha", "beta"))
    half = math.log(C / 6) / 2                          # N = D = sqrt(C/6) in the middle

    def reducible(log_n):                              # the loss above E along 6 N D = C
        return A * math.exp(-alpha * log_n) + B * math.exp(-beta * (2 * half - log_n))

    result = minimize_scalar(reducible, bracket=(half - 1.0, half + 1.0), tol=1e-12)
    N = math.exp(result.x)
    D = C / (6 * N)
    return {"N": N, "D": D, "loss": float(fit.get("E", 0.0)) + reducible(result.x),
            "tokens_per_param": D / N}
