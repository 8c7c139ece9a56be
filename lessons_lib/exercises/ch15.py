"""Checkers for chapter 15's exercises (linear attention as a recurrence, the selective scan,
the load-balancing loss, cutting images into patches).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (no feature map, no normaliser,
every key instead of the past ones, the state updated after the output; ``exp(A)`` without the
step, the input without the step, Euler's ``1 + delta A``, the readout before the update; a
missing factor ``n_experts``, ``f`` or ``P`` used twice, counts instead of shares; a reshape
without a permute, patches column by column, pixels column by column).

The references are written here with plain Python floats and loops, independently of
:mod:`lessons_lib.beyond`: the sums over keys position by position, the scan channel by channel,
the loss from counted assignments, and every patch pixel by pixel.
"""

from __future__ import annotations

import math

import torch

from ._core import Case, generator, randn, randn_call, run_cases
from ._core import number_close as _number_close
from ._core import tensor_close as _tensor_close

__all__ = [
    "check_linear_attention_recurrent",
    "check_selective_scan",
    "check_load_balancing_loss",
    "check_patchify",
]


def _matches(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=rtol, atol=atol))


# -----------------------------------------------------------------------------
# exercise 1: linear attention, one position at a time

def _phi(x: float) -> float:
    return x + 1.0 if x > 0 else math.exp(x)


def _linear_attention(q, k, v, feature=True, normalise=True, causal=True, include_current=True):
    """``out_t = sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s)`` over s <= t, in floats."""
    q, k, v = q.double().tolist(), k.double().tolist(), v.double().tolist()
    T, d, dv = len(q), len(q[0]), len(v[0])
    f = _phi if feature else (lambda x: x)
    out = []
    for t in range(T):
        keys = range(T) if not causal else range(t + 1) if include_current else range(t)
        num, den = [0.0] * dv, 0.0
        for s in keys:
            w = sum(f(q[t][i]) * f(k[s][i]) for i in range(d))
            num = [a + w * b for a, b in zip(num, v[s])]
            den += w
        if normalise:
            out.append([a / den if den else 0.0 for a in num])
        else:
            out.append(num)
    return torch.tensor(out, dtype=torch.float64)


def _linear_slips(q, k, v):
    wrong = {
        "the scores use q and k themselves: apply the feature map phi(x) = elu(x) + 1 to both "
        "first (it keeps every weight positive)": _linear_attention(q, k, v, feature=False),
        "the output is not normalised: divide the numerator S^T phi(q_t) by the normaliser "
        "z . phi(q_t), the sum of the weights": _linear_attention(q, k, v, normalise=False),
        "every position sees every key: a causal layer adds k_t, v_t to the state before "
        "reading position t and never looks ahead": _linear_attention(q, k, v, causal=False),
    }
    late = _linear_attention(q, k, v, include_current=False)

    def slips(got: torch.Tensor) -> str | None:
        for message, w in wrong.items():
            if _matches(got, w):
                return message
        if got.shape == late.shape and _matches(got[1:], late[1:]):
            return ("position t leaves out its own key: add phi(k_t) v_t to S (and phi(k_t) to z) "
                    "before you read the output at t")
        return None
    return slips


