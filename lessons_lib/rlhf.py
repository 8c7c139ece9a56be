"""Learning from human feedback: a reward model, then PPO (chapter 10). Read top to bottom.

1. The reward model. :class:`RewardModel` is a GPT trunk with a scalar head read at each
   sequence's end-of-text position. :func:`bradley_terry_loss` trains it on preference pairs
   (``P(chosen beats rejected) = sigmoid(r_chosen - r_rejected)``); :func:`pair_accuracy` and
   :func:`spearman` measure it on held-out pairs and ratings. On rated texts:
   :func:`encode_snippets` (a padded batch, each text ending in end-of-text),
   :func:`all_pairs_bradley_terry_loss` (every pair of a batch whose ratings differ by a
   margin), :func:`train_reward_model` and :func:`evaluate_reward_model`.
2. Responses and their log-probabilities. :class:`Rollout` holds sampled responses and
   :func:`response_mask` marks them; :mod:`lessons_lib.scoring` gives their log-probabilities
   and :func:`entropy_from_logits` the entropy they were drawn with; :func:`distinct_n`
   measures how varied they are.
3. PPO's pieces. :class:`PolicyWithValue` (a GPT with a value head), :func:`rollout` (samples
   responses with the KV cache and scores them),
   :func:`kl_penalized_rewards` (the KL to a frozen reference folded into the reward),
   :func:`gae` (advantages), :func:`ppo_losses` (the clipped objectives).
4. The PPO loop: :class:`PPOConfig`, :func:`ppo_step` (minibatch epochs over one batch of
   rollouts) and :func:`train_ppo` (rollout, reward, KL, GAE, update; logged per iteration).
5. Measuring a policy, and the other way to optimise a reward: :func:`evaluate_policy` (mean
   reward, KL to the reference and distinct-2 on fresh samples), :func:`best_of_n_kl` and
   :func:`best_of_n` (pick the best of ``n`` samples by one reward; what it scores by others).

6. DPO (chapter 11): :func:`dpo_loss`, the Bradley-Terry loss on the policy's log-probability
   ratios to the reference (the implicit reward), with no reward model in the loop; pairs from
   token lists (:func:`lessons_lib.scoring.encode_responses`) or from groups of samples
   (:func:`best_and_worst`);
   :class:`DPOConfig`, :func:`train_dpo` and :func:`dpo_implicit_accuracy` on held-out pairs.
7. GRPO (chapter 11): :func:`group_advantages` (a group of samples per prompt, normalised
   within the group; no value head), :func:`no_signal_fraction`, :func:`grpo_losses` (the
   clipped surrogate with a per-sequence advantage and a k3 KL to the reference, averaged per
   token or per sequence), :func:`pass_at_k`, the unbiased estimator, and
   :func:`mean_pass_at_k`; the loop: :class:`GRPOConfig` and :func:`train_grpo` (a group of
   samples per prompt, a reward a program computes, logged per iteration).

Conventions. A batch of sequences is ``(B, L)``: a prompt of ``P`` tokens (the same ``P`` for
every row) followed by a response. Every per-token tensor (log-probs, values, rewards,
advantages) is ``(B, L)`` and aligned with the tokens: entry ``[b, t]`` belongs to token
``t``, the action taken after reading tokens ``0 .. t-1``. Position 0 has no such action; its
entries are 0. ``response_mask`` (bool, ``(B, L)``) is True on the response's tokens, up to and
including its first end-of-text token; everything else is masked out of every sum and mean.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from numbers import Real

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import (eval_mode, float_tensor, is_int, non_negative_int, number_in, positive_int,
                     positive_number, shape_of, token_ids)
from .generate import generate
from .model import GPT, GPTConfig, num_parameters
from .runtime import model_device, threads_for, use_threads
from .scoring import (check_response_mask, logprobs_from_logits, response_logprobs,
                      sequence_logprobs)

__all__ = ["RewardModel", "end_positions", "bradley_terry_loss", "pair_accuracy", "spearman",
           "encode_snippets", "preference_mask", "all_pairs_bradley_terry_loss",
           "RewardTrainConfig", "RewardTrainHistory", "train_reward_model", "score_texts",
           "RewardEvaluation", "evaluate_reward_model",
           "Rollout", "rollout", "response_mask", "entropy_from_logits", "distinct_n",
           "PolicyWithValue", "kl_penalized_rewards", "gae",
           "PPOLosses", "ppo_losses", "PPOConfig", "PPOHistory", "ppo_step", "train_ppo",
           "PolicyEvaluation", "evaluate_policy", "best_of_n_kl", "BestOfN", "best_of_n",
           "dpo_loss", "best_and_worst", "DPOConfig", "DPOHistory",
           "train_dpo", "dpo_implicit_accuracy",
           "group_advantages", "no_signal_fraction", "GRPOLosses", "grpo_losses", "pass_at_k",
           "mean_pass_at_k", "GRPOConfig", "GRPOHistory", "train_grpo"]


# -----------------------------------------------------------------------------
# argument checks shared by this module

def _finite(name: str, x: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values: every entry must be finite")
    return x


def _same_shape(**tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the tokens where ``mask`` is True (all rows pooled)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum()


# -----------------------------------------------------------------------------
# 1. the reward model

def end_positions(idx: torch.Tensor, lengths: torch.Tensor | None = None,
                  eot_id: int | None = None) -> torch.Tensor:
    """Where each row of ``idx`` (B, T) ends, as (B,) indices: ``lengths - 1`` when ``lengths``
    (B,) is given (each row's length, end-of-text token included, right padding after it);
    else the first ``eot_id`` in the row, or its last position where the row has none (an
    unfinished text is read where it stops)."""
    B, T = idx.shape
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) \
                or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor of shape ({B},), "
                             f"got {shape_of(lengths)}")
        if len(lengths) and (lengths.min() < 1 or lengths.max() > T):
            raise ValueError(f"lengths must lie in 1..{T} (the sequences' length), got "
                             f"{int(lengths.min())}..{int(lengths.max())}")
        return lengths.to(idx.device).long() - 1
    if eot_id is None:
        raise ValueError("give lengths, or build the model with an eot_id to find the ends")
    is_eot = idx == eot_id
    first = is_eot.int().argmax(dim=1)               # 0 where a row has no eot at all
    return torch.where(is_eot.any(dim=1), first, T - 1)


class RewardModel(nn.Module):
    """A GPT trunk and a scalar head: ``forward(idx, lengths) -> rewards`` (B,).

    ``trunk`` is a :class:`GPTConfig` (a fresh GPT) or a :class:`GPT`, whose weights are
    copied (training the reward model leaves the language model as it was). The head reads
    the trunk's final hidden state at each sequence's end (:func:`end_positions`): a causal
    model has read the whole text there, and nothing after it, so padding cannot change it.
    """

    def __init__(self, trunk: GPT | GPTConfig, eot_id: int | None = None):
        super().__init__()
        if isinstance(trunk, GPTConfig):
            trunk = GPT(trunk)
        elif isinstance(trunk, GPT):
            trunk = copy.deepcopy(trunk)
        else:
            raise ValueError(f"trunk must be a GPTConfig or a GPT, got {type(trunk).__name__}")
        if eot_id is not None and not (is_int(eot_id) and 0 <= eot_id < trunk.config.vocab_size):
            raise ValueError(f"eot_id must be a token id in 0..{trunk.config.vocab_size - 1} "
                             f"or None, got {eot_id!r}")
        self.trunk = trunk
        self.head = nn.Linear(trunk.config.n_embd, 1, device=model_device(trunk))   # beside it
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.eot_id = eot_id

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        token_ids(idx, "idx")
        ends = end_positions(idx, lengths, self.eot_id)
        h = self.trunk.hidden_states(idx)                          # (B, T, n_embd)
        h_end = h[torch.arange(idx.size(0), device=h.device), ends]   # (B, n_embd)
        return self.head(h_end).squeeze(-1)


def _check_pair(r_chosen, r_rejected) -> None:
    float_tensor("r_chosen", r_chosen, ndim=1)
    float_tensor("r_rejected", r_rejected, ndim=1)
    if r_chosen.shape != r_rejected.shape or len(r_chosen) == 0:
        raise ValueError(f"r_chosen and r_rejected must be non-empty and of one length (one "
                         f"reward each per pair), got {len(r_chosen)} and {len(r_rejected)}")
    _finite("r_chosen", r_chosen)
    _finite("r_rejected", r_rejected)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """The mean of ``-log sigmoid(r_chosen - r_rejected)`` over the pairs: the negative
    log-likelihood of the human choices when ``P(chosen beats rejected) = sigmoid(r_c - r_r)``.
    ``logsigmoid`` stays finite where ``log(sigmoid(.))`` would give -inf (margins below -100)."""
    _check_pair(r_chosen, r_rejected)
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """The share of pairs whose chosen text gets the higher reward (a tie counts one half)."""
    _check_pair(r_chosen, r_rejected)
    wins = (r_chosen > r_rejected).double() + 0.5 * (r_chosen == r_rejected).double()
    return wins.mean().item()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x`` (1-D); tied values share the mean of the ranks they span."""
    sorted_x, order = torch.sort(x)
    starts_group = torch.ones_like(sorted_x, dtype=torch.bool)
    starts_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = starts_group.cumsum(0) - 1                             # group of each sorted value
    positions = torch.arange(1, len(x) + 1, dtype=torch.float64)
    rank_sum = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    mean_rank = rank_sum / torch.bincount(group)
    return torch.empty_like(positions).scatter_(0, order, mean_rank[group])


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties: average ranks)."""
    x = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    y = torch.as_tensor(y, dtype=torch.float64).detach().cpu()
    if x.dim() != 1 or y.dim() != 1 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x and y must be 1-D and of one length >= 2, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    _finite("x", x)
    _finite("y", y)
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    if denominator == 0:
        raise ValueError("x or y is constant: a rank correlation needs values that differ")
    return ((rx * ry).sum() / denominator).item()


# -- training and measuring a reward model on rated texts

def encode_snippets(texts, tokenizer, eot_id: int, block_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx (B, T), lengths (B,))``: each text's tokens, then ``eot_id``, right-padded with
    ``eot_id`` to the longest row. ``lengths`` counts each row's tokens, end-of-text included,
    so a :class:`RewardModel` reads row ``b`` at ``lengths[b] - 1``: its end-of-text token.

    A text longer than ``block_size - 1`` tokens keeps its first ``block_size - 1`` tokens and
    still ends with the end-of-text token, so the head always reads one. A tokenizer with
    ``encode_ordinary`` (a BPE) uses it, as pre-training did (a special-token string inside a
    text is plain text); any other uses ``encode``.
    """
    if not isinstance(texts, (list, tuple)) or not texts \
            or not all(isinstance(t, str) for t in texts):
        got = f"{len(texts)} items" if isinstance(texts, (list, tuple)) else type(texts).__name__
        raise ValueError(f"texts must be a non-empty list of strings, got {got}")
    if not is_int(eot_id) or eot_id < 0:
        raise ValueError(f"eot_id must be a token id (an int >= 0), got {eot_id!r}")
    if not is_int(block_size) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2 (room for a token and the "
                         f"end-of-text), got {block_size!r}")
    encode = getattr(tokenizer, "encode_ordinary", tokenizer.encode)
    rows = [encode(text)[:block_size - 1] + [eot_id] for text in texts]
    lengths = torch.tensor([len(row) for row in rows])
    idx = torch.full((len(rows), int(lengths.max())), eot_id, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, :len(row)] = torch.tensor(row)
    return idx, lengths


