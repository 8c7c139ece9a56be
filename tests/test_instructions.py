"""lessons_lib.instructions: the checks (whole words, lengths, VADER, the length AUC against
scikit-learn's ROC AUC), the mix (seeded, held-out snippets kept out of training, every pair
fits the window) and the follow rates of a tiny model, on small made-up snippets."""

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from lessons_lib.data import RatedSnippet
from lessons_lib.finetune import ChatTemplate, generate_responses
from lessons_lib.instructions import (KINDS, PROMPTS, Instruction, build_instruction_mix,
                                      content_words, follow_rates, follows, instruction_prompt,
                                      pair_auc, uses_word, vader_compound)
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.tokenizers import CharTokenizer

WORDS = ("film movie story acting actors plot funny moving dull boring charming clever "
         "the a and of is it with but very this").split()


def made_up_snippets(n, first_id, seed):
    rng = random.Random(seed)
    return [RatedSnippet(first_id + i, round(rng.uniform(-4, 4), 2),
                         " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) + ".")
            for i in range(n)]


TRAIN = made_up_snippets(120, 1, seed=0)
HELD_OUT = made_up_snippets(40, 1001, seed=1)
TOKENIZER = CharTokenizer.from_text("".join(PROMPTS.values()) + " ".join(WORDS) + ".")
BLOCK = 128


def mix(seed=0, **kwargs):
    return build_instruction_mix(TRAIN, HELD_OUT, TOKENIZER, BLOCK, seed=seed, **kwargs)


# -- the checks --------------------------------------------------------------------------------

def test_content_words_skip_short_words_and_stopwords_in_order():
    assert content_words("The FILM, the film's actors; and which of these were charming?") == \
        ["film", "actors", "charming"]
    assert content_words("It is so, and so it was.") == []
    assert content_words("Un café très réussi") == ["café", "très", "réussi"]


def test_uses_word_is_whole_word_and_case_insensitive():
    assert uses_word("A FILM of note.", "film")
    assert uses_word("The film's ending", "Film")
    assert uses_word("film", "film")
    assert not uses_word("Two films.", "film")
    assert not uses_word("A filmmaker's debut.", "film")
    assert not uses_word("microfilm", "film")
    example = Instruction("word", instruction_prompt("word", word="plot"), "the plot.", 1,
                          word="plot")
    assert follows(example, "A Plot!") and not follows(example, "plots and subplots")
    with pytest.raises(ValueError, match="word must be a run of letters"):
        uses_word("a text", "fi.m")


def test_length_checks_count_tokens_against_the_thresholds():
    short = Instruction("short", PROMPTS["short"], "abc", 1, max_tokens=5)
    long = Instruction("long", PROMPTS["long"], "abcdefghij", 2, min_tokens=8)
    assert follows(short, "the a", TOKENIZER)              # 5 characters, 5 tokens
    assert not follows(short, "the ab", TOKENIZER)
    assert follows(long, "the film", TOKENIZER) and not follows(long, "the fil", TOKENIZER)
    assert not follows(short, "   ", TOKENIZER)            # no answer follows nothing
    with pytest.raises(ValueError, match="counts tokens: pass the tokenizer"):
        follows(short, "the a")


def test_vader_judges_clear_sentences():
    positive = Instruction("positive", PROMPTS["positive"], "A good film.", 1)
    negative = Instruction("negative", PROMPTS["negative"], "A bad film.", 2)
    clearly_good = "A wonderful, moving film: funny, smart and beautifully acted."
    clearly_bad = "A dull, awful mess, boring and stupid from start to finish."
    plain = "The film is ninety minutes long."
    assert follows(positive, clearly_good) and not follows(negative, clearly_good)
    assert follows(negative, clearly_bad) and not follows(positive, clearly_bad)
    assert not follows(positive, plain) and not follows(negative, plain)
    analyzer = SentimentIntensityAnalyzer()
    for text in (clearly_good, clearly_bad, plain):
        assert vader_compound(text) == analyzer.polarity_scores(text)["compound"]


def test_classify_wants_the_label():
    example = Instruction("classify", instruction_prompt("classify", review="Dull."),
                          "negative", 1, label="negative")
    assert follows(example, "negative") and follows(example, " negative ")
    assert not follows(example, "positive") and not follows(example, "negative, clearly")


def test_pair_auc_is_scikit_learns_roc_auc():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(0)
    for _ in range(5):
        short, long = rng.integers(0, 12, size=17), rng.integers(3, 15, size=23)   # with ties
        labels = [0] * len(short) + [1] * len(long)
        expected = roc_auc_score(labels, np.concatenate([short, long]))
        assert pair_auc(short, long) == pytest.approx(expected, abs=1e-12)
    assert pair_auc([1, 2], [3, 4]) == 1.0 and pair_auc([5], [5]) == 0.5
    with pytest.raises(ValueError, match="lower must be a non-empty list"):
        pair_auc([], [1])


# -- the mix -----------------------------------------------------------------------------------

def test_mix_is_the_same_for_the_same_seed():
    first, again, other = mix(seed=3), mix(seed=3), mix(seed=4)
    assert first == again
    assert first.train != other.train
    assert set(first.counts()) == set(KINDS) and all(first.counts().values())
    assert first.pairs()[0] == first.train[0].pair()


def test_held_out_prompts_use_held_out_snippets_only():
    m = mix(held_out_per_kind=10)
    train_ids, held_ids = {s.id for s in TRAIN}, {s.id for s in HELD_OUT}
    assert {ex.snippet_id for ex in m.train} <= train_ids
    assert {ex.snippet_id for ex in m.held_out} <= held_ids
    assert max(m.counts("held_out").values()) <= 10
    texts = {s.id: s.text for s in TRAIN + HELD_OUT}
    for ex in m.train + m.held_out:
        assert len(TOKENIZER.encode(ex.prompt)) + len(TOKENIZER.encode(ex.response)) + 2 <= BLOCK
        if ex.kind not in ("positive", "negative"):          # those are VADER's to judge
            assert follows(ex, ex.response, TOKENIZER), ex
        if ex.kind == "word" and ex.snippet_id in train_ids:
            assert ex.word in content_words(texts[ex.snippet_id])[:2]
    assert m.short_max < m.long_min
    scores = {s.id: s.score for s in TRAIN}
    assert all(scores[ex.snippet_id] >= 2.0 for ex in m.train if ex.kind == "positive")
    assert all(scores[ex.snippet_id] <= -2.0 for ex in m.train if ex.kind == "negative")


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="train_snippets must be a non-empty list"):
        build_instruction_mix([], HELD_OUT, TOKENIZER)
    with pytest.raises(ValueError, match=r"held_out_snippets\[0\] must be a rated snippet"):
        build_instruction_mix(TRAIN, ["a review"], TOKENIZER)
    with pytest.raises(ValueError, match=r"train_snippets\[1\] must be a rated snippet .* "
                       "non-empty text"):
        build_instruction_mix([TRAIN[0], RatedSnippet(7, 1.0, " ")], HELD_OUT, TOKENIZER)
    with pytest.raises(ValueError, match="must not repeat a snippet id; 1 ids come twice"):
        build_instruction_mix(TRAIN + TRAIN[:1], HELD_OUT, TOKENIZER)
    with pytest.raises(ValueError, match="must be disjoint, but 1 snippet ids"):
        build_instruction_mix(TRAIN, HELD_OUT + TRAIN[:1], TOKENIZER, BLOCK)
    for seed in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            mix(seed=seed)
    with pytest.raises(ValueError, match=r"kind must be one of \['short'"):
        mix(kinds=("short", "poem"))
    with pytest.raises(ValueError, match="kind must be one of"):
        Instruction("poem", "Write a poem.", "Roses.", 1)
    with pytest.raises(ValueError, match="'word' Instruction's word must be a run of letters"):
        Instruction("word", "Write a review that uses the word .", "A film.", 1)
    with pytest.raises(ValueError, match="needs a non-empty review"):
        instruction_prompt("classify")
    with pytest.raises(ValueError, match="need at least 3 training snippets"):
        build_instruction_mix(TRAIN, HELD_OUT, TOKENIZER, block_size=24)
    with pytest.raises(ValueError, match="response must be a str, got NoneType"):
        follows(mix().train[0], None, TOKENIZER)


