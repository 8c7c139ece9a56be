"""Checkers for chapter 05's exercises (the Transformer block, and the LSTM it replaced).

Each checker calls the learner's function on hidden inputs and compares with answers computed
here in float64 from the formulas, so the checkers do not lean on the code being learned
(lessons_lib.model, torch.nn.LayerNorm, torch.nn.LSTMCell). Where a wrong answer matches a
common slip (sin and cos not interleaved, the unbiased variance, a forgotten LayerNorm, the
gates in the wrong order) the message says so. Every random input is drawn from its own seed,
and a failing random case prints the line that rebuilds it (the policy of ``_core``).
"""

from __future__ import annotations

import torch

from ._core import Case, _short, as_int, compare_close, randn, randn_call, run_cases

__all__ = ["check_sinusoidal_positions", "check_layer_norm", "check_block_param_count",
           "check_lstm_step"]


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> bool:
    return torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol)


def _tensor_problem(got, expected: torch.Tensor) -> str | None:
    """Type, shape and float-ness of a tensor answer; None if they are right."""
    if not isinstance(got, torch.Tensor):
        return f"expected a torch.Tensor, got a {type(got).__name__}: {_short(got)}"
    if tuple(got.shape) != tuple(expected.shape):
        return f"expected shape {tuple(expected.shape)}, got shape {tuple(got.shape)}"
    if not got.is_floating_point():
        return f"expected a floating-point tensor, got dtype {got.dtype}"
    return None


def _first_problem(got, expected: torch.Tensor, slips, rtol: float, atol: float) -> str | None:
    """None if ``got`` is ``expected`` within tolerance. Otherwise what is wrong: the type, shape
    or dtype, else the first of ``slips()`` (pairs of a wrong reference and why) that ``got``
    matches, else how the values differ."""
    problem = _tensor_problem(got, expected)
    if problem:
        return problem
    problem = compare_close(rtol=rtol, atol=atol)(got, expected)
    if problem is None:
        return None
    for slip, why in slips():
        if slip.shape == got.shape and _close(got, slip, rtol=rtol, atol=atol):
            return why
    return problem


# -----------------------------------------------------------------------------
# 1. sinusoidal positions

def _sinusoidal_ref(T: int, d: int, layout: str = "interleaved", exponent: str = "2i/d",
                    first: str = "sin") -> torch.Tensor:
    """The (T, d) table in float64; the other layouts describe common slips."""
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    i = torch.arange(d // 2, dtype=torch.float64)
    power = 2 * i / d if exponent == "2i/d" else i / d
    angle = pos / 10000.0 ** power                                  # (T, d/2)
    a, b = (angle.sin(), angle.cos()) if first == "sin" else (angle.cos(), angle.sin())
    if layout == "interleaved":
        return torch.stack([a, b], dim=-1).reshape(T, d)
    return torch.cat([a, b], dim=-1)                                # all sines, then all cosines


def check_sinusoidal_positions(fn) -> None:
    """``fn(T, d)`` returns the (T, d) sinusoidal table: column 2i holds
    sin(pos / 10000^(2i/d)) and column 2i+1 holds cos of the same angle."""
    __tracebackhide__ = True

    def compare(got, expected) -> str | None:
        T, d = expected.shape
        return _first_problem(got, expected, lambda: [
            (_sinusoidal_ref(T, d, layout="blocks"),
             "your table has all the sines first and then all the cosines; the sines go in the even "
             "columns (0, 2, 4, ...) and the cosines in the odd columns (1, 3, 5, ...)"),
            (_sinusoidal_ref(T, d, first="cos"),
             "sin and cos are swapped: column 0 should be sin(pos), which is 0 at position 0"),
            (_sinusoidal_ref(T, d, exponent="i/d"),
             "the exponent is 2i/d where i counts column PAIRS (i = 0 .. d/2 - 1), so the pair in "
             "columns 2i and 2i+1 uses 10000^(2i/d); you seem to use 10000^(i/d)"),
        ], rtol=1e-4, atol=1e-5)

    # the inputs are two small ints, printed with a failing case
    cases = [Case(f"T={T}, d={d}", args=(T, d), expected=_sinusoidal_ref(T, d).float(), compare=compare,
                  hint=hint)
             for T, d, hint in [
                 (1, 4, "position 0 has every angle equal to 0: [sin 0, cos 0, sin 0, cos 0] = [0, 1, 0, 1]"),
                 (6, 2, "with d=2 there is one pair: column 0 is sin(pos), column 1 is cos(pos)"),
                 (16, 8, ""),
                 (128, 64, "build the whole table at once: positions as a column (T, 1) times the "
                           "frequencies as a row (d/2,) broadcast to (T, d/2)"),
             ]]
    run_cases("check_sinusoidal_positions", fn, cases)


# -----------------------------------------------------------------------------
# 2. LayerNorm

def _layer_norm_ref(x, weight, bias, eps, unbiased=False, eps_outside=False):
    x = x.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=unbiased)
    denom = var.sqrt() + eps if eps_outside else (var + eps).sqrt()
    return (x - mean) / denom * weight.double() + bias.double()