def preference_mask(ratings: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """(B, B) bool: ``[i, j]`` is True where ``ratings[i] - ratings[j] >= margin`` (> 0): the
    humans clearly preferred text ``i`` to text ``j``. Each such pair appears once."""
    margin = positive_number("margin", margin)
    return ratings[:, None] - ratings[None, :] >= margin


def all_pairs_bradley_terry_loss(rewards: torch.Tensor, ratings: torch.Tensor,
                                 margin: float = 1.0) -> torch.Tensor:
    """The Bradley-Terry loss over every pair of a batch whose human ratings differ by at
    least ``margin`` (> 0): the mean of ``-log sigmoid(r_i - r_j)`` over the pairs where text
    ``i`` was rated higher than text ``j``. ``B`` forward passes give up to ``B (B - 1) / 2``
    pairs, where :func:`bradley_terry_loss` on fixed pairs needs two passes per pair.

    Raises ``ValueError`` when no two ratings differ by ``margin``: such a batch says nothing
    about which text is better (:func:`train_reward_model` skips it).
    """
    float_tensor("rewards", rewards, ndim=1)
    float_tensor("ratings", ratings, ndim=1)
    if rewards.shape != ratings.shape:
        raise ValueError(f"rewards and ratings must have one length (one of each per text), "
                         f"got {len(rewards)} and {len(ratings)}")
    _finite("rewards", rewards)
    _finite("ratings", ratings)
    preferred = preference_mask(ratings.to(rewards.device), margin)          # (B, B)
    if not preferred.any():
        raise ValueError(f"no two of the {len(ratings)} ratings differ by margin={margin}: "
                         "the batch holds no preference pair")
    reward_gaps = rewards[:, None] - rewards[None, :]                        # r_i - r_j
    return -F.logsigmoid(reward_gaps[preferred]).mean()


@dataclass
class RewardTrainConfig:
    """Training a :class:`RewardModel` on rated texts. The learning rate is 1e-3: on the movie
    snippets 2e-3 gave held-out pair accuracy 0.70-0.71, 1e-3 and 5e-4 0.72-0.73."""

    steps: int = 170
    batch_size: int = 64             # texts per step (at most all of them); all pairs count
    lr: float = 1e-3
    weight_decay: float = 0.0        # AdamW's, on the weight matrices only
    margin: float = 1.0              # two ratings closer than this make no pair
    seed: int = 0
    threads: int | None = None       # CPU threads; None: runtime.threads_for(model size)
    progress: bool = True

    def __post_init__(self):
        positive_int("RewardTrainConfig.steps", self.steps)
        positive_int("RewardTrainConfig.batch_size", self.batch_size)
        non_negative_int("RewardTrainConfig.seed", self.seed)
        positive_number("RewardTrainConfig.lr", self.lr)
        positive_number("RewardTrainConfig.margin", self.margin)
        number_in("RewardTrainConfig.weight_decay", self.weight_decay, low=0.0)
        if self.threads is not None:
            positive_int("RewardTrainConfig.threads", self.threads)


@dataclass
class RewardTrainHistory:
    loss: list[float] = field(default_factory=list)    # one per step that had a pair
    skipped_batches: int = 0                           # batches with no pair at the margin
    seconds: float = 0.0
    threads: int = 0
    from_cache: bool = False                           # loaded by pretrained.movie_reward_model


def _rated_texts(snippets, name: str) -> tuple[list[str], torch.Tensor]:
    """The texts and ratings of ``snippets`` (objects with ``.text`` and ``.score``, such as
    :class:`lessons_lib.data.RatedSnippet`)."""
    snippets = list(snippets)
    if not all(isinstance(getattr(s, "text", None), str) and isinstance(getattr(s, "score", None),
                                                                        Real) for s in snippets):
        raise ValueError(f"{name} must be rated snippets, each with .text (str) and .score "
                         "(a number), like lessons_lib.data.RatedSnippet")
    ratings = torch.tensor([float(s.score) for s in snippets], dtype=torch.float32)
    _finite(f"the ratings of {name}", ratings)
    return [s.text for s in snippets], ratings


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def train_reward_model(model: RewardModel, train_snippets, tokenizer,
                       config: RewardTrainConfig | None = None) -> RewardTrainHistory:
    """Train ``model`` in place on rated snippets with :func:`all_pairs_bradley_terry_loss`.

    Each step draws ``config.batch_size`` distinct snippets, encodes them with
    :func:`encode_snippets` (so ``model.eot_id`` must be set) and takes one AdamW step on
    every pair in the batch whose ratings differ by ``config.margin``; a batch without such
    a pair is skipped and counted. The model comes back in eval mode.
    """
    config = config or RewardTrainConfig()
    if not isinstance(model, RewardModel) or model.eot_id is None:
        raise ValueError("model must be a RewardModel built with an eot_id (where its head "
                         f"reads), got {type(model).__name__}")
    texts, ratings = _rated_texts(train_snippets, "train_snippets")
    if len(texts) < 2 or ratings.max() - ratings.min() < config.margin:     # not one pair
        raise ValueError(f"train_snippets must hold two ratings that differ by "
                         f"margin={config.margin}; got {len(texts)} snippets")
    device = model_device(model)
    block_size = model.trunk.config.block_size
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(_decay_groups(model, config.weight_decay), lr=config.lr)
    history = RewardTrainHistory(threads=config.threads or threads_for(num_parameters(model)))
    bar = tqdm(range(config.steps), desc="reward model", disable=not config.progress,
               leave=False, mininterval=1.0)
    model.train()
    start = time.perf_counter()
    with use_threads(history.threads):
        for _ in bar:
            rows = torch.randperm(len(texts), generator=generator)[:config.batch_size].tolist()
            batch_ratings = ratings[rows].to(device)
            if not preference_mask(batch_ratings, config.margin).any():
                history.skipped_batches += 1
                continue
            idx, lengths = encode_snippets([texts[i] for i in rows], tokenizer, model.eot_id,
                                           block_size)
            rewards = model(idx.to(device), lengths.to(device))
            loss = all_pairs_bradley_terry_loss(rewards, batch_ratings, config.margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.loss.append(loss.item())
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", refresh=False)
    bar.close()
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


def score_texts(model: RewardModel, texts, tokenizer, batch_size: int = 256) -> torch.Tensor:
    """The rewards (N,) of ``texts`` (each followed by the end-of-text token), in batches, in
    eval mode and without gradients; on the CPU."""
    if not isinstance(model, RewardModel) or model.eot_id is None:
        raise ValueError("model must be a RewardModel built with an eot_id (where its head "
                         f"reads), got {type(model).__name__}")
    positive_int("batch_size", batch_size)
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(f"texts must be a non-empty list of strings, got {texts!r:.60}")
    device = model_device(model)
    block_size = model.trunk.config.block_size
    scores = []
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(texts), batch_size):
            idx, lengths = encode_snippets(texts[i:i + batch_size], tokenizer, model.eot_id,
                                           block_size)
            scores.append(model(idx.to(device), lengths.to(device)).float().cpu())
    return torch.cat(scores)


@dataclass
class RewardEvaluation:
    pair_accuracy: float             # share of held-out pairs ranked as the humans ranked them
    spearman: float                  # rank correlation of the rewards with the human ratings
    n_pairs: int
    rewards: torch.Tensor            # (N,): the reward of each snippet, in the order given


def evaluate_reward_model(model: RewardModel, snippets, tokenizer, pairs=None,
                          margin: float = 1.0, batch_size: int = 256) -> RewardEvaluation:
    """How well ``model`` agrees with the humans on held-out rated ``snippets``.

    Pair accuracy (:func:`pair_accuracy`, a tie counts one half) on ``pairs``, a list of
    ``(chosen, rejected)`` snippets such as ``data.preference_pairs(val, margin=1.0)``; or,
    when ``pairs`` is None, on every pair of ``snippets`` whose ratings differ by ``margin``
    (an ``(N, N)`` mask: fine for a few thousand snippets). Spearman's correlation of the
    rewards with the ratings over all ``snippets``.
    """
    texts, ratings = _rated_texts(snippets, "snippets")
    if len(texts) < 2:
        raise ValueError(f"snippets must hold at least 2 rated snippets, got {len(texts)}")
    rewards = score_texts(model, texts, tokenizer, batch_size)
    if pairs is None:
        preferred = preference_mask(ratings, margin)
        chosen_rewards = rewards[:, None].expand_as(preferred)[preferred]
        rejected_rewards = rewards[None, :].expand_as(preferred)[preferred]
    else:
        pairs = list(pairs)
        if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise ValueError("pairs must be a non-empty list of (chosen, rejected) snippets")
        chosen_texts, _ = _rated_texts([c for c, _ in pairs], "pairs")
        rejected_texts, _ = _rated_texts([r for _, r in pairs], "pairs")
        chosen_rewards = score_texts(model, chosen_texts, tokenizer, batch_size)
        rejected_rewards = score_texts(model, rejected_texts, tokenizer, batch_size)
    if len(chosen_rewards) == 0:
        raise ValueError(f"no two ratings of snippets differ by margin={margin}: no pair")
    return RewardEvaluation(pair_accuracy(chosen_rewards, rejected_rewards),
                            spearman(rewards, ratings), len(chosen_rewards), rewards)


# -----------------------------------------------------------------------------
# 2. responses: sampling them, their log-probabilities, their diversity

@dataclass
class Rollout:
    """Responses sampled for a batch of prompts, and what the policy said while sampling."""

    sequences: torch.Tensor          # (B, L) long: prompt then response
    response_mask: torch.Tensor      # (B, L) bool: the response up to its first eot, inclusive
    logprobs: torch.Tensor           # (B, L): log-probs of the sampled tokens (0 off the mask)
    values: torch.Tensor | None      # (B, L): the value head's estimates (a PolicyWithValue)
    prompt_length: int

    @property
    def lengths(self) -> torch.Tensor:
        """(B,): prompt plus response, end-of-text included: what a :class:`RewardModel` reads."""
        return self.prompt_length + self.response_mask.sum(dim=1)

    def responses(self) -> list[list[int]]:
        """Each response's tokens, as a list of ints."""
        rows = zip(self.sequences.tolist(), self.response_mask.tolist())
        return [[t for t, m in zip(seq, mask) if m] for seq, mask in rows]

    def texts(self, tokenizer, eot_id: int | None = None) -> list[str]:
        """Each prompt and its response as text (``tokenizer.decode``), the end-of-text token
        ``eot_id`` left out: what a :class:`RewardModel` reads, as a string."""
        prompts = self.sequences[:, :self.prompt_length].tolist()
        return [tokenizer.decode(prompt + [t for t in response if t != eot_id])
                for prompt, response in zip(prompts, self.responses())]


def response_mask(sequences: torch.Tensor, prompt_length: int,
                  eot_id: int | None = None) -> torch.Tensor:
    """(B, L) bool: True on the tokens after the prompt, up to and including the first
    ``eot_id`` (every token after the prompt when ``eot_id`` is None)."""
    token_ids(sequences, "sequences")
    B, L = sequences.shape
    if not (is_int(prompt_length) and 1 <= prompt_length < L):
        raise ValueError(f"prompt_length must be an int in 1..{L - 1} (a response needs at "
                         f"least one token), got {prompt_length!r}")
    mask = torch.zeros_like(sequences, dtype=torch.bool)
    response = sequences[:, prompt_length:]
    if eot_id is None:
        mask[:, prompt_length:] = True
        return mask
    is_eot = (response == eot_id).long()
    eots_before = is_eot.cumsum(dim=1) - is_eot                    # eot tokens strictly before
    mask[:, prompt_length:] = eots_before == 0
    return mask


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, L): the entropy of the distribution each token was drawn from (aligned like
    :func:`lessons_lib.scoring.logprobs_from_logits`; position 0 gets 0)."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return F.pad(-(logp.exp() * logp).sum(dim=-1), (1, 0))


