"""lessons_lib.rlhf as a package: the shared trainer, the one reward signature, any model of
the course as a policy (GPT and Llama), the KL estimators, RLOO's baseline, the three
aggregations against TRL's formulas written out, and expert iteration."""

import copy
import dataclasses
import importlib.util
import math
import pathlib
import time

import pytest
import torch

from lessons_lib import rlhf
from lessons_lib.llama import Llama, LlamaConfig
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.scoring import encode_responses

TINY = GPTConfig(vocab_size=13, block_size=24, n_layer=2, n_head=2, n_embd=16)
EOT = 0


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=13, block_size=24, n_layer=2, n_head=2, n_kv_head=1,
                             n_embd=16, n_ff=32))


def count_reward(token):
    def reward_fn(batch):
        return ((batch.sequences == token) & batch.response_mask).float().sum(dim=1)
    return reward_fn


def prompts_for(n, seed=1):
    return torch.randint(1, TINY.vocab_size, (n, 2), generator=torch.Generator().manual_seed(seed))


def state_sums(model):
    return [v.double().sum().item() for v in model.state_dict().values()]


# -- the package itself ----------------------------------------------------------------

def test_rlhf_is_a_package_of_modules_and_the_old_module_is_gone():
    spec = importlib.util.find_spec("lessons_lib.rlhf")
    assert spec.submodule_search_locations                       # a package
    root = pathlib.Path(spec.origin).parent.parent
    assert not (root / "rlhf.py").exists()
    for name in ("trainer", "rollouts", "kl", "reward_model", "ppo", "evaluation", "dpo", "grpo",
                 "expert_iteration"):
        module = getattr(rlhf, name)
        assert module.__doc__ and module.__all__
        for public in module.__all__:
            assert getattr(rlhf, public) is getattr(module, public)


# -- one trainer scaffold --------------------------------------------------------------

def test_the_trainer_seeds_steps_clips_and_times_without_the_callback():
    model = torch.nn.Linear(3, 1)
    trainer = rlhf.Trainer(model, lr=0.1, seed=7, threads=1, progress=False, total=2,
                           desc="test", grad_clip=1e-3)
    assert torch.equal(torch.randn(4, generator=trainer.generator),
                       torch.randn(4, generator=torch.Generator().manual_seed(7)))
    history = rlhf.History()
    before = model.weight.detach().clone()
    with trainer.running(history):
        assert not model.training                                 # dropout off
        trainer.step((model(torch.ones(1, 3)) * 1e6).sum())
        trainer.call_back(lambda i, m, h: time.sleep(0.3), 1, history)
        trainer.tick(loss=1.0)
    # a huge gradient clipped to norm 1e-3 moves Adam by lr per weight at most
    assert (model.weight - before).abs().max() <= 0.1 + 1e-6
    assert history.threads == 1
    assert 0 <= history.seconds < 0.3                           # the callback's sleep left out
    assert model.training                                       # the mode it had is restored


def test_the_trainer_weight_decay_spares_biases():
    model = torch.nn.Linear(3, 2)
    trainer = rlhf.Trainer(model, lr=0.1, seed=0, threads=1, progress=False, total=1,
                           desc="test", weight_decay=0.5)
    decay, no_decay = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert decay["weight_decay"] == 0.5 and decay["params"] == [model.weight]
    assert no_decay["weight_decay"] == 0.0 and no_decay["params"] == [model.bias]