def _layer_norm_slips(x, weight, bias, eps):
    slips = [
        (_layer_norm_ref(x, weight, bias, eps, unbiased=True),
         "you used the unbiased variance (divide by d - 1); LayerNorm divides by d: "
         "x.var(dim=-1, unbiased=False) or ((x - mean) ** 2).mean(dim=-1)"),
        (_layer_norm_ref(x, weight, bias, eps, eps_outside=True),
         "eps goes inside the square root: (x - mean) / sqrt(var + eps)"),
        (_layer_norm_ref(x, torch.ones_like(weight), torch.zeros_like(bias), eps),
         "you normalised correctly but forgot to multiply by weight and add bias"),
    ]
    if x.dim() >= 2:
        xt = x.double().transpose(0, -1)
        ref0 = _layer_norm_ref(xt, torch.ones(xt.shape[-1]), torch.zeros(xt.shape[-1]), eps)
        slips.append((ref0.transpose(0, -1) * weight.double() + bias.double(),
                      "normalise over the LAST dimension (dim=-1), each vector on its own"))
    return slips


def _layer_norm_cases() -> list[Case]:
    """Each case's x, weight and bias come from seeds of their own; ``rebuild`` repeats them."""
    cases = []
    scaled = {"{}": lambda r: r, "{} * 10 + 50": lambda r: r * 10 + 50, "{} * 1e-3": lambda r: r * 1e-3}
    for description, shape, x_seed, x_text, eps, hint in [
        ("a (2, 3, 8) batch of random vectors", (2, 3, 8), 50, "{}", 1e-5, ""),
        ("vectors of size 4 with a large offset and spread (x * 10 + 50)", (5, 4), 51, "{} * 10 + 50",
         1e-5, "subtract each vector's own mean, then divide by its own standard deviation"),
        ("vectors whose entries differ by only about 0.001, with eps=1e-5", (3, 6), 52, "{} * 1e-3",
         1e-5, "compute (x - mean) / sqrt(var + eps): with a tiny variance, eps matters"),
        ("a vector whose entries are all equal (variance 0), with eps=0.1", (2, 5), None,
         "torch.full((2, 5), 3.0)", 0.1,
         "when every entry is equal, x - mean is 0 everywhere and the output is just bias"),
        ("a single vector (shape (16,)) with eps=0.01", (16,), 54, "{}", 1e-2, ""),
    ]:
        d = shape[-1]
        if x_seed is None:
            x = torch.full(shape, 3.0)
        else:                                     # x_text says in Python how x is drawn
            x = scaled[x_text](randn(*shape, seed=x_seed))
            x_text = x_text.format(randn_call(*shape, seed=x_seed))
        w_seed, b_seed = 100 + 2 * len(cases), 101 + 2 * len(cases)
        weight = randn(d, seed=w_seed) * 0.5 + 1.0
        bias = randn(d, seed=b_seed) * 0.1
        rebuild = (f"x = {x_text}; weight = {randn_call(d, seed=w_seed)} * 0.5 + 1.0; "
                   f"bias = {randn_call(d, seed=b_seed)} * 0.1; eps = {eps}")

        def compare(got, expected, x=x, weight=weight, bias=bias, eps=eps) -> str | None:
            return _first_problem(got, expected, lambda: _layer_norm_slips(x, weight, bias, eps),
                                  rtol=1e-4, atol=1e-4)

        cases.append(Case(description, args=(x.clone(), weight.clone(), bias.clone()),
                          kwargs={"eps": eps}, expected=_layer_norm_ref(x, weight, bias, eps).float(),
                          compare=compare, hint=hint, rebuild=rebuild))
    return cases


