"""The Transformer block and the position encodings of lessons_lib.model."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from lessons_lib.attention import MultiHeadAttention
from lessons_lib.model import MLP, Block, LearnedPositions, sinusoidal_positions


# -----------------------------------------------------------------------------
# the block

def test_block_shapes_and_structure():
    torch.manual_seed(0)
    b = Block(32, 4)
    x = torch.randn(3, 9, 32)
    y, w = b(x, return_weights=True)
    assert y.shape == x.shape and w.shape == (3, 4, 9, 9)
    assert isinstance(b.attn, MultiHeadAttention) and b.attn.causal
    assert b.mlp.c_fc.out_features == 4 * 32 and b.mlp.c_proj.in_features == 4 * 32
    torch.testing.assert_close(b(x), y, rtol=1e-5, atol=1e-6)   # fused path = explicit path
    # parameters: 2 LayerNorms (2d each), attention (4d^2 + 4d), MLP (8d^2 + 5d)
    d = 32
    assert sum(p.numel() for p in b.parameters()) == 12 * d * d + 13 * d
    nb = Block(d, 4, bias=False)
    assert sum(p.numel() for p in nb.parameters()) == 12 * d * d + 2 * d


def test_block_equals_its_formula():
    """x + attn(ln_1(x)), then + mlp(ln_2(.)), computed by hand from the submodules."""
    torch.manual_seed(1)
    b = Block(16, 2).eval()
    x = torch.randn(2, 7, 16)
    h = x + b.attn(b.ln_1(x))
    want = h + b.mlp.c_proj(torch.nn.functional.gelu(b.mlp.c_fc(b.ln_2(h)), approximate="tanh"))
    torch.testing.assert_close(b(x), want)


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(T=st.integers(2, 10), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_block_is_causal(T, data, seed):
    torch.manual_seed(seed)
    b = Block(24, 3).eval()
    x = torch.randn(2, T, 24)
    cut = data.draw(st.integers(0, T - 2))
    x2 = x.clone()
    x2[:, cut + 1:] = torch.randn(2, T - cut - 1, 24)
    y, y2 = b(x), b(x2)
    torch.testing.assert_close(y[:, :cut + 1], y2[:, :cut + 1])
    assert not torch.allclose(y[:, cut + 1:], y2[:, cut + 1:])


def test_encoder_block_sees_the_future():
    torch.manual_seed(2)
    b = Block(16, 2, causal=False).eval()
    assert not b.attn.causal
    x = torch.randn(1, 6, 16)
    x2 = x.clone()
    x2[:, -1] = torch.randn(16)          # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(b(x)[:, 0], b(x2)[:, 0])


def test_block_mask_is_forwarded():
    torch.manual_seed(3)
    b = Block(16, 2, causal=False).eval()
    x = torch.randn(2, 5, 16)
    only_self = torch.eye(5, dtype=torch.bool)
    _, w = b(x, mask=only_self, return_weights=True)
    assert torch.equal(w, torch.eye(5).expand(2, 2, 5, 5))


def test_block_gradients_flow_to_every_parameter():
    torch.manual_seed(4)
    b = Block(16, 4, dropout=0.1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    b(x).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in b.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_block_dropout_only_in_training():
    torch.manual_seed(5)
    b = Block(16, 2, dropout=0.5)
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(b(x), b(x))
    b.eval()
    assert torch.equal(b(x), b(x))


def test_block_errors():
    with pytest.raises(ValueError, match="not divisible"):
        Block(10, 3)
    with pytest.raises(ValueError, match="n_embd must be a positive int"):
        Block(0, 1)
    with pytest.raises(ValueError, match="n_head must be a positive int"):
        Block(8, -1)
    with pytest.raises(ValueError, match=r"\(batch, T, n_embd=8\), got torch.Size\(\[4, 6\]\)"):
        Block(8, 2)(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"n_embd=8\), got torch.Size\(\[2, 4, 6\]\)"):
        Block(8, 2)(torch.randn(2, 4, 6))


def test_mlp_shape():
    m = MLP(8)
    assert m(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    assert isinstance(m.gelu, nn.GELU) and m.gelu.approximate == "tanh"


# -----------------------------------------------------------------------------
# position encodings

def test_sinusoidal_formula_values():
    d = 8
    pe = sinusoidal_positions(50, d, dtype=torch.float64)
    assert pe.shape == (50, d) and pe.dtype == torch.float64
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)
    # hand-computed: position 1, i = 1 of d = 8 -> 1 / 10000^(1/4) = 0.1
    assert pe[1, 2].item() == pytest.approx(math.sin(0.1))
    assert pe[1, 3].item() == pytest.approx(math.cos(0.1))
    assert torch.equal(pe[0], torch.tensor([0.0, 1.0] * 4, dtype=torch.float64))


def test_sinusoidal_properties():
    pe = sinusoidal_positions(64, 16)
    assert pe.dtype == torch.float32
    assert pe.abs().max() <= 1.0
    # each sin/cos pair lies on the unit circle
    torch.testing.assert_close(pe[:, 0::2] ** 2 + pe[:, 1::2] ** 2, torch.ones(64, 8))
    # a shift by k positions is the same rotation for every position (a linear map)
    k = 5
    theta = k / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    c, s = torch.cos(theta), torch.sin(theta)
    pe64 = sinusoidal_positions(64, 16, dtype=torch.float64)
    sin_, cos_ = pe64[:-k, 0::2], pe64[:-k, 1::2]
    torch.testing.assert_close(pe64[k:, 0::2], sin_ * c + cos_ * s)
    torch.testing.assert_close(pe64[k:, 1::2], cos_ * c - sin_ * s)
    assert sinusoidal_positions(3, 4, base=100.0)[1, 2].item() == pytest.approx(math.sin(0.1))


def test_sinusoidal_errors():
    with pytest.raises(ValueError, match="d must be even"):
        sinusoidal_positions(10, 7)
    with pytest.raises(ValueError, match="T must be a positive int"):
        sinusoidal_positions(0, 8)
    with pytest.raises(ValueError, match="d must be a positive int"):
        sinusoidal_positions(4, 8.0)
    with pytest.raises(ValueError, match="base must be positive"):
        sinusoidal_positions(4, 8, base=0.0)


def test_learned_positions():
    torch.manual_seed(6)
    lp = LearnedPositions(16, 8)
    assert isinstance(lp.weight, nn.Parameter) and lp.weight.shape == (16, 8)
    assert torch.equal(lp(5), lp.weight[:5])
    assert torch.equal(lp(torch.zeros(3, 5, dtype=torch.long)), lp.weight[:5])     # token ids
    assert torch.equal(lp(torch.zeros(3, 5, 8)), lp.weight[:5])                     # embeddings
    assert torch.equal(lp(4, start=12), lp.weight[12:16])
    assert torch.equal(lp(16), lp.weight)
    lp(6).sum().backward()
    assert torch.equal(lp.weight.grad[:6], torch.ones(6, 8)) and lp.weight.grad[6:].abs().sum() == 0


def test_learned_positions_errors():
    lp = LearnedPositions(16, 8)
    with pytest.raises(ValueError, match=r"positions 0\.\.16 do not fit in block_size=16"):
        lp(17)
    with pytest.raises(ValueError, match=r"positions 10\.\.17 do not fit"):
        lp(8, start=10)
    with pytest.raises(ValueError, match="do not fit"):
        lp(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="T must be a positive int"):
        lp(0)
    with pytest.raises(ValueError, match="start must be a non-negative int"):
        lp(3, start=-1)
    with pytest.raises(ValueError, match="0-d tensor"):
        lp(torch.tensor(3))
    with pytest.raises(ValueError, match=r"\(\.\.\., T, d\)"):
        lp(torch.zeros(5))
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        LearnedPositions(0, 8)
    with pytest.raises(ValueError, match="d must be a positive int"):
        LearnedPositions(8, -1)