@pytest.mark.parametrize("train", ["ppo", "grpo", "dpo", "expert"])
def test_every_trainer_is_reproducible_from_its_seed(train):
    def run():
        base = tiny_gpt()
        prompts = prompts_for(16)
        if train == "ppo":
            policy = rlhf.PolicyWithValue(copy.deepcopy(base))
            rlhf.train_ppo(policy, base, count_reward(7), prompts, rlhf.PPOConfig(
                iterations=2, batch_size=8, max_new_tokens=4, eot_id=EOT, progress=False,
                seed=3))
        elif train == "grpo":
            policy = copy.deepcopy(base)
            rlhf.train_grpo(policy, base, count_reward(7), prompts, rlhf.GRPOConfig(
                iterations=2, prompts_per_iteration=4, group_size=4, max_new_tokens=4,
                eot_id=EOT, progress=False, seed=3))
        elif train == "dpo":
            policy = copy.deepcopy(base)
            ci, cm = encode_responses([[1, 2]] * 6, [[7, 7, EOT]] * 6, EOT)
            ri, rm = encode_responses([[1, 2]] * 6, [[3, EOT]] * 6, EOT)
            rlhf.train_dpo(policy, base, ci, cm, ri, rm, rlhf.DPOConfig(
                epochs=2, batch_size=4, progress=False, seed=3))
        else:
            policy = copy.deepcopy(base)
            rlhf.train_expert_iteration(policy, count_reward(7), prompts,
                                        rlhf.ExpertIterationConfig(
                                            iterations=2, prompts_per_iteration=8,
                                            max_new_tokens=4, eot_id=EOT, progress=False,
                                            seed=3, threshold=0.5))
        return state_sums(policy)
    assert run() == run()


# -- one reward signature --------------------------------------------------------------

def test_a_reward_model_and_a_program_are_called_the_same_way():
    rm = rlhf.RewardModel(TINY, eot_id=EOT)
    batch = rlhf.rollout(tiny_gpt(), prompts_for(5), 6, eot_id=EOT,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rlhf.score(rm, batch), rm(batch.sequences, batch.lengths))
    assert torch.equal(rlhf.score(count_reward(7), batch), count_reward(7)(batch))
    with pytest.raises(ValueError, match="callable"):
        rlhf.score("not a function", batch)


def test_a_reward_model_scores_a_templated_response_alone():
    """A policy whose vocabulary has two more ids (a chat template's end marker 13 and a
    prompt marker 14) answers; the reward model reads each response as its own text."""
    rm = rlhf.RewardModel(TINY, eot_id=EOT).train()
    end = TINY.vocab_size                            # the template's end marker
    policy = GPT(dataclasses.replace(TINY, vocab_size=TINY.vocab_size + 2))
    prompts = torch.tensor([[end + 1, 3, 4]] * 6)
    batch = rlhf.rollout(policy, prompts, 5, eot_id=end,
                         generator=torch.Generator().manual_seed(0))
    scores = rlhf.score(rm.score_responses, batch)
    assert rm.training, "scoring must leave the model's mode as it was"
    for row, response in enumerate(batch.responses()):
        text = [EOT if t >= end else t for t in response]
        with torch.no_grad():
            alone = rm.eval()(torch.tensor([text]), torch.tensor([len(text)]))
        assert torch.allclose(scores[row], alone[0], atol=1e-6), (row, response)
    assert any(r[-1] == end for r in batch.responses())     # some answers ended
    with pytest.raises(ValueError, match="must be a Rollout"):
        rm.score_responses(batch.sequences)
    with pytest.raises(ValueError, match="eot_id"):
        rlhf.RewardModel(TINY).score_responses(batch)


# -- any model of the course as a policy -----------------------------------------------

def test_llama_is_a_policy_a_reference_and_a_reward_trunk():
    base = tiny_llama()
    prompts = prompts_for(16)
    policy = rlhf.PolicyWithValue(copy.deepcopy(base))
    logits, values = policy(prompts)
    assert torch.allclose(logits, base(prompts)[0]) and (values == 0).all()
    rm = rlhf.RewardModel(base, eot_id=EOT)
    before = state_sums(policy.lm)
    history = rlhf.train_ppo(policy, base, rm, prompts, rlhf.PPOConfig(
        iterations=2, batch_size=8, max_new_tokens=4, eot_id=EOT, progress=False))
    assert len(history.reward) == 2 and state_sums(policy.lm) != before
    grpo_policy = copy.deepcopy(base)
    rlhf.train_grpo(grpo_policy, base, count_reward(7), prompts, rlhf.GRPOConfig(
        iterations=1, prompts_per_iteration=4, group_size=2, max_new_tokens=4, eot_id=EOT,
        progress=False))
    evaluation = rlhf.evaluate_policy(policy, base, rm, prompts, 4, eot_id=EOT)
    assert math.isfinite(evaluation.kl)


