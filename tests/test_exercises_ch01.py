"""Chapter 1's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch01 import (check_bigram_counts, check_cross_entropy, check_make_batch,
                                        check_numerical_gradient, check_sample_bigram)

# -----------------------------------------------------------------------------
# bigram counts


def counts_right(ids, vocab_size):
    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.long)
    counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.long), accumulate=True)
    return counts


def test_counts_accepts_a_correct_answer(capsys):
    check_bigram_counts(counts_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_counts_accepts_float_counts_from_a_python_loop():
    def loop(ids, vocab_size):
        counts = torch.zeros(vocab_size, vocab_size)
        for a, b in zip(ids[:-1].tolist(), ids[1:].tolist()):
            counts[a, b] += 1
        return counts
    check_bigram_counts(loop)


def test_counts_rejects_a_transposed_table():
    with pytest.raises(CheckFailed, match="transposed"):
        check_bigram_counts(lambda ids, v: counts_right(ids, v).T)


def test_counts_rejects_set_semantics_that_count_a_repeated_pair_once():
    def once(ids, vocab_size):
        return (counts_right(ids, vocab_size) > 0).long()
    with pytest.raises(CheckFailed, match="neighbouring pairs"):
        check_bigram_counts(once)


def test_counts_rejects_a_table_sized_by_the_largest_id():
    def too_small(ids, vocab_size):
        return counts_right(ids, int(ids.max()) + 1)
    with pytest.raises(CheckFailed, match="shape"):
        check_bigram_counts(too_small)


def test_counts_reports_a_crash_with_the_case():
    def crash(ids, vocab_size):
        raise IndexError("boom")
    with pytest.raises(CheckFailed, match=r"check 1 of 4 .* raised IndexError: boom"):
        check_bigram_counts(crash)


def test_checker_refuses_a_called_function():
    with pytest.raises(CheckFailed, match="pass your function itself"):
        check_bigram_counts(counts_right(torch.tensor([0, 1]), 2))


# -----------------------------------------------------------------------------
# cross-entropy


def cross_entropy_right(logits, targets):
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -log_probs[torch.arange(len(targets)), targets].mean()


def test_cross_entropy_accepts_a_stable_answer_and_pytorchs(capsys):
    check_cross_entropy(cross_entropy_right)
    check_cross_entropy(F.cross_entropy)
    assert capsys.readouterr().out.count("all 6 checks passed") == 2


def test_cross_entropy_rejects_a_naive_softmax_that_overflows():
    def naive(logits, targets):
        probs = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
        return -probs[torch.arange(len(targets)), targets].log().mean()
    with pytest.raises(CheckFailed, match=r"large logits.*\n.*got (nan|inf)"):
        check_cross_entropy(naive)


def test_cross_entropy_rejects_log_softmax_over_the_wrong_dimension():
    def wrong_dim(logits, targets):
        return -F.log_softmax(logits, dim=0)[torch.arange(len(targets)), targets].mean()
    with pytest.raises(CheckFailed, match="expected about"):
        check_cross_entropy(wrong_dim)


def test_cross_entropy_rejects_a_sum_and_a_missing_mean():
    with pytest.raises(CheckFailed, match="expected about"):
        check_cross_entropy(lambda lg, t: F.cross_entropy(lg, t, reduction="sum"))
    with pytest.raises(CheckFailed, match="forget to average"):
        check_cross_entropy(lambda lg, t: F.cross_entropy(lg, t, reduction="none"))


def test_cross_entropy_rejects_a_missing_minus_sign():
    with pytest.raises(CheckFailed, match="expected about"):
        check_cross_entropy(lambda lg, t: -cross_entropy_right(lg, t))


# -----------------------------------------------------------------------------
# sampling


def sample_right(probs, start, num_tokens, generator):
    out, current = [], start
    for _ in range(num_tokens):
        current = torch.multinomial(probs[current], 1, generator=generator).item()
        out.append(current)
    return out


def test_sampling_accepts_a_correct_answer_as_list_or_tensor(capsys):
    check_sample_bigram(sample_right)
    check_sample_bigram(lambda *args: torch.tensor(sample_right(*args), dtype=torch.long))
    assert capsys.readouterr().out.count("all 4 checks passed") == 2


def test_sampling_rejects_reading_columns():
    def columns(probs, start, num_tokens, generator):
        return sample_right(probs.T.contiguous(), start, num_tokens, generator)
    with pytest.raises(CheckFailed, match="column instead of a row"):
        check_sample_bigram(columns)


def test_sampling_rejects_greedy_argmax():
    def greedy(probs, start, num_tokens, generator):
        out, current = [], start
        for _ in range(num_tokens):
            current = int(probs[current].argmax())
            out.append(current)
        return out
    with pytest.raises(CheckFailed, match="argmax"):
        check_sample_bigram(greedy)


def test_sampling_rejects_including_the_start_token():
    with pytest.raises(CheckFailed, match="do not include the start token"):
        check_sample_bigram(lambda p, s, n, g: [s] + sample_right(p, s, n, g))


def test_sampling_rejects_ignoring_the_generator():
    def unseeded(probs, start, num_tokens, generator):
        return sample_right(probs, start, num_tokens, None)
    with pytest.raises(CheckFailed, match="generator=generator"):
        check_sample_bigram(unseeded)


def test_sampling_rejects_uniform_draws_that_ignore_the_table():
    def uniform(probs, start, num_tokens, generator):
        return torch.randint(len(probs), (num_tokens,), generator=generator).tolist()
    with pytest.raises(CheckFailed):
        check_sample_bigram(uniform)


# -----------------------------------------------------------------------------
# batches


def make_batch_right(data, starts, block_size):
    offsets = torch.arange(block_size)
    return data[starts[:, None] + offsets], data[starts[:, None] + offsets + 1]


def test_make_batch_accepts_a_correct_answer(capsys):
    check_make_batch(make_batch_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_make_batch_rejects_unshifted_targets():
    with pytest.raises(CheckFailed, match="targets equal the inputs"):
        check_make_batch(lambda d, s, b: (make_batch_right(d, s, b)[0],) * 2)


def test_make_batch_rejects_targets_one_token_short():
    def short(data, starts, block_size):
        inputs = torch.stack([data[s:s + block_size] for s in starts.tolist()])
        targets = torch.stack([data[s + 1:s + block_size] for s in starts.tolist()])
        return inputs, targets
    with pytest.raises(CheckFailed, match="targets of shape"):
        check_make_batch(short)


def test_make_batch_rejects_windows_stacked_as_columns():
    def columns(data, starts, block_size):
        inputs, targets = make_batch_right(data, starts, block_size)
        return inputs.T, targets.T
    with pytest.raises(CheckFailed, match="rows are windows"):
        check_make_batch(columns)


def test_make_batch_rejects_targets_shifted_the_wrong_way():
    def backwards(data, starts, block_size):
        inputs, _ = make_batch_right(data, starts, block_size)
        return inputs, data[(starts[:, None] + torch.arange(block_size) - 1).clamp_min(0)]
    with pytest.raises(CheckFailed, match="inputs are right but the targets are not"):
        check_make_batch(backwards)


# -----------------------------------------------------------------------------
# a gradient by finite differences


def numerical_gradient_right(f, x, h=1e-6):
    grad = torch.zeros_like(x)
    for k in range(x.numel()):
        up, down = x.clone(), x.clone()
        up.view(-1)[k] += h
        down.view(-1)[k] -= h
        grad.view(-1)[k] = (f(up) - f(down)) / (2 * h)
    return grad


def test_numerical_gradient_accepts_a_correct_answer(capsys):
    check_numerical_gradient(numerical_gradient_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_numerical_gradient_accepts_nudging_in_place_and_restoring():
    def in_place(f, x, h=1e-6):
        grad = torch.empty_like(x)
        flat = x.view(-1)
        for k in range(x.numel()):
            saved = flat[k].item()
            flat[k] = saved + h
            up = f(x).item()
            flat[k] = saved - h
            down = f(x).item()
            flat[k] = saved
            grad.view(-1)[k] = (up - down) / (2 * h)
        return grad
    check_numerical_gradient(in_place)


def test_numerical_gradient_rejects_a_one_sided_difference():
    def one_sided(f, x, h=1e-6):
        grad = torch.zeros_like(x)
        for k in range(x.numel()):
            up = x.clone()
            up.view(-1)[k] += h
            grad.view(-1)[k] = (f(up) - f(x)) / h
        return grad
    with pytest.raises(CheckFailed, match=r"h=1e-3(.|\n)*central difference"):
        check_numerical_gradient(one_sided)


def test_numerical_gradient_rejects_forgetting_the_two():
    with pytest.raises(CheckFailed, match=r"values differ"):
        check_numerical_gradient(lambda f, x, h=1e-6: 2 * numerical_gradient_right(f, x, h))


def test_numerical_gradient_rejects_changing_x():
    def drifts(f, x, h=1e-6):
        grad = torch.zeros_like(x)
        flat = x.view(-1)
        for k in range(x.numel()):
            flat[k] += h
            up = f(x)
            flat[k] -= 2 * h                 # never moved back up
            grad.view(-1)[k] = (up - f(x)) / (2 * h)
        return grad
    with pytest.raises(CheckFailed, match="changed the x it was given") as info:
        check_numerical_gradient(drifts)
    assert "To rerun this case: x = torch.tensor" in str(info.value)


def test_numerical_gradient_rejects_a_flat_answer_for_a_2d_x():
    def flat(f, x, h=1e-6):
        return numerical_gradient_right(f, x, h).flatten()
    with pytest.raises(CheckFailed, match=r"expected shape \(3, 4\), got shape \(12,\)"):
        check_numerical_gradient(flat)


# -----------------------------------------------------------------------------
# shared behaviour: rebuild lines, chained tracebacks


def test_a_failing_random_case_prints_a_line_that_rebuilds_it():
    def wrong_on_long_input(ids, vocab_size):
        counts = counts_right(ids, vocab_size)
        if len(ids) > 100:
            counts[0, 0] += 1
        return counts
    with pytest.raises(CheckFailed, match="To rerun this case") as info:
        check_bigram_counts(wrong_on_long_input)
    line = str(info.value).split("To rerun this case: ")[1].split("\n")[0]
    scope = {"torch": torch}
    exec(line, scope)
    assert scope["vocab_size"] == 7 and len(scope["ids"]) == 500


@pytest.mark.parametrize("checker, answer", [
    (check_bigram_counts, lambda ids, v: counts_right(ids, v)),
    (check_cross_entropy, cross_entropy_right),
    (check_sample_bigram, sample_right),
    (check_make_batch, make_batch_right),
    (check_numerical_gradient, numerical_gradient_right),
])
def test_every_rebuild_line_rebuilds_its_case(checker, answer, monkeypatch):
    import lessons_lib.exercises.ch01 as ch01
    seen = []
    original = ch01.run_cases

    def spy(name, fn, cases):
        seen.extend(cases)
        return original(name, fn, cases)
    monkeypatch.setattr(ch01, "run_cases", spy)
    checker(answer)
    for case in (c for c in seen if c.rebuild):
        scope = {"torch": torch, "F": F}
        exec(case.rebuild, scope)
        rebuilt = [v for k, v in scope.items() if isinstance(v, torch.Tensor)]
        given = [a for a in case.args if isinstance(a, torch.Tensor)]
        assert any(torch.equal(r, given[0]) for r in rebuilt), case.description


def test_a_raising_function_keeps_its_traceback():
    def crash(f, x, h=1e-6):
        raise ZeroDivisionError("oops")
    with pytest.raises(CheckFailed) as info:
        check_numerical_gradient(crash)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
