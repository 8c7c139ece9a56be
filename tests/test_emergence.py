"""lessons_lib.emergence: task generators checked element by element against direct loops,
attention scores against hand-built attention matrices and loops, head ablation against a
model whose output projection is edited by hand, scoring against direct counts; bad input."""

import math

import pytest
import torch

from lessons_lib.attention import MultiHeadAttention
from lessons_lib.emergence import (PARITY_EQUALS, PARITY_PAD, AttentionOnlyConfig,
                                   AttentionOnlyTransformer, ablate_heads, attention_to,
                                   induction_score, key_value_prompts, parity_sequences,
                                   previous_token_score, repeat_loss, repeated_spans,
                                   token_and_exact_match)
from lessons_lib.model import GPT, GPTConfig


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# repeated spans

def test_repeated_spans_copy_a_span_and_mark_the_copyable_positions():
    b = repeated_spans(200, 32, 64, 4, 15, gen(0))
    assert b.inputs.shape == b.targets.shape == (200, 32)
    seq = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
    assert torch.equal(seq[:, 1:-1], b.targets[:, :-1])
    for i in range(200):
        f, s, L = int(b.first[i]), int(b.second[i]), int(b.length[i])
        assert 4 <= L <= 15 and f + L <= s and s + L <= 33
        assert seq[i, f:f + L].tolist() == seq[i, s:s + L].tolist()
        for t in range(32):
            copyable = s <= t and t + 1 < s + L
            assert bool(b.repeat_mask[i, t]) == copyable
            if copyable:
                key = int(b.induction_key[i, t])
                assert key == t - (s - f) + 1
                # the key holds the token after the earlier occurrence of the current token
                assert seq[i, key - 1] == seq[i, t] and seq[i, key] == seq[i, t + 1]
            else:
                assert int(b.induction_key[i, t]) == -1
    # lengths and places vary (no fixed layout to learn)
    assert len(set(b.length.tolist())) >= 10 and len(set(b.second.tolist())) >= 10


def test_repeated_spans_is_seeded_and_rejects_bad_input():
    a, b = repeated_spans(4, 32, 64, 4, 15, gen(3)), repeated_spans(4, 32, 64, 4, 15, gen(3))
    assert torch.equal(a.inputs, b.inputs)
    with pytest.raises(ValueError, match="do not fit"):
        repeated_spans(4, 20, 64, 4, 15)
    with pytest.raises(ValueError, match="min_span"):
        repeated_spans(4, 32, 64, 9, 5)
    with pytest.raises(ValueError, match="positive int"):
        repeated_spans(0, 32, 64, 4, 15)
    with pytest.raises(ValueError, match="generator"):
        repeated_spans(4, 32, 64, 4, 15, generator=3)


# -----------------------------------------------------------------------------
# parity

def _parity_reference(bits, scratchpad):
    """One string, written out token by token."""
    tokens, targets, running = [], [], 0
    for b in bits:
        running ^= b
        tokens.append(b)
        targets.append(False)
        if scratchpad:
            tokens.append(running)
            targets.append(True)
    tokens += [PARITY_EQUALS, running]
    targets += [False, True]
    return tokens, targets


@pytest.mark.parametrize("scratchpad", [False, True])
def test_parity_sequences_match_a_direct_construction(scratchpad):
    g = gen(1)
    bits = torch.randint(2, (30, 12), generator=g)
    lengths = torch.randint(1, 13, (30,), generator=g)
    inputs, targets = parity_sequences(bits, lengths, scratchpad)
    for i in range(30):
        tokens, is_target = _parity_reference(bits[i, :lengths[i]].tolist(), scratchpad)
        n = len(tokens)
        assert inputs[i, :n - 1].tolist() == tokens[:-1]
        if n - 1 < inputs.shape[1]:                  # shorter than the longest: padded
            assert inputs[i, n - 1] == tokens[-1] and (inputs[i, n:] == PARITY_PAD).all()
        want = [t if m else -100 for t, m in zip(tokens[1:], is_target[1:])]
        assert targets[i, :n - 1].tolist() == want
        assert (targets[i, n - 1:] == -100).all()
    assert inputs.shape[1] == max(len(_parity_reference([0] * int(n), scratchpad)[0])
                                  for n in lengths) - 1


def test_parity_sequences_reject_bad_input():
    with pytest.raises(ValueError, match="only 0 and 1"):
        parity_sequences(torch.tensor([[0, 2]]), torch.tensor([2]), True)
    with pytest.raises(ValueError, match="lengths must lie"):
        parity_sequences(torch.tensor([[0, 1]]), torch.tensor([3]), True)
    with pytest.raises(ValueError, match="one entry per string"):
        parity_sequences(torch.tensor([[0, 1]]), torch.tensor([1, 2]), True)
    with pytest.raises(ValueError, match="integer"):
        parity_sequences(torch.tensor([[0.0, 1.0]]), torch.tensor([2]), True)


