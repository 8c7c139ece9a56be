"""lessons_lib.rlhf (reward_model, rollouts, ppo, evaluation): the reward model and PPO,
against direct computations written here."""

import copy
import itertools
import math
import random
import time

import pytest
import torch

from lessons_lib.data import RatedSnippet
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.rlhf import (PolicyWithValue, PPOConfig, RewardModel, RewardTrainConfig, Rollout,
                              all_pairs_bradley_terry_loss, best_of_n, best_of_n_kl,
                              bradley_terry_loss, distinct_n, evaluate_policy,
                              encode_snippets, end_positions, evaluate_reward_model, gae,
                              kl_penalized_rewards, pair_accuracy, ppo_losses, ppo_step,
                              preference_mask,
                              response_mask, rollout, score_texts, spearman, train_ppo,
                              train_reward_model)
from lessons_lib.scoring import sequence_logprobs
from lessons_lib.tokenizers import BPETokenizer, CharTokenizer

TINY = GPTConfig(vocab_size=13, block_size=24, n_layer=2, n_head=2, n_embd=16)
EOT = 0


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY)


# -- the reward model ----------------------------------------------------------------------

def test_bradley_terry_loss_matches_a_hand_computation():
    r_chosen = torch.tensor([2.0, 0.0, -1.0])
    r_rejected = torch.tensor([0.0, 0.0, 1.0])
    # margins 2, 0, -2: -log sigmoid(m) = log(1 + e^-m)
    # = 0.126928, log 2 = 0.693147, 2 + 0.126928 = 2.126928; mean 0.982334
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert expected == pytest.approx(0.982334, abs=1e-6)
    assert bradley_terry_loss(r_chosen, r_rejected).item() == pytest.approx(expected, rel=1e-6)
    # a margin of -200: log(1 + e^200) = 200 (+ e^-200), finite where log(sigmoid) is -inf
    far = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert far.item() == pytest.approx(200.0)