def distinct_n(seqs, n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams / all n-grams, pooled over ``seqs`` (a
    list of token lists or 1-D tensors). 1 when no n-gram repeats; 0 when there is no n-gram."""
    positive_int("n", n)
    seen, total = set(), 0
    for seq in seqs:
        tokens = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


# -----------------------------------------------------------------------------
# 3. PPO: a policy with a value head, rewards with a KL penalty, GAE, the clipped losses

class PolicyWithValue(nn.Module):
    """A GPT (the policy, trained in place) and a value head on its final hidden states.

    ``forward(idx) -> (logits (B, L, V), values (B, L))``, where ``values[:, t]`` estimates the
    return still to come *before* token ``t`` is chosen (read from the hidden state at
    ``t - 1``; ``values[:, 0]`` is 0): aligned with the tokens like every per-token tensor here.
    """

    def __init__(self, gpt: GPT):
        super().__init__()
        if not isinstance(gpt, GPT):
            raise ValueError(f"gpt must be a lessons_lib.model.GPT, got {type(gpt).__name__}")
        self.gpt = gpt
        self.value_head = nn.Linear(gpt.config.n_embd, 1, device=model_device(gpt))
        nn.init.zeros_(self.value_head.weight)       # every value starts at 0
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor):
        h = self.gpt.hidden_states(idx)                            # (B, L, n_embd)
        logits = self.gpt.lm_head(h)
        values = F.pad(self.value_head(h[:, :-1]).squeeze(-1), (1, 0))
        return logits, values.float()


def rollout(policy, prompts: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
            eot_id: int | None = None, generator: torch.Generator | None = None) -> Rollout:
    """Sample a response of ``max_new_tokens`` tokens for each prompt (rows of ``prompts``,
    (B, P), all of one length) with the KV cache, then score the samples with one forward pass
    (the log-probs; the values too when ``policy`` is a :class:`PolicyWithValue`). Tokens after
    a response's first ``eot_id`` are sampled but masked out."""
    token_ids(prompts, "prompts", shape="(batch, P)")
    if prompts.size(1) == 0:
        raise ValueError("prompts must hold at least one token each, got shape "
                         f"{tuple(prompts.shape)}")
    positive_int("max_new_tokens", max_new_tokens)
    positive_number("temperature", temperature)
    gpt = policy.gpt if isinstance(policy, PolicyWithValue) else policy
    if eot_id is not None and not (is_int(eot_id) and 0 <= eot_id < gpt.config.vocab_size):
        raise ValueError(f"eot_id must be a token id in 0..{gpt.config.vocab_size - 1} or None, "
                         f"got {eot_id!r}")
    sequences = generate(gpt, prompts, max_new_tokens, temperature=temperature,
                         generator=generator).to(model_device(gpt))
    mask = response_mask(sequences, prompts.size(1), eot_id)
    with torch.no_grad(), eval_mode(policy):
        logits, values = policy(sequences)
    logprobs = torch.where(mask, logprobs_from_logits(logits, sequences, temperature), 0.0)
    if isinstance(policy, PolicyWithValue):
        values = torch.where(mask, values, 0.0)
    else:
        values = None
    return Rollout(sequences, mask, logprobs, values, prompts.size(1))


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor,
                         ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, L) and the per-token KL estimate (B, L).

    The KL estimate is k1, ``log p_policy(token) - log p_ref(token)`` of the sampled token:
    summed over a response it is an unbiased estimate of KL(policy || reference) for that
    prompt, exactly 0 when the two models agree, and its policy gradient is the gradient of
    the KL itself (InstructGPT's choice). One token's or one sample's estimate can be
    negative; the mean over many samples is not. Every response token is rewarded
    ``-kl_coef * kl``; the last one also gets the reward model's ``scores`` (B,), the
    judgement of the whole text.
    """
    float_tensor("scores", scores, ndim=1)
    float_tensor("logprobs", logprobs, ndim=2)
    float_tensor("ref_logprobs", ref_logprobs, ndim=2)
    _same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_response_mask(mask, logprobs.shape)
    if scores.shape != (logprobs.size(0),):
        raise ValueError(f"scores must have shape ({logprobs.size(0)},), one per sequence, "
                         f"got {tuple(scores.shape)}")
    _finite("scores", scores)
    number_in("kl_coef", kl_coef, low=0.0)
    kl = torch.where(mask, logprobs - ref_logprobs, 0.0)
    rewards = -kl_coef * kl
    last = mask.size(1) - 1 - mask.flip(1).int().argmax(dim=1)     # each response's last token
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016), (B, L) in, (B, L) out.

    Backwards over the tokens of every response at once, with ``V = 0`` after a response ends:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    Returns ``(advantages, returns)`` with ``returns = advantages + values``, 0 off the mask.
    ``mask`` must be one run of True per row (a response).
    """
    float_tensor("rewards", rewards, ndim=2)
    float_tensor("values", values, ndim=2)
    _same_shape(rewards=rewards, values=values)
    check_response_mask(mask, rewards.shape)
    _finite("rewards", rewards)
    _finite("values", values)
    gamma, lam = number_in("gamma", gamma, 0.0, 1.0), number_in("lam", lam, 0.0, 1.0)
    m = mask.to(rewards.dtype)
    r, v = rewards * m, values * m
    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_advantage = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.size(1))):                   # over time; the batch in one go
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        advantages[:, t] = next_advantage
        next_value = v[:, t]
    return advantages, (advantages + v) * m