# -----------------------------------------------------------------------------
# key -> value prompts

def test_key_value_prompts_follow_one_mapping_per_sequence():
    n_keys, n_values, k = 8, 8, 5
    b = key_value_prompts(300, k, n_keys, n_values, gen(2))
    seq = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
    assert seq.shape == (300, 2 * k + 3)
    for i in range(300):
        s = seq[i].tolist()
        pairs = list(zip(s[0:2 * k:2], s[1:2 * k:2]))
        assert all(0 <= key < n_keys and n_keys <= v < n_keys + n_values for key, v in pairs)
        seen = {}
        for key, v in pairs:                      # one mapping: a repeated key keeps its value
            assert seen.setdefault(key, v) == v
        assert s[2 * k] == n_keys + n_values       # the Q token
        query, answer = s[2 * k + 1], s[2 * k + 2]
        assert bool(b.key_in_context[i]) == (query in seen)
        if query in seen:
            assert answer == seen[query]
        want = [-100] * (2 * k + 2)
        for j in range(k):
            want[2 * j] = s[2 * j + 1]
        want[-1] = answer
        assert b.targets[i].tolist() == want
        keys = s[0:2 * k:2]
        determined = [False] * (2 * k + 2)
        for j in range(k):
            determined[2 * j] = keys[j] in keys[:j]
        determined[-1] = query in seen
        assert b.predictable[i].tolist() == determined
    assert 0.3 < b.key_in_context.float().mean() < 0.7


def test_key_value_prompts_can_choose_where_the_query_comes_from():
    inside = key_value_prompts(100, 3, 8, 8, gen(0), query_in_context=True)
    outside = key_value_prompts(100, 3, 8, 8, gen(0), query_in_context=False)
    assert inside.key_in_context.all() and not outside.key_in_context.any()
    with pytest.raises(ValueError, match="no key is left"):
        key_value_prompts(4, 8, 8, 8, query_in_context=False)
    with pytest.raises(ValueError, match="positive int"):
        key_value_prompts(4, 0, 8, 8)


# -----------------------------------------------------------------------------
# attention scores

def test_attention_to_and_the_two_scores_match_loops():
    g = gen(4)
    weights = torch.rand(3, 2, 6, 6, generator=g).tril()
    weights = weights / weights.sum(-1, keepdim=True)
    key = torch.randint(-1, 6, (3, 6), generator=g)
    key[0, 0] = 2
    key = torch.minimum(key, torch.arange(6))          # causal: a key at or before its query
    got = attention_to(weights, key)
    for h in range(2):
        picked = [weights[b, h, t, key[b, t]].item() for b in range(3) for t in range(6)
                  if key[b, t] >= 0]
        assert math.isclose(got[h].item(), sum(picked) / len(picked), rel_tol=1e-6)
    prev = previous_token_score(weights)
    for h in range(2):
        want = sum(weights[b, h, t, t - 1].item() for b in range(3) for t in range(1, 6)) / 15
        assert math.isclose(prev[h].item(), want, rel_tol=1e-6)
    assert torch.allclose(induction_score(weights, key), got)
    one = attention_to(weights[:, 0], key)
    assert one.dim() == 0 and math.isclose(one.item(), got[0].item(), rel_tol=1e-6)