def check_linear_attention_recurrent(fn) -> None:
    """``fn(q, k, v)``: causal linear attention for one head, written as a recurrence. ``q`` and
    ``k`` are (T, d), ``v`` is (T, d_v) float tensors. With ``phi(x) = elu(x) + 1``, keep the
    state ``S`` (d x d_v, the sum of ``phi(k_s) v_s^T`` so far) and ``z`` (d, the sum of
    ``phi(k_s)``); at each position t first add ``phi(k_t) v_t^T`` and ``phi(k_t)``, then output
    ``S^T phi(q_t) / (z . phi(q_t))``. Return the (T, d_v) outputs."""
    __tracebackhide__ = True
    cases = []
    one = (torch.tensor([[0.5]]), torch.tensor([[-1.0]]), torch.tensor([[3.0, -2.0]]))
    cases.append(Case("one position: the output is v_0 itself", one, _linear_attention(*one),
                      compare=_tensor_close(rtol=1e-4, atol=1e-5, slips=_linear_slips(*one))))
    two = (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, -0.5], [2.0, 1.0]]),
           torch.tensor([[1.0], [-1.0]]))
    cases.append(Case("two positions, d = 2, d_v = 1", two, _linear_attention(*two),
                      compare=_tensor_close(rtol=1e-4, atol=1e-5, slips=_linear_slips(*two))))
    for seed, (T, d, dv) in enumerate([(6, 4, 3), (12, 8, 8), (20, 3, 5)], 1):
        q, k, v = randn(T, d, seed=seed), randn(T, d, seed=seed + 10), randn(T, dv, seed=seed + 20)
        cases.append(Case(f"{T} positions, d = {d}, d_v = {dv}", (q, k, v),
                          _linear_attention(q, k, v),
                          compare=_tensor_close(rtol=1e-4, atol=1e-5, slips=_linear_slips(q, k, v)),
                          rebuild=f"q = {randn_call(T, d, seed=seed)}; "
                                  f"k = {randn_call(T, d, seed=seed + 10)}; "
                                  f"v = {randn_call(T, dv, seed=seed + 20)}",
                          hint="phi = lambda x: torch.nn.functional.elu(x) + 1; start with "
                               "S = torch.zeros(d, d_v) and z = torch.zeros(d); in the loop "
                               "S += torch.outer(phi(k[t]), v[t])"))
    run_cases("check_linear_attention_recurrent", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: the selective scan

def _scan(x, delta, A, B, C, decay="exp", step_input=True, read_first=False):
    """Channel by channel, state by state: h = decay * h + delta B x; y = C . h."""
    x, delta, A, B, C = (t.double().tolist() for t in (x, delta, A, B, C))
    T, ch, n = len(x), len(x[0]), len(A[0])
    y = [[0.0] * ch for _ in range(T)]
    for c in range(ch):
        h = [0.0] * n
        for t in range(T):
            if read_first:
                y[t][c] = sum(C[t][i] * h[i] for i in range(n))
            for i in range(n):
                if decay == "exp":
                    a = math.exp(delta[t][c] * A[c][i])
                elif decay == "no_delta":
                    a = math.exp(A[c][i])
                else:                                   # Euler's step
                    a = 1.0 + delta[t][c] * A[c][i]
                b = (delta[t][c] if step_input else 1.0) * B[t][i] * x[t][c]
                h[i] = a * h[i] + b
            if not read_first:
                y[t][c] = sum(C[t][i] * h[i] for i in range(n))
    return torch.tensor(y, dtype=torch.float64)


def _scan_slips(*args):
    wrong = {
        "the decay is exp(A): it must be exp(delta_t * A), so that the step delta_t decides how "
        "much of the past to keep": _scan(*args, decay="no_delta"),
        "the input enters as B_t x_t: it must be delta_t * B_t * x_t (a bigger step lets in more "
        "of the input)": _scan(*args, step_input=False),
        "that is Euler's step 1 + delta A; Mamba's discretisation uses exp(delta_t * A)":
            _scan(*args, decay="euler"),
        "y_t is read from the state before the update: update h_t with x_t first, then "
        "y_t = C_t . h_t": _scan(*args, read_first=True),
    }

    def slips(got: torch.Tensor) -> str | None:
        for message, w in wrong.items():
            if _matches(got, w):
                return message
        return None
    return slips


def _scan_inputs(T: int, ch: int, n: int, seed: int):
    g = generator(seed)
    x = torch.randn(T, ch, generator=g)
    delta = torch.rand(T, ch, generator=g) * 0.9 + 0.1
    A = -torch.rand(ch, n, generator=g) * 3 - 0.5
    B = torch.randn(T, n, generator=g)
    C = torch.randn(T, n, generator=g)
    rebuild = (f"g = torch.Generator().manual_seed({seed}); x = torch.randn({T}, {ch}, generator=g); "
               f"delta = torch.rand({T}, {ch}, generator=g) * 0.9 + 0.1; "
               f"A = -torch.rand({ch}, {n}, generator=g) * 3 - 0.5; "
               f"B = torch.randn({T}, {n}, generator=g); C = torch.randn({T}, {n}, generator=g)")
    return (x, delta, A, B, C), rebuild


def check_selective_scan(fn) -> None:
    """``fn(x, delta, A, B, C)``: Mamba's selective scan, one position at a time, without the
    skip term. ``x`` and ``delta`` are (T, channels), ``A`` is (channels, state), ``B`` and ``C``
    are (T, state). Per channel c the state ``h`` (state,) starts at 0 and
    ``h_t = exp(delta[t, c] * A[c]) * h_{t-1} + delta[t, c] * B[t] * x[t, c]``, then
    ``y[t, c] = C[t] . h_t``. Return y, (T, channels)."""
    __tracebackhide__ = True
    cases = []
    tiny = (torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([[0.5], [0.5], [1.0]]),
            torch.tensor([[-1.0]]), torch.ones(3, 1), torch.ones(3, 1))
    cases.append(Case("one channel, one state: an impulse at t = 0 that decays",
                      tiny, _scan(*tiny),
                      compare=_tensor_close(rtol=1e-4, atol=1e-6, slips=_scan_slips(*tiny)),
                      hint="h starts at zero; at t = 0 it becomes 0.5 * 1 * 1 = 0.5, then it shrinks "
                           "by exp(0.5 * -1) and exp(1.0 * -1)"))
    for seed, (T, ch, n) in enumerate([(5, 2, 3), (16, 4, 8), (9, 3, 1)], 1):
        args, rebuild = _scan_inputs(T, ch, n, seed)
        cases.append(Case(f"{T} positions, {ch} channels, state size {n}", args, _scan(*args),
                          compare=_tensor_close(rtol=1e-4, atol=1e-5, slips=_scan_slips(*args)),
                          rebuild=rebuild,
                          hint="keep h as a (channels, state) tensor; in the loop "
                               "h = torch.exp(delta[t, :, None] * A) * h "
                               "+ delta[t, :, None] * B[t] * x[t, :, None]"))
    run_cases("check_selective_scan", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: the load-balancing loss

def _balance(probs, index, n_experts, kind="right") -> float:
    rows = probs.double().tolist()
    chosen = index.reshape(-1).tolist()
    tokens = len(rows)
    counts = [sum(1 for e in chosen if e == i) for i in range(n_experts)]
    f = [c / len(chosen) for c in counts]
    P = [sum(r[i] for r in rows) / tokens for i in range(n_experts)]
    if kind == "no_factor":
        return sum(a * b for a, b in zip(f, P))
    if kind == "f_twice":
        return n_experts * sum(a * a for a in f)
    if kind == "P_twice":
        return n_experts * sum(b * b for b in P)
    if kind == "counts":
        return n_experts * sum(c * b for c, b in zip(counts, P))
    if kind == "per_token":
        return n_experts * sum(c / tokens * b for c, b in zip(counts, P))
    return n_experts * sum(a * b for a, b in zip(f, P))


def _balance_slips(probs, index, n_experts):
    wrong = {
        "the factor n_experts is missing (with it, a perfectly balanced router scores 1)": "no_factor",
        "that uses the shares f twice: the second factor is P_i, the router's mean probability for "
        "expert i (the part that carries the gradient)": "f_twice",
        "that uses the probabilities P twice: the first factor is f_i, the share of the "
        "assignments that went to expert i": "P_twice",
        "f holds counts: divide them by the number of assignments so that f sums to 1": "counts",
        "with top-k routing f must be the share of the assignments (tokens x k), not of the "
        "tokens: here f sums to k": "per_token",
    }

    def slips(value: float) -> str | None:
        for message, kind in wrong.items():
            v = _balance(probs, index, n_experts, kind)
            if math.isclose(value, v, rel_tol=1e-5, abs_tol=1e-7) and not math.isclose(
                    v, _balance(probs, index, n_experts), rel_tol=1e-9):
                return message
        return None
    return slips


def _gradient_check(probs, index, n_experts):
    """The gradient must reach the probabilities (through P): d loss / d probs[t, i] is
    n_experts * f_i / tokens."""
    tokens = probs.shape[0]
    chosen = index.reshape(-1).tolist()
    f = [sum(1 for e in chosen if e == i) / len(chosen) for i in range(n_experts)]
    want = torch.tensor([[n_experts * f[i] / tokens for i in range(n_experts)]] * tokens,
                        dtype=torch.float64)

    def run(fn):
        p = probs.clone().requires_grad_(True)
        loss = fn(p, index, n_experts)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return None, loss
        loss.backward()
        return p.grad, loss

    def compare(got, expected) -> str | None:
        grad, loss = got
        if grad is None:
            return ("the loss must be a tensor that carries the gradient back to router_probs "
                    f"(through P), got {type(loss).__name__}; compute P with torch, not .item() "
                    "or .tolist()")
        if not torch.allclose(grad.double(), want, rtol=1e-5, atol=1e-8):
            return (f"the gradient with respect to router_probs is wrong: expected "
                    f"n_experts * f_i / tokens in column i, {want[0].tolist()}, got "
                    f"{grad[0].tolist()} in the first row")
        return None
    return run, compare


def check_load_balancing_loss(fn) -> None:
    """``fn(router_probs, expert_index, n_experts)``: the Switch Transformer's load-balancing
    loss ``n_experts * sum_i f_i * P_i``. ``router_probs`` (tokens, n_experts) is the router's
    softmax; ``expert_index`` (tokens, k) holds the experts each token was sent to. ``f_i`` is
    the share of all the assignments (tokens x k) that went to expert i, ``P_i`` the mean of
    column i of ``router_probs``. Return a one-element tensor through which the gradient
    reaches ``router_probs``."""
    __tracebackhide__ = True
    cases = []
    uniform = (torch.full((4, 4), 0.25), torch.tensor([[0], [1], [2], [3]]), 4)
    cases.append(Case("four tokens, four experts, perfectly balanced (the loss is 1)", uniform,
                      _balance(*uniform), compare=_number_close(slips=_balance_slips(*uniform))))
    skew = (torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1]]),
            torch.tensor([[0], [0], [0], [1]]), 3)
    cases.append(Case("four tokens, three experts, most sent to expert 0", skew, _balance(*skew),
                      compare=_number_close(slips=_balance_slips(*skew))))
    for seed, (tokens, E, k) in enumerate([(50, 8, 1), (40, 4, 2)], 1):
        g = generator(seed)
        probs = torch.softmax(torch.randn(tokens, E, generator=g) * 2, dim=-1)
        index = probs.topk(k, dim=-1).indices
        args = (probs, index, E)
        cases.append(Case(f"{tokens} tokens, {E} experts, top-{k}", args, _balance(*args),
                          compare=_number_close(slips=_balance_slips(*args)),
                          rebuild=f"g = torch.Generator().manual_seed({seed}); router_probs = "
                                  f"torch.softmax(torch.randn({tokens}, {E}, generator=g) * 2, "
                                  f"dim=-1); expert_index = router_probs.topk({k}, dim=-1)"
                                  f".indices; n_experts = {E}",
                          hint="f = torch.bincount(expert_index.flatten(), minlength=n_experts) "
                               "/ expert_index.numel(); P = router_probs.mean(0)"))
    probs, index, E = cases[-1].args
    run, compare = _gradient_check(probs, index, E)
    cases.append(Case("the gradient with respect to router_probs (40 tokens, 4 experts, top-2)",
                      (fn,), None, compare=compare, rebuild=cases[-1].rebuild))
    run_cases("check_load_balancing_loss", _dispatch(fn, run), cases)


