"""Position options of lessons_lib's GPT and attention: RoPE and ALiBi against direct
constructions and against transformers' rotary code, the KV cache for every option, the
default GPT unchanged, bad input."""

import math

import pytest
import torch

from lessons_lib.attention import (MultiHeadAttention, alibi_bias, alibi_slopes, apply_rope,
                                   attention_with_weights, rope_tables, rotate_half)
from lessons_lib.model import GPT, GPTConfig, count_parameters

SCHEMES = ("learned", "sinusoidal", "none", "rope", "alibi")


def tiny(positions, **kw):
    cfg = dict(vocab_size=23, block_size=24, n_layer=2, n_head=4, n_embd=32, positions=positions)
    cfg.update(kw)
    return GPTConfig(**cfg)


# -- RoPE ---------------------------------------------------------------------------------

def direct_rotation(x, positions, base=10000.0):
    """Rotate pair (x[i], x[i + d/2]) by the angle pos * base^(-2i/d), one pair at a time,
    with a 2 x 2 rotation matrix, in float64."""
    d = x.shape[-1]
    out = torch.empty_like(x, dtype=torch.float64)
    for t, pos in enumerate(positions):
        for i in range(d // 2):
            theta = pos * base ** (-2 * i / d)
            rot = torch.tensor([[math.cos(theta), -math.sin(theta)],
                                [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
            pair = torch.stack([x[..., t, i], x[..., t, i + d // 2]], dim=-1).double()
            turned = pair @ rot.T
            out[..., t, i], out[..., t, i + d // 2] = turned[..., 0], turned[..., 1]
    return out


@pytest.mark.parametrize("start", [0, 5])
def test_rope_equals_a_direct_rotation_of_each_pair(start):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    cos, sin = rope_tables(6, 8, start=start, dtype=torch.float64)
    got = apply_rope(x, cos, sin)
    want = direct_rotation(x, range(start, start + 6))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow                      # importing transformers takes seconds
def test_rope_matches_transformers_llama_rotary():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    torch.manual_seed(1)
    B, h, T, hd, start = 2, 4, 10, 16, 7
    config = LlamaConfig(hidden_size=h * hd, num_attention_heads=h, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(config)
    q, k = torch.randn(B, h, T, hd), torch.randn(B, h, T, hd)
    position_ids = torch.arange(start, start + T)[None].expand(B, T)
    hf_cos, hf_sin = rotary(q, position_ids)
    want_q, want_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    cos, sin = rope_tables(T, hd, start=start, base=config.rope_parameters["rope_theta"])
    torch.testing.assert_close(cos, hf_cos[0])
    torch.testing.assert_close(sin, hf_sin[0])
    torch.testing.assert_close(apply_rope(q, cos, sin), want_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), want_k)


def test_rope_scores_depend_only_on_the_distance():
    torch.manual_seed(2)
    q, k = torch.randn(8), torch.randn(8)
    def score(m, n):
        cq, sq = rope_tables(1, 8, start=m, dtype=torch.float64)
        ck, sk = rope_tables(1, 8, start=n, dtype=torch.float64)
        return (apply_rope(q[None].double(), cq, sq) * apply_rope(k[None].double(), ck, sk)).sum()
    torch.testing.assert_close(score(3, 1), score(40, 38))
    torch.testing.assert_close(score(0, 0), (q.double() * k.double()).sum())


def test_rotate_half_is_a_quarter_turn():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_half(x).tolist() == [-3.0, -4.0, 1.0, 2.0]
    torch.testing.assert_close(rotate_half(rotate_half(x)), -x)


# -- ALiBi ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, want", [
    (1, [2 ** -8]),
    (4, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]),
    (8, [2 ** -(i + 1) for i in range(8)]),
    # not a power of two: the 4-head slopes, then every other one of the 8-head slopes
    (6, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]),
])
def test_alibi_slopes_are_the_papers(n, want):
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(want))


@pytest.mark.parametrize("T_q, T_k, start", [(5, 5, None), (1, 7, None), (3, 9, 6), (2, 8, 4)])
def test_alibi_bias_is_minus_slope_times_distance(T_q, T_k, start):
    heads = 4
    bias = alibi_bias(heads, T_q, T_k, start=start)
    first = T_k - T_q if start is None else start
    slopes = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]
    want = torch.tensor([[[-slopes[h] * ((first + i) - j) for j in range(T_k)]
                          for i in range(T_q)] for h in range(heads)])
    torch.testing.assert_close(bias, want)


def test_attention_with_an_alibi_bias_equals_a_direct_softmax():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64) for _ in range(3))
    bias = alibi_bias(4, 6, dtype=torch.float64)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    y, w = attention_with_weights(q, k, v, mask, bias=bias)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8) + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(w, scores.softmax(-1))
    torch.testing.assert_close(y, scores.softmax(-1) @ v)


# -- the attention module and the GPT -----------------------------------------------------------

@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_fused_path_equals_the_explicit_path(positions):
    torch.manual_seed(4)
    m = MultiHeadAttention(32, 4, causal=True, positions=positions).eval()
    x = torch.randn(2, 9, 32)
    y_fast = m(x)
    y_slow, w = m(x, return_weights=True)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-5, atol=1e-5)
    assert torch.all(w.triu(1) == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9))
    pad = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    pad[1, ..., :2] = False        # a padding mask combines with the causal mask and the scheme
    pad[1, ..., 0, :] = True
    torch.testing.assert_close(m(x, mask=pad), m(x, mask=pad, return_weights=True)[0],
                               rtol=1e-5, atol=1e-5)


