"""lessons_lib.attention against PyTorch's own attention (nobody here wrote those)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lessons_lib.attention import (MultiHeadAttention, causal_mask, merge_heads,
                                   attention_with_weights, split_heads)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


# -----------------------------------------------------------------------------
# attention_with_weights

@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
       t_q=st.integers(1, 9), t_k=st.integers(1, 9), d_k=st.integers(1, 16), d_v=st.integers(1, 16),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_sdpa_matches_torch_without_mask(lead, t_q, t_k, d_k, d_v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, t_q, d_k, generator=g, dtype=dtype)
    k = torch.randn(*lead, t_k, d_k, generator=g, dtype=dtype)
    v = torch.randn(*lead, t_k, d_v, generator=g, dtype=dtype)
    out, w = attention_with_weights(q, k, v)
    assert out.shape == (*lead, t_q, d_v) and w.shape == (*lead, t_q, t_k)
    assert out.dtype == dtype and w.dtype == dtype
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **TOL[dtype])
    torch.testing.assert_close(w.sum(-1), torch.ones(*lead, t_q, dtype=dtype), **TOL[dtype])
    # the weights are the softmax that produced the output
    torch.testing.assert_close(w @ v, out, **TOL[dtype])
    assert (w >= 0).all()


@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       t_q=st.integers(1, 8), t_k=st.integers(1, 8), d_k=st.integers(1, 12), d_v=st.integers(1, 12),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_sdpa_matches_torch_with_broadcast_masks(lead, t_q, t_k, d_k, d_v, dtype, seed, data):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, t_q, d_k, generator=g, dtype=dtype)
    k = torch.randn(*lead, t_k, d_k, generator=g, dtype=dtype)
    v = torch.randn(*lead, t_k, d_v, generator=g, dtype=dtype)
    # a mask shape that broadcasts: drop some leading dims, set others (or T_q) to 1
    n_lead = data.draw(st.integers(0, len(lead)))
    kept = lead[len(lead) - n_lead:]
    mask_lead = [d if data.draw(st.booleans()) else 1 for d in kept]
    mask_tq = t_q if data.draw(st.booleans()) else 1
    mask = torch.rand(*mask_lead, mask_tq, t_k, generator=g) < 0.6
    mask[..., data.draw(st.integers(0, t_k - 1))] = True          # every row keeps one key
    out, w = attention_with_weights(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(w.sum(-1), torch.ones(*lead, t_q, dtype=dtype), **TOL[dtype])
    assert (w.masked_select(~mask.expand_as(w)) == 0).all()          # masked keys get weight 0


def test_sdpa_causal_mask_equals_is_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    out, w = attention_with_weights(q, k, v, causal_mask(10))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.equal(w.triu(1), torch.zeros_like(w))


def test_sdpa_is_stable_for_large_scores():
    q = torch.full((1, 2, 4), 1e4)
    k = torch.tensor([[[1e4, 1e4, 1e4, 1e4], [-1e4, 0.0, 0.0, 0.0]]])
    v = torch.tensor([[[1.0], [2.0]]])
    out, w = attention_with_weights(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    torch.testing.assert_close(out, torch.ones(1, 2, 1))


def test_sdpa_leading_dims_broadcast():
    torch.manual_seed(1)
    q = torch.randn(4, 1, 5, 8)
    k = torch.randn(1, 3, 6, 8)
    v = torch.randn(1, 3, 6, 2)
    out, w = attention_with_weights(q, k, v)
    assert out.shape == (4, 3, 5, 2) and w.shape == (4, 3, 5, 6)
    ref = F.scaled_dot_product_attention(q.expand(4, 3, 5, 8), k.expand(4, 3, 6, 8), v.expand(4, 3, 6, 2))
    torch.testing.assert_close(out, ref)


def test_sdpa_errors_name_the_shapes():
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 6, 4), torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match=r"q \(2, 5, 8\) and k \(2, 6, 4\)"):
        attention_with_weights(q, k, v)
    k = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match=r"k \(2, 6, 8\) and v \(2, 7, 3\)"):
        attention_with_weights(q, k, torch.randn(2, 7, 3))
    with pytest.raises(ValueError, match=r"mask of shape \(4, 6\).*\(2, 5, 6\)"):
        attention_with_weights(q, k, v, torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5, 6\).*\(2, 5, 6\)"):
        attention_with_weights(q, k, v, torch.ones(3, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.bool.*torch.float32"):
        attention_with_weights(q, k, v, torch.zeros(5, 6))
    with pytest.raises(ValueError, match="torch.bool.*torch.int64"):
        attention_with_weights(q, k, v, torch.ones(5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.bool"):
        attention_with_weights(q, k, v, [[True] * 6] * 5)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[3] = False
    with pytest.raises(ValueError, match="every key is masked"):
        attention_with_weights(q, k, v, mask)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        attention_with_weights(torch.randn(8), k, v)
    with pytest.raises(ValueError, match="floating-point"):
        attention_with_weights(q.long(), k, v)
    with pytest.raises(ValueError, match="one dtype"):
        attention_with_weights(q.double(), k, v)
    with pytest.raises(ValueError, match="do not broadcast"):
        attention_with_weights(torch.randn(3, 5, 8), k, v)
    with pytest.raises(ValueError, match="torch.Tensor"):
        attention_with_weights(q.tolist(), k, v)


# -----------------------------------------------------------------------------
# masks and heads

def test_causal_mask():
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert torch.equal(m, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    assert causal_mask(3, device="cpu").device.type == "cpu"
    assert causal_mask(3, torch.device("cpu")).shape == (3, 3)
    for bad in (0, -2, 2.0, True, "3"):
        with pytest.raises(ValueError, match="positive int"):
            causal_mask(bad)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), T=st.integers(1, 6),
       h=st.integers(1, 4), hd=st.integers(1, 5))
def test_split_merge_heads_round_trip(lead, T, h, hd):
    x = torch.randn(*lead, T, h * hd)
    s = split_heads(x, h)
    assert s.shape == (*lead, h, T, hd)
    # head j holds feature slice j*hd:(j+1)*hd
    for j in range(h):
        assert torch.equal(s[..., j, :, :], x[..., j * hd:(j + 1) * hd])
    assert torch.equal(merge_heads(s), x)


def test_split_merge_heads_errors():
    with pytest.raises(ValueError, match="not divisible by n_heads=3"):
        split_heads(torch.randn(2, 4, 8), 3)
    with pytest.raises(ValueError, match="positive int"):
        split_heads(torch.randn(2, 4, 8), 0)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, C\)"):
        split_heads(torch.randn(8), 2)
    with pytest.raises(ValueError, match="n_heads, T, head_dim"):
        merge_heads(torch.randn(4, 8))


# -----------------------------------------------------------------------------
# MultiHeadAttention against torch.nn.MultiheadAttention

def _torch_mha(d, h, bias, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(d, h, bias=bias, batch_first=True, dtype=dtype).eval()
    if bias:   # torch initialises the biases to zero; make them count
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
    return m


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_torch_matches_torch_mha(bias, causal, dtype):
    d, h, B, T = 48, 6, 3, 11
    ref = _torch_mha(d, h, bias, dtype)
    ours = MultiHeadAttention.from_torch(ref, causal=causal)
    assert ours.causal is causal and not ours.training
    x = torch.randn(B, T, d, dtype=dtype)
    # torch's boolean attn_mask means True = NOT allowed: the opposite of ours
    attn_mask = ~causal_mask(T) if causal else None
    want, want_w = ref(x, x, x, attn_mask=attn_mask, need_weights=True, average_attn_weights=True)
    fused = ours(x)
    explicit, w = ours(x, return_weights=True)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(fused, want, **tol)
    torch.testing.assert_close(explicit, want, **tol)
    assert w.shape == (B, h, T, T)
    torch.testing.assert_close(w.mean(dim=1), want_w, **tol)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, h, T, dtype=dtype), **tol)
    # per-head weights equal torch's unaveraged ones
    _, per_head = ref(x, x, x, attn_mask=attn_mask, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(w, per_head, **tol)


def test_from_torch_copies_parameters_and_rejects_other_modules():
    ref = _torch_mha(16, 4, True)
    ours = MultiHeadAttention.from_torch(ref)
    assert torch.equal(ours.c_attn.weight, ref.in_proj_weight)
    assert torch.equal(ours.c_proj.bias, ref.out_proj.bias)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    with pytest.raises(ValueError, match="torch.nn.MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="batch_first=True"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4))
    with pytest.raises(ValueError, match="kdim"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True))
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True))


def test_padding_mask_matches_torch_key_padding_mask():
    d, h, B, T = 32, 4, 2, 7
    ref = _torch_mha(d, h, True)
    ours = MultiHeadAttention.from_torch(ref)
    x = torch.randn(B, T, d)
    lengths = torch.tensor([7, 4])
    keep = torch.arange(T)[None, :] < lengths[:, None]            # (B, T), True = real token
    want, _ = ref(x, x, x, key_padding_mask=~keep)
    for got in (ours(x, mask=keep[:, None, None, :]),
                ours(x, mask=keep[:, None, None, :], return_weights=True)[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_and_explicit_paths_agree(bias):
    torch.manual_seed(3)
    for causal in (False, True):
        m = MultiHeadAttention(40, 5, bias=bias, causal=causal).eval()
        x = torch.randn(4, 13, 40)
        torch.testing.assert_close(m(x), m(x, return_weights=True)[0], rtol=1e-5, atol=2e-6)
        mask = torch.rand(13, 13) < 0.5
        mask |= torch.eye(13, dtype=torch.bool)                    # every row keeps itself
        torch.testing.assert_close(m(x, mask=mask), m(x, mask=mask, return_weights=True)[0],
                                   rtol=1e-5, atol=2e-6)


def test_causal_combines_with_extra_mask():
    torch.manual_seed(4)
    m = MultiHeadAttention(16, 2, causal=True).eval()
    x = torch.randn(2, 6, 16)
    extra = torch.ones(6, 6, dtype=torch.bool)
    extra[:, 0] = False
    extra[0, 0] = True
    _, w = m(x, mask=extra, return_weights=True)
    assert torch.equal(w.triu(1), torch.zeros_like(w))            # still causal
    assert torch.equal(w[..., 1:, 0], torch.zeros_like(w[..., 1:, 0]))  # and the extra mask holds


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 12), t=st.data(), seed=st.integers(0, 2**31 - 1), weights=st.booleans())
def test_causal_mha_does_not_look_ahead(T, t, seed, weights):
    torch.manual_seed(seed)
    m = MultiHeadAttention(24, 3, causal=True).eval()
    x = torch.randn(2, T, 24)
    cut = t.draw(st.integers(0, T - 2))
    x2 = x.clone()
    x2[:, cut + 1:] = torch.randn(2, T - cut - 1, 24) * 5          # change the future only
    y = m(x, return_weights=weights)
    y2 = m(x2, return_weights=weights)
    if weights:
        (y, w), (y2, w2) = y, y2
        torch.testing.assert_close(w[..., :cut + 1, :], w2[..., :cut + 1, :])
    torch.testing.assert_close(y[:, :cut + 1], y2[:, :cut + 1])
    assert not torch.allclose(y[:, cut + 1:], y2[:, cut + 1:])   # the future did change


def test_non_causal_mha_looks_everywhere():
    torch.manual_seed(5)
    m = MultiHeadAttention(16, 2).eval()
    x = torch.randn(1, 5, 16)
    x2 = x.clone()
    x2[:, -1] += 3.0
    assert not torch.allclose(m(x)[:, 0], m(x2)[:, 0])


def test_dropout_only_in_training():
    torch.manual_seed(6)
    m = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(m(x), m(x))                         # training: random
    m.eval()
    assert torch.equal(m(x), m(x))
    _, w = m.train()(x, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 5))    # weights returned before dropout


def test_mha_gradients_flow():
    m = MultiHeadAttention(16, 4, causal=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    m(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_mha_errors():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        MultiHeadAttention(8, 0)
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        MultiHeadAttention(8.0, 2)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(8, 2, dropout=1.0)
    m = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"\(batch, T, d_model=8\), got torch.Size\(\[5, 8\]\)"):
        m(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"\(batch, T, d_model=8\), got torch.Size\(\[1, 2, 5, 8\]\)"):
        m(torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match=r"d_model=8\), got torch.Size\(\[2, 5, 6\]\)"):
        m(torch.randn(2, 5, 6))
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"mask of shape \(4, 4\).*\(2, 2, 5, 5\)"):
        m(x, mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.bool"):
        m(x, mask=torch.ones(5, 5))
    bad = torch.ones(5, 5, dtype=torch.bool)
    bad[2] = False
    for path in (False, True):
        with pytest.raises(ValueError, match="every key is masked"):
            m(x, mask=bad, return_weights=path)
    mc = MultiHeadAttention(8, 2, causal=True)
    with pytest.raises(ValueError, match="torch.bool"):
        mc(x, mask=torch.ones(5, 5))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5\)"):
        mc(x, mask=torch.ones(3, 5, dtype=torch.bool))
    # with causal=True, a padding mask that hides the first token leaves row 0 empty
    mc = MultiHeadAttention(8, 2, causal=True)
    pad = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    pad[..., 0] = False
    with pytest.raises(ValueError, match="every key is masked"):
        mc(x, mask=pad)
