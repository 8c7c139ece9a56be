"""lessons_lib.rlhf sections 6-7: DPO's loss, GRPO's advantages and objective, pass@k, against
hand derivations, direct loops and brute force written here."""

import itertools
import math

import pytest
import torch

from lessons_lib.model import GPT, GPTConfig
from lessons_lib.rlhf import (dpo_loss, grpo_losses, group_advantages, no_signal_fraction,
                              pass_at_k, sequence_logprobs)


def logps(*values):
    return torch.tensor(values, dtype=torch.float64)


# -- DPO ----------------------------------------------------------------------

def test_dpo_loss_by_hand():
    # pair 1: policy log-ratios +1 (chosen) and -1 (rejected); pair 2: 0 and +0.5; beta 0.5
    loss, chosen, rejected = dpo_loss(logps(-3.0, -5.0), logps(-6.0, -4.5),
                                      logps(-4.0, -5.0), logps(-5.0, -5.0), beta=0.5)
    assert torch.allclose(chosen, logps(0.5, 0.0)) and torch.allclose(rejected, logps(-0.5, 0.25))
    margins = [0.5 - (-0.5), 0.0 - 0.25]
    expected = sum(math.log(1 + math.exp(-m)) for m in margins) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_dpo_loss_is_ln2_without_preference():
    pc, pr, rc, rr = (torch.randn(7, dtype=torch.float64) for _ in range(4))
    assert dpo_loss(pc, pr, rc, rr, beta=0.0)[0].item() == pytest.approx(math.log(2), abs=1e-12)
    same = torch.randn(7, dtype=torch.float64)             # equal log-ratios for both responses
    assert dpo_loss(rc + same, rr + same, rc, rr, beta=0.3)[0].item() == pytest.approx(math.log(2))


def test_dpo_loss_against_the_published_formula_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(32, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    pc.requires_grad_(True)
    beta = 0.1
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta)
    h = beta * ((pc - rc) - (pr - rr))
    published = torch.log1p(torch.exp(-h)).mean()         # -log sigmoid(h), written out
    assert torch.allclose(loss, published, atol=1e-12)
    loss.backward()
    # d loss / d pc_i = -beta * sigmoid(-h_i) / N: raising a chosen log-prob lowers the loss
    expected = -beta * torch.sigmoid(-h.detach()) / 32
    assert torch.allclose(pc.grad, expected, atol=1e-12) and (pc.grad < 0).all()


def test_dpo_loss_is_stable_for_large_margins():
    loss, _, _ = dpo_loss(logps(0.0), logps(-5000.0), logps(0.0), logps(0.0), beta=1.0)
    assert loss.item() == 0.0
    loss, _, _ = dpo_loss(logps(-5000.0), logps(0.0), logps(0.0), logps(0.0), beta=1.0)
    assert loss.item() == pytest.approx(5000.0)


def test_dpo_loss_rejects_bad_input():
    a = logps(-1.0, -2.0)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(a, logps(-1.0), a, a, 0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, -0.1)
    with pytest.raises(ValueError, match="finite"):
        dpo_loss(logps(float("nan"), 0.0), a, a, a, 0.1)
    with pytest.raises(ValueError, match="floating-point"):
        dpo_loss(torch.tensor([1, 2]), a, a, a, 0.1)
    with pytest.raises(ValueError, match="no pairs"):
        e = torch.zeros(0)
        dpo_loss(e, e, e, e, 0.1)


def test_dpo_on_sequence_logprobs_counts_response_tokens_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=12, n_layer=1, n_head=2, n_embd=8))
    idx = torch.randint(11, (4, 9))
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[:, 5:] = True                                     # prompt of 5 tokens, 4 response tokens
    total = sequence_logprobs(model, idx, mask).sum(1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(idx)[0], dim=-1)
    direct = torch.stack([sum(log_probs[b, t - 1, idx[b, t]] for t in range(5, 9))
                          for b in range(4)])               # response tokens only
    assert torch.allclose(total, direct, atol=1e-5)
    loss, chosen, _ = dpo_loss(total[:2], total[2:], total[:2].detach(), total[2:].detach(), 0.1)
    assert loss.item() == pytest.approx(math.log(2)) and (chosen == 0).all()


# -- GRPO ---------------------------------------------------------------------

