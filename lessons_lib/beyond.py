"""Beyond softmax attention: layers whose cost grows linearly with the length, and experts.

Read top to bottom:

1. **Linear attention** (Katharopoulos et al., 2020). Softmax attention compares every query
   with every key: ``T^2`` work. Replace ``exp(q . k)`` by ``phi(q) . phi(k)`` with a feature
   map ``phi`` (here ``elu(x) + 1``, which is positive) and the sum over keys can be kept as a
   running state ``S_t = S_{t-1} + phi(k_t) v_t^T``: :func:`linear_attention_parallel` (the
   ``T x T`` form), :func:`linear_attention_recurrent` (the state, one step per position) and
   :func:`linear_attention_chunked` (the state carried between chunks, ``T x chunk`` work);
   all three give the same outputs.
2. **An RWKV-style recurrence** (Peng et al., 2023, RWKV-4's "WKV"). Each channel averages the
   past values with weights that decay by ``exp(-w)`` per step and a bonus ``u`` for the
   current token: :func:`wkv_parallel` and :func:`wkv_recurrent` (numerically stabilised the
   way RWKV's own kernel is), :func:`wkv_step` (one token, as in generation, from the state
   :func:`wkv_initial_state` starts), and :class:`RWKVTimeMix`, the layer around it.
3. **A selective state-space layer** (Gu and Dao, 2023, Mamba's "S6"). A linear recurrence
   ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t``, ``y_t = C_t . h_t + D x_t`` whose step
   ``delta``, input map ``B`` and readout ``C`` depend on the input: :func:`selective_scan`
   (one step per position) and :func:`selective_scan_parallel` (all positions at once, in
   ``log2 T`` rounds); :class:`MambaMixer`, the layer around it.
4. **A mixture of experts** (Shazeer et al., 2017; Fedus et al., 2021): :class:`MoEMLP`
   routes each token to its top-k of ``n_experts`` MLPs and reports, in :class:`RouterStats`,
   the router's load and the Switch Transformer's load-balancing loss;
   :func:`moe_parameter_counts` (total vs active).
5. **One language model for all of them**: :class:`MixerLM` (embeddings, pre-LN blocks of
   mixer + MLP, a head) with ``mixer`` one of :data:`MIXERS`, the same interface as
   :class:`lessons_lib.model.GPT` (``model(idx, targets) -> (logits, loss)``) so that
   :func:`lessons_lib.train.train` trains it; :meth:`MixerLM.router_stats` reads its routers.
6. **Images as tokens**: :func:`patchify` cuts images into patches, :class:`PatchClassifier`
   embeds them and classifies with :class:`lessons_lib.model.Block` (``causal=False``).
7. **Memory for training**: :func:`saved_activation_bytes`, the bytes that autograd keeps
   from a forward pass for the backward pass.

Every sequence tensor is batched; lengths are the second-to-last dimension ``T``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiHeadAttention
from .checks import float_tensor, positive_int, shape_of, token_ids
from .model import MLP, Block, LearnedPositions, next_token_loss

__all__ = ["elu_feature_map", "linear_attention_parallel", "linear_attention_recurrent",
           "linear_attention_chunked", "LinearAttention", "wkv_parallel", "wkv_recurrent",
           "wkv_initial_state", "wkv_step", "RWKVTimeMix", "selective_scan",
           "selective_scan_parallel", "MambaMixer", "MoEMLP", "RouterStats", "load_balancing_loss",
           "moe_parameter_counts", "MIXERS", "MixerLM", "patchify", "PatchClassifier",
           "saved_activation_bytes"]


# -----------------------------------------------------------------------------
# 1. linear attention

def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = elu(x) + 1``: positive (in float32, >= 0 below about -17), so the
    normaliser is a sum of non-negative terms; ``eps`` guards the rest."""
    return F.elu(x) + 1.0


def _check_qkv(q, k, v, key_mask):
    float_tensor("q", q, 4, "(batch, heads, T, head_dim)")
    float_tensor("k", k, 4, "(batch, heads, T, head_dim)")
    float_tensor("v", v, 4, "(batch, heads, T, value_dim)")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q and k must have the same shape and v the same (batch, heads, T), got "
                         f"q {shape_of(q)}, k {shape_of(k)}, v {shape_of(v)}")
    if key_mask is not None:
        if (not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool
                or key_mask.shape != (q.shape[0], q.shape[2])):
            raise ValueError(f"key_mask must be a bool tensor of shape (batch, T) = "
                             f"{(q.shape[0], q.shape[2])}, True where a key may be attended to, "
                             f"got {shape_of(key_mask)}")


