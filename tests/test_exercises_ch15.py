"""Chapter 15's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.beyond import linear_attention_recurrent, load_balancing_loss, patchify
from lessons_lib.beyond import selective_scan
from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch15 import (check_linear_attention_recurrent,
                                        check_load_balancing_loss, check_patchify,
                                        check_selective_scan)

# -----------------------------------------------------------------------------
# linear attention as a recurrence


def linear_variant(feature=True, normalise=True, causal=True, add_first=True):
    def fn(q, k, v):
        phi = (lambda x: F.elu(x) + 1) if feature else (lambda x: x)
        fq, fk = phi(q), phi(k)
        T, d = q.shape
        if not causal:
            S, z = fk.T @ v, fk.sum(0)
        else:
            S, z = torch.zeros(d, v.shape[1]), torch.zeros(d)
        out = []
        for t in range(T):
            if causal and add_first:
                S, z = S + torch.outer(fk[t], v[t]), z + fk[t]
            num = fq[t] @ S
            out.append(num / (fq[t] @ z) if normalise else num)
            if causal and not add_first:
                S, z = S + torch.outer(fk[t], v[t]), z + fk[t]
        return torch.stack(out)
    return fn


def test_linear_accepts_a_correct_answer_and_the_library(capsys):
    check_linear_attention_recurrent(linear_variant())
    check_linear_attention_recurrent(
        lambda q, k, v: linear_attention_recurrent(q[None, None], k[None, None], v[None, None])[0, 0])
    assert capsys.readouterr().out.count("all 5 checks passed") == 2


@pytest.mark.parametrize("variant,message", [
    (dict(feature=False), "feature map"),
    (dict(normalise=False), "not normalised"),
    (dict(causal=False), "every key"),
    (dict(add_first=False), "leaves out its own key"),
])
def test_linear_rejects_slips(variant, message):
    with pytest.raises(CheckFailed, match=message):
        check_linear_attention_recurrent(linear_variant(**variant))


def test_linear_rejects_a_wrong_shape():
    with pytest.raises(CheckFailed, match="expected shape"):
        check_linear_attention_recurrent(lambda q, k, v: linear_variant()(q, k, v).T)


# -----------------------------------------------------------------------------
# selective scan


def scan_variant(decay="exp", step_input=True, read_first=False):
    def fn(x, delta, A, B, C):
        T, ch = x.shape
        h = torch.zeros(ch, A.shape[1])
        ys = []
        for t in range(T):
            d = delta[t, :, None]
            if decay == "exp":
                a = torch.exp(d * A)
            elif decay == "no_delta":
                a = torch.exp(A)
            else:
                a = 1 + d * A
            if read_first:
                ys.append(h @ C[t])
            h = a * h + (d if step_input else 1.0) * B[t] * x[t, :, None]
            if not read_first:
                ys.append(h @ C[t])
        return torch.stack(ys)
    return fn


def test_scan_accepts_a_correct_answer_and_the_library(capsys):
    check_selective_scan(scan_variant())
    check_selective_scan(lambda x, delta, A, B, C: selective_scan(
        x[None], delta[None], A, B[None], C[None])[0])
    assert capsys.readouterr().out.count("all 4 checks passed") == 2


@pytest.mark.parametrize("variant,message", [
    (dict(decay="no_delta"), r"decay is exp\(A\)"),
    (dict(step_input=False), "input enters as"),
    (dict(decay="euler"), "Euler"),
    (dict(read_first=True), "before the update"),
])
def test_scan_rejects_slips(variant, message):
    with pytest.raises(CheckFailed, match=message):
        check_selective_scan(scan_variant(**variant))


def test_scan_keeps_the_learners_traceback():
    def broken(x, delta, A, B, C):
        return x.scan()
    with pytest.raises(CheckFailed, match="raised AttributeError") as info:
        check_selective_scan(broken)
    assert isinstance(info.value.__cause__, AttributeError)


# -----------------------------------------------------------------------------
# load-balancing loss


def balance_variant(kind="right"):
    def fn(router_probs, expert_index, n_experts):
        counts = torch.bincount(expert_index.flatten(), minlength=n_experts).float()
        f = counts / expert_index.numel()
        P = router_probs.mean(0)
        if kind == "no_factor":
            return (f * P).sum()
        if kind == "f_twice":
            return n_experts * (f * f).sum()
        if kind == "P_twice":
            return n_experts * (P * P).sum()
        if kind == "counts":
            return n_experts * (counts * P).sum()
        if kind == "per_token":
            return n_experts * (counts / expert_index.shape[0] * P).sum()
        if kind == "float":
            return (n_experts * (f * P).sum()).item()
        if kind == "max_prob":
            return n_experts * (f * router_probs.max(-1).values.mean()).sum()
        return n_experts * (f * P).sum()
    return fn


def test_balance_accepts_a_correct_answer_and_the_library(capsys):
    check_load_balancing_loss(balance_variant())
    check_load_balancing_loss(load_balancing_loss)
    assert capsys.readouterr().out.count("all 5 checks passed") == 2


@pytest.mark.parametrize("kind,message", [
    ("no_factor", "factor n_experts is missing"),
    ("f_twice", "uses the shares f twice"),
    ("P_twice", "probabilities P twice"),
    ("counts", "f holds counts"),
    ("per_token", "share of the assignments"),
    ("float", "carries the gradient"),
    ("max_prob", "expected about"),
])
def test_balance_rejects_slips(kind, message):
    with pytest.raises(CheckFailed, match=message):
        check_load_balancing_loss(balance_variant(kind))


def test_balance_rejects_a_non_function():
    with pytest.raises(CheckFailed, match="pass your function itself"):
        check_load_balancing_loss(1.0)


# -----------------------------------------------------------------------------
# patchify


def patch_variant(kind="right"):
    def fn(images, patch):
        b, H, W = images.shape
        p = patch
        if kind == "reshape":
            return images.reshape(b, (H // p) * (W // p), p * p)
        x = images.reshape(b, H // p, p, W // p, p)
        if kind == "patch_columns":
            x = x.permute(0, 3, 1, 2, 4)
        elif kind == "pixel_columns":
            x = x.permute(0, 1, 3, 4, 2)
        else:
            x = x.permute(0, 1, 3, 2, 4)
        return x.reshape(b, (H // p) * (W // p), p * p)
    return fn


def test_patchify_accepts_a_correct_answer_and_the_library(capsys):
    check_patchify(patch_variant())
    check_patchify(patchify)
    assert capsys.readouterr().out.count("all 4 checks passed") == 2


@pytest.mark.parametrize("kind,message", [
    ("reshape", "plain reshape"),
    ("patch_columns", "patches come column by column"),
    ("pixel_columns", "pixels of each patch"),
])
def test_patchify_rejects_slips(kind, message):
    with pytest.raises(CheckFailed, match=message):
        check_patchify(patch_variant(kind))