def _clipped_surrogate(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, clip: float):
    """Per token: PPO's clipped policy loss ``max(-A ratio, -A clip(ratio))`` (B, L), the ratio,
    and whether it left the clip range; ``advantages`` (B, L) or (B, 1)."""
    log_ratio = torch.where(mask, new_logp - old_logp, 0.0)
    ratio = log_ratio.exp()
    loss = torch.maximum(-advantages * ratio,
                         -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))
    return loss, ratio, log_ratio


@dataclass
class PPOLosses:
    policy: torch.Tensor             # the clipped surrogate, to minimise
    value: torch.Tensor              # the clipped value loss, to minimise
    approx_kl: torch.Tensor          # mean of (ratio - 1) - log ratio: how far the update moved
    clip_fraction: torch.Tensor      # share of tokens whose ratio left [1 - clip, 1 + clip]


def ppo_losses(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float = 0.2, vf_clip: float = 0.2) -> PPOLosses:
    """PPO's clipped objectives (Schulman et al., 2017), averaged over the masked tokens.

    policy: ``max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))`` with
    ``ratio = exp(new_logp - old_logp)``: no gain from moving a token's probability further
    than the clip range in the direction its advantage favours.
    value: ``0.5 * max((V - R)^2, (V_clipped - R)^2)``, ``V_clipped`` kept within ``vf_clip``
    of ``old_values``, so the value head also moves only a little per batch.
    """
    tensors = dict(new_logp=new_logp, old_logp=old_logp, advantages=advantages, values=values,
                   old_values=old_values, returns=returns)
    for name, t in tensors.items():
        float_tensor(name, t, ndim=2)
    _same_shape(**tensors)
    check_response_mask(mask, new_logp.shape)
    clip, vf_clip = positive_number("clip", clip), positive_number("vf_clip", vf_clip)

    token_loss, ratio, log_ratio = _clipped_surrogate(new_logp, old_logp, advantages, mask, clip)
    policy_loss = _masked_mean(token_loss, mask)

    values_clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    value_error = torch.maximum((values - returns).square(), (values_clipped - returns).square())
    value_loss = 0.5 * _masked_mean(value_error, mask)

    with torch.no_grad():
        approx_kl = _masked_mean((ratio - 1.0) - log_ratio, mask)
        clip_fraction = _masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
    return PPOLosses(policy_loss, value_loss, approx_kl, clip_fraction)


# -----------------------------------------------------------------------------
# 4. the PPO loop

@dataclass
class PPOConfig:
    iterations: int = 80
    batch_size: int = 64             # prompts (and responses) per iteration
    max_new_tokens: int = 24
    temperature: float = 1.0
    eot_id: int | None = None        # a response ends at its first eot_id (inclusive)
    kl_coef: float = 0.1             # weight of the per-token KL penalty in the reward
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1             # weight of the value loss in the total loss
    epochs: int = 4                  # passes over each batch of rollouts
    minibatches: int = 2             # optimizer steps per pass
    lr: float = 5e-5
    grad_clip: float = 1.0           # max gradient norm; 0 turns clipping off
    whiten_advantages: bool = True   # advantages to mean 0, std 1 over the batch's tokens
    threads: int | None = None       # CPU threads; None: runtime.threads_for(model size)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("iterations", "batch_size", "max_new_tokens", "epochs", "minibatches"):
            positive_int(f"PPOConfig.{name}", getattr(self, name))
        for name in ("temperature", "clip", "vf_clip", "lr"):
            positive_number(f"PPOConfig.{name}", getattr(self, name))
        for name in ("gamma", "lam"):
            number_in(f"PPOConfig.{name}", getattr(self, name), 0.0, 1.0)
        for name in ("kl_coef", "vf_coef", "grad_clip"):
            number_in(f"PPOConfig.{name}", getattr(self, name), low=0.0)
        if self.minibatches > self.batch_size:
            raise ValueError(f"PPOConfig.minibatches={self.minibatches} is more than "
                             f"batch_size={self.batch_size}: a minibatch would be empty")
        if self.threads is not None:
            positive_int("PPOConfig.threads", self.threads)


@dataclass
class PPOHistory:
    """One entry per iteration; ``reward`` is the reward model's mean score of the batch."""

    reward: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)              # per sequence, summed over tokens
    entropy: list[float] = field(default_factory=list)         # per token
    clip_fraction: list[float] = field(default_factory=list)
    approx_kl: list[float] = field(default_factory=list)
    policy_loss: list[float] = field(default_factory=list)
    value_loss: list[float] = field(default_factory=list)
    distinct_2: list[float] = field(default_factory=list)
    response_length: list[float] = field(default_factory=list)
    seconds: float = 0.0
    threads: int = 0