def _features(q, k, key_mask):
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    if key_mask is not None:                 # a masked key adds nothing to any sum
        fk = fk * key_mask[:, None, :, None].to(fk.dtype)
    return fq, fk


def linear_attention_parallel(q, k, v, key_mask=None, eps: float = 1e-6) -> torch.Tensor:
    """Causal linear attention, all positions at once (``T x T`` work, like softmax attention).

    ``out_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s / sum_{s<=t} phi(q_t) . phi(k_s)``.
    ``q, k`` (batch, heads, T, d), ``v`` (batch, heads, T, d_v); ``key_mask`` (batch, T) bool,
    False for keys (e.g. padding) nobody may attend to. Returns (batch, heads, T, d_v).
    """
    _check_qkv(q, k, v, key_mask)
    fq, fk = _features(q, k, key_mask)
    T = q.shape[2]
    scores = fq @ fk.transpose(-2, -1)                        # (B, H, T, T), all >= 0
    scores = scores * torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def linear_attention_recurrent(q, k, v, key_mask=None, eps: float = 1e-6) -> torch.Tensor:
    """The same outputs as :func:`linear_attention_parallel`, one position at a time.

    The state is ``S`` (d x d_v), the sum of ``phi(k_s) v_s^T`` so far, and ``z`` (d), the
    sum of ``phi(k_s)``: constant memory per step, however long the sequence, like an RNN.
    """
    _check_qkv(q, k, v, key_mask)
    fq, fk = _features(q, k, key_mask)
    B, H, T, d = q.shape
    S = q.new_zeros(B, H, d, v.shape[-1])
    z = q.new_zeros(B, H, d)
    outputs = []
    for t in range(T):
        S = S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + fk[:, :, t]
        numerator = (fq[:, :, t, :, None] * S).sum(-2)            # (B, H, d_v)
        denominator = (fq[:, :, t] * z).sum(-1, keepdim=True)     # (B, H, 1)
        outputs.append(numerator / (denominator + eps))
    return torch.stack(outputs, dim=2)


def linear_attention_chunked(q, k, v, key_mask=None, chunk: int = 64,
                             eps: float = 1e-6) -> torch.Tensor:
    """The same outputs again, ``chunk`` positions at a time: within a chunk the ``T x T``
    form (``chunk x chunk`` work), between chunks the state ``S, z``. Work ~ ``T * chunk``,
    linear in ``T``, with matrix products instead of a Python step per position."""
    _check_qkv(q, k, v, key_mask)
    positive_int("chunk", chunk)
    fq, fk = _features(q, k, key_mask)
    B, H, T, d = q.shape
    S = q.new_zeros(B, H, d, v.shape[-1])
    z = q.new_zeros(B, H, d, 1)
    outputs = []
    for start in range(0, T, chunk):
        qc, kc, vc = (x[:, :, start:start + chunk] for x in (fq, fk, v))
        n = qc.shape[2]
        scores = (qc @ kc.transpose(-2, -1)) * torch.ones(
            n, n, dtype=torch.bool, device=q.device).tril()
        numerator = qc @ S + scores @ vc                          # earlier chunks + this one
        denominator = qc @ z + scores.sum(-1, keepdim=True)
        outputs.append(numerator / (denominator + eps))
        S = S + kc.transpose(-2, -1) @ vc
        z = z + kc.sum(-2)[..., None]
    return torch.cat(outputs, dim=2)


