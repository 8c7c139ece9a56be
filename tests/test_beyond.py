"""lessons_lib.beyond: each layer's forms against each other and against direct computations
written here, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.beyond import (MIXERS, LinearAttention, MambaMixer, MixerLM, MoEMLP,
                                PatchClassifier, RWKVTimeMix, elu_feature_map,
                                linear_attention_chunked, linear_attention_parallel,
                                linear_attention_recurrent, load_balancing_loss,
                                moe_parameter_counts, patchify, saved_activation_bytes,
                                selective_scan, selective_scan_parallel, wkv_initial_state,
                                wkv_parallel, wkv_recurrent, wkv_step)
from lessons_lib.model import MLP


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# linear attention

def reference_linear_attention(q, k, v, key_mask=None):
    """Position by position, sum by sum, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                num, den = 0.0, 0.0
                for s in range(t + 1):
                    if key_mask is not None and not key_mask[b, s]:
                        continue
                    weight = (phi(q[b, h, t]) * phi(k[b, h, s])).sum()
                    num = num + weight * v[b, h, s]
                    den = den + weight
                out[b, h, t] = num / (den + 1e-6)
    return out.float()


def test_elu_feature_map_is_positive_and_elu_plus_one():
    x = torch.linspace(-8, 5, 101)
    assert (elu_feature_map(x) > 0).all()
    assert (elu_feature_map(torch.tensor([-30.0, -1e4])) >= 0).all()
    torch.testing.assert_close(elu_feature_map(x), torch.where(x > 0, x + 1, torch.exp(x)))


@pytest.mark.parametrize("T,chunk", [(1, 4), (7, 3), (12, 4), (13, 64)])
def test_linear_attention_three_forms_match_reference(T, chunk):
    q, k, v = torch.randn(3, 2, 2, T, 5, generator=gen(T)).unbind(0)
    want = reference_linear_attention(q, k, v)
    torch.testing.assert_close(linear_attention_parallel(q, k, v), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear_attention_recurrent(q, k, v), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear_attention_chunked(q, k, v, chunk=chunk), want,
                               atol=1e-5, rtol=1e-5)


def test_linear_attention_key_mask_and_value_dim():
    q, k = torch.randn(2, 2, 3, 9, 4, generator=gen(1)).unbind(0)
    v = torch.randn(2, 3, 9, 6, generator=gen(2))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 3:5] = False
    mask[1, 0] = False
    want = reference_linear_attention(q, k, v, mask)
    for fn in (linear_attention_parallel, linear_attention_recurrent,
               lambda *a: linear_attention_chunked(*a, chunk=4)):
        got = fn(q, k, v, mask)
        assert got.shape == (2, 3, 9, 6)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_attention_is_causal():
    q, k, v = torch.randn(3, 1, 2, 10, 4, generator=gen(3)).unbind(0)
    out = linear_attention_chunked(q, k, v, chunk=4)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] += 5.0
    v2[:, :, 6:] -= 3.0
    out2 = linear_attention_chunked(q, k2, v2, chunk=4)
    torch.testing.assert_close(out[:, :, :6], out2[:, :, :6])
    assert not torch.allclose(out[:, :, 6:], out2[:, :, 6:])