def direct_advantages(rewards, group_size, scale_by_std, eps=1e-4):
    out = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out += [(r - mean) / (std + eps) if scale_by_std else r - mean for r in group]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_against_a_loop(scale_by_std):
    g = torch.Generator().manual_seed(1)
    rewards = (torch.rand(24, generator=g, dtype=torch.float64) > 0.5).double()
    rewards[:4] = 1.0                                       # one group all correct
    got = group_advantages(rewards, 4, scale_by_std=scale_by_std)
    assert torch.allclose(got, direct_advantages(rewards, 4, scale_by_std), atol=1e-12)
    assert (got[:4] == 0).all()


def test_no_signal_fraction():
    rewards = torch.tensor([1., 1., 1., 0., 0., 0., 1., 0., 0.5, 0.5, 0.5, 0.5])
    assert no_signal_fraction(rewards, 3) == pytest.approx(3 / 4)
    assert no_signal_fraction(rewards, 6) == 0.0


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([0.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="1 dimension"):
        group_advantages(torch.zeros(2, 4), 4)


def grpo_case(seed=0, B=6, L=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    new = old + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(B, L, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, 2:2 + 1 + b % (L - 2)] = True              # responses of different lengths
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return new, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_grpo_losses_against_a_direct_loop(aggregation):
    new, old, ref, adv, mask = grpo_case()
    clip, beta = 0.2, 0.05
    out = grpo_losses(new, old, adv, mask, ref_logp=ref, kl_coef=beta, clip=clip,
                      aggregation=aggregation)
    per_seq, per_tok, kl_seq, kl_tok, clipped = [], [], [], [], 0
    for b in range(new.shape[0]):
        terms, kls = [], []
        for t in range(new.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(new[b, t] - old[b, t])
            bounded = min(max(ratio, 1 - clip), 1 + clip)
            terms.append(-min(ratio * adv[b].item(), bounded * adv[b].item()))
            q = (ref[b, t] - new[b, t]).item()
            kls.append(math.exp(q) - q - 1)
            clipped += abs(ratio - 1) > clip
        per_seq.append(sum(terms) / len(terms))
        kl_seq.append(sum(kls) / len(kls))
        per_tok += terms
        kl_tok += kls
    if aggregation == "token":
        policy, kl = sum(per_tok) / len(per_tok), sum(kl_tok) / len(kl_tok)
    else:
        policy, kl = sum(per_seq) / len(per_seq), sum(kl_seq) / len(kl_seq)
    assert out.policy_loss.item() == pytest.approx(policy, abs=1e-12)
    assert out.kl.item() == pytest.approx(kl, abs=1e-12)
    assert out.loss.item() == pytest.approx(policy + beta * kl, abs=1e-12)
    assert out.clip_fraction.item() == pytest.approx(clipped / mask.sum().item())


def test_grpo_kl_is_zero_for_the_reference_itself():
    new, old, _, adv, mask = grpo_case(seed=2)
    out = grpo_losses(new, old, adv, mask, ref_logp=new.clone(), kl_coef=0.1)
    assert out.kl.item() == 0.0


def test_a_group_with_equal_rewards_gets_no_gradient():
    new, _, _, _, mask = grpo_case(seed=3, B=8)
    old = new.clone()                                     # ratio 1: no token clipped
    rewards = torch.tensor([1., 1., 1., 1., 0., 1., 0., 0.], dtype=torch.float64)
    adv = group_advantages(rewards, 4)
    new.requires_grad_(True)
    grpo_losses(new, old, adv, mask).loss.backward()
    assert (new.grad[:4] == 0).all()                     # the all-correct group: no signal
    assert (new.grad[4:][mask[4:]] != 0).all()


def test_grpo_losses_reject_bad_input():
    new, old, ref, adv, mask = grpo_case()
    with pytest.raises(ValueError, match="one entry per sequence"):
        grpo_losses(new, old, adv[:3], mask)
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_losses(new, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_losses(new, old, adv, mask, aggregation="batch")
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="empty responses"):
        grpo_losses(new, old, adv, empty)
    with pytest.raises(ValueError, match="finite"):
        grpo_losses(new, old, torch.full_like(adv, float("nan")), mask)


# -- pass@k -------------------------------------------------------------------

@pytest.mark.parametrize("n,c", [(5, 0), (5, 2), (6, 3), (7, 7), (8, 1)])
def test_pass_at_k_against_every_subset(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_large_n_and_bad_input():
    assert pass_at_k(1000, 10, 1) == pytest.approx(0.01)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c \\(correct"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="must be an int"):
        pass_at_k(4.0, 1, 1)
