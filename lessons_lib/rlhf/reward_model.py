"""The reward model (chapter 10): a language model's trunk and a scalar head that reads it at
each text's end, trained on human ratings with the Bradley-Terry loss. Read top to bottom.

:class:`RewardModel`; :func:`bradley_terry_loss` on preference pairs
(``P(chosen beats rejected) = sigmoid(r_chosen - r_rejected)``); :func:`pair_accuracy` and
:func:`spearman` to measure it on held-out pairs and ratings. On rated texts:
:func:`encode_snippets` (a padded batch, each text ending in end-of-text),
:func:`all_pairs_bradley_terry_loss` (every pair of a batch whose ratings differ by a margin),
:func:`train_reward_model`, :func:`score_texts` and :func:`evaluate_reward_model`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from numbers import Real

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import (eval_mode, finite, float_tensor, is_int, number_in,
                      positive_int, positive_number, shape_of, token_ids)
from ..model import GPT, DecoderLM, GPTConfig
from ..runtime import model_device
from .rollouts import Rollout
from .trainer import History, Trainer, check_run_fields

__all__ = ["RewardModel", "end_positions", "bradley_terry_loss", "pair_accuracy", "spearman",
           "encode_snippets", "preference_mask", "all_pairs_bradley_terry_loss",
           "RewardTrainConfig", "RewardTrainHistory", "train_reward_model", "score_texts",
           "RewardEvaluation", "evaluate_reward_model"]


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
    """A language model's trunk and a scalar head: ``forward(idx, lengths) -> rewards`` (B,),
    or ``forward(batch)`` on a :class:`lessons_lib.rlhf.rollouts.Rollout` (its sequences and
    lengths): the reward-function signature every trainer here calls.

    ``trunk`` is a :class:`GPTConfig` (a fresh GPT) or a model with hidden states (a
    :class:`lessons_lib.model.DecoderLM`: GPT or Llama), whose weights are copied (training the
    reward model leaves the language model as it was). The head reads the trunk's final hidden
    state at each sequence's end (:func:`end_positions`): a causal model has read the whole
    text there, and nothing after it, so padding cannot change it.
    """

    def __init__(self, trunk: DecoderLM | GPTConfig, eot_id: int | None = None):
        super().__init__()
        if isinstance(trunk, GPTConfig):
            trunk = GPT(trunk)
        elif isinstance(trunk, DecoderLM):
            trunk = copy.deepcopy(trunk)
        else:
            raise ValueError(f"trunk must be a GPTConfig or a lessons_lib.model.DecoderLM (a GPT "
                             f"or a Llama), got {type(trunk).__name__}")
        if eot_id is not None and not (is_int(eot_id) and 0 <= eot_id < trunk.config.vocab_size):
            raise ValueError(f"eot_id must be a token id in 0..{trunk.config.vocab_size - 1} "
                             f"or None, got {eot_id!r}")
        self.trunk = trunk
        self.head = nn.Linear(trunk.config.n_embd, 1, device=model_device(trunk))   # beside it
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.eot_id = eot_id

    def forward(self, idx: torch.Tensor | Rollout,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(idx, Rollout):
            idx, lengths = idx.sequences, idx.lengths
        token_ids(idx, "idx")
        ends = end_positions(idx, lengths, self.eot_id)
        h = self.trunk.hidden_states(idx)                          # (B, T, n_embd)
        h_end = h[torch.arange(idx.size(0), device=h.device), ends]   # (B, n_embd)
        return self.head(h_end).squeeze(-1)

    def score_responses(self, batch: Rollout) -> torch.Tensor:
        """The score of each response of ``batch`` alone, read as a text of its own (the prompt
        left out): a reward function for a policy that answers in a chat template this model
        never read. Tokens past the trunk's vocabulary (the template's special tokens, such as
        its end marker) read as ``eot_id``."""
        if not isinstance(batch, Rollout):
            raise ValueError(f"batch must be a Rollout, got {type(batch).__name__}")
        if self.eot_id is None:
            raise ValueError("score_responses reads a response's end marker as end-of-text: "
                             "build the RewardModel with an eot_id")
        P = batch.prompt_length
        response, mask = batch.sequences[:, P:], batch.response_mask[:, P:]
        idx = torch.where(mask & (response < self.trunk.config.vocab_size), response,
                          self.eot_id)
        with eval_mode(self):
            return self(idx, mask.sum(dim=1).clamp(min=1))


def _check_pair(r_chosen, r_rejected) -> None:
    float_tensor("r_chosen", r_chosen, ndim=1)
    float_tensor("r_rejected", r_rejected, ndim=1)
    if r_chosen.shape != r_rejected.shape or len(r_chosen) == 0:
        raise ValueError(f"r_chosen and r_rejected must be non-empty and of one length (one "
                         f"reward each per pair), got {len(r_chosen)} and {len(r_rejected)}")
    finite("r_chosen", r_chosen)
    finite("r_rejected", r_rejected)


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
    finite("x", x)
    finite("y", y)
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
    finite("rewards", rewards)
    finite("ratings", ratings)
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
        positive_number("RewardTrainConfig.margin", self.margin)
        number_in("RewardTrainConfig.weight_decay", self.weight_decay, low=0.0)
        check_run_fields(self)


@dataclass
class RewardTrainHistory(History):
    loss: list[float] = field(default_factory=list)    # one per step that had a pair
    skipped_batches: int = 0                           # batches with no pair at the margin


def _rated_texts(snippets, name: str) -> tuple[list[str], torch.Tensor]:
    """The texts and ratings of ``snippets`` (objects with ``.text`` and ``.score``, such as
    :class:`lessons_lib.data.RatedSnippet`)."""
    snippets = list(snippets)
    if not all(isinstance(getattr(s, "text", None), str) and isinstance(getattr(s, "score", None),
                                                                        Real) for s in snippets):
        raise ValueError(f"{name} must be rated snippets, each with .text (str) and .score "
                         "(a number), like lessons_lib.data.RatedSnippet")
    ratings = torch.tensor([float(s.score) for s in snippets], dtype=torch.float32)
    finite(f"the ratings of {name}", ratings)
    return [s.text for s in snippets], ratings


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
    trainer = Trainer.for_config(model, config, total=config.steps, desc="reward model",
                                 weight_decay=config.weight_decay)
    history = RewardTrainHistory()
    with trainer.running(history, train_mode=True):
        for _ in range(config.steps):
            rows = torch.randperm(len(texts), generator=trainer.generator)
            rows = rows[:config.batch_size].tolist()
            batch_ratings = ratings[rows].to(device)
            if not preference_mask(batch_ratings, config.margin).any():
                history.skipped_batches += 1
                trainer.tick()
                continue
            idx, lengths = encode_snippets([texts[i] for i in rows], tokenizer, model.eot_id,
                                           block_size)
            rewards = model(idx.to(device), lengths.to(device))
            loss = all_pairs_bradley_terry_loss(rewards, batch_ratings, config.margin)
            trainer.step(loss)
            history.loss.append(loss.item())
            trainer.tick(loss=history.loss[-1])
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
