"""lessons_lib.train and lessons_lib.generate: the loop, checkpoints, sampling, the KV cache."""

import math

import pytest
import torch

from lessons_lib.generate import filter_logits, generate, sample_next
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.train import TrainConfig, load_checkpoint, lr_at, save_checkpoint, train

TINY = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY.__dict__, **overrides}))


def repeating_data():
    pattern = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    return pattern.repeat(200), pattern.repeat(20)


# -- the training loop -------------------------------------------------------------------

def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


@pytest.mark.slow
def test_training_learns_a_repeating_pattern_and_is_deterministic():
    cfg = TrainConfig(max_steps=100, batch_size=8, block_size=16, lr=3e-3, warmup_steps=5,
                      eval_interval=50, eval_batches=2, progress=False)
    a, b = tiny_model(), tiny_model()
    ha, hb = train(a, repeating_data(), cfg), train(b, repeating_data(), cfg)
    assert ha.train_loss == hb.train_loss, "same seed, same losses"
    assert ha.val_loss[-1] < 0.3 < math.log(23) - 1          # 0.11 measured; uniform is 3.1
    assert len(ha.step) == 100 and ha.eval_step == [49, 99] and ha.tokens == 100 * 8 * 16


def test_one_step_reduces_the_loss_on_a_fixed_batch():
    model = tiny_model()
    x = torch.randint(23, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    before = model(x, y)[1].item()
    cfg = TrainConfig(max_steps=1, warmup_steps=0, lr=1e-2, eval_batches=1, progress=False)
    train(model, lambda split, g: (x, y), cfg)
    assert model(x, y)[1].item() < before


def test_bf16_autocast_trains_on_cpu():
    cfg = TrainConfig(max_steps=20, batch_size=4, block_size=16, lr=3e-3, warmup_steps=2,
                      eval_interval=20, eval_batches=1, precision="bf16", progress=False)
    h = train(tiny_model(), repeating_data(), cfg)
    assert h.val_loss[-1] < math.log(23)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(seed=1)
    save_checkpoint(model, tmp_path / "ckpt.safetensors", {"val_loss": 1.23})
    other = tiny_model(seed=2)
    meta = load_checkpoint(other, tmp_path / "ckpt.safetensors")
    assert meta == {"val_loss": 1.23}
    idx = torch.arange(10)[None]
    assert torch.equal(model(idx)[0], other(idx)[0])
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(tiny_model(n_embd=16), tmp_path / "ckpt.safetensors")


def test_train_config_errors():
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(max_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="train_ids, val_ids"):
        train(tiny_model(), torch.arange(100), TrainConfig(max_steps=1, warmup_steps=0, progress=False))


# -- sampling ----------------------------------------------------------------------------

def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.8)).tolist() == [[True, False, True, False]]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, generator=g)[:, 0], minlength=3) / 20000
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)
    hot = torch.bincount(sample_next(logits, temperature=0.5, generator=g)[:, 0], minlength=3) / 20000
    assert hot[0] > 0.75                       # 0.36 / (0.36 + 0.09 + 0.01) = 0.78
    assert sample_next(logits[:2], greedy=True).tolist() == [[0], [0]]


@pytest.mark.slow
@pytest.mark.parametrize("prompt_len, new", [(1, 10), (5, 11), (16, 4), (3, 40)])
def test_cache_gives_the_same_greedy_tokens(prompt_len, new):
    model = tiny_model()
    prompt = torch.randint(23, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = generate(model, prompt, new, greedy=True, use_cache=True)
    plain = generate(model, prompt, new, greedy=True, use_cache=False)
    assert cached.shape == (3, prompt_len + new) and torch.equal(cached, plain)
    assert torch.equal(cached[:, :prompt_len], prompt)


@pytest.mark.slow
def test_cache_gives_the_same_samples_for_the_same_generator():
    model = tiny_model()
    prompt = torch.tensor([1, 2, 3])
    a = generate(model, prompt, 30, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = generate(model, prompt, 30, top_k=5, top_p=0.9, use_cache=False,
                 generator=torch.Generator().manual_seed(0))
    assert a.shape == (33,) and torch.equal(a, b)


def test_cached_logits_equal_full_forward():
    model = tiny_model().eval()
    idx = torch.randint(23, (2, 12), generator=torch.Generator().manual_seed(3))
    full, _ = model(idx)
    cache = model.new_kv_cache(2)
    first, _ = model(idx[:, :7], kv_cache=cache)
    rest = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(2, 5, dtype=torch.long), kv_cache=cache)


def test_generate_errors():
    model = tiny_model()
    for kwargs, match in [({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k"),
                          ({"top_p": 1.5}, "top_p"), ({"top_p": -0.1}, "top_p"),
                          ({"temperature": -1.0}, "temperature"),
                          ({"temperature": float("nan")}, "temperature")]:
        with pytest.raises(ValueError, match=match):
            generate(model, torch.tensor([1]), 3, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.tensor([1]), -1)
    with pytest.raises(ValueError, match="T >= 1"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="integer token ids"):
        generate(model, torch.tensor([1.0]), 3)


def test_top_p_zero_generates_like_greedy():
    """top_p=0 keeps only the most likely token, so sampling with it is the argmax."""
    model = tiny_model()
    prompt = torch.tensor([1, 2, 3])
    sampled = generate(model, prompt, 12, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(model, prompt, 12, greedy=True))


def test_bf16_evaluation_is_close_to_fp32():
    from lessons_lib.train import evaluate
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(23, (4, 16), generator=g), torch.randint(23, (4, 16), generator=g)) for _ in range(3)]
    fp32 = evaluate(model, batches, torch.device("cpu"))
    bf16 = evaluate(model, batches, torch.device("cpu"), "bf16")
    assert abs(fp32 - bf16) < 0.02 and abs(fp32 - math.log(23)) < 0.2


def test_training_picks_its_threads_and_restores_them():
    seen = []
    before = torch.get_num_threads()

    def batch_fn(split, generator):
        seen.append(torch.get_num_threads())
        x = torch.randint(23, (2, 8), generator=generator)
        return x, x
    cfg = TrainConfig(max_steps=2, warmup_steps=0, eval_batches=1, progress=False)
    train(tiny_model(), batch_fn, cfg)                      # a tiny model: one thread
    assert seen[-1] == 1 and torch.get_num_threads() == before    # (eval batches are drawn before)
    seen.clear()
    train(tiny_model(), batch_fn, TrainConfig(max_steps=2, warmup_steps=0, eval_batches=1, progress=False,
                                              threads=2))
    assert seen[-1] == 2 and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(threads=0)


def test_generated_ids_can_feed_a_training_step():
    # generate runs under inference mode; what it returns must still be usable where autograd records
    model = tiny_model()
    out = generate(model, torch.tensor([[1, 2, 3]]), 5, greedy=True)
    assert not out.is_inference()
    _, loss = model(out, out)
    loss.backward()
    assert model.wte.weight.grad is not None