class LinearAttention(nn.Module):
    """Multi-head causal linear attention: ``(batch, T, d_model) -> (batch, T, d_model)``,
    computed by :func:`linear_attention_chunked` (``mode="chunked"``), ``"parallel"`` or
    ``"recurrent"``."""

    def __init__(self, d_model: int, n_head: int, chunk: int = 64, mode: str = "chunked"):
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("n_head", n_head)
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        if mode not in ("chunked", "parallel", "recurrent"):
            raise ValueError(f"mode must be 'chunked', 'parallel' or 'recurrent', got {mode!r}")
        self.d_model, self.n_head, self.chunk, self.mode = d_model, n_head, chunk, mode
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        float_tensor("x", x, 3, f"(batch, T, d_model={self.d_model})")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, T, {self.d_model}), got {shape_of(x)}")
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=-1))
        if self.mode == "chunked":
            y = linear_attention_chunked(q, k, v, key_mask, chunk=self.chunk)
        elif self.mode == "parallel":
            y = linear_attention_parallel(q, k, v, key_mask)
        else:
            y = linear_attention_recurrent(q, k, v, key_mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


# -----------------------------------------------------------------------------
# 2. an RWKV-style recurrence

def _check_wkv(k, v, w, u):
    float_tensor("k", k, 3, "(batch, T, channels)")
    float_tensor("v", v, 3, "(batch, T, channels)")
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape, got {shape_of(k)} and {shape_of(v)}")
    C = k.shape[-1]
    for name, p in (("w", w), ("u", u)):
        if not isinstance(p, torch.Tensor) or p.shape != (C,):
            raise ValueError(f"{name} must be a tensor of shape (channels,) = ({C},), got {shape_of(p)}")
    if (w < 0).any():
        raise ValueError("w is a decay rate per step and must be >= 0 (weights shrink by exp(-w))")


def wkv_parallel(k, v, w, u) -> torch.Tensor:
    """RWKV-4's weighted average of values, all positions at once (``T x T`` per channel).

    For each channel: ``wkv_t = sum_i a_{t,i} v_i / sum_i a_{t,i}`` with
    ``a_{t,i} = exp(k_i - (t - 1 - i) w)`` for ``i < t`` (older tokens decay by ``exp(-w)``
    per step), ``a_{t,t} = exp(u + k_t)`` (a bonus ``u`` for the current token), 0 for
    ``i > t``: a softmax over ``i`` of those exponents. ``k, v`` (batch, T, C); ``w >= 0``
    and ``u`` (C,). Returns (batch, T, C).
    """
    _check_wkv(k, v, w, u)
    T = k.shape[1]
    t = torch.arange(T, device=k.device)
    age = (t[:, None] - 1 - t[None, :]).to(k.dtype)              # (T, T): t - 1 - i
    logits = k[:, None, :, :] - age[None, :, :, None] * w        # (B, T, T, C)
    diagonal = (u + k)[:, :, None, :]                            # (B, T, 1, C)
    eye = torch.eye(T, dtype=torch.bool, device=k.device)[None, :, :, None]
    logits = torch.where(eye, diagonal, logits)
    future = torch.ones(T, T, dtype=torch.bool, device=k.device).triu(1)[None, :, :, None]
    weights = torch.softmax(logits.masked_fill(future, float("-inf")), dim=2)
    return (weights * v[:, None, :, :]).sum(2)


def wkv_recurrent(k, v, w, u) -> torch.Tensor:
    """The same outputs as :func:`wkv_parallel`, one position at a time, with a state of
    three numbers per channel: the decayed sums ``a`` (of ``e^k v``) and ``b`` (of ``e^k``),
    both stored divided by ``e^p``, ``p`` the largest exponent so far (RWKV's own trick to
    keep ``exp`` from overflowing)."""
    _check_wkv(k, v, w, u)
    B, T, C = k.shape
    state = wkv_initial_state(B, C, dtype=k.dtype, device=k.device)
    outputs = []
    for t in range(T):
        out, state = _wkv_step(k[:, t], v[:, t], w, u, state)
        outputs.append(out)
    return torch.stack(outputs, dim=1)


def wkv_initial_state(batch: int, channels: int, dtype=torch.float32, device=None):
    """The state of :func:`wkv_step` before the first token: ``(a, b, p)``, each
    (batch, channels): empty sums and a largest exponent of ``-1e38`` (minus infinity)."""
    positive_int("batch", batch)
    positive_int("channels", channels)
    zeros = torch.zeros(batch, channels, dtype=dtype, device=device)
    return zeros, zeros.clone(), torch.full_like(zeros, -1e38)


def _wkv_step(kt, vt, w, u, state):
    a, b, p = state
    # output: the state plus the current token with its bonus u
    q = torch.maximum(p, u + kt)
    e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
    out = (e1 * a + e2 * vt) / (e1 * b + e2)
    # update: decay the state by exp(-w), then add the current token without the bonus
    q = torch.maximum(p - w, kt)
    e1, e2 = torch.exp(p - w - q), torch.exp(kt - q)
    return out, (e1 * a + e2 * vt, e1 * b + e2, q)


def wkv_step(k, v, w, u, state):
    """One token of :func:`wkv_recurrent`, the way RWKV generates text: ``k, v`` (batch, C)
    are the new token's, ``state`` is ``(a, b, p)`` from :func:`wkv_initial_state` or the
    previous step. Returns ``(output (batch, C), new state)``. The state has the same size
    after any number of tokens, so each step costs the same however long the text so far."""
    float_tensor("k", k, 2, "(batch, channels)")
    float_tensor("v", v, 2, "(batch, channels)")
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape, got {shape_of(k)} and {shape_of(v)}")
    if (not isinstance(state, (tuple, list)) or len(state) != 3
            or any(not isinstance(s, torch.Tensor) or s.shape != k.shape for s in state)):
        raise ValueError(f"state must be three tensors (a, b, p) of shape {shape_of(k)}, as "
                         "wkv_initial_state makes them")
    C = k.shape[-1]
    for name, p in (("w", w), ("u", u)):
        if not isinstance(p, torch.Tensor) or p.shape != (C,):
            raise ValueError(f"{name} must be a tensor of shape (channels,) = ({C},), got {shape_of(p)}")
    return _wkv_step(k, v, w, u, state)


class RWKVTimeMix(nn.Module):
    """RWKV's time-mixing layer: ``(batch, T, d_model) -> (batch, T, d_model)``.

    Token shift (each position mixes in the previous one's features with learned weights),
    then ``k, v, r`` projections, :func:`wkv_recurrent` (``mode="recurrent"``) or
    :func:`wkv_parallel`, gated by ``sigmoid(r)``, and an output projection. The decay per
    channel is ``w = exp(time_decay)`` (positive); ``time_first`` is the bonus ``u``.
    """

    def __init__(self, d_model: int, mode: str = "recurrent"):
        super().__init__()
        positive_int("d_model", d_model)
        if mode not in ("recurrent", "parallel"):
            raise ValueError(f"mode must be 'recurrent' or 'parallel', got {mode!r}")
        self.d_model, self.mode = d_model, mode
        ramp = torch.arange(d_model) / max(1, d_model - 1)
        self.time_decay = nn.Parameter(-5.0 + 7.0 * ramp ** 0.7)    # w from e^-5 to e^2
        self.time_first = nn.Parameter(torch.full((d_model,), math.log(0.3)))
        self.mix_k = nn.Parameter(ramp.clone())
        self.mix_v = nn.Parameter(ramp.clone())
        self.mix_r = nn.Parameter(0.5 * ramp)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.output = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        float_tensor("x", x, 3, f"(batch, T, d_model={self.d_model})")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, T, {self.d_model}), got {shape_of(x)}")
        previous = F.pad(x, (0, 0, 1, -1))                  # x shifted one step to the right
        k = self.key(x * self.mix_k + previous * (1 - self.mix_k))
        v = self.value(x * self.mix_v + previous * (1 - self.mix_v))
        r = self.receptance(x * self.mix_r + previous * (1 - self.mix_r))
        wkv = wkv_recurrent if self.mode == "recurrent" else wkv_parallel
        y = wkv(k, v, torch.exp(self.time_decay), self.time_first)
        return self.output(torch.sigmoid(r) * y)