def ppo_step(policy: PolicyWithValue, optimizer: torch.optim.Optimizer, batch: Rollout,
             advantages: torch.Tensor, returns: torch.Tensor, config: PPOConfig,
             generator: torch.Generator | None = None) -> dict[str, float]:
    """``config.epochs`` passes over ``batch`` in ``config.minibatches`` shuffled minibatches,
    one optimizer step each; returns the mean of each loss and statistic over the steps."""
    if batch.values is None:
        raise ValueError("the rollout has no values: sample it with a PolicyWithValue")
    mask = batch.response_mask
    if config.whiten_advantages:
        mean = _masked_mean(advantages, mask)
        std = _masked_mean((advantages - mean).square(), mask).sqrt()
        advantages = torch.where(mask, (advantages - mean) / (std + 1e-8), 0.0)
    B = batch.sequences.size(0)
    n_minibatches = min(config.minibatches, B)
    totals: dict[str, float] = {}
    for _ in range(config.epochs):
        order = torch.randperm(B, generator=generator).to(mask.device)
        # exactly n_minibatches, of sizes differing by at most one row (chunk can give fewer)
        for rows in order.tensor_split(n_minibatches):
            logits, values = policy(batch.sequences[rows])
            new_logp = logprobs_from_logits(logits, batch.sequences[rows], config.temperature)
            losses = ppo_losses(new_logp, batch.logprobs[rows], advantages[rows], values,
                                batch.values[rows], returns[rows], mask[rows],
                                config.clip, config.vf_clip)
            optimizer.zero_grad(set_to_none=True)
            (losses.policy + config.vf_coef * losses.value).backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
            optimizer.step()
            with torch.no_grad():
                entropy = _masked_mean(entropy_from_logits(logits, config.temperature), mask[rows])
            step = dict(policy_loss=losses.policy, value_loss=losses.value, entropy=entropy,
                        approx_kl=losses.approx_kl, clip_fraction=losses.clip_fraction)
            for name, value in step.items():
                totals[name] = totals.get(name, 0.0) + value.item()
    n_steps = config.epochs * n_minibatches
    return {name: total / n_steps for name, total in totals.items()}


def _scores(reward_fn, batch: Rollout, *args) -> torch.Tensor:
    """``reward_fn(*args)`` (by default ``(sequences, lengths)``), checked: one finite score
    per sequence of ``batch``, on its device. A reward model (a module) scores in eval mode."""
    judge = eval_mode(reward_fn) if isinstance(reward_fn, nn.Module) else contextlib.nullcontext()
    with torch.no_grad(), judge:
        scores = reward_fn(*(args or (batch.sequences, batch.lengths)))
    B = batch.sequences.size(0)
    if not isinstance(scores, torch.Tensor) or scores.shape != (B,):
        raise ValueError(f"reward_fn must return a tensor of shape ({B},), one score per "
                         f"sequence, got {shape_of(scores)}")
    return _finite("the scores of reward_fn", scores.float().to(batch.logprobs.device))


def _end_iteration(bar, history, callback, iteration: int, policy) -> float:
    """Show the iteration's reward and KL on the progress bar and run ``callback``; returns the
    seconds the callback took (the trainers leave them out of ``history.seconds``)."""
    bar.set_postfix(reward=f"{history.reward[-1]:.2f}", kl=f"{history.kl[-1]:.2f}",
                    refresh=False)
    if callback is None:
        return 0.0
    start = time.perf_counter()
    callback(iteration, policy, history)
    return time.perf_counter() - start


def train_ppo(policy: PolicyWithValue, reference: GPT, reward_fn, prompts: torch.Tensor,
              config: PPOConfig | None = None, callback=None) -> PPOHistory:
    """Optimise ``policy`` in place with PPO against ``reward_fn``, kept near ``reference``.

    ``reward_fn(sequences (B, L), lengths (B,)) -> scores (B,)`` judges whole texts (a
    :class:`RewardModel` is one); ``reference`` is frozen (usually the policy's starting
    point); ``prompts`` (N, P) are drawn ``config.batch_size`` at a time. Each iteration:
    rollout -> scores and the KL to the reference -> per-token rewards -> GAE -> PPO epochs.
    Dropout is off throughout, so the first ratio of every batch is exactly 1.

    ``callback(iteration, policy, history)``, if given, runs after every iteration (1, 2, ...),
    e.g. to evaluate checkpoints with :func:`evaluate_policy`; its time is not counted in
    ``history.seconds``, and it must leave the policy's weights as it found them.
    """
    config = config or PPOConfig()
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    if not isinstance(policy, PolicyWithValue):
        raise ValueError(f"policy must be a PolicyWithValue, got {type(policy).__name__}")
    shared = {id(p) for p in reference.parameters()} & {id(p) for p in policy.parameters()}
    if shared:
        raise ValueError("policy and reference share weights, so training the policy would move "
                         "the reference too: wrap a copy, PolicyWithValue(copy.deepcopy(base))")
    token_ids(prompts, "prompts", shape="(N, P)")
    device = model_device(policy)
    prompts = prompts.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    history = PPOHistory(threads=config.threads or threads_for(num_parameters(policy)))
    bar = tqdm(range(config.iterations), desc="PPO", disable=not config.progress, leave=False,
               mininterval=1.0)
    start, callback_seconds = time.perf_counter(), 0.0
    with eval_mode(policy), eval_mode(reference), use_threads(history.threads):
        for iteration in bar:
            pick = torch.randint(len(prompts), (config.batch_size,), generator=generator)
            batch = rollout(policy, prompts[pick.to(device)], config.max_new_tokens,
                            config.temperature, config.eot_id, generator)
            scores = _scores(reward_fn, batch)
            with torch.no_grad():
                ref_logp = sequence_logprobs(reference, batch.sequences, batch.response_mask,
                                             config.temperature)
            rewards, kl = kl_penalized_rewards(scores, batch.logprobs, ref_logp,
                                               batch.response_mask, config.kl_coef)
            advantages, returns = gae(rewards, batch.values, batch.response_mask,
                                      config.gamma, config.lam)
            stats = ppo_step(policy, optimizer, batch, advantages, returns, config, generator)
            _log(history, stats, scores, kl, batch)
            callback_seconds += _end_iteration(bar, history, callback, iteration + 1, policy)
    bar.close()
    history.seconds = time.perf_counter() - start - callback_seconds
    return history


def _log(history: PPOHistory, stats: dict, scores, kl, batch: Rollout) -> None:
    history.reward.append(scores.mean().item())
    history.kl.append(kl.sum(dim=1).mean().item())
    history.distinct_2.append(distinct_n(batch.responses(), 2))
    history.response_length.append(batch.response_mask.sum(dim=1).float().mean().item())
    for name, value in stats.items():
        getattr(history, name).append(value)


# -----------------------------------------------------------------------------
# 5. measuring a policy on fresh samples; best-of-n sampling

@dataclass
class PolicyEvaluation:
    """A policy measured on fresh samples (one per prompt given)."""

    rewards: dict[str, float]        # the mean score of the samples, by each reward function
    kl: float                        # mean over samples of log p_policy - log p_ref (summed)
    distinct_2: float                # distinct bigrams / all bigrams of the responses
    ended: float                     # share of responses that end with the end-of-text token
    response_length: float           # mean tokens per response, end-of-text included
    scores: dict[str, torch.Tensor]  # (n,) each sample's score, by each reward function
    samples: Rollout                 # the samples themselves (sequences, mask)


def _reward_fns(reward_fns) -> dict:
    if callable(reward_fns):
        return {"reward": reward_fns}
    if isinstance(reward_fns, dict) and reward_fns and all(callable(f) for f in
                                                           reward_fns.values()):
        return dict(reward_fns)
    raise ValueError("reward_fns must be a reward function (sequences, lengths) -> scores, or "
                     "a non-empty dict of them by name")