def test_policies_must_be_language_models():
    with pytest.raises(ValueError, match="DecoderLM"):
        rlhf.PolicyWithValue(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="DecoderLM"):
        rlhf.RewardModel(torch.nn.Linear(2, 2))
    gpt = tiny_gpt()
    with pytest.raises(ValueError, match="language model"):
        rlhf.train_grpo(torch.nn.Linear(2, 2), gpt, count_reward(1), prompts_for(4))
    with pytest.raises(ValueError, match="share weights"):
        rlhf.train_grpo(gpt, gpt, count_reward(1), prompts_for(4))


# -- k1, k2, k3 ------------------------------------------------------------------------

P = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
Q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)


def test_k1_and_k3_are_unbiased_and_k2_is_not():
    # the expectation over x ~ p, exactly: every token weighted by its probability
    exact = (P * (P / Q).log()).sum()
    logp, logq = P.log(), Q.log()
    assert torch.isclose((P * rlhf.k1(logp, logq)).sum(), exact)
    assert torch.isclose((P * rlhf.k3(logp, logq)).sum(), exact)
    k2_mean = (P * rlhf.k2(logp, logq)).sum()
    assert abs(k2_mean - exact) > 0.01
    # the same token by token: k1 changes sign, k2 and k3 never go below 0
    assert (rlhf.k1(logp, logq) < 0).any() and (rlhf.k1(logp, logq) > 0).any()
    assert (rlhf.k2(logp, logq) >= 0).all() and (rlhf.k3(logp, logq) >= 0).all()
    # the same model twice: all three are 0
    for k in (rlhf.k1, rlhf.k2, rlhf.k3):
        assert (k(logp, logp) == 0).all()


def test_k3_has_the_lower_variance_when_the_models_are_close():
    near = torch.tensor([0.27, 0.26, 0.24, 0.23], dtype=torch.float64)
    logp, logq = near.log(), Q.log()
    variance = {k.__name__: (near * (k(logp, logq) - (near * k(logp, logq)).sum()) ** 2).sum()
                for k in (rlhf.k1, rlhf.k3)}
    assert variance["k3"] < variance["k1"] / 10


def test_kl_estimators_reject_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        rlhf.k3(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="floating-point"):
        rlhf.k1(torch.zeros(3, dtype=torch.long), torch.zeros(3))


