"""lessons_lib.rlhf (dpo, grpo, evaluation): DPO's loss, GRPO's advantages and objective, pass@k, against
hand derivations, direct loops and brute force written here."""

import copy
import dataclasses
import itertools
import math
import time

import pytest
import torch

from lessons_lib.model import GPT, GPTConfig
from lessons_lib.rlhf import (DPOConfig, GRPOConfig, PolicyWithValue, best_and_worst,
                              dpo_implicit_accuracy, dpo_loss, grpo_losses, group_advantages,
                              mean_pass_at_k, no_signal_fraction, pass_at_k, train_dpo,
                              train_grpo)
from lessons_lib.scoring import encode_responses, sequence_logprobs


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


def test_grpo_kl_stays_finite_far_from_the_reference():
    # a policy that has all but ruled out tokens the reference likes: q = ref - new = 200
    # nats, and exp(200) overflows float32; k3 is clamped at q = 20
    new, old, _, adv, mask = grpo_case(seed=4)
    new, old, adv = new.float(), old.float(), adv.float()
    far = grpo_losses(new, old, adv, mask, ref_logp=new + 200.0 * mask, kl_coef=0.1)
    edge = grpo_losses(new, old, adv, mask, ref_logp=new + 20.0 * mask, kl_coef=0.1)
    assert math.isfinite(far.loss.item())
    assert far.kl.item() == edge.kl.item() == pytest.approx(math.exp(20.0) - 21.0, rel=1e-5)


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


# -- the DPO trainer ----------------------------------------------------------

def tiny_gpt(seed=0, vocab_size=11):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=12, n_layer=1, n_head=2, n_embd=16,
                         dropout=0.0))


def random_pairs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(11, (n, 3), generator=g).tolist()
    chosen = torch.randint(11, (n, 4), generator=g).tolist()
    rejected = torch.randint(11, (n, 3), generator=g).tolist()
    return (*encode_responses(prompts, chosen, pad_id=0),
            *encode_responses(prompts, rejected, pad_id=0))


def test_best_and_worst_pairs_each_groups_extremes():
    scores = torch.tensor([0.1, 0.9, 0.5, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0])
    chosen, rejected = best_and_worst(scores, 3)
    assert chosen.tolist() == [1, 7] and rejected.tolist() == [0, 6]     # group 2: a tie


def test_train_dpo_learns_the_preferences_and_leaves_the_reference_alone():
    reference = tiny_gpt()
    policy = copy.deepcopy(reference)
    pairs = random_pairs()
    ref_weights = {k: v.clone() for k, v in reference.state_dict().items()}
    assert dpo_implicit_accuracy(reference, reference, *pairs) == 0.5   # every log-ratio 0
    start = time.perf_counter()
    history = train_dpo(policy, reference, *pairs,
                        DPOConfig(beta=0.5, lr=1e-2, epochs=20, batch_size=8, progress=False))
    elapsed = time.perf_counter() - start
    assert history.loss[0] == pytest.approx(math.log(2), abs=1e-5)       # policy = reference
    assert history.margin[0] == pytest.approx(0.0, abs=1e-5)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ref_weights.items())
    assert dpo_implicit_accuracy(policy, reference, *pairs) == 1.0
    assert history.loss[-1] < 0.3 and min(history.margin[-2:]) > 1.0
    assert len(history.loss) == 20
    assert 0 < history.seconds <= elapsed                    # seconds, of this training run


