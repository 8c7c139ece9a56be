"""lessons_lib.pretrained: the exact whole-split score, the recipe's cache key, the cache itself."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch
import torch.nn as nn

from lessons_lib import pretrained
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.train import TrainConfig
from lessons_lib.pretrained import (RECIPES, Recipe, cache_path, evaluate_split, shakespeare_char,
                                    shakespeare_data)

TINY_MODEL = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
TINY_RECIPE = Recipe(
    model=GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16),
    train=TrainConfig(block_size=16, batch_size=4, max_steps=6, warmup_steps=1,
                      eval_interval=3, eval_batches=1, precision="fp32"))


def with_train(recipe, **changes):
    """``recipe`` with some of its training settings changed."""
    return replace(recipe, train=replace(recipe.train, **changes))


def tiny_movies():
    """The movie recipe, shrunk to a few steps of a 1-layer model."""
    movies = RECIPES["movies"]
    return replace(movies, model=replace(movies.model, n_layer=1, n_embd=32, n_head=2),
                   train=replace(movies.train, batch_size=4, max_steps=3, warmup_steps=1,
                                 eval_interval=3, eval_batches=2))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY_MODEL).eval()


def by_hand(model, ids, block_size):
    """Every window scored alone, in float64, with an explicit log-softmax."""
    nll = []
    for start in range(0, len(ids) - 1, block_size):
        x = ids[start:start + block_size]
        y = ids[start + 1:start + block_size + 1]
        x = x[: len(y)]
        with torch.no_grad():
            logits = model(x[None])[0][0].double()
        log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        nll += [-log_probs[t, y[t]].item() for t in range(len(y))]
    return sum(nll) / len(nll), len(nll)


# -- the exact score -----------------------------------------------------------------------

@pytest.mark.parametrize("n_ids, block_size", [(41, 8), (33, 8), (9, 8), (2, 8), (20, 3), (30, 1)])
def test_evaluate_split_equals_a_hand_computation(n_ids, block_size):
    model = tiny_model()
    ids = torch.randint(11, (n_ids,), generator=torch.Generator().manual_seed(n_ids))
    expected, count = by_hand(model, ids, block_size)
    assert count == n_ids - 1                       # every token but the first is predicted once
    assert evaluate_split(model, ids, block_size) == pytest.approx(expected, rel=1e-5)


def test_evaluate_split_does_not_depend_on_the_batch_size():
    model = tiny_model()
    ids = torch.randint(11, (500,), generator=torch.Generator().manual_seed(1))
    results = [evaluate_split(model, ids, 8, batch_size=b) for b in (1, 7, 64)]
    assert max(results) - min(results) < 1e-6


class Uniform(nn.Module):
    """Equal logits everywhere: the loss must be exactly ln V on any text."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size) + 0 * self.dummy, None


def test_a_uniform_model_scores_ln_v():
    ids = torch.randint(64, (1000,), generator=torch.Generator().manual_seed(2))
    assert evaluate_split(Uniform(64), ids, block_size=64) == pytest.approx(math.log(64), rel=1e-6)


def test_evaluate_split_defaults_to_the_model_block_and_restores_training_mode():
    model = tiny_model().train()
    ids = torch.randint(11, (50,), generator=torch.Generator().manual_seed(3))
    assert evaluate_split(model, ids) == evaluate_split(model, ids, 8)
    assert model.training


def test_evaluate_split_errors():
    model = tiny_model()
    ids = torch.arange(10) % 11
    with pytest.raises(ValueError, match="1-D"):
        evaluate_split(model, ids[None])
    with pytest.raises(ValueError, match="integer"):
        evaluate_split(model, ids.float())
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_split(model, ids[:1])
    with pytest.raises(ValueError, match="longer than the model"):
        evaluate_split(model, ids, block_size=9)
    with pytest.raises(ValueError, match="block_size"):
        evaluate_split(model, ids, block_size=-1)
    with pytest.raises(ValueError, match="block_size"):
        evaluate_split(Uniform(11), ids)               # no config: block_size is required
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_split(model, ids, batch_size=0)


# -- recipes ---------------------------------------------------------------------------------