# -- follow rates ------------------------------------------------------------------------------

def tiny_gpt(template, says=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=template.vocab_size, block_size=BLOCK, n_layer=1, n_head=2,
                          n_embd=16, tie_weights=False))
    if says is not None:                            # a model that always writes one token
        model.lm_head = nn.Linear(16, template.vocab_size)
        with torch.no_grad():
            model.lm_head.weight.zero_()
            model.lm_head.bias.fill_(-10.0)
            model.lm_head.bias[says] = 10.0
    return model.eval()


def test_follow_rates_checks_each_answer():
    template = ChatTemplate.for_tokenizer(TOKENIZER)
    held_out = list(mix(held_out_per_kind=3).held_out)
    silent = follow_rates(tiny_gpt(template, says=template.end_id), template, TOKENIZER,
                          held_out)
    assert silent.n == mix(held_out_per_kind=3).counts("held_out")
    assert set(silent.rates.values()) == {0.0}
    assert set(silent.responses) == {""} and silent.length_auc == 0.5
    assert silent.sentiment_auc == 0.5

    model = tiny_gpt(template)
    rates = follow_rates(model, template, TOKENIZER, held_out, seed=1)
    assert rates == follow_rates(model, template, TOKENIZER, held_out, seed=1)
    assert rates != follow_rates(model, template, TOKENIZER, held_out, seed=2)
    # the answers are sampled, one length group of prompts after the other, from one generator
    generator = torch.Generator().manual_seed(1)
    by_length = {}
    for i, ex in enumerate(held_out):
        by_length.setdefault(len(template.encode_prompt(TOKENIZER, ex.prompt)), []).append(i)
    for n, rows in sorted(by_length.items()):
        expected = generate_responses(model, template, TOKENIZER,
                                      [held_out[i].prompt for i in rows], BLOCK - n,
                                      greedy=False, generator=generator)
        assert [rates.responses[i] for i in rows] == expected
    for kind, n in rates.n.items():
        rows = [i for i, ex in enumerate(held_out) if ex.kind == kind]
        assert len(rows) == n
        expected = np.mean([follows(held_out[i], rates.responses[i], TOKENIZER)
                            for i in rows])
        assert rates.rates[kind] == expected
    rows = {kind: [i for i, ex in enumerate(held_out) if ex.kind == kind] for kind in rates.n}
    texts = rates.responses
    assert rates.length_auc == pair_auc(
        *([len(TOKENIZER.encode(texts[i])) for i in rows[k]] for k in ("short", "long")))
    assert rates.sentiment_auc == pair_auc(
        *([vader_compound(texts[i]) for i in rows[k]] for k in ("negative", "positive")))
    only_short = [ex for ex in held_out if ex.kind == "short"]
    one_kind = follow_rates(model, template, TOKENIZER, only_short)
    assert one_kind.length_auc is None and one_kind.sentiment_auc is None
    with pytest.raises(ValueError, match="examples must be a non-empty list of Instructions"):
        follow_rates(model, template, TOKENIZER, [])