def test_bradley_terry_loss_gradient_is_sigmoid_of_minus_the_margin():
    r_chosen = torch.tensor([1.0, -0.5], requires_grad=True)
    r_rejected = torch.tensor([0.0, 0.5])
    bradley_terry_loss(r_chosen, r_rejected).backward()
    # d/dr_c of -log sigmoid(r_c - r_r) = -(1 - sigmoid(m)) = -sigmoid(-m); mean over 2 pairs
    expected = [-1 / (1 + math.exp(1.0)) / 2, -1 / (1 + math.exp(-1.0)) / 2]
    assert r_chosen.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_pair_accuracy_counts_wins_and_half_ties():
    r_chosen = torch.tensor([1.0, 2.0, 0.0, 5.0])
    r_rejected = torch.tensor([0.0, 3.0, 0.0, 4.0])
    assert pair_accuracy(r_chosen, r_rejected) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_spearman_matches_scipy_with_and_without_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g)
    y = x + torch.randn(50, generator=g)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)
    xt = torch.randint(0, 5, (60,), generator=g).float()          # many ties
    yt = torch.randint(0, 4, (60,), generator=g).float() + 0.3 * xt
    assert spearman(xt, yt) == pytest.approx(stats.spearmanr(xt.numpy(), yt.numpy())[0],
                                             abs=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_end_positions_from_lengths_or_the_first_eot():
    idx = torch.tensor([[5, 6, EOT, 7, EOT], [5, 6, 7, 8, 9], [EOT, 1, 2, 3, 4]])
    assert end_positions(idx, eot_id=EOT).tolist() == [2, 4, 0]
    assert end_positions(idx, torch.tensor([3, 5, 1])).tolist() == [2, 4, 0]


def test_reward_model_reads_the_eot_position_and_ignores_the_padding_after_it():
    rm = RewardModel(TINY, eot_id=EOT)
    idx = torch.tensor([[4, 5, 6, EOT, 9, 9], [4, 7, EOT, 1, 1, 1]])
    padded_differently = idx.clone()
    padded_differently[0, 4:] = torch.tensor([3, 2])
    padded_differently[1, 3:] = torch.tensor([8, EOT, 12])
    with torch.no_grad():
        r = rm(idx)
        assert r.shape == (2,)
        assert torch.equal(r, rm(padded_differently))
        assert torch.equal(r, rm(padded_differently, torch.tensor([4, 3])))
        h = rm.trunk.hidden_states(idx)
        by_hand = torch.stack([rm.head(h[0, 3]), rm.head(h[1, 2])]).squeeze(-1)
        assert torch.allclose(r, by_hand, atol=1e-6)
        changed = idx.clone()
        changed[0, 1] = 11                                 # a token before the end does count
        assert rm(changed)[0] != r[0] and rm(changed)[1] == r[1]


def test_reward_model_copies_the_gpt_it_is_built_from():
    gpt = tiny_gpt()
    rm = RewardModel(gpt)
    assert all(torch.equal(a, b) for a, b in zip(rm.trunk.state_dict().values(),
                                                 gpt.state_dict().values()))
    with torch.no_grad():
        rm.trunk.wte.weight.add_(1.0)
    assert not torch.equal(rm.trunk.wte.weight, gpt.wte.weight)


def test_the_heads_live_on_the_device_of_the_gpt():
    """On a GPU the reward and value heads must sit beside the trunk ("meta" stands in for any
    device other than the CPU: its tensors have shapes but no data)."""
    gpt = tiny_gpt().to("meta")
    assert RewardModel(gpt).head.weight.device.type == "meta"
    assert PolicyWithValue(gpt).value_head.weight.device.type == "meta"
    assert RewardModel(tiny_gpt()).head.weight.device.type == "cpu"


# -- training a reward model on rated texts ---------------------------------------------------

def all_pairs_loss_by_hand(rewards, ratings, margin):
    """A double loop over ordered pairs: i rated at least ``margin`` above j."""
    total, n = 0.0, 0
    for i in range(len(ratings)):
        for j in range(len(ratings)):
            if ratings[i] - ratings[j] >= margin:
                total += math.log(1 + math.exp(-(rewards[i] - rewards[j])))
                n += 1
    return total / n, n


@pytest.mark.parametrize("margin", [0.5, 1.0, 2.5])
def test_all_pairs_loss_matches_a_double_loop_over_pairs(margin):
    g = torch.Generator().manual_seed(6)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    ratings = torch.tensor([-3.0, -2.5, -1.0, -1.0, 0.0, 0.2, 0.7, 1.0, 1.0, 2.0, 3.5, 3.9],
                           dtype=torch.float64)
    expected, n_pairs = all_pairs_loss_by_hand(rewards.tolist(), ratings.tolist(), margin)
    loss = all_pairs_bradley_terry_loss(rewards, ratings, margin)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert preference_mask(ratings, margin).sum().item() == n_pairs


def test_all_pairs_loss_counts_ties_and_close_ratings_out():
    rewards = torch.tensor([0.0, 5.0, -5.0])
    # ratings 1 and 1 tie; 1.0 vs 0.5 is closer than the margin: only the pairs with 0.0 count
    loss = all_pairs_bradley_terry_loss(rewards, torch.tensor([1.0, 1.0, 0.0]), margin=1.0)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-5.0))
                                         + math.log(1 + math.exp(-10.0))) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="no preference pair"):
        all_pairs_bradley_terry_loss(rewards, torch.tensor([1.0, 0.5, 1.2]), margin=1.0)


def bpe_with_eot(text, merges=40):
    tokenizer = BPETokenizer().train(text, 256 + merges)
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer, tokenizer.special_tokens["<|endoftext|>"]


def test_encode_snippets_pads_right_ends_with_eot_and_truncates_keeping_it():
    tokenizer, eot = bpe_with_eot("the film was good and the plot was bad")
    texts = ["the film was good", "bad", "", "the plot was bad and the film was good " * 3]
    idx, lengths = encode_snippets(texts, tokenizer, eot, block_size=12)
    direct = [tokenizer.encode_ordinary(t) for t in texts]
    assert len(direct[3]) > 11                                # the last one gets truncated
    expected = [ids[:11] + [eot] for ids in direct]
    assert lengths.tolist() == [len(e) for e in expected]
    assert idx.shape == (4, max(len(e) for e in expected)) and idx.dtype == torch.long
    for b, row in enumerate(expected):
        assert idx[b, :len(row)].tolist() == row
        assert (idx[b, len(row):] == eot).all()               # padding after the eot
        assert idx[b, lengths[b] - 1] == eot
    # a special-token string inside a text is plain text, as in pre-training
    idx, lengths = encode_snippets(["bad <|endoftext|>"], tokenizer, eot, block_size=64)
    assert (idx[0] == eot).sum() == 1 and idx[0, -1] == eot
    # a tokenizer without encode_ordinary uses encode
    chars = CharTokenizer.from_text("abc")
    idx, lengths = encode_snippets(["cab", "a"], chars, 3, block_size=8)
    assert idx.tolist() == [[2, 0, 1, 3], [0, 3, 3, 3]] and lengths.tolist() == [4, 2]