def test_every_field_of_the_recipe_is_in_the_key():
    """Every number of the model and of the training run changes the key; the run's device
    and progress bar do not."""
    base = Recipe()
    keys = {base.key()}

    def changed(name, value):
        if isinstance(value, bool):
            return not value
        if name == "dropout":
            return 0.1
        if name == "precision":            # "auto" resolves to one of the two: ask for the other
            return "fp32" if base.resolved().train.precision == "bf16" else "bf16"
        if name == "positions":
            return "rope"
        if name == "betas":
            return (0.8, 0.99)
        if name == "threads":
            return 3
        if name == "warmup_steps":
            return value + 1
        if name == "device":
            return "cpu"
        return value * 2

    n = 0
    for part in ("model", "train"):
        config = getattr(base, part)
        for f in fields(config):
            if f.name in ("vocab_size", "block_size"):
                continue                   # tied to the corpus and to each other: below
            other = replace(config, **{f.name: changed(f.name, getattr(config, f.name))})
            if f.name in ("device", "progress"):
                assert replace(base, **{part: other}).key() == base.key()
                continue
            keys.add(replace(base, **{part: other}).key())
            n += 1
    keys.add(replace(base, model=replace(base.model, block_size=32),
                     train=replace(base.train, block_size=32)).key())
    keys.add(replace(base, corpus="movie-snippets-bpe1024",
                     model=replace(base.model, vocab_size=1024)).key())
    assert len(keys) == n + 3
    assert Recipe().key() == base.key() and len(base.key()) == 16


def test_the_key_holds_the_precision_that_runs(monkeypatch):
    auto = Recipe()
    assert auto.train.precision == "auto"
    assert auto.resolved().train.precision in ("fp32", "bf16")
    monkeypatch.setenv("LESSONS_LIB_PRECISION", "fp32")
    fp32, bf16 = with_train(auto, precision="fp32"), with_train(auto, precision="bf16")
    assert auto.key() == fp32.key() != bf16.key()
    monkeypatch.setenv("LESSONS_LIB_PRECISION", "bf16")
    assert auto.key() == bf16.key() and cache_path(auto) == cache_path(bf16)
    with pytest.raises(ValueError, match="precision"):
        with_train(auto, precision="fp16")


def test_recipe_checks_its_numbers_and_the_named_recipes_exist():
    base = Recipe()
    with pytest.raises(ValueError):
        replace(base, model=replace(base.model, n_layer=0))
    with pytest.raises(ValueError):
        with_train(base, max_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match="vocab_size must be the 'shakespeare-char' "
                                         "tokenizer's 64, got 1024"):
        replace(base, model=replace(base.model, vocab_size=1024))
    with pytest.raises(ValueError, match="must be the same"):
        with_train(base, block_size=32)
    with pytest.raises(ValueError, match="needs a GPTConfig and a TrainConfig"):
        Recipe(model={"n_layer": 2})
    assert set(RECIPES) >= {"1min", "3min"}
    assert RECIPES["1min"] == Recipe() and RECIPES["3min"].tokens > RECIPES["1min"].tokens
    with pytest.raises(ValueError, match="unknown recipe"):
        cache_path("5min")
    with pytest.raises(ValueError, match="must be a Recipe"):
        cache_path(42)


def test_the_data_split_is_the_last_tenth():
    tokenizer, train_ids, val_ids = shakespeare_data()
    assert tokenizer.vocab_size == 64
    assert abs(len(val_ids) / (len(train_ids) + len(val_ids)) - 0.1) < 1e-3


# -- the cache -------------------------------------------------------------------------------

@pytest.fixture
def counted_training(monkeypatch, tmp_path):
    """Cache into a temporary folder and count how often the trainer runs."""
    monkeypatch.setattr(pretrained, "models_dir", lambda: tmp_path)
    calls = []
    real_train = pretrained.train

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)
    monkeypatch.setattr(pretrained, "train", counting_train)
    return calls