def evaluate_policy(policy, reference: GPT, reward_fns, prompts: torch.Tensor,
                    max_new_tokens: int, eot_id: int | None = None, temperature: float = 1.0,
                    seed: int = 0) -> PolicyEvaluation:
    """Sample one response per row of ``prompts`` (N, P) with ``policy`` (a GPT or a
    :class:`PolicyWithValue`), as PPO does, and measure the samples: their mean score by each
    of ``reward_fns`` (one function ``(sequences, lengths) -> scores``, such as a
    :class:`RewardModel`, or a dict of them by name), the KL to ``reference`` (the k1
    estimate of :func:`kl_penalized_rewards`, summed over each response and averaged over the
    samples: an unbiased estimate of KL(policy || reference) in nats per response), distinct-2,
    the share that end by themselves and their mean length. Seeded, so two policies measured
    with one seed see the same prompts and random numbers."""
    reward_fns = _reward_fns(reward_fns)
    if not isinstance(reference, GPT):
        raise ValueError(f"reference must be a lessons_lib.model.GPT, got "
                         f"{type(reference).__name__}")
    token_ids(prompts, "prompts", shape="(N, P)")
    non_negative_int("seed", seed)
    generator = torch.Generator().manual_seed(seed)
    threads = threads_for(num_parameters(reference))
    gpt = policy.gpt if isinstance(policy, PolicyWithValue) else policy
    with use_threads(threads), eval_mode(reference):
        samples = rollout(policy, prompts, max_new_tokens, temperature, eot_id, generator)
        with torch.no_grad():
            if gpt is reference:             # the reference itself: KL 0, one pass saved
                ref_logp = samples.logprobs
            else:
                ref_logp = sequence_logprobs(reference, samples.sequences,
                                             samples.response_mask, temperature)
            scores = {name: _scores(fn, samples).cpu() for name, fn in reward_fns.items()}
    kl = (samples.logprobs - ref_logp).sum(dim=1).mean().item()
    response = samples.sequences[:, samples.prompt_length:]
    ended = (response == eot_id).any(dim=1).float().mean().item() if eot_id is not None else 0.0
    return PolicyEvaluation(
        rewards={name: s.mean().item() for name, s in scores.items()}, kl=kl,
        distinct_2=distinct_n(samples.responses(), 2), ended=ended,
        response_length=samples.response_mask.sum(dim=1).float().mean().item(),
        scores=scores, samples=samples)


def best_of_n_kl(n) -> float:
    """``ln n - (n - 1) / n`` nats: the KL(best-of-n || base) of picking the best of ``n``
    independent samples by a score with no ties when no two samples can be equal (continuous
    outputs; Stiennon et al., 2020, appendix), and an upper bound on it for discrete outputs
    such as text, where a sample can repeat (Beirami et al., 2024). 0 for ``n = 1``."""
    if not (is_int(n) and n >= 1):
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


@dataclass
class BestOfN:
    """Best-of-n by one score, for each ``n``: what the picked sample scores, on average."""

    n: list[int]
    kl: list[float]                  # best_of_n_kl(n): the bound on the KL to the base model
    scores: dict[str, list[float]]   # by name: the mean score of the picked samples


def best_of_n(select: torch.Tensor, ns, **others: torch.Tensor) -> BestOfN:
    """Best-of-n sampling, estimated exactly from a pool of ``N`` samples per prompt.

    ``select`` (prompts, N) holds the score that picks: best-of-n keeps, of ``n`` samples,
    the one ``select`` ranks highest. ``others`` (each (prompts, N), by name) are other scores
    of the same samples (e.g. a gold reward). For each ``n`` in ``ns`` (1 .. N) this returns
    the expected score of the picked sample, averaged over the prompts, by ``select`` (as
    ``"select"``) and by each of ``others``: not one random draw of ``n`` samples but the
    average over every subset of ``n`` of the pool, an unbiased estimate. Sorted by
    ``select``, the ``i``-th lowest of ``N`` (``i = 1 .. N``) is the best of a random subset of
    ``n`` with probability ``C(i - 1, n - 1) / C(N, n)``."""
    float_tensor("select", select, ndim=2)
    _finite("select", select)
    for name, other in others.items():
        float_tensor(name, other, ndim=2)
        _finite(name, other)
        if other.shape != select.shape:
            raise ValueError(f"{name} must have the shape of select, {tuple(select.shape)}, "
                             f"got {tuple(other.shape)}")
    n_prompts, pool = select.shape
    ns = list(ns)
    if not ns or not all(is_int(n) and 1 <= n <= pool for n in ns):
        raise ValueError(f"ns must be ints in 1..{pool} (the samples per prompt), got {ns}")
    order = select.argsort(dim=1)                                   # ascending, per prompt
    ranked = {"select": select.gather(1, order).double()}
    ranked.update({name: other.gather(1, order).double() for name, other in others.items()})
    i = torch.arange(1, pool + 1, dtype=torch.float64)              # rank of each sorted sample
    scores = {name: [] for name in ranked}
    for n in ns:
        # log C(i - 1, n - 1) - log C(N, n); zero weight where i < n
        log_weight = (torch.lgamma(i) - torch.lgamma(torch.clamp(i - n + 1, min=1.0))
                      - math.lgamma(n) - (math.lgamma(pool + 1) - math.lgamma(n + 1)
                                          - math.lgamma(pool - n + 1)))
        weight = torch.where(i >= n, log_weight.exp(), 0.0)          # sums to 1
        for name, values in ranked.items():
            scores[name].append((values @ weight).mean().item())
    return BestOfN(ns, [best_of_n_kl(n) for n in ns], scores)


# -----------------------------------------------------------------------------
# 6. DPO: the preference loss on log-probability ratios, no reward model in the loop