# -----------------------------------------------------------------------------
# 3. a selective state-space layer (Mamba's S6)

def _check_scan(x, delta, A, B, C, D):
    float_tensor("x", x, 3, "(batch, T, channels)")
    float_tensor("delta", delta, 3, "(batch, T, channels)")
    float_tensor("B", B, 3, "(batch, T, state)")
    float_tensor("C", C, 3, "(batch, T, state)")
    float_tensor("A", A, 2, "(channels, state)")
    b, T, ch = x.shape
    n = A.shape[1]
    if delta.shape != x.shape or A.shape[0] != ch or B.shape != (b, T, n) or C.shape != (b, T, n):
        raise ValueError(f"shapes do not fit: x and delta (batch, T, channels), A (channels, state),"
                         f" B and C (batch, T, state); got x {shape_of(x)}, delta {shape_of(delta)}, "
                         f"A {shape_of(A)}, B {shape_of(B)}, C {shape_of(C)}")
    if D is not None and (not isinstance(D, torch.Tensor) or D.shape != (ch,)):
        raise ValueError(f"D must be None or a tensor of shape (channels,) = ({ch},), got {shape_of(D)}")
    if (delta < 0).any():
        raise ValueError("delta is a step size and must be >= 0 (Mamba makes it with softplus)")