def _dispatch(fn, gradient_run):
    """The learner's function for the value cases; the gradient case passes fn itself."""
    def call(*args):
        if len(args) == 1 and args[0] is fn:
            return gradient_run(fn)
        return fn(*args)
    call.__name__ = getattr(fn, "__name__", "fn")
    return call if callable(fn) else fn


# -----------------------------------------------------------------------------
# exercise 4: images as tokens

def _patchify(images: torch.Tensor, patch: int, patch_order="rows", pixel_order="rows"):
    imgs = images.double().tolist()
    b, H, W = len(imgs), len(imgs[0]), len(imgs[0][0])
    out = []
    for n in range(b):
        patches = []
        grid = [(r, c) for r in range(H // patch) for c in range(W // patch)]
        if patch_order == "columns":
            grid = [(r, c) for c in range(W // patch) for r in range(H // patch)]
        for r, c in grid:
            cells = [(i, j) for i in range(patch) for j in range(patch)]
            if pixel_order == "columns":
                cells = [(i, j) for j in range(patch) for i in range(patch)]
            patches.append([imgs[n][r * patch + i][c * patch + j] for i, j in cells])
        out.append(patches)
    return torch.tensor(out, dtype=torch.float64)


def _patch_slips(images: torch.Tensor, patch: int):
    b, H, W = images.shape
    plain = images.double().reshape(b, (H // patch) * (W // patch), patch * patch)
    wrong = {
        "that is a plain reshape: it cuts each row of the image into pieces, not into squares. "
        "Reshape to (batch, H/p, p, W/p, p), permute to (batch, H/p, W/p, p, p), then flatten":
            plain,
        "the patches come column by column: number them row by row (left to right along the "
        "top row of patches first)": _patchify(images, patch, patch_order="columns"),
        "the pixels of each patch are read column by column: flatten each patch row by row":
            _patchify(images, patch, pixel_order="columns"),
    }

    def slips(got: torch.Tensor) -> str | None:
        for message, w in wrong.items():
            if _matches(got, w, rtol=0, atol=1e-6):
                return message
        return None
    return slips


def check_patchify(fn) -> None:
    """``fn(images, patch)``: ``images`` (batch, H, W) float, ``patch`` dividing H and W. Cut
    each image into non-overlapping ``patch x patch`` squares, numbered row by row (left to right,
    then top to bottom), and flatten each square row by row. Return
    (batch, (H / patch) * (W / patch), patch * patch)."""
    __tracebackhide__ = True
    cases = []
    counting = torch.arange(16.0).reshape(1, 4, 4)
    cases.append(Case("one 4 x 4 image holding 0..15, patches of 2 "
                      "(the first patch is [0, 1, 4, 5])", (counting, 2), _patchify(counting, 2),
                      compare=_tensor_close(rtol=0, atol=1e-6, slips=_patch_slips(counting, 2))))
    wide = torch.arange(24.0).reshape(1, 4, 6)
    cases.append(Case("one 4 x 6 image holding 0..23, patches of 2 (a grid of 2 x 3 patches)",
                      (wide, 2), _patchify(wide, 2),
                      compare=_tensor_close(rtol=0, atol=1e-6, slips=_patch_slips(wide, 2))))
    whole = torch.arange(8.0).reshape(2, 2, 2)
    cases.append(Case("patch size = image size: one patch per image", (whole, 2), _patchify(whole, 2),
                      compare=_tensor_close(rtol=0, atol=1e-6)))
    images = randn(3, 8, 8, seed=4)
    cases.append(Case("three random 8 x 8 images, patches of 4", (images, 4), _patchify(images, 4),
                      compare=_tensor_close(rtol=0, atol=1e-6, slips=_patch_slips(images, 4)),
                      rebuild=f"images = {randn_call(3, 8, 8, seed=4)}; patch = 4",
                      hint="images.reshape(b, H // p, p, W // p, p).permute(0, 1, 3, 2, 4)"))
    run_cases("check_patchify", fn, cases)