def test_ppo_penalty_is_k1_and_grpo_term_is_k3():
    logp = torch.tensor([[0.0, -1.0, -0.2, -3.0]])
    ref = torch.tensor([[0.0, -0.5, -0.9, -1.0]])
    mask = torch.tensor([[False, True, True, True]])
    _, kl = rlhf.kl_penalized_rewards(torch.tensor([0.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.equal(kl, torch.where(mask, rlhf.k1(logp, ref), 0.0))
    losses = rlhf.grpo_losses(logp, logp, torch.tensor([0.0]), mask, ref, kl_coef=1.0)
    assert torch.isclose(losses.kl, rlhf.k3(logp, ref)[mask].mean())


# -- RLOO ------------------------------------------------------------------------------

def test_leave_one_out_advantages_against_trls_rloo_formula():
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    k = 4
    # TRL's RLOOTrainer holds (k, prompts): row i is every prompt's i-th sample
    trl = rewards.view(-1, k).T
    baseline = (trl.sum(0) - trl) / (k - 1)
    expected = (trl - baseline).T.flatten()
    got = rlhf.group_advantages(rewards, k, scale_by_std=False, leave_one_out=True)
    assert torch.allclose(got, expected, atol=1e-12)
    # k / (k - 1) times the group-mean advantage
    plain = rlhf.group_advantages(rewards, k, scale_by_std=False)
    assert torch.allclose(got, plain * k / (k - 1), atol=1e-12)
    # the one right answer of four: +1 against the three others' mean of 0
    assert got[3].item() == 1.0 and got[0].item() == pytest.approx(-1 / 3)


def test_grpo_config_takes_rloo():
    base = tiny_gpt()
    policy = copy.deepcopy(base)
    config = rlhf.GRPOConfig(iterations=1, prompts_per_iteration=4, group_size=4,
                             max_new_tokens=4, eot_id=EOT, progress=False,
                             scale_by_std=False, leave_one_out=True)
    history = rlhf.train_grpo(policy, base, count_reward(7), prompts_for(8), config)
    assert len(history.reward) == 1


# -- the three aggregations, against TRL's GRPOTrainer formulas written out -------------

def trl_loss(logp, old_logp, ref_logp, advantages, mask, beta, eps, loss_type, max_len):
    """TRL's GRPOTrainer._compute_loss on completion tokens only (B, C)."""
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)   # dr_grpo


@pytest.mark.parametrize("aggregation, loss_type", [("sequence", "grpo"), ("token", "bnpo"),
                                                    ("constant", "dr_grpo")])
def test_aggregations_match_trls_loss_types(aggregation, loss_type):
    g = torch.Generator().manual_seed(0)
    B, P, C = 3, 2, 5
    logp = -torch.rand(B, C, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(B, C, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    completion_mask = torch.arange(C) < torch.tensor([5, 2, 3])[:, None]
    expected = trl_loss(logp, old, ref, advantages, completion_mask, 0.04, 0.2, loss_type, C)

    def with_prompt(x, fill):            # ours: (B, P + C), prompt positions masked out
        return torch.cat([torch.full((B, P), fill, dtype=x.dtype), x], dim=1)

    got = rlhf.grpo_losses(with_prompt(logp, 9.0), with_prompt(old, -9.0), advantages,
                           with_prompt(completion_mask, False), with_prompt(ref, 4.0),
                           kl_coef=0.04, clip=0.2, aggregation=aggregation, max_new_tokens=C)
    assert torch.isclose(got.loss, expected, atol=1e-12)


def test_the_constant_aggregation_needs_its_constant():
    x = torch.zeros(1, 3)
    mask = torch.tensor([[False, True, True]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        rlhf.grpo_losses(x, x, torch.zeros(1), mask, aggregation="constant")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        rlhf.grpo_losses(x, x, torch.zeros(1), mask, aggregation="mean")


# -- expert iteration ------------------------------------------------------------------

def test_expert_iteration_learns_only_from_samples_that_pass():
    base = tiny_gpt()
    prompts = prompts_for(32)
    policy = copy.deepcopy(base)
    config = rlhf.ExpertIterationConfig(iterations=12, prompts_per_iteration=32,
                                        samples_per_prompt=4, max_new_tokens=4, eot_id=EOT,
                                        threshold=0.5, lr=3e-3, progress=False)
    history = rlhf.train_expert_iteration(policy, count_reward(7), prompts, config)
    assert len(history.reward) == 12 and 0 < history.kept[0] < 1
    assert sum(history.reward[-3:]) / 3 > 2 * history.reward[0]
    # nothing passes: no step is taken, the weights stay as they were
    still = copy.deepcopy(base)
    none = rlhf.train_expert_iteration(still, count_reward(7), prompts,
                                       dataclasses.replace(config, iterations=2,
                                                           threshold=100.0))
    assert none.kept == [0.0, 0.0] and all(math.isnan(v) for v in none.loss)
    assert state_sums(still) == state_sums(base)


def test_expert_iteration_rejects_bad_input():
    gpt = tiny_gpt()
    with pytest.raises(ValueError, match="samples_per_prompt"):
        rlhf.ExpertIterationConfig(samples_per_prompt=0)
    with pytest.raises(ValueError, match="threshold"):
        rlhf.ExpertIterationConfig(threshold=float("nan"))
    with pytest.raises(ValueError, match="more than the 4 prompts"):
        rlhf.train_expert_iteration(gpt, count_reward(1), prompts_for(4),
                                    rlhf.ExpertIterationConfig(prompts_per_iteration=8))
    with pytest.raises(ValueError, match="callback"):
        rlhf.train_expert_iteration(gpt, count_reward(1), prompts_for(4),
                                    rlhf.ExpertIterationConfig(prompts_per_iteration=4),
                                    callback=3)