def _scan_terms(x, delta, A, B):
    """The recurrence ``h_t = decay_t * h_{t-1} + inputs_t`` for every t at once:
    ``decay = exp(delta A)`` and ``inputs = delta B x``, both (batch, T, channels, state)."""
    decay = torch.exp(delta[..., None] * A)
    inputs = (delta * x)[..., None] * B[:, :, None, :]
    return decay, inputs


def selective_scan(x, delta, A, B, C, D=None) -> torch.Tensor:
    """Mamba's selective scan, one position at a time.

    Per channel ``c`` and state index ``n``:
    ``h_t = exp(delta_t A) * h_{t-1} + delta_t B_t x_t`` and ``y_t = sum_n C_t h_t + D x_t``.
    ``x, delta`` (batch, T, channels); ``A`` (channels, state), negative for a decaying
    memory; ``B, C`` (batch, T, state), chosen per token by the input ("selective");
    ``D`` (channels,) or None. Returns (batch, T, channels).
    """
    _check_scan(x, delta, A, B, C, D)
    decay, inputs = _scan_terms(x, delta, A, B)
    h = torch.zeros_like(inputs[:, 0])                           # (batch, channels, state)
    states = []
    for t in range(x.shape[1]):
        h = decay[:, t] * h + inputs[:, t]
        states.append(h)
    y = (torch.stack(states, dim=1) * C[:, :, None, :]).sum(-1)
    return y + x * D if D is not None else y


def selective_scan_parallel(x, delta, A, B, C, D=None) -> torch.Tensor:
    """The same outputs as :func:`selective_scan` in ``ceil(log2 T)`` steps, each over all
    positions at once (a Hillis-Steele parallel scan).

    Steps ``(decay, inputs)`` compose: applying ``(a1, b1)`` then ``(a2, b2)`` is the one step
    ``(a2 a1, a2 b1 + b2)``. After the round with offset ``o`` (1, 2, 4, ...) position t holds
    the composition of the ``2o`` steps ending at t, so after ``log2 T`` rounds it holds all
    of them from the start: ``h_t`` itself. Work ~ ``T log T``, but no Python loop over ``T``:
    the idea behind the scan a GPU runs for Mamba.
    """
    _check_scan(x, delta, A, B, C, D)
    a, b = _scan_terms(x, delta, A, B)
    T, offset = x.shape[1], 1
    while offset < T:
        # position t absorbs the composed steps ending at t - offset (nothing before t = 0)
        b = torch.cat([b[:, :offset], a[:, offset:] * b[:, :-offset] + b[:, offset:]], dim=1)
        a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], dim=1)
        offset *= 2
    y = (b * C[:, :, None, :]).sum(-1)
    return y + x * D if D is not None else y


class MambaMixer(nn.Module):
    """Mamba's block without its norm: ``(batch, T, d_model) -> (batch, T, d_model)``.

    ``in_proj`` to two streams of ``expand * d_model``: one through a causal depthwise
    convolution (kernel ``d_conv``), SiLU and the selective scan, whose ``delta`` (softplus of
    a low-rank projection), ``B`` and ``C`` come from the input; the other a SiLU gate.
    ``A = -exp(A_log)`` starts at ``-1 .. -d_state`` per state index (S4D-real).
    ``mode``: "parallel" (:func:`selective_scan_parallel`) or "sequential"
    (:func:`selective_scan`).
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | None = None, mode: str = "parallel"):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("expand", expand),
                            ("d_conv", d_conv)):
            positive_int(name, value)
        if mode not in ("parallel", "sequential"):
            raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
        d_inner = expand * d_model
        self.d_model, self.d_inner, self.d_state = d_model, d_inner, d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.mode = mode
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        # initial steps between 0.001 and 0.1, log-uniform, as in Mamba
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(0.1), d_inner))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        float_tensor("x", x, 3, f"(batch, T, d_model={self.d_model})")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, T, {self.d_model}), got {shape_of(x)}")
        T = x.shape[1]
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv(u.transpose(1, 2))[..., :T].transpose(1, 2))  # causal: cut the tail
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log)
        if self.mode == "parallel":
            y = selective_scan_parallel(u, delta, A, B, C, self.D)
        else:
            y = selective_scan(u, delta, A, B, C, self.D)
        return self.out_proj(y * F.silu(gate))


# -----------------------------------------------------------------------------
# 4. a mixture of experts

def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor,
                        n_experts: int) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss, ``n_experts * sum_i f_i P_i``.

    ``router_probs`` (tokens, n_experts): the router's softmax; ``expert_index`` (tokens, k):
    the experts each token was sent to. ``f_i`` is the share of the assignments that went to
    expert ``i`` (not differentiable), ``P_i`` the mean probability the router gave it (which
    carries the gradient). It is 1 when both are uniform and grows as the load concentrates.
    """
    positive_int("n_experts", n_experts)
    float_tensor("router_probs", router_probs, 2, f"(tokens, n_experts={n_experts})")
    if router_probs.shape[1] != n_experts:
        raise ValueError(f"router_probs must have {n_experts} columns, got {shape_of(router_probs)}")
    if (not isinstance(expert_index, torch.Tensor) or expert_index.dim() != 2
            or expert_index.shape[0] != router_probs.shape[0] or expert_index.dtype.is_floating_point):
        raise ValueError(f"expert_index must be an integer tensor (tokens, k) with "
                         f"{router_probs.shape[0]} rows, got {shape_of(expert_index)}")
    if router_probs.shape[0] == 0:
        raise ValueError("load_balancing_loss needs at least one token")
    counts = torch.bincount(expert_index.reshape(-1), minlength=n_experts).to(router_probs.dtype)
    f = counts / counts.sum()
    P = router_probs.mean(0)
    return n_experts * (f * P).sum()


