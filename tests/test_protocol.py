"""One protocol for every language model, one parameter count, one evaluator, and the KV cache
as an object that owns its position."""

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.bigram import BigramLanguageModel
from lessons_lib.model import GPT, Block, GPTConfig, count_parameters, next_token_loss, num_parameters
from lessons_lib.recurrent import LSTMLanguageModel
from lessons_lib.train import evaluate

V = 11
CONFIG = GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=8)
INTEGER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def models():
    torch.manual_seed(0)
    return {"gpt": GPT(CONFIG), "bigram": BigramLanguageModel(V),
            "lstm": LSTMLanguageModel(V, n_embd=8, hidden_size=12)}


@pytest.mark.parametrize("name", ["gpt", "bigram", "lstm"])
def test_forward_returns_logits_and_loss_for_any_integer_dtype(name):
    model = models()[name].eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(V, (3, 7), generator=g)
    targets = torch.randint(V, (3, 7), generator=g)
    logits, loss = model(idx)
    assert logits.shape == (3, 7, V) and loss is None
    expected = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    for dtype in INTEGER_DTYPES:
        same, loss = model(idx.to(dtype), targets.to(dtype))
        torch.testing.assert_close(same, logits, rtol=0, atol=0)
        torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="integer token ids"):
        model(idx.float())
    with pytest.raises(ValueError, match=rf"must lie in 0\.\.{V - 1}"):
        model(idx + V)


def test_next_token_loss_ignores_minus_100_and_checks_the_shape():
    logits = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(2))
    targets = torch.randint(V, (2, 5), generator=torch.Generator().manual_seed(3))
    targets[0, :2] = -100
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(next_token_loss(logits, targets), expected)
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        next_token_loss(logits, targets[:, :4])
    with pytest.raises(ValueError, match="integer token ids"):
        next_token_loss(logits, targets.float())


def test_one_parameter_count():
    model = GPT(CONFIG)
    by_hand = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert num_parameters(model) == model.num_parameters() == count_parameters(CONFIG) \
        == by_hand
    model.wte.weight.requires_grad_(False)          # tied: the head is frozen with it
    assert num_parameters(model, trainable_only=True) == by_hand - V * CONFIG.n_embd


def test_evaluate_infers_the_device_and_restores_the_mode_after_an_error():
    model = GPT(CONFIG).train()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(V, (2, 8), generator=g), torch.randint(V, (2, 8), generator=g))
               for _ in range(3)]
    expected = sum(model.eval()(x, y)[1].item() for x, y in batches) / 3
    model.train()
    assert evaluate(model, batches) == pytest.approx(expected, rel=1e-6)
    assert evaluate(model, batches, "cpu") == evaluate(model, batches)
    assert model.training
    with pytest.raises(ValueError, match="must lie in"):
        evaluate(model, [(batches[0][0] + V, batches[0][1])])
    assert model.training
    with pytest.raises(ValueError, match="at least one"):
        evaluate(model, [])


# -----------------------------------------------------------------------------
# the KV cache, the config and the block