def test_train_dpo_rejects_bad_input():
    reference = tiny_gpt()
    pairs = random_pairs()
    with pytest.raises(ValueError, match="share weights"):
        train_dpo(reference, reference, *pairs, DPOConfig(progress=False))
    with pytest.raises(ValueError, match="one row per pair"):
        train_dpo(copy.deepcopy(reference), reference, *pairs[:2], pairs[2][:3], pairs[3][:3])
    bad_mask = pairs[1].clone()
    bad_mask[:, 0] = True
    with pytest.raises(ValueError, match="first token"):
        train_dpo(copy.deepcopy(reference), reference, pairs[0], bad_mask, *pairs[2:])
    with pytest.raises(ValueError, match="DPOConfig.beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="GPT"):
        dpo_implicit_accuracy(PolicyWithValue(copy.deepcopy(reference)), reference, *pairs)


# -- the GRPO trainer ---------------------------------------------------------

TARGET = 3


def first_token_reward(batch):
    """1 when the response starts with TARGET: a reward a program can check."""
    return (batch.sequences[:, batch.prompt_length] == TARGET).float()


def grpo_setup(**overrides):
    reference = tiny_gpt(seed=1, vocab_size=8)
    prompts = torch.randint(8, (16, 2), generator=torch.Generator().manual_seed(0))
    settings = dict(iterations=12, prompts_per_iteration=8, group_size=8, max_new_tokens=2,
                    lr=1e-2, kl_coef=0.0, progress=False)
    settings.update(overrides)
    return copy.deepcopy(reference), reference, prompts, GRPOConfig(**settings)


def test_train_grpo_raises_a_verifiable_reward():
    policy, reference, prompts, config = grpo_setup()
    seen = []
    history = train_grpo(policy, reference, first_token_reward, prompts, config,
                         callback=lambda i, p, h: seen.append(i))
    assert seen == list(range(1, 13)) and len(history.reward) == 12
    assert history.kl[0] == pytest.approx(0.0, abs=1e-5)              # policy = reference
    start, end = sum(history.reward[:2]) / 2, sum(history.reward[-2:]) / 2
    assert start < 0.4 and end > start + 0.4                               # chance is 1/8
    assert history.kl[-1] > 0.1 and history.entropy[-1] < history.entropy[0]
    assert all(0.0 <= f <= 1.0 for f in history.no_signal)


def test_train_grpo_kl_term_holds_the_policy_nearer_the_reference():
    free = train_grpo(*grpo_setup()[:2], first_token_reward, grpo_setup()[2], grpo_setup()[3])
    policy, reference, prompts, config = grpo_setup(kl_coef=1.0)
    held = train_grpo(policy, reference, first_token_reward, prompts, config)
    assert held.kl[-1] < free.kl[-1]


def test_train_grpo_one_step_per_batch_never_clips():
    # the batch's own samples: every ratio is exactly 1, whatever the learning rate
    policy, reference, prompts, config = grpo_setup(minibatches=1, lr=5e-2)
    history = train_grpo(policy, reference, first_token_reward, prompts, config)
    assert history.clip_fraction == [0.0] * config.iterations


def test_train_grpo_rejects_bad_input():
    policy, reference, prompts, config = grpo_setup(iterations=1)
    with pytest.raises(ValueError, match="plain|GPT"):
        train_grpo(PolicyWithValue(policy), reference, first_token_reward, prompts, config)
    with pytest.raises(ValueError, match="share weights"):
        train_grpo(reference, reference, first_token_reward, prompts, config)
    with pytest.raises(ValueError, match="shape \\(64,\\)"):
        train_grpo(policy, reference, lambda b: torch.zeros(3), prompts, config)
    with pytest.raises(ValueError, match="more than the 16 prompts"):
        train_grpo(policy, reference, first_token_reward, prompts,
                   dataclasses.replace(config, prompts_per_iteration=17))
    with pytest.raises(ValueError, match="token ids"):
        train_grpo(policy, reference, first_token_reward, prompts.float(), config)
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="aggregation"):
        GRPOConfig(aggregation="mean")


def test_mean_pass_at_k_averages_over_problems():
    correct = torch.tensor([[True, False, False, False], [False, False, False, False]])
    assert mean_pass_at_k(correct, 1) == pytest.approx(0.125)
    assert mean_pass_at_k(correct, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bool"):
        mean_pass_at_k(correct.float(), 1)


def test_train_grpo_takes_prompts_of_several_lengths():
    policy, reference, _, config = grpo_setup(iterations=16)
    g = torch.Generator().manual_seed(0)
    buckets = [torch.randint(8, (3, 2), generator=g), torch.randint(8, (1, 4), generator=g)]
    lengths = []

    def reward(batch):
        lengths.append(batch.prompt_length)
        return first_token_reward(batch)
    history = train_grpo(policy, reference, reward, buckets, config)
    assert set(lengths) == {2, 4}               # both lengths drawn, each batch one length
    assert lengths.count(2) > lengths.count(4)  # in proportion to their rows: 3 to 1
    assert sum(history.reward[-4:]) / 4 > history.reward[0] + 0.2
    with pytest.raises(ValueError, match="non-empty list"):
        train_grpo(copy.deepcopy(reference), reference, reward, [], config)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        train_grpo(copy.deepcopy(reference), reference, reward,
                   [buckets[0], torch.zeros(3)], config)