def test_rope_attention_is_the_plain_attention_of_rotated_q_and_k():
    torch.manual_seed(5)
    m = MultiHeadAttention(16, 2, causal=True, positions="rope").eval()
    x = torch.randn(1, 5, 16)
    q, k, v = m.c_attn(x).split(16, dim=-1)
    q, k, v = (t.view(1, 5, 2, 8).transpose(1, 2) for t in (q, k, v))
    cos, sin = rope_tables(5, 8)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y, _ = attention_with_weights(q, k, v, torch.ones(5, 5, dtype=torch.bool).tril())
    want = m.c_proj(y.transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", SCHEMES)
def test_kv_cache_gives_the_logits_of_a_full_forward(positions):
    torch.manual_seed(6)
    model = GPT(tiny(positions)).eval()
    idx = torch.randint(0, 23, (2, 17))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2)
        pieces = [model(idx[:, :5], kv_cache=cache)[0]]      # a prompt, then one at a time,
        pieces.append(model(idx[:, 5:9], kv_cache=cache)[0])  # then a chunk, then one by one
        for t in range(9, 17):
            pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", SCHEMES)
def test_each_scheme_gives_weights_and_trains(positions):
    torch.manual_seed(7)
    model = GPT(tiny(positions))
    idx = torch.randint(0, 23, (2, 12))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    x = model.wte(idx)
    _, w = model.h[0](x, return_weights=True)
    assert w.shape == (2, 4, 12, 12)


def test_schemes_without_a_table_add_no_parameters_and_no_state():
    learned = GPT(tiny("learned"))
    for positions in ("none", "rope", "alibi", "sinusoidal"):
        model = GPT(tiny(positions))
        assert set(model.state_dict()) == set(learned.state_dict()) - {"wpe.weight"}
        assert model.num_parameters() == count_parameters(model.config)


def test_the_positions_change_what_the_model_computes():
    """Same weights, different schemes: with one layer and no positions the last token sees its
    past as a set (a swap changes nothing); RoPE and ALiBi see the order. (With two layers or
    more the causal mask alone leaks the order: earlier positions see different prefixes.)"""
    torch.manual_seed(8)
    base = GPT(tiny("none", n_layer=1)).eval()
    idx = torch.randint(0, 23, (1, 10))
    swapped = idx.clone()
    swapped[0, [2, 5]] = idx[0, [5, 2]]
    outs = {}
    for positions in ("none", "rope", "alibi"):
        model = GPT(tiny(positions, n_layer=1)).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            outs[positions] = (model(idx)[0][0, -1], model(swapped)[0][0, -1])
    torch.testing.assert_close(*outs["none"])          # no positions: order of the past is invisible
    for positions in ("rope", "alibi"):
        assert (outs[positions][0] - outs[positions][1]).abs().max() > 1e-4


def test_the_default_gpt_is_unchanged():
    """Same keys as GPT-2's layout, and the outputs of the formula written out here."""
    torch.manual_seed(9)
    model = GPT(tiny("learned")).eval()
    keys = set(model.state_dict())
    assert "wpe.weight" in keys and not any("rope" in k or "alibi" in k for k in keys)
    assert all(b.attn.positions is None for b in model.h)
    idx = torch.randint(0, 23, (2, 11))
    with torch.no_grad():
        x = model.wte(idx) + model.wpe.weight[:11]
        for block in model.h:
            x = block(x)
        want = model.lm_head(model.ln_f(x))
        torch.testing.assert_close(model(idx)[0], want)


def test_rope_and_alibi_run_past_the_trained_length_but_learned_does_not():
    idx = torch.randint(0, 23, (1, 24))
    for positions in ("sinusoidal", "none", "rope", "alibi"):
        GPT(tiny(positions))(idx)                   # up to block_size: fine
    with pytest.raises(ValueError, match="block_size"):
        GPT(tiny("learned", block_size=16))(idx)


# -- bad input ----------------------------------------------------------------------------------

def test_bad_input_raises_value_errors():
    with pytest.raises(ValueError, match="positions"):
        GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4, positions="rotary")
    with pytest.raises(ValueError, match="even"):
        GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=2, n_embd=6, positions="rope")
    with pytest.raises(ValueError, match="positions"):
        MultiHeadAttention(8, 2, positions="learned")
    with pytest.raises(ValueError, match="even"):
        MultiHeadAttention(6, 2, positions="rope")
    with pytest.raises(ValueError, match="rope_base"):
        MultiHeadAttention(8, 2, positions="rope", rope_base=0)
    with pytest.raises(ValueError, match="even"):
        rope_tables(4, 7)
    with pytest.raises(ValueError, match="start"):
        rope_tables(4, 8, start=-1)
    with pytest.raises(ValueError):
        rope_tables(0, 8)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(torch.randn(2, 5, 8), *rope_tables(4, 8))
    with pytest.raises(ValueError, match="even"):
        rotate_half(torch.randn(3, 5))
    with pytest.raises(ValueError):
        alibi_slopes(0)
    with pytest.raises(ValueError, match="start"):
        alibi_bias(2, 5, 3)                       # more queries than keys and no start
    with pytest.raises(ValueError, match="bias"):
        attention_with_weights(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8),
                               bias=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="bias"):
        attention_with_weights(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8),
                               bias=torch.zeros(4, 4, dtype=torch.long))