def _check_logps(**logps: torch.Tensor) -> None:
    for name, t in logps.items():
        float_tensor(name, t, ndim=1)
        _finite(name, t)
    _same_shape(**logps)
    if next(iter(logps.values())).numel() == 0:
        raise ValueError("got no pairs: the log-probability tensors are empty")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023), averaged over the pairs.

    Each argument is (pairs,): a response's log-probability summed over its response tokens
    only (:func:`lessons_lib.scoring.sequence_logprobs` ``.sum(1)``), under the policy or the
    frozen reference. The implicit reward of a response is
    ``beta * (log pi(y|x) - log pi_ref(y|x))``, and the loss is the Bradley-Terry negative
    log-likelihood of the preferences under that reward:
    ``-log sigmoid(r(chosen) - r(rejected))``. ``beta = 0``, or equal log-ratios, gives ln 2.

    Returns ``(loss, chosen_rewards, rejected_rewards)``; the rewards are detached.
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps,
                 policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta = number_in("beta", beta, 0.0, math.inf, high_open=True)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def best_and_worst(scores: torch.Tensor, group_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference pairs from groups of samples: ``scores`` (B,) holds ``B / group_size``
    groups one after the other (samples of one prompt, as :func:`group_advantages` reads
    them). Returns the rows ``(chosen (n,), rejected (n,))`` of each group's best and worst
    sample, leaving out groups whose scores are all equal (no preference)."""
    groups = _check_groups(scores, group_size)
    best, worst = groups.argmax(dim=1), groups.argmin(dim=1)
    keep = groups.max(dim=1).values > groups.min(dim=1).values
    start = torch.arange(len(groups), device=groups.device) * group_size
    return (start + best)[keep], (start + worst)[keep]


@dataclass
class DPOConfig:
    beta: float = 0.1                # strength of the implicit KL: the reward is beta * log-ratio
    lr: float = 5e-5
    epochs: int = 6                  # passes over the pairs
    batch_size: int = 32             # pairs per optimizer step
    grad_clip: float = 1.0           # max gradient norm; 0 turns clipping off
    threads: int | None = None       # CPU threads; None: runtime.threads_for(model size)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            positive_int(f"DPOConfig.{name}", getattr(self, name))
        for name in ("beta", "lr"):
            positive_number(f"DPOConfig.{name}", getattr(self, name))
        number_in("DPOConfig.grad_clip", self.grad_clip, low=0.0)
        non_negative_int("DPOConfig.seed", self.seed)
        if self.threads is not None:
            positive_int("DPOConfig.threads", self.threads)


@dataclass
class DPOHistory:
    """One entry per optimizer step, over the step's pairs; rewards are DPO's implicit ones,
    ``beta * (log pi - log pi_ref)`` of a whole response."""

    loss: list[float] = field(default_factory=list)
    chosen_reward: list[float] = field(default_factory=list)
    rejected_reward: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)          # chosen minus rejected
    accuracy: list[float] = field(default_factory=list)        # share with a positive margin
    seconds: float = 0.0
    threads: int = 0


def _check_pairs(chosen_idx, chosen_mask, rejected_idx, rejected_mask) -> int:
    for name, idx, mask in (("chosen", chosen_idx, chosen_mask),
                            ("rejected", rejected_idx, rejected_mask)):
        token_ids(idx, f"{name}_idx", shape="(pairs, L)")
        check_response_mask(mask, idx.shape)
        if mask[:, 0].any():
            raise ValueError(f"{name}_mask[:, 0] must be False: the first token is the prompt's")
    if len(chosen_idx) != len(rejected_idx) or len(chosen_idx) == 0:
        raise ValueError(f"chosen and rejected must hold one row per pair, got "
                         f"{len(chosen_idx)} and {len(rejected_idx)} rows")
    return len(chosen_idx)


def _check_policy_and_reference(policy, reference) -> None:
    for name, model in (("policy", policy), ("reference", reference)):
        if not isinstance(model, GPT):
            raise ValueError(f"{name} must be a lessons_lib.model.GPT, got "
                             f"{type(model).__name__}")
    if {id(p) for p in reference.parameters()} & {id(p) for p in policy.parameters()}:
        raise ValueError("policy and reference share weights, so training the policy would move "
                         "the reference too: train a copy, copy.deepcopy(reference)")


def train_dpo(policy: GPT, reference: GPT, chosen_idx: torch.Tensor, chosen_mask: torch.Tensor,
              rejected_idx: torch.Tensor, rejected_mask: torch.Tensor,
              config: DPOConfig | None = None) -> DPOHistory:
    """Optimise ``policy`` in place with :func:`dpo_loss` on fixed preference pairs.

    Row ``i`` of ``chosen_idx`` (pairs, L) and of ``rejected_idx`` (pairs, L') is a prompt and
    the preferred (resp. the other) response; the masks mark the response tokens (a
    :class:`Rollout`'s ``response_mask``, or :func:`lessons_lib.scoring.encode_responses`). The
    reference's log-probabilities are computed once, before training, without gradients: it
    never moves. Each epoch visits the pairs in a new random order, ``config.batch_size`` per
    Adam step. Dropout is off throughout, as in :func:`train_ppo`.
    """
    config = config or DPOConfig()
    _check_policy_and_reference(policy, reference)
    n_pairs = _check_pairs(chosen_idx, chosen_mask, rejected_idx, rejected_mask)
    device = model_device(policy)
    history = DPOHistory(threads=config.threads or threads_for(num_parameters(policy)))
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    steps = config.epochs * math.ceil(n_pairs / config.batch_size)
    bar = tqdm(total=steps, desc="DPO", disable=not config.progress, leave=False,
               mininterval=1.0)
    start = time.perf_counter()
    with eval_mode(policy), use_threads(history.threads):
        ref_chosen = response_logprobs(reference, chosen_idx, chosen_mask)
        ref_rejected = response_logprobs(reference, rejected_idx, rejected_mask)
        for _ in range(config.epochs):
            for rows in torch.randperm(n_pairs, generator=generator).split(config.batch_size):
                policy_chosen = sequence_logprobs(policy, chosen_idx[rows].to(device),
                                                  chosen_mask[rows].to(device)).sum(dim=1)
                policy_rejected = sequence_logprobs(policy, rejected_idx[rows].to(device),
                                                    rejected_mask[rows].to(device)).sum(dim=1)
                loss, chosen_reward, rejected_reward = dpo_loss(
                    policy_chosen, policy_rejected, ref_chosen[rows].to(device),
                    ref_rejected[rows].to(device), config.beta)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
                optimizer.step()
                margin = chosen_reward - rejected_reward
                history.loss.append(loss.item())
                history.chosen_reward.append(chosen_reward.mean().item())
                history.rejected_reward.append(rejected_reward.mean().item())
                history.margin.append(margin.mean().item())
                history.accuracy.append((margin > 0).float().mean().item())
                bar.update()
                bar.set_postfix(loss=f"{history.loss[-1]:.3f}", refresh=False)
    bar.close()
    history.seconds = time.perf_counter() - start
    return history


def dpo_implicit_accuracy(policy: GPT, reference: GPT, chosen_idx: torch.Tensor,
                          chosen_mask: torch.Tensor, rejected_idx: torch.Tensor,
                          rejected_mask: torch.Tensor) -> float:
    """The share of pairs whose chosen response gets the higher implicit reward, i.e. the
    larger log-ratio ``log pi - log pi_ref`` (a tie counts one half; beta does not matter).
    0.5 for the reference itself: every log-ratio is 0."""
    if policy is not reference:
        _check_policy_and_reference(policy, reference)
    _check_pairs(chosen_idx, chosen_mask, rejected_idx, rejected_mask)
    with use_threads(threads_for(num_parameters(policy))):
        chosen = response_logprobs(policy, chosen_idx, chosen_mask) \
            - response_logprobs(reference, chosen_idx, chosen_mask)
        rejected = response_logprobs(policy, rejected_idx, rejected_mask) \
            - response_logprobs(reference, rejected_idx, rejected_mask)
    return pair_accuracy(chosen, rejected)


# -----------------------------------------------------------------------------
# 7. GRPO: advantages from a group of samples per prompt, no value head; pass@k

def _check_groups(rewards, group_size: int) -> torch.Tensor:
    float_tensor("rewards", rewards, ndim=1)
    _finite("rewards", rewards)
    if not (is_int(group_size) and group_size >= 2):
        raise ValueError(f"group_size must be an int >= 2 (a group compares its samples), "
                         f"got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"rewards must hold whole groups of {group_size} (prompt after prompt), "
                         f"got {rewards.numel()} rewards")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """(B,): each sample's reward minus its group's mean, divided by the group's standard
    deviation (Bessel-corrected) plus ``eps`` when ``scale_by_std`` (GRPO, Shao et al., 2024),
    not divided when False (Dr. GRPO, Liu et al., 2025: dividing by the std up-weights groups
    whose rewards barely differ, i.e. prompts that are too easy or too hard).

    ``rewards`` (B,) holds ``B / group_size`` groups one after the other: samples ``0 ..
    group_size - 1`` answer the first prompt, and so on. A group whose rewards are all equal
    gets advantage 0 for every sample: it carries no signal.
    """
    groups = _check_groups(rewards, group_size)
    positive_number("eps", eps)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def no_signal_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """The fraction of groups whose rewards are all equal: GRPO learns nothing from them."""
    groups = _check_groups(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1).float().mean().item()


@dataclass
class GRPOLosses:
    loss: torch.Tensor            # what to minimise: policy_loss + kl_coef * kl
    policy_loss: torch.Tensor
    kl: torch.Tensor              # the k3 estimate of KL(policy || reference) per token, detached
    clip_fraction: torch.Tensor   # share of response tokens whose ratio left the clip range


def grpo_losses(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                clip: float = 0.2, aggregation: str = "token") -> GRPOLosses:
    """GRPO's objective: PPO's clipped surrogate with one advantage per sequence (B,) spread
    over its response tokens, plus ``kl_coef`` times a per-token KL to the reference.

    The KL is the k3 estimator ``exp(q) - q - 1`` with ``q = ref_logp - new_logp`` (unbiased
    and never negative), as in DeepSeekMath, with ``q`` clamped to [-20, 20] against overflow;
    ``ref_logp`` is needed when ``kl_coef > 0``.

    ``aggregation`` says how tokens are averaged. "token": over every response token of the
    batch at once, so each token counts the same (DAPO's token mean, TRL's ``loss_type="bnpo"``;
    what this course uses; Dr. GRPO divides the same sum by a constant instead).
    "sequence": over each sequence's tokens, then over sequences (the original GRPO): a token
    of a short response then weighs more than one of a long response, which biases the
    policy's response length.
    """
    for name, t in dict(new_logp=new_logp, old_logp=old_logp).items():
        float_tensor(name, t, ndim=2)
    _same_shape(new_logp=new_logp, old_logp=old_logp)
    check_response_mask(mask, new_logp.shape)
    float_tensor("advantages", advantages, ndim=1)
    _finite("advantages", advantages)
    if advantages.shape[0] != new_logp.shape[0]:
        raise ValueError(f"advantages must have one entry per sequence ({new_logp.shape[0]}), "
                         f"got shape {shape_of(advantages)}")
    kl_coef = number_in("kl_coef", kl_coef, 0.0, math.inf, high_open=True)
    clip = positive_number("clip", clip)
    if aggregation not in ("token", "sequence"):
        raise ValueError(f'aggregation must be "token" or "sequence", got {aggregation!r}')
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp, the reference's per-token log-probs")

    def average(x):
        if aggregation == "token":
            return _masked_mean(x, mask)
        per_sequence = torch.where(mask, x, 0.0).sum(dim=1) / mask.sum(dim=1)
        return per_sequence.mean()

    token_loss, ratio, _ = _clipped_surrogate(new_logp, old_logp, advantages[:, None], mask, clip)
    policy_loss = average(token_loss)
    if ref_logp is not None:
        float_tensor("ref_logp", ref_logp, ndim=2)
        _same_shape(new_logp=new_logp, ref_logp=ref_logp)
        # clamped so that exp cannot overflow where the policy has left the reference far behind
        q = torch.where(mask, ref_logp - new_logp, 0.0).clamp(-20.0, 20.0)
        kl = average(q.exp() - q - 1.0)
    else:
        kl = torch.zeros((), dtype=new_logp.dtype, device=new_logp.device)
    with torch.no_grad():
        clip_fraction = _masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
    return GRPOLosses(policy_loss + kl_coef * kl, policy_loss, kl.detach(), clip_fraction)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et
    al., 2021): the probability that at least one of ``k`` samples drawn without replacement
    from the ``n`` is correct, ``1 - C(n - c, k) / C(n, k)``, computed as a product so that it
    stays exact for large ``n``."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be in 0..n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n} (k samples out of n), got {k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):        # C(n-c, k) / C(n, k) = prod (1 - k / i)
        fail *= 1.0 - k / i
    return 1.0 - fail


def mean_pass_at_k(correct: torch.Tensor, k: int) -> float:
    """pass@k averaged over problems: ``correct`` (problems, n) bool holds ``n`` checked
    samples per problem; each row gives :func:`pass_at_k` ``(n, correct in the row, k)``."""
    if not isinstance(correct, torch.Tensor) or correct.dtype != torch.bool or correct.dim() != 2:
        raise ValueError(f"correct must be a (problems, n) bool tensor, got {shape_of(correct)}")
    n = correct.size(1)
    return sum(pass_at_k(n, c, k) for c in correct.sum(dim=1).tolist()) / len(correct)


@dataclass
class GRPOConfig:
    iterations: int = 40
    prompts_per_iteration: int = 16  # distinct prompts per batch, each sampled group_size times
    group_size: int = 8              # G: samples per prompt, compared with one another
    max_new_tokens: int = 8
    temperature: float = 1.0
    eot_id: int | None = None        # a response ends at its first eot_id (inclusive)
    kl_coef: float = 0.04            # weight of the k3 KL to the reference (DeepSeekMath's)
    clip: float = 0.2
    scale_by_std: bool = True        # False: Dr. GRPO's advantages, not divided by the std
    aggregation: str = "token"       # "token" or "sequence": see grpo_losses
    epochs: int = 1                  # passes over each batch of samples
    minibatches: int = 2             # optimizer steps per pass
    lr: float = 1e-4
    grad_clip: float = 1.0           # max gradient norm; 0 turns clipping off
    threads: int | None = None       # CPU threads; None: runtime.threads_for(model size)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("iterations", "prompts_per_iteration", "max_new_tokens", "epochs",
                     "minibatches"):
            positive_int(f"GRPOConfig.{name}", getattr(self, name))
        if not (is_int(self.group_size) and self.group_size >= 2):
            raise ValueError(f"GRPOConfig.group_size must be an int >= 2 (a group compares its "
                             f"samples), got {self.group_size!r}")
        for name in ("temperature", "clip", "lr"):
            positive_number(f"GRPOConfig.{name}", getattr(self, name))
        for name in ("kl_coef", "grad_clip"):
            number_in(f"GRPOConfig.{name}", getattr(self, name), low=0.0)
        if self.aggregation not in ("token", "sequence"):
            raise ValueError(f'GRPOConfig.aggregation must be "token" or "sequence", got '
                             f"{self.aggregation!r}")
        if self.minibatches > self.prompts_per_iteration * self.group_size:
            raise ValueError(f"GRPOConfig.minibatches={self.minibatches} is more than the "
                             f"{self.prompts_per_iteration * self.group_size} samples per "
                             "iteration: a minibatch would be empty")
        non_negative_int("GRPOConfig.seed", self.seed)
        if self.threads is not None:
            positive_int("GRPOConfig.threads", self.threads)


@dataclass
class GRPOHistory:
    """One entry per iteration, measured on the iteration's samples (before its update)."""

    reward: list[float] = field(default_factory=list)          # mean reward of the samples
    no_signal: list[float] = field(default_factory=list)       # share of groups all equal
    kl: list[float] = field(default_factory=list)              # k1, nats per response
    entropy: list[float] = field(default_factory=list)         # per response token
    clip_fraction: list[float] = field(default_factory=list)   # mean over the steps
    response_length: list[float] = field(default_factory=list)
    seconds: float = 0.0
    threads: int = 0


def train_grpo(policy: GPT, reference: GPT, reward_fn, prompts: torch.Tensor,
               config: GRPOConfig | None = None, callback=None) -> GRPOHistory:
    """Optimise ``policy`` (a plain GPT: no value head) in place with GRPO.

    Each iteration draws ``config.prompts_per_iteration`` distinct rows of ``prompts`` (N, P),
    repeats each ``config.group_size`` times, samples responses with :func:`rollout`, and asks
    ``reward_fn(batch: Rollout) -> (B,)`` for one reward per sample (e.g. 1 for a correct
    answer). :func:`group_advantages` compares each sample with the others of its prompt;
    :func:`grpo_losses` turns them into the clipped objective, with ``config.kl_coef`` times
    the KL to the frozen ``reference``. Dropout is off, so each batch's first ratio is 1.

    ``callback(iteration, policy, history)``, if given, runs after every iteration (1, 2, ...);
    its time is not counted in ``history.seconds``.
    """
    config = config or GRPOConfig()
    _check_policy_and_reference(policy, reference)
    if not callable(reward_fn):
        raise ValueError(f"reward_fn must be callable (Rollout -> (B,) rewards), got "
                         f"{type(reward_fn).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    token_ids(prompts, "prompts", shape="(N, P)")
    if config.prompts_per_iteration > len(prompts):
        raise ValueError(f"GRPOConfig.prompts_per_iteration={config.prompts_per_iteration} is "
                         f"more than the {len(prompts)} prompts given")
    device = model_device(policy)
    prompts = prompts.to(device)
    G = config.group_size
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    history = GRPOHistory(threads=config.threads or threads_for(num_parameters(policy)))
    bar = tqdm(range(config.iterations), desc="GRPO", disable=not config.progress, leave=False,
               mininterval=1.0)
    start, callback_seconds = time.perf_counter(), 0.0
    with eval_mode(policy), eval_mode(reference), use_threads(history.threads):
        for iteration in bar:
            pick = torch.randperm(len(prompts), generator=generator)[:config.prompts_per_iteration]
            group_prompts = prompts[pick.to(device)].repeat_interleave(G, dim=0)
            batch = rollout(policy, group_prompts, config.max_new_tokens, config.temperature,
                            config.eot_id, generator)
            rewards = _scores(reward_fn, batch, batch)
            advantages = group_advantages(rewards, G, config.scale_by_std)
            mask = batch.response_mask
            with torch.no_grad():
                ref_logp = sequence_logprobs(reference, batch.sequences, mask, config.temperature)
            entropy, clip_fraction, n_steps = 0.0, 0.0, 0
            for _ in range(config.epochs):
                order = torch.randperm(len(rewards), generator=generator).to(device)
                for rows in order.tensor_split(min(config.minibatches, len(rewards))):
                    logits, _ = policy(batch.sequences[rows])
                    new_logp = logprobs_from_logits(logits, batch.sequences[rows],
                                                    config.temperature)
                    losses = grpo_losses(new_logp, batch.logprobs[rows], advantages[rows],
                                         mask[rows], ref_logp[rows], config.kl_coef,
                                         config.clip, config.aggregation)
                    optimizer.zero_grad(set_to_none=True)
                    losses.loss.backward()
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
                    optimizer.step()
                    with torch.no_grad():
                        token_entropy = entropy_from_logits(logits, config.temperature)
                        entropy += _masked_mean(token_entropy, mask[rows]).item()
                    clip_fraction += losses.clip_fraction.item()
                    n_steps += 1
            history.reward.append(rewards.mean().item())
            history.no_signal.append(no_signal_fraction(rewards, G))
            history.kl.append((batch.logprobs - ref_logp).sum(dim=1).mean().item())
            history.entropy.append(entropy / n_steps)
            history.clip_fraction.append(clip_fraction / n_steps)
            history.response_length.append(mask.sum(dim=1).float().mean().item())
            callback_seconds += _end_iteration(bar, history, callback, iteration + 1, policy)
    bar.close()
    history.seconds = time.perf_counter() - start - callback_seconds
    return history