def test_a_reward_model_reads_encoded_snippets_as_if_each_were_alone():
    tokenizer, eot = bpe_with_eot("the film was good and the plot was bad")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2,
                       n_embd=16)
    torch.manual_seed(0)
    rm = RewardModel(config, eot_id=eot)
    texts = ["the film was good and the plot", "bad", "the plot was"]
    together = score_texts(rm, texts, tokenizer, batch_size=2)
    with torch.no_grad():
        alone = torch.cat([rm(*encode_snippets([t], tokenizer, eot, 32)) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


FILLER = ["the", "plot", "film", "cast", "story", "music", "was", "and", "its", "ending"]


def word_rated_snippets(n, seed):
    """Snippets of filler words and one "good" (rated about +1.5) or "bad" (about -1.5)."""
    rng = random.Random(seed)
    snippets = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        good = rng.random() < 0.5
        words.insert(rng.randint(0, len(words)), "good" if good else "bad")
        rating = (1.5 if good else -1.5) + rng.uniform(-0.4, 0.4)
        snippets.append(RatedSnippet(i, rating, " ".join(words)))
    return snippets


def test_a_reward_model_learns_which_word_the_raters_liked():
    train, held_out = word_rated_snippets(200, seed=0), word_rated_snippets(100, seed=1)
    tokenizer, eot = bpe_with_eot(" ".join(FILLER + ["good", "bad"]))
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2,
                       n_embd=32)
    torch.manual_seed(0)
    rm = RewardModel(config, eot_id=eot)
    before = evaluate_reward_model(rm, held_out, tokenizer)
    start = time.perf_counter()
    history = train_reward_model(rm, train, tokenizer, RewardTrainConfig(
        steps=15, batch_size=32, lr=1e-2, progress=False))
    elapsed = time.perf_counter() - start
    after = evaluate_reward_model(rm, held_out, tokenizer)
    assert len(history.loss) == 15 and history.skipped_batches == 0
    assert 0 < history.seconds <= elapsed                    # seconds, of this training run
    assert not rm.training
    assert after.pair_accuracy > 0.8 and after.pair_accuracy > before.pair_accuracy
    good = sum(1 for s in held_out if s.score > 0)
    assert after.n_pairs == good * (len(held_out) - good)      # every good-bad pair, once
    # held-out pairs given explicitly: the same rewards, the same ranking
    pairs = [(a, b) for a in held_out[:10] for b in held_out[10:20] if a.score - b.score >= 1]
    on_pairs = evaluate_reward_model(rm, held_out, tokenizer, pairs=pairs)
    r = after.rewards.tolist()                      # snippet i of held_out has id i
    wins = sum((r[a.id] > r[b.id]) + 0.5 * (r[a.id] == r[b.id]) for a, b in pairs)
    assert on_pairs.n_pairs == len(pairs) and on_pairs.spearman == after.spearman
    assert on_pairs.pair_accuracy == pytest.approx(wins / len(pairs))


# -- responses and log-probabilities ---------------------------------------------------------

def test_response_mask_runs_from_the_prompt_to_the_first_eot_inclusive():
    seqs = torch.tensor([[1, 2, 3, EOT, 4, EOT], [1, 2, EOT, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
    mask = response_mask(seqs, prompt_length=2, eot_id=EOT)
    assert mask.int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert response_mask(seqs, 2).int().tolist() == [[0, 0, 1, 1, 1, 1]] * 3


def test_sequence_logprobs_equal_per_token_log_softmax_by_hand():
    gpt = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, TINY.vocab_size, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 3:9], mask[1, 3:5], mask[2, 3:4] = True, True, True    # responses of 6, 2, 1 tokens
    with torch.no_grad():
        logp = sequence_logprobs(gpt, idx, mask)
        logits, _ = gpt(idx)
    for b in range(3):
        by_hand = 0.0
        for t in range(9):
            if mask[b, t]:
                by_hand += torch.log_softmax(logits[b, t - 1], dim=-1)[idx[b, t]].item()
        assert logp[b].sum().item() == pytest.approx(by_hand, abs=1e-5)
    assert (logp[~mask] == 0).all()


def test_rollout_keeps_prompts_masks_after_eot_and_scores_its_samples():
    policy = PolicyWithValue(tiny_gpt())
    prompts = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    g = torch.Generator().manual_seed(0)
    out = rollout(policy, prompts, max_new_tokens=10, eot_id=EOT, generator=g)
    assert out.sequences.shape == (4, 12) and torch.equal(out.sequences[:, :2], prompts)
    assert torch.equal(out.response_mask, response_mask(out.sequences, 2, EOT))
    with torch.no_grad():
        expected = sequence_logprobs(policy.lm, out.sequences, out.response_mask)
    assert torch.allclose(out.logprobs, expected, atol=1e-6)
    assert out.values.shape == (4, 12) and (out.values == 0).all()   # a fresh value head
    assert out.lengths.tolist() == (2 + out.response_mask.sum(1)).tolist()
    assert [len(r) for r in out.responses()] == out.response_mask.sum(1).tolist()


def test_distinct_n_by_hand():
    # bigrams: (1,2) (2,1) (1,2) | (3,3) (3,3): 3 distinct of 5
    assert distinct_n([[1, 2, 1, 2], torch.tensor([3, 3, 3])], 2) == pytest.approx(3 / 5)
    assert distinct_n([[1, 2, 3]], 1) == 1.0
    assert distinct_n([[1]], 2) == 0.0


# -- PPO ------------------------------------------------------------------------------------

def test_kl_is_exactly_zero_when_policy_and_reference_are_the_same_model():
    policy = PolicyWithValue(tiny_gpt())
    reference = copy.deepcopy(policy.lm)
    prompts = torch.tensor([[1, 2], [3, 4], [5, 6]])
    out = rollout(policy, prompts, 8, eot_id=EOT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for ref in (reference, policy.lm):
            ref_logp = sequence_logprobs(ref, out.sequences, out.response_mask)
            scores = torch.tensor([1.0, -2.0, 0.5])
            rewards, kl = kl_penalized_rewards(scores, out.logprobs, ref_logp,
                                               out.response_mask, kl_coef=0.3)
            assert (kl == 0).all()
            last = out.lengths - 1
            assert torch.equal(rewards[torch.arange(3), last], scores)
            assert rewards.sum().item() == pytest.approx(scores.sum().item())


def test_kl_penalty_goes_on_every_response_token_and_the_score_on_the_last():
    logp = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -3.0], [0.0, -2.0, -1.0, -1.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    rewards, kl = kl_penalized_rewards(torch.tensor([10.0, 20.0]), logp, ref, mask, 0.5)
    assert kl.tolist() == [[0.0, 0.5, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    assert rewards.tolist() == [[0.0, -0.25, 0.5, 10.0], [0.0, 19.5, 0.0, 0.0]]


def gae_by_hand(rewards, values, mask, gamma, lam):
    """The backward recursion, one sequence at a time, over its masked tokens only."""
    B, L = len(rewards), len(rewards[0])
    advantages = [[0.0] * L for _ in range(B)]
    returns = [[0.0] * L for _ in range(B)]
    for b in range(B):
        steps = [t for t in range(L) if mask[b][t]]
        next_value, next_advantage = 0.0, 0.0          # after the last token: nothing more
        for t in reversed(steps):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[b][t] = next_advantage
            returns[b][t] = next_advantage + values[b][t]
            next_value = values[b][t]
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_direct_backward_recursion(gamma, lam):
    g = torch.Generator().manual_seed(3)
    B, L = 4, 10
    rewards = torch.randn(B, L, generator=g, dtype=torch.float64)
    values = torch.randn(B, L, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, (start, stop) in enumerate([(2, 10), (2, 3), (2, 6), (1, 9)]):  # lengths 8, 1, 4, 8
        mask[b, start:stop] = True
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_by_hand(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert torch.allclose(adv, torch.tensor(adv_ref, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ret, torch.tensor(ret_ref, dtype=torch.float64), atol=1e-12)


def test_gae_with_gamma_and_lambda_one_is_return_to_go_minus_value():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    values = torch.tensor([[0.0, 0.5, 0.5, 0.5]])
    mask = torch.tensor([[False, True, True, True]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert ret.tolist() == [[0.0, 6.0, 5.0, 3.0]]
    assert adv.tolist() == [[0.0, 5.5, 4.5, 2.5]]


def test_ppo_losses_match_a_direct_elementwise_computation():
    g = torch.Generator().manual_seed(4)
    B, L, clip, vf_clip = 3, 7, 0.2, 0.3
    old_logp = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    new_logp = old_logp + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, L, generator=g, dtype=torch.float64)
    old_values = torch.randn(B, L, generator=g, dtype=torch.float64)
    values = old_values + 0.6 * torch.randn(B, L, generator=g, dtype=torch.float64)
    returns = torch.randn(B, L, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 2:7], mask[1, 2:4], mask[2, 2:3] = True, True, True
    out = ppo_losses(new_logp, old_logp, advantages, values, old_values, returns, mask,
                     clip, vf_clip)

    pol, val, kl, clipped, n = 0.0, 0.0, 0.0, 0, 0
    for b in range(B):
        for t in range(L):
            if not mask[b, t]:
                continue
            ratio = math.exp(new_logp[b, t].item() - old_logp[b, t].item())
            a = advantages[b, t].item()
            pol += max(-a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip))
            v, v_old, r = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            v_clipped = v_old + min(max(v - v_old, -vf_clip), vf_clip)
            val += 0.5 * max((v - r) ** 2, (v_clipped - r) ** 2)
            kl += (ratio - 1) - math.log(ratio)
            clipped += abs(ratio - 1) > clip
            n += 1
    assert out.policy.item() == pytest.approx(pol / n, rel=1e-10)
    assert out.value.item() == pytest.approx(val / n, rel=1e-10)
    assert out.approx_kl.item() == pytest.approx(kl / n, rel=1e-10)
    assert out.clip_fraction.item() == pytest.approx(clipped / n)
    assert 0 < out.clip_fraction.item() < 1                      # both branches were exercised


def test_ppo_losses_before_any_update_are_minus_the_mean_advantage():
    logp = -torch.rand(2, 5, dtype=torch.float64)
    advantages = torch.randn(2, 5, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    out = ppo_losses(logp, logp, advantages, logp, logp, logp, mask)
    assert out.policy.item() == pytest.approx(-advantages[mask].mean().item())
    assert out.approx_kl.item() == 0 and out.clip_fraction.item() == 0 and out.value.item() == 0


def test_policy_with_value_aligns_values_with_the_tokens():
    policy = PolicyWithValue(tiny_gpt())
    torch.nn.init.normal_(policy.value_head.weight)
    idx = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    with torch.no_grad():
        logits, values = policy(idx)
        h = policy.lm.hidden_states(idx)
        assert torch.allclose(logits, policy.lm(idx)[0])
        assert (values[:, 0] == 0).all()
        assert torch.allclose(values[:, 1:], policy.value_head(h[:, :-1]).squeeze(-1))


def count_reward(token):
    """A toy reward: how many times ``token`` appears in each response."""
    def reward_fn(batch):
        return ((batch.sequences == token) & batch.response_mask).float().sum(dim=1)
    return reward_fn


def test_a_reward_model_scores_rollouts_in_eval_mode():
    from lessons_lib.rlhf import score
    rm = RewardModel(GPTConfig(**{**TINY.__dict__, "dropout": 0.5}), eot_id=EOT).train()
    policy = PolicyWithValue(tiny_gpt())
    batch = rollout(policy, torch.tensor([[1, 2], [3, 4]]), 6, eot_id=EOT,
                    generator=torch.Generator().manual_seed(0))
    scores = score(rm, batch)
    assert rm.training                                   # the mode it was in is restored
    with torch.no_grad():
        assert torch.equal(scores, rm.eval()(batch.sequences, batch.lengths))


@pytest.mark.parametrize("rows, minibatches", [(13, 6), (12, 6), (5, 5), (7, 2)])
def test_ppo_step_takes_exactly_the_minibatches_asked_for(rows, minibatches):
    # 13 rows in 6 minibatches: torch.chunk would give 5 (3, 3, 3, 3, 1); every step must
    # count, and the statistics are means over the steps actually taken
    policy = PolicyWithValue(tiny_gpt())
    prompts = torch.randint(1, TINY.vocab_size, (rows, 2),
                            generator=torch.Generator().manual_seed(1))
    batch = rollout(policy, prompts, 6, eot_id=EOT, generator=torch.Generator().manual_seed(2))
    advantages = torch.randn(batch.logprobs.shape, generator=torch.Generator().manual_seed(3))
    returns = torch.randn(batch.logprobs.shape, generator=torch.Generator().manual_seed(4))
    config = PPOConfig(batch_size=rows, minibatches=minibatches, epochs=2, eot_id=EOT)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    sizes, forward = [], policy.forward

    def counting_forward(idx):
        sizes.append(idx.size(0))
        return forward(idx)

    policy.forward = counting_forward
    stats = ppo_step(policy, optimizer, batch, advantages, returns, config,
                     torch.Generator().manual_seed(5))
    assert len(sizes) == 2 * minibatches and sum(sizes) == 2 * rows
    assert max(sizes) - min(sizes) <= 1
    assert set(stats) == {"policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"}
    assert all(math.isfinite(v) for v in stats.values())


@pytest.mark.slow
def test_ppo_raises_a_toy_reward_and_logs_every_iteration():
    base = tiny_gpt()
    policy = PolicyWithValue(copy.deepcopy(base))
    prompts = torch.randint(1, TINY.vocab_size, (32, 2), generator=torch.Generator().manual_seed(5))
    config = PPOConfig(iterations=6, batch_size=32, max_new_tokens=6, lr=3e-3, kl_coef=0.01,
                       eot_id=EOT, progress=False)
    before = copy.deepcopy(base.state_dict())
    history = train_ppo(policy, base, count_reward(7), prompts, config)
    for name in ("reward", "kl", "entropy", "clip_fraction", "approx_kl", "distinct_2",
                 "response_length", "policy_loss", "value_loss"):
        values = getattr(history, name)
        assert len(values) == 6 and all(math.isfinite(v) for v in values), name
    assert history.kl[0] == 0.0                       # the first batch comes from the reference
    assert history.reward[-1] > history.reward[0] + 1.0          # seeds 0-4 gained 1.8-2.4
    assert history.kl[-1] > 0
    reference_after = base.state_dict()
    assert all(torch.equal(before[k], reference_after[k]) for k in before)   # frozen...
    assert not torch.equal(policy.lm.wte.weight, base.wte.weight)   # ...the policy moved


# -- bad input --------------------------------------------------------------------------------

def test_bad_input_raises_value_errors():
    r = torch.tensor([1.0, 2.0])
    bad_calls = [
        lambda: bradley_terry_loss(r, torch.tensor([1.0, 2.0, 3.0])),      # mismatched lengths
        lambda: bradley_terry_loss(torch.tensor([]), torch.tensor([])),     # no pairs
        lambda: bradley_terry_loss(r, torch.tensor([1.0, float("nan")])),  # non-finite
        lambda: bradley_terry_loss(r[None], r[None]),                      # wrong shape
        lambda: pair_accuracy(r, torch.tensor([1, 2])),                    # integer rewards
        lambda: spearman([1.0, 2.0, 3.0], [1.0, 2.0]),
        lambda: spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]),                # constant
        lambda: spearman([1.0, float("inf")], [1.0, 2.0]),
        lambda: distinct_n([[1, 2]], 0),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()


def test_bad_per_token_input_raises_value_errors():
    B, L = 2, 5
    x = torch.zeros(B, L)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    empty = mask.clone()
    empty[1] = False
    bad_calls = [
        lambda: gae(x, torch.zeros(B, L + 1), mask),                        # shapes differ
        lambda: gae(x, x, empty),                                           # empty response
        lambda: gae(torch.full((B, L), float("nan")), x, mask),             # non-finite rewards
        lambda: gae(x, x, mask.int()),                                      # mask not bool
        lambda: gae(x, x, mask, gamma=1.5),
        lambda: kl_penalized_rewards(torch.tensor([1.0, float("inf")]), x, x, mask, 0.1),
        lambda: kl_penalized_rewards(torch.tensor([1.0, 2.0, 3.0]), x, x, mask, 0.1),
        lambda: kl_penalized_rewards(torch.tensor([1.0, 2.0]), x, x, mask, -0.1),
        lambda: ppo_losses(x, x, x, x, x, x[:, :4], mask),
        lambda: ppo_losses(x, x, x, x, x, x, empty),
        lambda: ppo_losses(x, x, x, x, x, x, mask, clip=0),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()


def test_bad_model_input_raises_value_errors():
    gpt = tiny_gpt()
    rm = RewardModel(gpt, eot_id=EOT)
    policy = PolicyWithValue(gpt)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.bool)
    first_masked = mask.clone()
    first_masked[0, 0] = True
    bad_calls = [
        lambda: RewardModel("gpt"),
        lambda: RewardModel(gpt, eot_id=TINY.vocab_size),
        lambda: rm(idx, torch.tensor([3, 4])),                              # longer than T
        lambda: rm(idx, torch.tensor([3])),                                 # one length for 2
        lambda: rm(idx, torch.tensor([3.0, 2.0])),
        lambda: RewardModel(gpt)(idx),                                      # no eot, no lengths
        lambda: sequence_logprobs(gpt, idx, mask[:, :2]),
        lambda: sequence_logprobs(gpt, idx, first_masked),
        lambda: sequence_logprobs(gpt, idx.float(), mask),
        lambda: rollout(policy, idx, 0),                                    # empty responses
        lambda: rollout(policy, idx[0], 4),                                 # (P,), not (B, P)
        lambda: rollout(policy, idx, 4, temperature=0.0),
        lambda: rollout(policy, idx, 4, eot_id=-1),
        lambda: response_mask(idx, 3),                                      # no room to respond
        lambda: PPOConfig(minibatches=0),
        lambda: PPOConfig(batch_size=2, minibatches=4),
        lambda: PPOConfig(lam=1.2),
        lambda: train_ppo(gpt, gpt, count_reward(1), idx),                 # no value head
        lambda: train_ppo(policy, gpt, count_reward(1), idx),              # shared weights
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()


def test_train_ppo_rejects_non_finite_or_misshapen_rewards():
    gpt = tiny_gpt()
    prompts = torch.tensor([[1, 2], [3, 4]])
    config = PPOConfig(iterations=1, batch_size=2, max_new_tokens=3, epochs=1, minibatches=1,
                       progress=False)
    for reward_fn in (lambda b: torch.full((len(b.sequences),), float("nan")),
                      lambda b: torch.zeros(len(b.sequences) + 1),
                      lambda b: [0.0] * len(b.sequences)):
        with pytest.raises(ValueError):
            train_ppo(PolicyWithValue(copy.deepcopy(gpt)), gpt, reward_fn, prompts, config)


def test_bad_reward_training_input_raises_value_errors():
    tokenizer, eot = bpe_with_eot("the film was good and the plot was bad")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2,
                       n_embd=16)
    rm = RewardModel(config, eot_id=eot)
    rated = word_rated_snippets(8, seed=2)
    same = [RatedSnippet(i, 1.0, "good") for i in range(4)]
    r, ratings = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])
    quick = RewardTrainConfig(steps=1, progress=False)
    bad_calls = [
        lambda: all_pairs_bradley_terry_loss(r, torch.tensor([0.0, 1.0, 2.0])),  # lengths
        lambda: all_pairs_bradley_terry_loss(r, ratings, margin=0.0),    # every self-pair
        lambda: all_pairs_bradley_terry_loss(r, ratings, margin=-1.0),
        lambda: all_pairs_bradley_terry_loss(torch.tensor([1.0, float("nan")]), ratings),
        lambda: all_pairs_bradley_terry_loss(r, torch.tensor([0.0, float("inf")])),
        lambda: all_pairs_bradley_terry_loss(r[None], ratings[None]),    # not 1-D
        lambda: all_pairs_bradley_terry_loss(torch.tensor([1, 2]), ratings),   # integers
        lambda: all_pairs_bradley_terry_loss(r, torch.tensor([1.0, 1.5])),     # no pair
        lambda: encode_snippets([], tokenizer, eot, 16),
        lambda: encode_snippets("the film", tokenizer, eot, 16),          # a str, not a list
        lambda: encode_snippets(["good", 3], tokenizer, eot, 16),
        lambda: encode_snippets(["good"], tokenizer, eot, 1),             # no room for a token
        lambda: encode_snippets(["good"], tokenizer, -1, 16),
        lambda: RewardTrainConfig(steps=0),
        lambda: RewardTrainConfig(lr=0.0),
        lambda: RewardTrainConfig(margin=0.0),
        lambda: RewardTrainConfig(weight_decay=-0.1),
        lambda: RewardTrainConfig(threads=0),
        lambda: train_reward_model(RewardModel(config), rated, tokenizer, quick),   # no eot_id
        lambda: train_reward_model(rm.trunk, rated, tokenizer, quick),
        lambda: train_reward_model(rm, ["good", "bad"], tokenizer, quick),  # texts, no ratings
        lambda: train_reward_model(rm, rated[:1], tokenizer, quick),
        lambda: train_reward_model(rm, same, tokenizer, quick),           # no pair at margin
        lambda: evaluate_reward_model(rm, rated[:1], tokenizer),
        lambda: evaluate_reward_model(rm, same, tokenizer),               # no pair (and constant)
        lambda: evaluate_reward_model(rm, rated, tokenizer, pairs=[]),
        lambda: evaluate_reward_model(rm, rated, tokenizer, pairs=[rated[0]]),
        lambda: score_texts(rm, "good", tokenizer),
        lambda: score_texts(rm, [], tokenizer),
        lambda: score_texts(rm, ["good"], tokenizer, batch_size=0),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()


# -- measuring a policy; best-of-n ----------------------------------------------------------

def test_best_of_n_kl_matches_the_formula_and_a_direct_sum():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(256) == pytest.approx(math.log(256) - 255 / 256)
    # direct: of K equally likely outcomes, best-of-n picks rank k (1 = lowest) with probability
    # (k/K)^n - ((k-1)/K)^n; its KL to the uniform base tends to ln n - (n-1)/n as K grows
    K, n = 20_000, 5
    k = torch.arange(1, K + 1, dtype=torch.float64)
    p = (k / K) ** n - ((k - 1) / K) ** n
    direct = (p * torch.log(p * K)).sum().item()
    assert direct == pytest.approx(best_of_n_kl(n), abs=1e-3)


def test_best_of_n_matches_an_average_over_every_subset():
    g = torch.Generator().manual_seed(0)
    select = torch.randn(3, 7, generator=g, dtype=torch.float64)
    gold = torch.randn(3, 7, generator=g, dtype=torch.float64)
    out = best_of_n(select, [1, 2, 3, 7], gold=gold)
    assert out.n == [1, 2, 3, 7]
    assert out.kl == pytest.approx([best_of_n_kl(n) for n in out.n])
    for j, n in enumerate(out.n):
        picked_select, picked_gold = [], []
        for p in range(3):
            subsets = list(itertools.combinations(range(7), n))
            best = [max(s, key=lambda i: select[p, i].item()) for s in subsets]
            picked_select.append(sum(select[p, i].item() for i in best) / len(best))
            picked_gold.append(sum(gold[p, i].item() for i in best) / len(best))
        assert out.scores["select"][j] == pytest.approx(sum(picked_select) / 3, abs=1e-9)
        assert out.scores["gold"][j] == pytest.approx(sum(picked_gold) / 3, abs=1e-9)
    assert out.scores["select"][0] == pytest.approx(select.mean().item())   # n = 1: any sample
    assert out.scores["select"][-1] == pytest.approx(select.max(dim=1).values.mean().item())


def test_best_of_n_rejects_bad_input():
    select = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="ns must be"):
        best_of_n(select, [5])
    with pytest.raises(ValueError, match="ns must be"):
        best_of_n(select, [])
    with pytest.raises(ValueError, match="shape of select"):
        best_of_n(select, [1], gold=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="finite"):
        best_of_n(torch.tensor([[0.0, float("nan")]]), [1])
    with pytest.raises(ValueError, match="n must be"):
        best_of_n_kl(0)


def test_evaluate_policy_measures_fresh_samples_and_is_zero_kl_for_the_reference():
    base = tiny_gpt()
    prompts = torch.randint(1, TINY.vocab_size, (40, 2), generator=torch.Generator().manual_seed(1))
    reward = count_reward(7)
    same = evaluate_policy(PolicyWithValue(copy.deepcopy(base)), base, reward, prompts, 8,
                           eot_id=EOT, seed=3)
    assert same.kl == 0.0
    s = same.samples
    expected_reward = reward(s).mean().item()
    assert same.rewards == {"reward": pytest.approx(expected_reward)}
    assert same.distinct_2 == pytest.approx(distinct_n(s.responses(), 2))
    ended = [EOT in row for row in s.sequences[:, 2:].tolist()]
    assert same.ended == pytest.approx(sum(ended) / 40)
    assert same.response_length == pytest.approx(s.response_mask.sum().item() / 40)
    # the same seed gives the same samples, with a GPT or its PolicyWithValue
    again = evaluate_policy(base, base, {"a": reward, "b": reward}, prompts, 8, eot_id=EOT,
                            seed=3)
    assert torch.equal(again.samples.sequences, s.sequences)
    assert set(again.scores) == {"a", "b"}
    # a different policy: the KL is the mean of the summed log-ratios of its samples
    other = tiny_gpt(seed=1)
    moved = evaluate_policy(other, base, reward, prompts, 8, eot_id=EOT, seed=3)
    m = moved.samples
    with torch.no_grad():
        direct = (sequence_logprobs(other, m.sequences, m.response_mask)
                  - sequence_logprobs(base, m.sequences, m.response_mask)).sum(1).mean()
    assert moved.kl == pytest.approx(direct.item(), rel=1e-5)
    assert moved.kl > 0
    with pytest.raises(ValueError, match="reward_fns"):
        evaluate_policy(base, base, {}, prompts, 8)
    with pytest.raises(ValueError, match="reference"):
        evaluate_policy(base, PolicyWithValue(base), reward, prompts, 8)


def test_train_ppo_calls_back_after_every_iteration():
    base = tiny_gpt()
    policy = PolicyWithValue(copy.deepcopy(base))
    prompts = torch.randint(1, TINY.vocab_size, (8, 2), generator=torch.Generator().manual_seed(5))
    seen = []
    config = PPOConfig(iterations=3, batch_size=8, max_new_tokens=4, eot_id=EOT, progress=False)
    train_ppo(policy, base, count_reward(7), prompts, config,
              callback=lambda i, p, h: seen.append((i, p is policy, len(h.reward))))
    assert seen == [(1, True, 1), (2, True, 2), (3, True, 3)]
    with pytest.raises(ValueError, match="callback"):
        train_ppo(policy, base, count_reward(7), prompts, config, callback=3)


def test_rollout_texts_decode_prompt_and_response_without_the_eot():
    tok = CharTokenizer.from_text("abc|")
    eot = tok.encode("|")[0]
    a, b, c = tok.encode("abc")
    sequences = torch.tensor([[a, b, c, eot, a], [b, b, a, c, c]])
    mask = response_mask(sequences, 2, eot)
    out = Rollout(sequences, mask, torch.zeros(2, 5), None, 2)
    assert out.texts(tok, eot) == ["abc", "bbacc"]