def test_linear_attention_bad_input():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="q must be"):
        linear_attention_parallel(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="same shape"):
        linear_attention_recurrent(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="floating-point"):
        linear_attention_chunked(q.long(), q, q)
    with pytest.raises(ValueError, match="key_mask"):
        linear_attention_parallel(q, q, q, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_mask"):
        linear_attention_parallel(q, q, q, key_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="chunk"):
        linear_attention_chunked(q, q, q, chunk=0)


def test_linear_attention_module_modes_agree_and_check_input():
    torch.manual_seed(0)
    layer = LinearAttention(16, 4, chunk=3)
    x = torch.randn(2, 11, 16)
    y = layer(x)
    assert y.shape == x.shape
    for mode in ("parallel", "recurrent"):
        layer.mode = mode
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(10, 4)
    with pytest.raises(ValueError, match="mode"):
        LinearAttention(16, 4, mode="fast")
    with pytest.raises(ValueError, match=r"\(batch, T, 16\)"):
        layer(torch.randn(2, 11, 8))


# -----------------------------------------------------------------------------
# RWKV

def reference_wkv(k, v, w, u):
    """RWKV-4's formula as written in the paper, in float64, no stabilisation."""
    k, v, w, u = k.double(), v.double(), w.double(), u.double()
    B, T, C = k.shape
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            weight = torch.exp(-(t - 1 - i) * w + k[:, i])
            num = num + weight * v[:, i]
            den = den + weight
        out[:, t] = num / den
    return out.float()


@pytest.mark.parametrize("T", [1, 2, 9])
def test_wkv_parallel_and_recurrent_match_reference(T):
    k, v = torch.randn(2, 3, T, 5, generator=gen(T)).unbind(0)
    w = torch.rand(5, generator=gen(10)) * 2
    w[0] = 0.0                                   # no decay at all: a running mean
    u = torch.randn(5, generator=gen(11))
    want = reference_wkv(k, v, w, u)
    torch.testing.assert_close(wkv_parallel(k, v, w, u), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wkv_recurrent(k, v, w, u), want, atol=1e-5, rtol=1e-5)


def test_wkv_recurrent_is_stable_for_large_keys():
    k = torch.full((1, 6, 2), 200.0)             # exp(200) overflows float32
    v = torch.arange(12.0).view(1, 6, 2)
    w, u = torch.tensor([0.5, 1.0]), torch.zeros(2)
    got = wkv_recurrent(k, v, w, u)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, wkv_parallel(k, v, w, u))
    torch.testing.assert_close(got, reference_wkv(k - 200, v, w, u))   # shift-invariant


def test_wkv_step_by_step_is_wkv_recurrent_with_a_fixed_size_state():
    k, v = torch.randn(2, 3, 7, 5, generator=gen(12)).unbind(0)
    w, u = torch.rand(5, generator=gen(13)), torch.randn(5, generator=gen(14))
    state = wkv_initial_state(3, 5)
    outputs = []
    for t in range(7):
        out, state = wkv_step(k[:, t], v[:, t], w, u, state)
        assert [s.shape for s in state] == [(3, 5)] * 3
        outputs.append(out)
    assert torch.equal(torch.stack(outputs, dim=1), wkv_recurrent(k, v, w, u))
    a, b, p = wkv_initial_state(2, 4, dtype=torch.float64)
    assert a.dtype == torch.float64 and not a.any() and not b.any() and (p == -1e38).all()


def test_wkv_step_bad_input():
    k = torch.randn(2, 3)
    w, u = torch.ones(3), torch.zeros(3)
    state = wkv_initial_state(2, 3)
    with pytest.raises(ValueError, match="k must be"):
        wkv_step(k[0], k[0], w, u, state)
    with pytest.raises(ValueError, match="same shape"):
        wkv_step(k, k[:1], w, u, state)
    with pytest.raises(ValueError, match="state must be"):
        wkv_step(k, k, w, u, state[:2])
    with pytest.raises(ValueError, match="state must be"):
        wkv_step(k, k, w, u, wkv_initial_state(1, 3))
    with pytest.raises(ValueError, match="u must be"):
        wkv_step(k, k, w, torch.zeros(4), state)
    with pytest.raises(ValueError, match="batch"):
        wkv_initial_state(0, 3)


def test_wkv_bad_input():
    k = torch.randn(1, 4, 3)
    w, u = torch.ones(3), torch.zeros(3)
    with pytest.raises(ValueError, match="k must be"):
        wkv_parallel(k[0], k[0], w, u)
    with pytest.raises(ValueError, match="same shape"):
        wkv_recurrent(k, k[:, :3], w, u)
    with pytest.raises(ValueError, match="w must be"):
        wkv_recurrent(k, k, torch.ones(4), u)
    with pytest.raises(ValueError, match=">= 0"):
        wkv_parallel(k, k, -w, u)


def test_rwkv_time_mix_modes_agree_causal_and_bad_input():
    torch.manual_seed(0)
    layer = RWKVTimeMix(8)
    x = torch.randn(2, 7, 8)
    y = layer(x)
    layer.mode = "parallel"
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(layer(x2)[:, :4], y[:, :4], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        RWKVTimeMix(8, mode="chunked")
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(7, 8))