@pytest.mark.slow
def test_first_call_trains_and_the_second_loads_from_the_cache(counted_training):
    model, tokenizer, report = shakespeare_char(TINY_RECIPE, progress=False)
    assert len(counted_training) == 1 and not report.from_cache
    assert cache_path(TINY_RECIPE).exists() and report.path == str(cache_path(TINY_RECIPE))

    again, tokenizer2, cached = shakespeare_char(TINY_RECIPE, progress=False)
    assert len(counted_training) == 1, "a cache hit must not train"
    assert cached.from_cache and tokenizer2.chars == tokenizer.chars
    idx = torch.tensor([tokenizer.encode("ROMEO:\nO, she")])
    with torch.no_grad():
        assert torch.equal(model(idx)[0], again(idx)[0])
    assert cached.val_loss == report.val_loss and cached.train_seconds == report.train_seconds
    assert cached.history == report.history


@pytest.mark.slow
def test_the_report_holds_the_recipe_the_exact_val_loss_and_the_time(counted_training):
    model, tokenizer, report = shakespeare_char(TINY_RECIPE, progress=False)
    _, _, val_ids = shakespeare_data()
    assert report.recipe == TINY_RECIPE.to_dict() and report.key == TINY_RECIPE.key()
    assert report.precision == "fp32" and report.history["precision"] == "fp32"
    assert report.threads == report.history["threads"] == 1 and report.cpu     # a tiny model: one thread
    assert report.val_loss == pytest.approx(evaluate_split(model, val_ids, TINY_RECIPE.model.block_size), rel=1e-6)
    assert 0 < report.train_seconds < 600
    assert report.steps == TINY_RECIPE.train.max_steps and report.tokens == TINY_RECIPE.tokens
    assert report.parameters == model.num_parameters()
    assert len(report.history["train_loss"]) == TINY_RECIPE.train.max_steps
    assert report.history["eval_step"] == [2, 5]
    assert math.log(64) - 1 < report.val_loss < math.log(64) + 0.5   # a few steps: near uniform
    assert not model.training


@pytest.mark.slow
def test_retrain_trains_again_and_gives_the_same_weights(counted_training):
    model, _, _ = shakespeare_char(TINY_RECIPE, progress=False)
    again, _, report = shakespeare_char(TINY_RECIPE, retrain=True, progress=False)
    assert len(counted_training) == 2 and not report.from_cache
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_a_changed_recipe_trains_a_new_model(counted_training):
    shakespeare_char(TINY_RECIPE, progress=False)
    other = with_train(TINY_RECIPE, lr=2e-3)
    _, _, report = shakespeare_char(other, progress=False)
    assert len(counted_training) == 2 and report.recipe["train"]["lr"] == 2e-3
    assert cache_path(other) != cache_path(TINY_RECIPE) and cache_path(other).exists()