def check_layer_norm(fn) -> None:
    """``fn(x, weight, bias, eps=1e-5)`` normalises each vector along the LAST dimension of
    ``x`` to mean 0 and variance 1, then scales by ``weight`` and shifts by ``bias``."""
    __tracebackhide__ = True
    run_cases("check_layer_norm", fn, _layer_norm_cases())


# -----------------------------------------------------------------------------
# 3. parameters of a block

def _block_counts(d: int, bias: bool) -> dict[str, int]:
    b = 1 if bias else 0
    return {
        "ln": 2 * (d + b * d),                                   # two LayerNorms: weight (+ bias)
        "attn": 3 * d * d + b * 3 * d + d * d + b * d,            # c_attn (d -> 3d) and c_proj (d -> d)
        "mlp": d * 4 * d + b * 4 * d + 4 * d * d + b * d,         # c_fc (d -> 4d) and c_proj (4d -> d)
    }


def check_block_param_count(fn) -> None:
    """``fn(n_embd, bias=True)`` returns the number of parameters of one pre-LN Transformer block
    (two LayerNorms, multi-head attention with a fused q|k|v projection and an output projection,
    an MLP of width 4 * n_embd). ``bias=False`` removes every bias, in the Linears and the
    LayerNorms alike."""
    __tracebackhide__ = True

    def compare_for(d, bias):
        def compare(got, expected) -> str | None:
            got, problem = as_int(got, "a whole number of parameters (an int)")
            if problem:
                return problem
            if got == expected:
                return None
            parts = _block_counts(d, bias)
            other = sum(_block_counts(d, not bias).values())
            slips = [
                (expected - parts["ln"], "you left out the two LayerNorms (each has a weight"
                                         + (" and a bias" if bias else "") + f" of size {d})"),
                (expected - parts["ln"] // 2, "there are TWO LayerNorms in a block, one before "
                                              "the attention and one before the MLP"),
                (expected - parts["mlp"] + (2 * d * d + (d + d if bias else 0)),
                 "the MLP's hidden layer is 4 * n_embd wide, not n_embd"),
                (expected - 2 * d * d, "the attention has FOUR d x d matrices: W_Q, W_K, W_V "
                                       "(fused in c_attn, d -> 3d) and the output projection W_O"),
                (other, "bias=True counts every bias (Linears and LayerNorms); bias=False counts "
                        "none of them (LayerNorms keep only their weight)"),
            ]
            for wrong, why in slips:
                if got == wrong:
                    return f"expected {expected:,}, got {got:,}: {why}"
            return f"expected {expected:,}, got {got:,}"
        return compare

    # the inputs are an int and a bool, printed with a failing case
    cases = [Case(f"n_embd={d}, bias={bias}", args=(d,), kwargs={"bias": bias},
                  expected=sum(_block_counts(d, bias).values()), compare=compare_for(d, bias), hint=hint)
             for d, bias, hint in [
                 (64, True, "count each Linear(n_in, n_out) as n_in * n_out weights plus n_out biases"),
                 (64, False, ""),
                 (768, True, "n_embd=768 is a GPT-2 small block"),
                 (1, True, ""),
                 (1600, False, ""),
             ]]
    run_cases("check_block_param_count", fn, cases)


# -----------------------------------------------------------------------------
# 4. one LSTM step

def _lstm_step_ref(x, h, c, w_ih, w_hh, b_ih, b_hh, order="ifgo", h_from="tanh_c"):
    gates = x.double() @ w_ih.double().T + b_ih.double() + h.double() @ w_hh.double().T + b_hh.double()
    chunks = dict(zip(order, gates.chunk(4, dim=-1)))
    i, f, g, o = chunks["i"].sigmoid(), chunks["f"].sigmoid(), chunks["g"].tanh(), chunks["o"].sigmoid()
    c_new = f * c.double() + i * g
    h_new = o * (c_new.tanh() if h_from == "tanh_c" else c_new)
    return h_new, c_new