# -----------------------------------------------------------------------------
# selective scan

def scan_inputs(seed, b=2, T=11, ch=3, n=4):
    g = gen(seed)
    x = torch.randn(b, T, ch, generator=g)
    delta = torch.rand(b, T, ch, generator=g)
    A = -torch.rand(ch, n, generator=g) * 3
    B = torch.randn(b, T, n, generator=g)
    C = torch.randn(b, T, n, generator=g)
    D = torch.randn(ch, generator=g)
    return x, delta, A, B, C, D


def reference_scan(x, delta, A, B, C, D):
    """Every channel, state index and step by hand, in float64."""
    x, delta, A, B, C, D = (t.double() for t in (x, delta, A, B, C, D))
    b, T, ch = x.shape
    y = torch.zeros(b, T, ch, dtype=torch.float64)
    for i in range(b):
        for c in range(ch):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(T):
                h = torch.exp(delta[i, t, c] * A[c]) * h + delta[i, t, c] * B[i, t] * x[i, t, c]
                y[i, t, c] = (C[i, t] * h).sum() + D[c] * x[i, t, c]
    return y.float()


@pytest.mark.parametrize("T", [1, 2, 5, 8, 11])
def test_selective_scan_forms_match_reference(T):
    args = scan_inputs(T, T=T)
    want = reference_scan(*args)
    torch.testing.assert_close(selective_scan(*args), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(selective_scan_parallel(*args), want, atol=1e-5, rtol=1e-5)
    no_d = reference_scan(*args[:5], torch.zeros(3))
    torch.testing.assert_close(selective_scan_parallel(*args[:5]), no_d, atol=1e-5, rtol=1e-5)


def test_selective_scan_gradients_agree():
    args = [t.requires_grad_() for t in scan_inputs(5, T=9)]
    selective_scan(*args).square().sum().backward()
    grads = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    selective_scan_parallel(*args).square().sum().backward()
    for want, t in zip(grads, args):
        torch.testing.assert_close(t.grad, want, atol=1e-4, rtol=1e-4)


def test_selective_scan_bad_input():
    x, delta, A, B, C, D = scan_inputs(0)
    with pytest.raises(ValueError, match="x must be"):
        selective_scan(x[0], delta, A, B, C)
    with pytest.raises(ValueError, match="shapes do not fit"):
        selective_scan_parallel(x, delta, A[:2], B, C)
    with pytest.raises(ValueError, match="shapes do not fit"):
        selective_scan(x, delta, A, B[:, :, :3], C)
    with pytest.raises(ValueError, match="D must be"):
        selective_scan(x, delta, A, B, C, torch.ones(4))
    with pytest.raises(ValueError, match="delta is a step size"):
        selective_scan_parallel(x, -delta, A, B, C)


def test_mamba_mixer_modes_agree_causal_and_bad_input():
    torch.manual_seed(0)
    layer = MambaMixer(8, d_state=4, expand=2)
    x = torch.randn(2, 10, 8)
    y = layer(x)
    assert y.shape == x.shape
    layer.mode = "sequential"
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(layer(x2)[:, :6], y[:, :6], atol=1e-6, rtol=1e-6)
    # the initial step sizes lie in Mamba's range, 0.001 .. 0.1
    dt = F.softplus(layer.dt_proj.bias)
    assert 0.9e-3 < dt.min() and dt.max() < 0.11
    with pytest.raises(ValueError, match="mode"):
        MambaMixer(8, mode="chunked")
    with pytest.raises(ValueError, match="d_state"):
        MambaMixer(8, d_state=0)
    with pytest.raises(ValueError, match=r"\(batch, T, 8\)"):
        layer(torch.randn(2, 10, 4))


# -----------------------------------------------------------------------------
# mixture of experts

def test_moe_matches_direct_computation_with_mask():
    torch.manual_seed(0)
    moe = MoEMLP(8, n_experts=4, top_k=2)
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    y, stats = moe(x, mask)
    want = torch.zeros(2, 5, 8)
    chosen = []
    for b in range(2):
        for t in range(5):
            if not mask[b, t]:
                continue
            probs = torch.softmax(x[b, t] @ moe.router.weight.T, -1)
            top = sorted(range(4), key=lambda e: -probs[e])[:2]
            chosen += top
            for e in top:
                want[b, t] += probs[e] * moe.experts[e](x[b, t][None])[0]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    counts = torch.bincount(torch.tensor(chosen), minlength=4).float()
    torch.testing.assert_close(stats.load, counts / counts.sum())
    assert math.isclose(float(stats.load.sum()), 1.0, abs_tol=1e-6)
    probs = torch.softmax(x[mask] @ moe.router.weight.T, -1)       # the kept tokens only
    want_aux = load_balancing_loss(probs, torch.tensor(chosen).view(-1, 2), 4)
    torch.testing.assert_close(stats.aux_loss, want_aux)
    assert not hasattr(moe, "aux_loss") and not hasattr(moe, "load")    # nothing kept on it


def test_moe_with_every_position_masked_reports_zeros():
    moe = MoEMLP(8, n_experts=3)
    y, stats = moe(torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.bool))
    assert (y == 0).all() and stats.aux_loss.item() == 0.0
    assert stats.load.tolist() == [0.0, 0.0, 0.0]


