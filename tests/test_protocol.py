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