def test_the_cache_owns_its_position_and_checks_the_batch():
    model = GPT(CONFIG).eval()
    idx = torch.randint(V, (2, 6), generator=torch.Generator().manual_seed(5))
    cache = model.new_kv_cache(2)
    assert cache.pos == 0 and cache.batch_size == 2 and cache.max_len == CONFIG.block_size
    with torch.no_grad():
        model(idx[:, :4], kv_cache=cache)
        assert cache.pos == 4
        with pytest.raises(ValueError, match="built for a batch of 2, got a batch of 3"):
            model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache)
        assert cache.pos == 4                                   # a refused call changes nothing
        with pytest.raises(AttributeError):
            cache.pos = 0
        last, _ = model(idx[:, 4:], kv_cache=cache)
        torch.testing.assert_close(last, model(idx)[0][:, 4:], rtol=1e-5, atol=1e-5)
        cache.reset()
        again, _ = model(idx, kv_cache=cache)
        torch.testing.assert_close(again, model(idx)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.new_kv_cache(0)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        model.new_kv_cache(2, max_len=0)
    small = model.new_kv_cache(1, max_len=3)
    with pytest.raises(ValueError, match="positions"):
        small.advance(4)


def test_attention_refuses_a_cache_of_another_batch_size():
    model = GPT(CONFIG).eval()
    cache = model.new_kv_cache(2)
    x = torch.randn(3, 1, CONFIG.n_embd)
    with pytest.raises(ValueError, match="built for a batch of 2, got a batch of 3"):
        model.h[0].attn(x, kv=cache.layer(0))


def test_gpt_config_rejects_a_width_the_heads_do_not_divide():
    with pytest.raises(ValueError, match=r"GPTConfig\.n_embd=10 is not divisible by n_head=3"):
        GPTConfig(n_embd=10, n_head=3)
    for name in ("small", "medium", "large", "xl", "2.7b", "6.7b", "13b", "175b"):
        config = GPTConfig.gpt3(name)
        assert config.n_embd % config.n_head == 0


def test_block_refuses_weights_and_a_cache_at_once():
    model = GPT(CONFIG).eval()
    cache = model.new_kv_cache(1)
    with pytest.raises(ValueError, match="no weights"):
        model.h[0](torch.randn(1, 2, CONFIG.n_embd), return_weights=True, kv=cache.layer(0))
    block = Block(8, 2)
    out, weights = block(torch.randn(1, 3, 8), return_weights=True)
    assert out.shape == (1, 3, 8) and weights.shape == (1, 2, 3, 3)


# -----------------------------------------------------------------------------
# the protocol, for all six language models, and the one generate they share

def six_models():
    from lessons_lib.beyond import MixerLM
    from lessons_lib.emergence import AttentionOnlyConfig, AttentionOnlyTransformer
    from lessons_lib.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    return {
        "gpt": GPT(CONFIG),
        "llama": Llama(LlamaConfig(vocab_size=V, n_layer=2, n_embd=16, n_head=4, n_kv_head=2,
                                   n_ff=24, block_size=16)),
        "attention-only": AttentionOnlyTransformer(
            AttentionOnlyConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16)),
        "mixer": MixerLM(V, 16, mixer="rwkv", n_layer=2, n_embd=16),
        "lstm": LSTMLanguageModel(V, n_embd=8, hidden_size=12),
        "bigram": BigramLanguageModel(V),
    }


SIX = list(six_models())


@pytest.mark.parametrize("name", SIX)
def test_every_model_meets_the_language_model_protocol(name):
    from lessons_lib.model import LanguageModel
    model = six_models()[name].eval()
    assert isinstance(model, LanguageModel)
    assert model.block_size is None or model.block_size >= 1
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(V, (3, 7), generator=g), torch.randint(V, (3, 7), generator=g)
    targets[0, :3] = -100
    logits, loss = model(idx)
    assert logits.shape == (3, 7, V) and loss is None
    same, loss = model(idx, targets)
    torch.testing.assert_close(same, logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, next_token_loss(logits, targets))


def test_something_without_block_size_is_not_a_language_model():
    from lessons_lib.model import LanguageModel
    assert not isinstance(torch.nn.Linear(2, 2), LanguageModel)


@pytest.mark.parametrize("name", SIX)
def test_generate_works_for_every_model_with_and_without_a_cache(name):
    from lessons_lib.generate import generate
    model = six_models()[name]
    prompt = torch.randint(V, (2, 5), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, 8, greedy=True)
    uncached = generate(model, prompt, 8, greedy=True, use_cache=False)
    assert cached.shape == (2, 13) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    # greedy, one token at a time, by hand: the argmax of the last position, fed back
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            window = ids if model.block_size is None else ids[:, -model.block_size:]
            ids = torch.cat([ids, model(window)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)
    sampled = generate(model, prompt, 20, generator=torch.Generator().manual_seed(3))
    assert sampled.shape == (2, 25)       # the window slides past block_size = 16


def test_the_cache_holds_the_prompt_and_the_new_tokens_only(monkeypatch):
    from lessons_lib.generate import generate
    model = six_models()["llama"]
    model.config.block_size = 8192          # SmolLM2's: a cache of 8,192 would be wasted
    sizes = []
    original = type(model).new_kv_cache

    def recording(self, batch_size, max_len=None):
        sizes.append(max_len)
        return original(self, batch_size, max_len)

    monkeypatch.setattr(type(model), "new_kv_cache", recording)
    generate(model, torch.zeros(1, 4, dtype=torch.long), 6, greedy=True)
    assert sizes == [10]


def test_generate_stops_when_every_row_has_written_a_stop_id():
    from lessons_lib.generate import generate
    model = six_models()["gpt"]
    prompt = torch.randint(V, (2, 4), generator=torch.Generator().manual_seed(4))
    free = generate(model, prompt, 12, greedy=True)
    first = free[0, 4].item()                         # row 0's first new token
    stopped = generate(model, prompt, 12, greedy=True, stop_ids=[first])
    row1 = free[1, 4:].tolist()
    if first in row1:                                 # both rows stop: cut at the later one
        end = 4 + max(1, row1.index(first) + 1)
        assert stopped.shape[1] == end
    else:
        assert torch.equal(stopped[1], free[1])       # row 1 never stops: all 12 tokens
    assert (stopped[0, 4:] == first).all()            # row 0 repeats its stop id