def test_moe_router_gets_gradient_with_top1_and_aux_loss():
    torch.manual_seed(1)
    moe = MoEMLP(8, n_experts=3, top_k=1)
    y, stats = moe(torch.randn(2, 6, 8))
    (y.square().sum() + stats.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_load_balancing_loss_reference_values():
    # uniform probabilities and loads: exactly 1
    probs = torch.full((8, 4), 0.25)
    index = torch.arange(8)[:, None] % 4
    assert math.isclose(float(load_balancing_loss(probs, index, 4)), 1.0, rel_tol=1e-6)
    # everything on expert 0 with probability 1: n_experts
    probs = torch.zeros(6, 4)
    probs[:, 0] = 1
    assert math.isclose(float(load_balancing_loss(probs, torch.zeros(6, 1, dtype=torch.long), 4)), 4.0)
    # a hand-worked case: f = (2/3, 1/3, 0), P = mean of the rows
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.1, 0.8, 0.1]])
    index = torch.tensor([[0], [0], [1]])
    P = probs.mean(0)
    want = 3 * (2 / 3 * P[0] + 1 / 3 * P[1])
    assert math.isclose(float(load_balancing_loss(probs, index, 3)), float(want), rel_tol=1e-6)


def test_moe_and_balancing_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(8, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="n_experts"):
        MoEMLP(8, n_experts=0)
    moe = MoEMLP(8, 2)
    with pytest.raises(ValueError, match="mask"):
        moe(torch.randn(2, 3, 8), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(batch, T, 8\)"):
        moe(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="columns"):
        load_balancing_loss(torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="expert_index"):
        load_balancing_loss(torch.rand(4, 3), torch.zeros(4, 1), 3)


def test_moe_parameter_counts():
    torch.manual_seed(0)
    model = MixerLM(20, 16, "attention", n_layer=2, n_embd=16, n_experts=4, top_k=2)
    counts = moe_parameter_counts(model)
    dense = MixerLM(20, 16, "attention", n_layer=2, n_embd=16)
    mlp = sum(p.numel() for p in MLP(16).parameters())            # 8 d^2 + 5 d
    assert mlp == 8 * 16 * 16 + 5 * 16
    router = 16 * 4
    dense_total = sum(p.numel() for p in dense.parameters())
    assert counts["total"] == dense_total + 2 * (3 * mlp + router)
    assert counts["active"] == dense_total + 2 * (1 * mlp + router)
    assert moe_parameter_counts(dense) == {"total": dense_total, "active": dense_total}


# -----------------------------------------------------------------------------
# the language model

@pytest.mark.parametrize("mixer", MIXERS)
def test_mixer_lm_loss_causality_and_training_step(mixer):
    torch.manual_seed(0)
    model = MixerLM(11, 12, mixer, n_layer=2, n_embd=16, n_head=2)
    idx = torch.randint(11, (2, 12))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 12, 11)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 11), idx.reshape(-1)))
    assert abs(loss.item() - math.log(11)) < 0.3                # small init: near uniform
    idx2 = idx.clone()
    idx2[:, 8:] = (idx2[:, 8:] + 1) % 11
    torch.testing.assert_close(model(idx2)[0][:, :8], logits[:, :8], atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_mixer_lm_aux_loss_and_bad_input():
    idx = torch.randint(11, (2, 12), generator=gen(0))
    torch.manual_seed(0)
    plain = MixerLM(11, 12, n_embd=16, n_head=2, n_experts=4)
    torch.manual_seed(0)
    aux = MixerLM(11, 12, n_embd=16, n_head=2, n_experts=4, aux_coef=0.5)
    _, loss0 = plain(idx, idx)
    _, loss1 = aux(idx, idx)
    stats = aux.router_stats(idx)
    assert len(stats) == 2 and all(s.load.shape == (4,) for s in stats)
    extra = 0.5 * sum(s.aux_loss for s in stats)
    torch.testing.assert_close(loss1, loss0 + extra)
    assert MixerLM(11, 12, n_embd=16, n_head=2).router_stats(idx) == []     # no experts
    aux.eval()
    torch.testing.assert_close(aux(idx, idx)[1], loss0)          # evaluation: the LM loss only
    with pytest.raises(ValueError, match="mixer"):
        MixerLM(11, 12, "lstm")
    with pytest.raises(ValueError, match="block_size"):
        plain(torch.randint(11, (1, 13)))
    with pytest.raises(ValueError, match="idx"):
        plain(torch.randn(1, 4))
    with pytest.raises(ValueError, match="aux_coef"):
        MixerLM(11, 12, aux_coef=-1.0)


# -----------------------------------------------------------------------------
# images as tokens

def test_patchify_against_loops():
    images = torch.arange(2 * 3 * 4 * 6.0).view(2, 3, 4, 6)
    p = patchify(images, 2)
    assert p.shape == (2, 6, 12)
    for b in range(2):
        for row in range(2):
            for col in range(3):
                want = images[b, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2].reshape(-1)
                torch.testing.assert_close(p[b, row * 3 + col], want)
    gray = torch.randn(5, 8, 8)
    torch.testing.assert_close(patchify(gray, 4), patchify(gray[:, None], 4))
    with pytest.raises(ValueError, match="divide"):
        patchify(gray, 3)
    with pytest.raises(ValueError, match="images must be"):
        patchify(torch.randn(8, 8), 2)
    with pytest.raises(ValueError, match="patch"):
        patchify(gray, 0)


def test_patch_classifier_shapes_permutation_and_bad_input():
    torch.manual_seed(0)
    model = PatchClassifier(8, 2, 10, n_embd=16, n_head=2, n_layer=1)
    images = torch.randn(3, 8, 8)
    logits = model(images)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(model(images[:, None]), logits)
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(3, 7, 7))
    with pytest.raises(ValueError, match="divide"):
        PatchClassifier(8, 3, 10)


# -----------------------------------------------------------------------------
# memory

def test_saved_activation_bytes():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    # x @ w saves x and w; exp saves its output
    assert saved_activation_bytes(lambda x, w: (x @ w).exp(), x, w) == (32 + 64 + 32) * 4
    assert saved_activation_bytes(lambda x: x + 1, x) == 0
    with torch.no_grad():
        assert saved_activation_bytes(lambda x: x.exp(), x) == 0
    # the explicit attention keeps T x T weights: 4x the bytes when T doubles
    from lessons_lib.attention import attention_with_weights
    sizes = []
    for T in (64, 128):
        q = torch.randn(1, 1, T, 4, requires_grad=True)
        sizes.append(saved_activation_bytes(lambda q: attention_with_weights(q, q, q)[0], q))
    assert 3.5 < sizes[1] / sizes[0] < 4.1
    with pytest.raises(ValueError, match="callable"):
        saved_activation_bytes(3, x)
    with pytest.raises(ValueError, match="tensor"):
        saved_activation_bytes(lambda: 0)