class RouterStats(NamedTuple):
    """What the router of a :class:`MoEMLP` did in one forward pass.

    ``aux_loss`` (): :func:`load_balancing_loss` of the batch, with its gradient. ``load``
    (n_experts,): the share of the assignments each expert received, summing to 1; detached.
    Both are 0 when no token was routed (every position masked out)."""

    aux_loss: torch.Tensor
    load: torch.Tensor


class MoEMLP(nn.Module):
    """A mixture-of-experts MLP: ``forward(x, mask=None) -> (y, stats)``, ``x`` and ``y``
    (batch, T, n_embd), ``stats`` a :class:`RouterStats` of this batch.

    A router (``Linear(n_embd, n_experts)``, no bias) scores the experts for each token; the
    token goes to its ``top_k`` experts (each a :class:`lessons_lib.model.MLP`), whose outputs
    are added with the router's probabilities as weights (Switch Transformer: not renormalised,
    so the router gets a gradient even for ``top_k = 1``). Add ``coef * stats.aux_loss`` to the
    training loss to balance the experts.

    ``mask`` (batch, T) bool leaves positions out (False: padding): they get output 0 and do
    not count in the load or the loss.
    """

    def __init__(self, n_embd: int, n_experts: int = 4, top_k: int = 1, bias: bool = True):
        super().__init__()
        positive_int("n_embd", n_embd)
        positive_int("n_experts", n_experts)
        positive_int("top_k", top_k)
        if top_k > n_experts:
            raise ValueError(f"top_k={top_k} cannot exceed n_experts={n_experts}")
        self.n_embd, self.n_experts, self.top_k = n_embd, n_experts, top_k
        self.router = nn.Linear(n_embd, n_experts, bias=False)
        self.experts = nn.ModuleList([MLP(n_embd, bias=bias) for _ in range(n_experts)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RouterStats]:
        float_tensor("x", x, 3, f"(batch, T, n_embd={self.n_embd})")
        if x.shape[-1] != self.n_embd:
            raise ValueError(f"x must have shape (batch, T, {self.n_embd}), got {shape_of(x)}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or mask.shape != x.shape[:2]):
            raise ValueError(f"mask must be a bool tensor of shape (batch, T) = {tuple(x.shape[:2])}, "
                             f"got {shape_of(mask)}")
        tokens = x.reshape(-1, self.n_embd)
        keep = (torch.arange(tokens.shape[0], device=x.device) if mask is None
                else mask.reshape(-1).nonzero().squeeze(1))
        chosen_tokens = tokens[keep]                                     # (n, n_embd)
        probs = torch.softmax(self.router(chosen_tokens).float(), dim=-1)
        weight, index = probs.topk(self.top_k, dim=-1)                   # (n, k)
        out = torch.zeros_like(chosen_tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = (index == e).nonzero(as_tuple=True)             # tokens routed to e
            if rows.numel():
                y = expert(chosen_tokens[rows]) * weight[rows, slot, None].to(x.dtype)
                out = out.index_add(0, rows, y)
        result = torch.zeros_like(tokens).index_copy(0, keep, out).view_as(x)
        return result, self._stats(probs, index)

    def _stats(self, probs: torch.Tensor, index: torch.Tensor) -> RouterStats:
        """The :class:`RouterStats` of routing probabilities ``probs`` (n, n_experts) and
        choices ``index`` (n, top_k) of ``n`` tokens."""
        if index.numel() == 0:
            return RouterStats(probs.new_zeros(()), probs.new_zeros(self.n_experts))
        counts = torch.bincount(index.reshape(-1), minlength=self.n_experts).float()
        return RouterStats(load_balancing_loss(probs, index, self.n_experts),
                           (counts / counts.sum()).detach())


def moe_parameter_counts(model: nn.Module) -> dict:
    """``{"total", "active"}`` parameters of ``model``: every tensor once (total), and those a
    token uses (active): each :class:`MoEMLP` counts its router and ``top_k`` of its experts."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoEMLP):
            per_expert = sum(p.numel() for p in module.experts[0].parameters())
            inactive += (module.n_experts - module.top_k) * per_expert
    return {"total": total, "active": total - inactive}


# -----------------------------------------------------------------------------
# 5. one language model, any mixer

MIXERS = ("attention", "linear", "rwkv", "mamba")


class MixerBlock(nn.Module):
    """Pre-LN block: ``x + mixer(ln_1(x))``, then ``x + mlp(ln_2(x))``; the MLP is
    :class:`lessons_lib.model.MLP`, or a :class:`MoEMLP` when ``n_experts`` > 1."""

    def __init__(self, n_embd: int, n_head: int, mixer: str, n_experts: int = 1,
                 top_k: int = 1, mlp: bool = True, d_state: int = 8, expand: int = 1):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        if mixer == "attention":
            self.mixer = MultiHeadAttention(n_embd, n_head, causal=True)
        elif mixer == "linear":
            self.mixer = LinearAttention(n_embd, n_head)
        elif mixer == "rwkv":
            self.mixer = RWKVTimeMix(n_embd)
        else:
            self.mixer = MambaMixer(n_embd, d_state=d_state, expand=expand)
        self.ln_2 = nn.LayerNorm(n_embd) if mlp else None
        self.mlp = None
        if mlp:
            self.mlp = MoEMLP(n_embd, n_experts, top_k) if n_experts > 1 else MLP(n_embd)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        """``(x, stats)``: the block's output (batch, T, n_embd), and the :class:`RouterStats`
        of its :class:`MoEMLP` (None without one)."""
        x = x + self.mixer(self.ln_1(x))
        if self.mlp is None:
            return x, None
        if isinstance(self.mlp, MoEMLP):
            y, stats = self.mlp(self.ln_2(x))
            return x + y, stats
        return x + self.mlp(self.ln_2(x)), None


class MixerLM(nn.Module):
    """A character- or token-level language model whose blocks mix positions with ``mixer``:
    "attention" (softmax, lessons_lib's MultiHeadAttention), "linear" (linear attention),
    "rwkv" (:class:`RWKVTimeMix`) or "mamba" (:class:`MambaMixer`).

    Learned positions are added for the two attentions only (the recurrences know the order).
    ``n_experts`` > 1 swaps every MLP for a :class:`MoEMLP`; ``aux_coef`` then adds that much
    of their load-balancing losses to the training loss. ``mlp=False`` drops the MLPs (Mamba
    stacks mixers only). ``d_state`` and ``expand`` size the Mamba mixers (8 and 1: smaller
    than the paper's 16 and 2, to train in seconds on a CPU).
    ``forward(idx, targets=None) -> (logits, loss)`` like GPT; :meth:`router_stats` reports
    what the routers did on a batch.
    """

    def __init__(self, vocab_size: int, block_size: int, mixer: str = "attention",
                 n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_experts: int = 1,
                 top_k: int = 1, aux_coef: float = 0.0, mlp: bool = True,
                 d_state: int = 8, expand: int = 1):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size),
                            ("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head),
                            ("n_experts", n_experts), ("top_k", top_k)):
            positive_int(name, value)
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        if aux_coef < 0:
            raise ValueError(f"aux_coef must be >= 0, got {aux_coef}")
        self.vocab_size, self.block_size, self.mixer = vocab_size, block_size, mixer
        self.aux_coef = aux_coef
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = LearnedPositions(block_size, n_embd) if mixer in ("attention", "linear") else None
        self.blocks = nn.ModuleList([MixerBlock(n_embd, n_head, mixer, n_experts, top_k, mlp,
                                                d_state, expand) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        dt_projs = {id(m.dt_proj) for m in self.modules() if isinstance(m, MambaMixer)}
        for module in self.modules():        # GPT-2's init; Mamba's dt_proj keeps its own
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in dt_projs:
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def _run(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[RouterStats]]:
        """``(logits (batch, T, vocab_size), one RouterStats per MoE block)`` of ``idx``."""
        token_ids(idx, "idx", vocab_size=self.vocab_size)
        T = idx.shape[1]
        if not 1 <= T <= self.block_size:
            raise ValueError(f"sequence of length {T} does not fit block_size={self.block_size}")
        x = self.wte(idx.long())
        if self.wpe is not None:
            x = x + self.wpe(T)
        router_stats = []
        for block in self.blocks:
            x, stats = block(x)
            if stats is not None:
                router_stats.append(stats)
        return self.lm_head(self.ln_f(x)), router_stats

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits, router_stats = self._run(idx)
        if targets is None:
            return logits, None
        loss = next_token_loss(logits, targets)
        if self.aux_coef and self.training:
            loss = loss + self.aux_coef * sum(s.aux_loss for s in router_stats)
        return logits, loss

    def router_stats(self, idx: torch.Tensor) -> list[RouterStats]:
        """What each MoE block's router does with ``idx`` (batch, T): one :class:`RouterStats`
        per block, first block first (empty without experts), from one forward pass in the
        mode the model is in."""
        return self._run(idx)[1]


# -----------------------------------------------------------------------------
# 6. images as tokens

def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut ``images`` (batch, H, W) or (batch, channels, H, W) into non-overlapping
    ``patch x patch`` squares, row by row: (batch, n_patches, channels * patch * patch),
    each patch flattened channel by channel, then row by row (ViT's order)."""
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError(f"images must be (batch, H, W) or (batch, channels, H, W), got {shape_of(images)}")
    positive_int("patch", patch)
    if images.dim() == 3:
        images = images[:, None]
    b, c, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"patch={patch} must divide the image's height {H} and width {W}")
    x = images.reshape(b, c, H // patch, patch, W // patch, patch)
    x = x.permute(0, 2, 4, 1, 3, 5)                 # (b, rows, cols, c, patch, patch)
    return x.reshape(b, (H // patch) * (W // patch), c * patch * patch)


class PatchClassifier(nn.Module):
    """A tiny Vision Transformer: patches -> Linear embedding + learned positions, a ``[CLS]``
    token in front, ``n_layer`` encoder :class:`lessons_lib.model.Block` (``causal=False``),
    a LayerNorm and a Linear head read at ``[CLS]``. ``forward(images) -> logits``."""

    def __init__(self, image_size: int, patch: int, n_classes: int, channels: int = 1,
                 n_embd: int = 64, n_head: int = 4, n_layer: int = 2):
        super().__init__()
        for name, value in (("image_size", image_size), ("patch", patch), ("n_classes", n_classes),
                            ("channels", channels), ("n_embd", n_embd), ("n_head", n_head),
                            ("n_layer", n_layer)):
            positive_int(name, value)
        if image_size % patch:
            raise ValueError(f"patch={patch} must divide image_size={image_size}")
        self.image_size, self.patch, self.channels = image_size, patch, channels
        n_patches = (image_size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, n_embd)
        self.cls = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, n_embd))
        self.blocks = nn.ModuleList([Block(n_embd, n_head, causal=False) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        ok = isinstance(images, torch.Tensor) and images.shape[-2:] == (size, size) and (
            images.dim() == 4 and images.shape[1] == self.channels
            or images.dim() == 3 and self.channels == 1)
        if not ok:
            raise ValueError(f"images must be (batch, {self.channels}, {size}, {size})"
                             + (f" or (batch, {size}, {size})" if self.channels == 1 else "")
                             + f", got {shape_of(images)}")
        x = self.embed(patchify(images.float(), self.patch))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))


# -----------------------------------------------------------------------------
# 7. memory for training

def saved_activation_bytes(fn, *inputs: torch.Tensor) -> int:
    """The bytes autograd keeps from ``fn(*inputs)`` for the backward pass: every tensor saved
    for backward, each storage counted once (a tensor saved twice, or views of one storage,
    count once). The inputs need ``requires_grad`` for anything to be saved. Deterministic,
    unlike a process's peak memory, and it is what grows with the length in training."""
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ValueError("saved_activation_bytes needs at least one tensor input")
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())