_LSTM_ARGS = ("x", "h", "c", "weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _lstm_step_cases() -> list[Case]:
    """Seven tensors per case, each from a seed of its own (seed, seed + 1, ...) times a scale;
    ``rebuild`` repeats them."""

    def compare_for(args):
        def compare(got, expected) -> str | None:
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                return f"expected a pair (h_new, c_new), got {_short(got)}"
            for name, t, want in (("h_new", got[0], expected[0]), ("c_new", got[1], expected[1])):
                problem = _tensor_problem(t, want)
                if problem:
                    return f"{name}: {problem}"
            h_got, c_got = got
            if _close(h_got, expected[0], 1e-4, 1e-5) and _close(c_got, expected[1], 1e-4, 1e-5):
                return None
            if _close(h_got, expected[1], 1e-4, 1e-5) and _close(c_got, expected[0], 1e-4, 1e-5):
                return "h_new and c_new are swapped: return (h_new, c_new), in that order"
            for order in ("ifog", "iofg", "fiog", "figo", "gifo", "oifg"):
                h_s, c_s = _lstm_step_ref(*args, order=order)
                if _close(h_got, h_s, 1e-4, 1e-5) and _close(c_got, c_s, 1e-4, 1e-5):
                    return (f"the four gate blocks are taken in the order {', '.join(order)}; "
                            "PyTorch stacks them as input, forget, cell (g), output: "
                            "i, f, g, o = gates.chunk(4, dim=-1)")
            h_s, c_s = _lstm_step_ref(*args, h_from="c")
            if _close(h_got, h_s, 1e-4, 1e-5):
                return "h_new is o * tanh(c_new), not o * c_new"
            close = compare_close(rtol=1e-4, atol=1e-5)
            if _close(c_got, expected[1], 1e-4, 1e-5):
                return "c_new is right but h_new is not:\n  " + close(h_got, expected[0].float())
            return "c_new: " + close(c_got, expected[1].float())
        return compare

    cases = []
    for description, B, n_in, H, seed, state_scale, hint in [
        ("batch 3, input_size 5, hidden_size 4, zero state", 3, 5, 4, 70, 0.0,
         "gates = x @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh, shape (batch, 4 * hidden)"),
        ("batch 2, input_size 3, hidden_size 6, a non-zero state", 2, 3, 6, 80, 1.0,
         "the new memory is c_new = f * c + i * g: forget some of the old, add some of the new"),
        ("batch 1, input_size 8, hidden_size 2, large inputs", 1, 8, 2, 90, 3.0, ""),
    ]:
        shapes = [(B, n_in), (B, H), (B, H), (4 * H, n_in), (4 * H, H), (4 * H,), (4 * H,)]
        scales = [1 + state_scale, state_scale, state_scale, 0.5, 0.5, 0.3, 0.3]
        args = tuple(randn(*shape, seed=seed + k) * scale
                     for k, (shape, scale) in enumerate(zip(shapes, scales)))
        rebuild = "; ".join(f"{name} = {randn_call(*shape, seed=seed + k)} * {scale}"
                            for k, (name, shape, scale) in enumerate(zip(_LSTM_ARGS, shapes, scales)))
        want = tuple(t.float() for t in _lstm_step_ref(*args))
        cases.append(Case(description, args=tuple(t.clone() for t in args), expected=want,
                          compare=compare_for(args), hint=hint, rebuild=rebuild))
    return cases


def check_lstm_step(fn) -> None:
    """``fn(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh)`` returns ``(h_new, c_new)``, one step
    of an LSTM with PyTorch's weight layout: the four gates stacked in the order input, forget,
    cell (g), output; shapes x (batch, input_size), h and c (batch, hidden_size), weight_ih
    (4 * hidden_size, input_size), weight_hh (4 * hidden_size, hidden_size), biases (4 * hidden_size,)."""
    __tracebackhide__ = True
    run_cases("check_lstm_step", fn, _lstm_step_cases())