def test_perfect_heads_score_one():
    T = 10
    shifted = torch.zeros(T, T)
    shifted[0, 0] = 1.0
    shifted[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    assert previous_token_score(shifted).item() == pytest.approx(1.0)
    b = repeated_spans(5, 32, 64, 4, 15, gen(5))
    perfect = torch.zeros(5, 1, 32, 32)
    for i in range(5):
        for t in range(32):
            perfect[i, 0, t, int(b.induction_key[i, t]) if b.induction_key[i, t] >= 0 else 0] = 1
    assert induction_score(perfect, b.induction_key).item() == pytest.approx(1.0)
    uniform = torch.ones(5, 1, 32, 32).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    assert induction_score(uniform, b.induction_key).item() < 0.2


def test_attention_scores_reject_bad_input():
    w = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="T, T"):
        attention_to(torch.rand(2, 4, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="key must have shape"):
        attention_to(w, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no query"):
        attention_to(w, torch.full((2, 4), -1))
    with pytest.raises(ValueError, match="below T"):
        attention_to(w, torch.full((2, 4), 4))
    with pytest.raises(ValueError, match="at least 2 positions"):
        previous_token_score(torch.ones(1, 1, 1, 1))


# -----------------------------------------------------------------------------
# the attention-only model and head ablation

def test_attention_only_model_returns_causal_weights_and_the_loss():
    torch.manual_seed(0)
    model = AttentionOnlyTransformer(AttentionOnlyConfig(vocab_size=10, block_size=8, n_layer=2,
                                                         n_head=2, n_embd=16))
    idx = torch.randint(10, (3, 8))
    logits, loss, weights = model(idx, idx, return_weights=True)
    assert logits.shape == (3, 8, 10) and len(weights) == 2
    assert torch.allclose(model(idx)[0], logits, atol=1e-6)        # the fused path agrees
    for w in weights:
        assert w.shape == (3, 2, 8, 8)
        assert torch.allclose(w.sum(-1), torch.ones(3, 2, 8), atol=1e-6)
        assert (w.triu(1) == 0).all()
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), idx.reshape(-1))
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-6)
    # causal: changing the last token leaves the earlier logits alone
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 10
    assert torch.allclose(model(changed)[0][:, :-1], logits[:, :-1], atol=1e-6)
    assert not any(isinstance(m, torch.nn.GELU) for m in model.modules())   # no MLPs
    with pytest.raises(ValueError, match="lie in"):
        model(torch.full((1, 4), 10))
    with pytest.raises(ValueError, match="divisible"):
        AttentionOnlyConfig(n_embd=10, n_head=3)


def test_ablating_a_head_equals_zeroing_its_slice_of_the_output_projection():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=12, block_size=8, n_layer=2, n_head=4, n_embd=16))
    idx = torch.randint(12, (2, 8))
    before = model(idx)[0]
    with ablate_heads(model, {1: [2], 0: [0, 3]}):
        ablated = model(idx)[0]
    assert torch.allclose(model(idx)[0], before)                    # hooks removed on exit
    assert not torch.allclose(ablated, before)
    edited = GPT(model.config)
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():                     # the reference: the heads' columns of W^O zeroed
        for layer, heads in ((1, [2]), (0, [0, 3])):
            for h in heads:
                edited.h[layer].attn.c_proj.weight[:, h * 4:(h + 1) * 4] = 0
    assert torch.allclose(edited(idx)[0], ablated, atol=1e-6)


def test_ablate_heads_rejects_bad_input_and_cleans_up_on_errors():
    model = GPT(GPTConfig(vocab_size=12, block_size=8, n_layer=2, n_head=4, n_embd=16))
    with pytest.raises(ValueError, match="layer must be in"):
        with ablate_heads(model, {2: [0]}):
            pass
    with pytest.raises(ValueError, match="heads of layer 0"):
        with ablate_heads(model, {1: [0], 0: [4]}):
            pass
    attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert all(not a.c_proj._forward_pre_hooks for a in attns)
    with pytest.raises(RuntimeError):
        with ablate_heads(model, {0: [1]}):
            raise RuntimeError("inside")
    assert all(not a.c_proj._forward_pre_hooks for a in attns)


# -----------------------------------------------------------------------------
# scoring

def test_token_and_exact_match_count_directly():
    g = gen(6)
    logits = torch.randn(50, 7, 3, generator=g)
    targets = torch.randint(3, (50, 7), generator=g)
    targets[:, :2] = -100
    targets[::3, 4] = -100
    per_token, exact = token_and_exact_match(logits, targets)
    pred = logits.argmax(-1).tolist()
    right = total = whole = 0
    for i in range(50):
        ok = True
        for t in range(7):
            if targets[i, t] != -100:
                total += 1
                right += pred[i][t] == targets[i, t]
                ok = ok and pred[i][t] == targets[i, t]
        whole += ok
    assert math.isclose(per_token.item(), right / total, rel_tol=1e-6)
    assert math.isclose(exact.item(), whole / 50, rel_tol=1e-6)
    with pytest.raises(ValueError, match="at least one target"):
        token_and_exact_match(logits, torch.full((50, 7), -100))
    with pytest.raises(ValueError, match="targets must have shape"):
        token_and_exact_match(logits, targets[:, :3])


def test_repeat_loss_scores_only_the_copyable_positions():
    torch.manual_seed(2)
    model = AttentionOnlyTransformer(AttentionOnlyConfig(vocab_size=64, block_size=32, n_layer=1,
                                                         n_head=2, n_embd=16))
    b = repeated_spans(8, 32, 64, 4, 15, gen(7))
    logits = model(b.inputs)[0]
    logp = torch.log_softmax(logits, -1)
    picked = [-logp[i, t, b.targets[i, t]].item() for i in range(8) for t in range(32)
              if b.repeat_mask[i, t]]
    assert math.isclose(repeat_loss(model, b), sum(picked) / len(picked), rel_tol=1e-5)
    assert model.training                                             # mode restored
