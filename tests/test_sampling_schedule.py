"""Sampling filters against Hugging Face's logits processors, the learning-rate schedule against
torch.optim.lr_scheduler, and AdamW's weight-decay groups."""

import math

import pytest
import torch

from lessons_lib.generate import filter_logits, sample_next
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.train import TrainConfig, lr_at, make_optimizer


def random_logits(seed, shape=(6, 40), ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:                       # few distinct values: many tokens share a logit
        return torch.randint(0, 4, shape, generator=g).double()
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2


def kept(logits):
    return ~torch.isinf(logits)


# -----------------------------------------------------------------------------
# top-k and top-p against transformers

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5, 17, 39, 40, 100])
def test_top_k_equals_hugging_face(k, ties):
    transformers = pytest.importorskip("transformers")
    warper = transformers.TopKLogitsWarper(top_k=k)
    for seed in range(5):
        logits = random_logits(seed, ties=ties)
        ours = filter_logits(logits, top_k=k)
        assert torch.equal(ours, warper(None, logits.clone()))
        # never fewer than k tokens (ties at the k-th value may add more), all at their values
        assert (kept(ours).sum(-1) >= min(k, logits.size(-1))).all()
        assert torch.equal(ours[kept(ours)], logits[kept(ours)])


@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.5, 0.75, 0.9, 0.99])
def test_top_p_equals_hugging_face_without_ties(p):
    transformers = pytest.importorskip("transformers")
    warper = transformers.TopPLogitsWarper(top_p=p)
    for seed in range(5):
        logits = random_logits(seed)
        assert torch.equal(kept(filter_logits(logits, top_p=p)), kept(warper(None, logits.clone())))


@pytest.mark.parametrize("k, p", [(5, 0.5), (10, 0.9), (1, 0.3), (40, 0.6)])
def test_top_k_then_top_p_equals_hugging_face_chained(k, p):
    transformers = pytest.importorskip("transformers")
    chain = transformers.LogitsProcessorList([transformers.TopKLogitsWarper(top_k=k),
                                              transformers.TopPLogitsWarper(top_p=p)])
    for seed in range(5):
        logits = random_logits(seed)
        assert torch.equal(kept(filter_logits(logits, top_k=k, top_p=p)),
                           kept(chain(None, logits.clone())))


def nucleus_by_definition(row, p):
    """Keep a token when the tokens strictly more likely than it hold less than p, and always
    keep the most likely tokens: the rule filter_logits documents, ties included."""
    probs = torch.softmax(row, -1).tolist()
    values = row.tolist()
    best = max(values)
    return [v == best or sum(q for u, q in zip(values, probs) if u > v) < p for v in values]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 1.0])
def test_top_p_with_ties_keeps_or_drops_tied_tokens_together(p):
    for seed in range(5):
        logits = random_logits(seed, ties=True)
        ours = kept(filter_logits(logits, top_p=p))
        for row, mask in zip(logits, ours):
            assert mask.tolist() == nucleus_by_definition(row, p)


def test_top_p_zero_keeps_the_most_likely_token():
    logits = random_logits(0)
    only = kept(filter_logits(logits, top_p=0.0))
    assert (only.sum(-1) == 1).all()
    assert torch.equal(only.float().argmax(-1), logits.argmax(-1))
    draws = sample_next(logits.float(), top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws[:, 0], logits.argmax(-1))


def test_filters_reject_what_makes_no_distribution():
    logits = random_logits(1).float()
    with pytest.raises(ValueError, match="top_k must be a positive int or None"):
        filter_logits(logits, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=2.5)
    for p in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match="top_p must be a number in"):
            filter_logits(logits, top_p=p)
    bad = logits.clone()
    bad[0, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        filter_logits(bad, top_k=3)
    with pytest.raises(ValueError, match="NaN"):
        sample_next(bad)
    with pytest.raises(ValueError, match="floating-point"):
        filter_logits(torch.zeros(2, 3, dtype=torch.long), top_k=1)
    for t in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            sample_next(logits, temperature=t)
    # -inf is a token that cannot be chosen: allowed
    masked = logits.clone()
    masked[:, 0] = -math.inf
    assert (sample_next(masked, generator=torch.Generator().manual_seed(0)) != 0).all()


def test_top_k_at_least_the_vocabulary_keeps_everything():
    logits = random_logits(2)
    assert torch.equal(filter_logits(logits, top_k=40), logits)
    assert torch.equal(filter_logits(logits, top_k=10_000), logits)
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)


# -----------------------------------------------------------------------------
# the schedule against torch.optim.lr_scheduler

def torch_schedule(config):
    """The same schedule built from PyTorch's schedulers: LinearLR for the warmup, then
    CosineAnnealingLR down to lr * min_lr_ratio over the remaining steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    span = max(1, config.max_steps - config.warmup_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=span,
                                                        eta_min=config.lr * config.min_lr_ratio)
    if config.warmup_steps >= 2:
        W = config.warmup_steps
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / W, end_factor=1.0,
                                                 total_iters=W - 1)
        scheduler = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[W])
    else:
        scheduler = cosine
    lrs = []
    for _ in range(config.max_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("max_steps, warmup_steps, min_lr_ratio",
                         [(100, 10, 0.1), (57, 5, 0.0), (40, 0, 0.1), (30, 2, 1.0), (200, 30, 0.25)])
def test_lr_at_equals_pytorch_schedulers_at_every_step(max_steps, warmup_steps, min_lr_ratio):
    config = TrainConfig(max_steps=max_steps, warmup_steps=warmup_steps, lr=3e-3,
                         min_lr_ratio=min_lr_ratio)
    ours = [lr_at(step, config) for step in range(max_steps)]
    assert ours == pytest.approx(torch_schedule(config), rel=1e-9, abs=1e-12)


# -----------------------------------------------------------------------------
# weight decay: matrices only, every parameter in exactly one group

def test_weight_decay_groups_cover_every_parameter_once():
    config = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = GPT(config)
    model.h[1].ln_2.weight.requires_grad_(False)            # frozen: in no group
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}        # tied weights: one name
    decayed = sorted(names[id(p)] for p in decay["params"])
    not_decayed = sorted(names[id(p)] for p in no_decay["params"])
    assert not set(decayed) & set(not_decayed)
    assert len(decayed) == len(decay["params"]) and len(not_decayed) == len(no_decay["params"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(decayed + not_decayed) == trainable
    assert "h.1.ln_2.weight" not in not_decayed
    # the matrices: token and position tables (the head is tied to wte) and every Linear weight
    expected = ["wpe.weight", "wte.weight"] + [f"h.{i}.{m}.weight" for i in range(2) for m in
                                               ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert decayed == sorted(expected)
    assert all(n.endswith("bias") or ".ln_" in n or n.startswith("ln_f") for n in not_decayed)
    counted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters() if p.requires_grad)
