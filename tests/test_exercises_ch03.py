"""Chapter 03's checkers accept a correct solution and reject plausible wrong answers."""

import math

import pytest
import torch

from lessons_lib.attention import causal_mask, attention_with_weights
from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch03 import (check_attention, check_attention_entropy, check_causal_mask,
                                        check_softmax)


# ----------------------------------------------------------------------------- softmax

def stable_softmax(x):
    x = x - x.amax(dim=-1, keepdim=True)
    e = x.exp()
    return e / e.sum(dim=-1, keepdim=True)


def naive_softmax(x):
    e = x.exp()
    return e / e.sum(dim=-1, keepdim=True)


def softmax_wrong_dim(x):
    return torch.softmax(x, dim=0)


def test_softmax_accepts_solution(capsys):
    check_softmax(stable_softmax)
    check_softmax(lambda x: torch.softmax(x, dim=-1))
    assert "all 6 checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, words", [(naive_softmax, "maximum"), (softmax_wrong_dim, "LAST")])
def test_softmax_rejects_wrong(wrong, words):
    with pytest.raises(CheckFailed, match=words):
        check_softmax(wrong)


def test_softmax_rejects_a_non_function():
    with pytest.raises(CheckFailed, match="without calling it"):
        check_softmax(stable_softmax(torch.zeros(3)))


# ----------------------------------------------------------------------------- causal mask

def test_causal_mask_accepts_solution(capsys):
    check_causal_mask(lambda T: torch.ones(T, T, dtype=torch.bool).tril())
    check_causal_mask(causal_mask)
    assert "all 4 checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, words", [
    (lambda T: torch.ones(T, T).tril(), "dtype torch.bool"),                              # float mask
    (lambda T: ~torch.ones(T, T, dtype=torch.bool).tril(), "inverted"),                   # wrong convention
    (lambda T: torch.ones(T, T, dtype=torch.bool).triu(), "transposed"),                  # future, not past
    (lambda T: torch.ones(T, T, dtype=torch.bool).tril(diagonal=-1), "diagonal"),         # cannot see itself
    (lambda T: torch.ones(T, T + 1, dtype=torch.bool).tril(), "shape"),
])
def test_causal_mask_rejects_wrong(wrong, words):
    with pytest.raises(CheckFailed, match=words):
        check_causal_mask(wrong)


# ----------------------------------------------------------------------------- attention

def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


def attention_by_d_k(q, k, v, mask=None):              # divides by d_k, not its square root
    scores = q @ k.transpose(-2, -1) / q.shape[-1]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


def attention_inverted_mask(q, k, v, mask=None):       # treats True as "blocked"
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


def attention_naive_softmax(q, k, v, mask=None):       # exp() overflows on large scores
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = naive_softmax(scores)
    return weights @ v, weights


def attention_output_only(q, k, v, mask=None):
    return attention(q, k, v, mask)[0]


def attention_k_T(q, k, v, mask=None):                 # swaps the wrong dimensions of k
    weights = torch.softmax(q @ k.transpose(0, 1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v, weights


def test_attention_accepts_solutions(capsys):
    check_attention(attention)
    check_attention(attention_with_weights)
    assert capsys.readouterr().out.count("all 5 checks passed") == 2


@pytest.mark.parametrize("wrong, words", [
    (attention_by_d_k, "divided the scores by d_k"),
    (attention_inverted_mask, "mask is inverted"),
    (attention_naive_softmax, "nan"),
    (attention_output_only, "tuple"),
    (attention_k_T, "transpose"),
])
def test_attention_rejects_wrong(wrong, words):
    with pytest.raises(CheckFailed, match=words):
        check_attention(wrong)


# ----------------------------------------------------------------------------- entropy

def entropy(w):
    return -torch.special.xlogy(w, w).sum(dim=-1)


def entropy_naive(w):                                  # 0 * log(0) = nan
    return -(w * w.log()).sum(dim=-1)


def entropy_total(w):                                  # one number for the whole tensor
    return -torch.special.xlogy(w, w).sum()


def entropy_bits(w):                                   # log base 2 instead of nats
    return -(torch.special.xlogy(w, w) / math.log(2)).sum(dim=-1)


def test_entropy_accepts_solution(capsys):
    check_attention_entropy(entropy)
    assert "all 5 checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, words", [
    (entropy_naive, "0 \\* log\\(0\\)"),
    (entropy_total, "shape"),
    (entropy_bits, "expected about|differ"),
])
def test_entropy_rejects_wrong(wrong, words):
    with pytest.raises(CheckFailed, match=words):
        check_attention_entropy(wrong)


# ----------------------------------------------------------------------------- debugging help

def _rerun_line(err) -> str:
    import re
    return re.search(r"To rerun this case: (.*)", str(err.value)).group(1)


def test_failing_random_attention_case_can_be_rebuilt():
    with pytest.raises(CheckFailed) as err:
        check_attention(attention_k_T)                 # fails on the batched random case
    scope = {"torch": torch}
    exec(_rerun_line(err), scope)
    q, k, v = scope["q"], scope["k"], scope["v"]
    assert q.shape == (2, 3, 4, 8) and k.shape == (2, 3, 6, 8) and v.shape == (2, 3, 6, 5)
    want_out, want_w = attention(q, k, v)
    with pytest.raises(Exception):                     # the wrong answer fails on it by hand too
        got_out, got_w = attention_k_T(q, k, v)
        assert torch.allclose(got_w, want_w)


def test_masked_case_rebuild_includes_the_mask():
    with pytest.raises(CheckFailed) as err:
        check_attention(attention_inverted_mask)
    scope = {"torch": torch}
    exec(_rerun_line(err), scope)
    assert torch.equal(scope["mask"], causal_mask(5))
    out, w = attention(scope["q"], scope["k"], scope["v"], scope["mask"])
    assert not torch.allclose(attention_inverted_mask(scope["q"], scope["k"], scope["v"], scope["mask"])[1],
                              w, equal_nan=True)


def test_random_softmax_case_rebuilds_its_input():
    with pytest.raises(CheckFailed) as err:
        check_softmax(softmax_wrong_dim)
    scope = {"torch": torch}
    exec(_rerun_line(err), scope)
    assert scope["x"].shape == (4, 6)
    assert not torch.allclose(softmax_wrong_dim(scope["x"]), stable_softmax(scope["x"]))


def test_random_entropy_case_rebuilds_its_input():
    def wrong_on_3d(w):                                # right except on 3-D input
        return entropy(w) if w.dim() < 3 else entropy(w) * 2
    with pytest.raises(CheckFailed, match="random") as err:
        check_attention_entropy(wrong_on_3d)
    scope = {"torch": torch}
    exec(_rerun_line(err), scope)
    assert torch.allclose(scope["weights"].sum(-1), torch.ones(3, 4))


def test_a_raising_learner_function_keeps_its_traceback():
    def broken(x):
        raise KeyError("my bug")
    with pytest.raises(CheckFailed, match="raised KeyError") as err:
        check_softmax(broken)
    assert isinstance(err.value.__cause__, KeyError)