@pytest.mark.slow
def test_a_damaged_cache_file_is_replaced(counted_training):
    path = cache_path(TINY_RECIPE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a safetensors file")
    _, _, report = shakespeare_char(TINY_RECIPE, progress=False)
    assert len(counted_training) == 1 and not report.from_cache
    _, _, cached = shakespeare_char(TINY_RECIPE, progress=False)
    assert len(counted_training) == 1 and cached.from_cache


@pytest.mark.slow
def test_the_callback_sees_each_evaluation(counted_training):
    seen = []
    shakespeare_char(TINY_RECIPE, retrain=True, progress=False,
                     callback=lambda step, model, history: seen.append((step, len(history.val_loss))))
    assert seen == [(2, 1), (5, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_the_override_decides_what_an_auto_recipe_trains_in(counted_training, monkeypatch, forced):
    monkeypatch.setenv("LESSONS_LIB_PRECISION", forced)
    auto = with_train(TINY_RECIPE, precision="auto")
    model, _, report = shakespeare_char(auto, progress=False)
    assert report.precision == forced and report.history["precision"] == forced
    assert report.recipe["train"]["precision"] == forced and "LESSONS_LIB_PRECISION" in report.precision_reason
    assert cache_path(auto) == cache_path(with_train(auto, precision=forced))
    _, _, cached = shakespeare_char(auto, progress=False)
    assert cached.from_cache and cached.precision == forced and len(counted_training) == 1
    assert math.log(64) - 1 < report.val_loss < math.log(64) + 0.5


def test_an_unknown_corpus_is_refused():
    with pytest.raises(ValueError, match="unknown corpus 'tiny-stories'"):
        Recipe(corpus="tiny-stories")


# -- the movie snippets' base model ------------------------------------------------------------

@pytest.mark.slow
def test_movie_data_is_bpe_over_the_training_snippets_with_end_of_text():
    from lessons_lib.data import load_movie_ratings, split_ratings
    from lessons_lib.pretrained import END_OF_TEXT, movie_data
    tokenizer, train_ids, val_ids = movie_data()
    assert tokenizer.vocab_size == 1024 and tokenizer.special_tokens == {END_OF_TEXT: 1023}
    train, val = split_ratings(load_movie_ratings())
    assert int((train_ids == 1023).sum()) == len(train) and int((val_ids == 1023).sum()) == len(val)
    assert train_ids[-1] == 1023 and val_ids[-1] == 1023
    first = train_ids[: int((train_ids == 1023).nonzero()[0]) ]
    assert tokenizer.decode(first.tolist()) == train[0].text
    assert 2.3 < sum(len(s.text) for s in train) / (len(train_ids) - len(train)) < 3.5   # chars/token
    with pytest.raises(ValueError, match="vocab_size"):
        movie_data(200)


@pytest.mark.slow
def test_movie_gpt_trains_caches_and_reloads_its_bpe(counted_training):
    from lessons_lib.pretrained import movie_gpt
    tiny = tiny_movies()
    model, tokenizer, report = movie_gpt(tiny, progress=False)
    again, tokenizer2, cached = movie_gpt(tiny, progress=False)
    assert len(counted_training) == 1 and cached.from_cache
    assert cache_path(tiny).name.startswith("movie-snippets-bpe1024-")
    text = "A gorgeous, witty film."
    assert tokenizer2.encode(text) == tokenizer.encode(text)
    idx = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.equal(model(idx)[0], again(idx)[0])
    assert report.parameters == model.num_parameters() and model.config.vocab_size == 1024


@pytest.mark.slow
def test_movie_assistant_fine_tunes_on_the_instructions_caches_and_reloads(counted_training):
    from lessons_lib.finetune import ChatTemplate
    from lessons_lib.pretrained import (ASSISTANT_KINDS, ASSISTANT_TRAIN, movie_assistant,
                                        movie_gpt, movie_instructions)
    tiny = tiny_movies()
    base, tokenizer, _ = movie_gpt(tiny, progress=False)
    assert len(counted_training) == 1
    mix = movie_instructions(("short", "positive"), recipe=tiny)
    assert set(ex.kind for ex in mix.train) == {"short", "positive"}
    assert mix == movie_instructions(("short", "positive"), recipe=tiny)      # seeded
    assert movie_instructions(recipe=tiny).counts("held_out") == {
        k: (100 if k in ASSISTANT_KINDS else 0) for k in mix.counts()}
    config = replace(ASSISTANT_TRAIN, max_steps=2, warmup_steps=1, eval_interval=2,
                     eval_batches=1, seed=3, progress=False)
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    model, template, history = movie_assistant(config, recipe=tiny)
    assert torch.equal(torch.rand(3), before), "the caller's random numbers must not move"
    assert len(counted_training) == 2 and not history.from_cache and history.step == [0, 1]
    assert template == ChatTemplate.for_tokenizer(tokenizer)
    assert model.config.vocab_size == template.vocab_size and not model.training
    again, _, cached = movie_assistant(config, recipe=tiny)
    assert len(counted_training) == 2 and cached.from_cache
    assert cached.train_loss == history.train_loss and cached.threads == history.threads
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    n = base.config.vocab_size                            # the base rows moved, the new ones too
    assert not torch.equal(model.wte.weight[:n], base.wte.weight)
    movie_assistant(config, recipe=tiny, retrain=True)
    other, _, _ = movie_assistant(replace(config, seed=4), recipe=tiny)
    movie_assistant(config, kinds=("long",), recipe=tiny)
    assert len(counted_training) == 5
    assert not torch.equal(other.wte.weight[n:], model.wte.weight[n:])
    with pytest.raises(ValueError, match="TrainConfig"):
        movie_assistant({"max_steps": 2}, recipe=tiny)
    with pytest.raises(ValueError, match="kind must be one of"):
        movie_assistant(config, kinds=("haiku",), recipe=tiny)


@pytest.mark.slow
def test_movie_reward_model_trains_caches_and_reloads(counted_training, monkeypatch):
    from lessons_lib import rlhf
    from lessons_lib.pretrained import movie_gpt, movie_reward_model
    tiny = tiny_movies()
    rm_calls = []
    real = rlhf.train_reward_model

    def counting(*args, **kwargs):
        rm_calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(rlhf, "train_reward_model", counting)
    config = rlhf.RewardTrainConfig(steps=2, batch_size=16, seed=3, progress=False)
    movie_gpt(tiny, progress=False)              # the base model, cached first
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    model, history = movie_reward_model(config, recipe=tiny)
    assert torch.equal(torch.rand(3), before), "the caller's random numbers must not move"
    again, cached = movie_reward_model(config, recipe=tiny)
    assert len(rm_calls) == 1 and not history.from_cache and cached.from_cache
    assert cached.loss == history.loss and cached.threads == history.threads
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    movie_reward_model(config, recipe=tiny, retrain=True)
    other, _ = movie_reward_model(replace(config, seed=4), recipe=tiny)
    assert len(rm_calls) == 3
    assert not torch.equal(other.head.weight, model.head.weight)   # the seed draws the head
    with pytest.raises(ValueError, match="RewardTrainConfig"):
        movie_reward_model({"steps": 2}, recipe=tiny)


@pytest.mark.slow
def test_movie_ppo_policy_trains_caches_and_reloads(counted_training, monkeypatch):
    from lessons_lib import rlhf
    from lessons_lib.data import load_movie_ratings, snippet_prompts, split_ratings
    from lessons_lib.pretrained import movie_gpt, movie_ppo_policy
    tiny = tiny_movies()
    ppo_calls = []
    real = rlhf.train_ppo

    def counting(*args, **kwargs):
        ppo_calls.append(args[3])                    # the prompts it was given
        return real(*args, **kwargs)
    monkeypatch.setattr(rlhf, "train_ppo", counting)
    _, tokenizer, _ = movie_gpt(tiny, progress=False)
    rm_config = rlhf.RewardTrainConfig(steps=2, batch_size=16, seed=3, progress=False)
    config = rlhf.PPOConfig(iterations=2, batch_size=8, max_new_tokens=4, progress=False,
                            eot_id=tokenizer.special_tokens["<|endoftext|>"])
    policy, history = movie_ppo_policy(config, rm_config, recipe=tiny)
    again, cached = movie_ppo_policy(config, rm_config, recipe=tiny)
    assert len(ppo_calls) == 1 and not history.from_cache and cached.from_cache
    assert cached.reward == history.reward and cached.kl == history.kl
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    train, _ = split_ratings(load_movie_ratings())
    assert torch.equal(ppo_calls[0].cpu(), snippet_prompts(train, tokenizer, 2))
    movie_ppo_policy(config, rm_config, recipe=tiny, retrain=True)
    movie_ppo_policy(replace(config, kl_coef=0.0), rm_config, recipe=tiny)
    assert len(ppo_calls) == 3
    with pytest.raises(ValueError, match="PPOConfig"):
        movie_ppo_policy({"iterations": 2}, rm_config, recipe=tiny)


def test_snippet_prompts_take_the_first_tokens_of_long_enough_snippets():
    from lessons_lib.data import RatedSnippet, snippet_prompts
    from lessons_lib.tokenizers import BPETokenizer
    tokenizer = BPETokenizer().train("a big cat and a dog", 260)
    snippets = [RatedSnippet(1, 1.0, "a big cat"), RatedSnippet(2, 0.0, "a"),
                RatedSnippet(3, -1.0, "and a dog")]
    got = snippet_prompts(snippets, tokenizer, 2)
    expected = [tokenizer.encode_ordinary(t)[:2] for t in ("a big cat", "and a dog")]
    assert got.tolist() == expected
    with pytest.raises(ValueError, match="no snippet has 50 tokens"):
        snippet_prompts(snippets, tokenizer, 50)
    with pytest.raises(ValueError, match="n_tokens"):
        snippet_prompts(snippets, tokenizer, 0)
