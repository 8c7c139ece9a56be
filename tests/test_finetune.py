"""lessons_lib.finetune: the template, the masked SFT loss, padding, the dataset, scoring fixed
answers, LoRA (on Linear layers and on the tied token table).

References: the loss against a loop over positions written here; LoRA against a plain
computation and, where it installs, against Hugging Face's peft with the same A and B."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from lessons_lib.finetune import (IGNORE, ChatTemplate, Example, LoRAEmbedding, LoRALinear,
                                  TiedHead, apply_lora, build_sft_dataset, collate,
                                  continuation_logprobs, generate_responses, lora_layers,
                                  lora_parameters, merge_lora, parameter_counts,
                                  resize_token_embeddings, sft_batch_fn, sft_loss, unmerge_lora)
from lessons_lib.generate import generate
from lessons_lib.model import GPT, GPTConfig, num_parameters
from lessons_lib.tokenizers import BPETokenizer, CharTokenizer
from lessons_lib.train import TrainConfig, evaluate, train

TOKENIZER = CharTokenizer("abcdefgh ")
TEMPLATE = ChatTemplate.for_tokenizer(TOKENIZER)      # specials 9..12, vocab 13
P, R, E, PAD = TEMPLATE.prompt_id, TEMPLATE.response_id, TEMPLATE.end_id, TEMPLATE.pad_id


def tiny_gpt(seed=0, vocab_size=TEMPLATE.vocab_size, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


def ids(text):
    return TOKENIZER.encode(text)


def randomize_b(model, seed=1):
    """LoRA's B starts at zero; give it values so the update is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.1


# -- the template --------------------------------------------------------------------------

def test_template_puts_specials_after_the_tokenizer_and_masks_the_prompt():
    assert (P, R, E, PAD, TEMPLATE.vocab_size) == (9, 10, 11, 12, 13)
    x, y = TEMPLATE.encode(TOKENIZER, "ab", "cd")
    a, b, c, d = ids("abcd")
    assert x.tolist() == [P, a, b, R, c, d]                  # the full sequence less its end
    assert y.tolist() == [IGNORE, IGNORE, IGNORE, c, d, E]  # loss on the response and <|end|>
    assert TEMPLATE.encode_prompt(TOKENIZER, "ab") == [P, a, b, R]
    assert TEMPLATE.decode(TOKENIZER, x.tolist() + [E, PAD]) == \
        "<|prompt|>ab<|response|>cd<|end|><|pad|>"
    assert TEMPLATE.response_text(TOKENIZER, [c, d, E, a]) == "cd"
    assert TEMPLATE.response_text(TOKENIZER, torch.tensor([c, d])) == "cd"


def test_template_works_with_a_bpe_tokenizer():
    tok = BPETokenizer().train("the cat sat on the mat, the cat sat " * 20, 270)
    template = ChatTemplate.for_tokenizer(tok)
    x, y = template.encode(tok, "the cat", "sat on the mat")
    assert template.prompt_id == tok.vocab_size > 256
    assert template.vocab_size == tok.vocab_size + 4
    sequence = x.tolist() + [y[-1].item()]
    assert template.decode(tok, sequence) == "<|prompt|>the cat<|response|>sat on the mat<|end|>"
    n_prompt = len(template.encode_prompt(tok, "the cat"))
    assert (y[:n_prompt - 1] == IGNORE).all() and (y[n_prompt - 1:] != IGNORE).all()



def test_responses_stop_at_the_tokenizers_end_of_text():
    """A model pre-trained on snippets separated by <|endoftext|> writes it after a snippet: the
    response ends there (as at <|end|>), so its text never holds the marker and encodes again."""
    tok = BPETokenizer().train("the cat sat on the mat, the cat sat " * 20, 270)
    tok.add_special_tokens(["<|endoftext|>"])
    eot = tok.special_tokens["<|endoftext|>"]
    template = ChatTemplate.for_tokenizer(tok)
    ids = tok.encode("the cat") + [eot] + tok.encode(" sat") + [template.end_id]
    assert template.response_text(tok, ids) == "the cat"
    assert template.response_text(tok, torch.tensor([eot, *tok.encode("sat")])) == ""
    assert template.stop_ids(tok) == [*template.special_tokens.values(), eot]
    assert TEMPLATE.stop_ids(TOKENIZER) == [P, R, E, PAD]        # no special tokens of its own

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=template.vocab_size, block_size=16, n_layer=1, n_head=1,
                          n_embd=8, tie_weights=False))
    model.lm_head = nn.Linear(8, template.vocab_size)       # a model that always says eot
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.fill_(-10.0)
        model.lm_head.bias[eot] = 10.0
    for greedy in (True, False):
        answers = generate_responses(model, template, tok, ["the cat", "the mat"], 5,
                                     greedy=greedy, generator=torch.Generator().manual_seed(0))
        assert answers == ["", ""]
        assert [tok.encode(a) for a in answers] == [[], []]


# -- the masked loss and padding -------------------------------------------------------------

def direct_loss(logits, targets):
    """Per row: the sum of -log softmax at each counted position, and how many were counted."""
    sums, counts = [], []
    for b in range(targets.shape[0]):
        total, n = 0.0, 0
        for t in range(targets.shape[1]):
            if targets[b, t] != IGNORE:
                total -= torch.log_softmax(logits[b, t].double(), -1)[targets[b, t]].item()
                n += 1
        sums.append(total)
        counts.append(n)
    return sums, counts


def test_masked_loss_matches_a_loop_over_positions():
    examples = [TEMPLATE.encode(TOKENIZER, p, r) for p, r in
                [("abc", "cba"), ("a", "hgfedcb"), ("h g", "f")]]
    inputs, targets = collate(examples, PAD)
    logits = torch.randn(*inputs.shape, TEMPLATE.vocab_size,
                         generator=torch.Generator().manual_seed(0)) * 3
    sums, counts = direct_loss(logits, targets)
    assert counts == [4, 8, 2]                                # response tokens + <|end|>
    assert sft_loss(logits, targets).item() == pytest.approx(sum(sums) / sum(counts), rel=1e-6)
    assert sft_loss(logits, targets, "sum").item() == pytest.approx(sum(sums), rel=1e-6)
    per_example = sft_loss(logits, targets, "per_example")
    assert per_example.tolist() == pytest.approx([s / n for s, n in zip(sums, counts)], rel=1e-6)


def test_the_models_own_loss_is_the_masked_loss():
    model = tiny_gpt()
    inputs, targets = collate([TEMPLATE.encode(TOKENIZER, "abc", "cba"),
                               TEMPLATE.encode(TOKENIZER, "de", "ed f")], PAD)
    logits, loss = model(inputs, targets)
    assert loss.item() == pytest.approx(sft_loss(logits, targets).item(), rel=1e-6)


def test_collate_pads_on_the_right_with_ignored_targets():
    short, long = TEMPLATE.encode(TOKENIZER, "a", "b"), TEMPLATE.encode(TOKENIZER, "abc", "defg")
    inputs, targets = collate([short, long], PAD)
    assert inputs.shape == targets.shape == (2, len(long.inputs))
    n = len(short.inputs)
    assert inputs[0, :n].tolist() == short.inputs.tolist() and (inputs[0, n:] == PAD).all()
    assert targets[0, :n].tolist() == short.targets.tolist() and (targets[0, n:] == IGNORE).all()
    assert torch.equal(inputs[1], long.inputs) and torch.equal(targets[1], long.targets)


def test_padding_changes_nothing():
    model = tiny_gpt()
    example = TEMPLATE.encode(TOKENIZER, "ab", "c")
    other = TEMPLATE.encode(TOKENIZER, "abcdefgh", "hgfedcba")
    x1, y1 = collate([example], PAD)
    xb, yb = collate([other, example], PAD)
    assert xb.shape[1] > x1.shape[1]                          # the example is padded in the batch
    with torch.no_grad():
        alone, in_batch = model(x1)[0], model(xb)[0]
    n = x1.shape[1]
    torch.testing.assert_close(in_batch[1, :n], alone[0], atol=1e-5, rtol=1e-5)
    loss_alone = sft_loss(alone, y1, "per_example")[0]
    loss_in_batch = sft_loss(in_batch, yb, "per_example")[1]
    assert loss_in_batch.item() == pytest.approx(loss_alone.item(), abs=1e-6)


# -- the dataset and the sampler -----------------------------------------------------------

PAIRS = [("ab", "ba"), ("abcdefgh", "hgfedcba"), ("abc", "cba")]


def test_dataset_drops_or_truncates_what_does_not_fit():
    # lengths in positions: len(prompt) + len(response) + 2 = 6, 18, 8
    kept = build_sft_dataset(PAIRS, TEMPLATE, TOKENIZER, block_size=8)
    assert (len(kept), kept.dropped, kept.truncated) == (2, 1, 0)
    assert [len(ex.inputs) for ex in kept] == [6, 8]
    cut = build_sft_dataset(PAIRS, TEMPLATE, TOKENIZER, block_size=12, too_long="truncate")
    assert (len(cut), cut.dropped, cut.truncated) == (3, 0, 1)
    x, y = cut[1]
    assert len(x) == 12 and x.tolist() == [P, *ids("abcdefgh"), R, *ids("hg")]
    assert y.tolist() == [IGNORE] * 9 + ids("hgf")             # no <|end|>: the response was cut
    with pytest.raises(ValueError, match="pair 1 needs 18 positions"):
        build_sft_dataset(PAIRS, TEMPLATE, TOKENIZER, block_size=12, too_long="error")


def test_batch_fn_feeds_train_padded_batches_reproducibly():
    data = build_sft_dataset(PAIRS, TEMPLATE, TOKENIZER, block_size=20)
    batch_fn = sft_batch_fn(data.examples[:2], data.examples[2:], 4, PAD, device="cpu")
    x1, y1 = batch_fn("train", torch.Generator().manual_seed(3))
    x2, y2 = batch_fn("train", torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape[0] == 4
    assert x1.dtype == y1.dtype == torch.long and x1.device.type == "cpu"
    xv, _ = batch_fn("val", torch.Generator().manual_seed(0))
    assert (xv == data.examples[2].inputs).all()             # one val example, drawn 4 times
    with pytest.raises(ValueError, match="split must be"):
        batch_fn("test", None)


def test_generate_responses_equals_one_prompt_at_a_time():
    model = tiny_gpt(seed=4, tie_weights=False)       # a random model that answers in letters
    prompts = ["ab", "hgf", "c", "de", "ba"]
    answers = generate_responses(model, TEMPLATE, TOKENIZER, prompts, 6, batch_size=1)
    assert sum(len(a) for a in answers) >= 6, answers
    for prompt, answer in zip(prompts, answers):
        context = TEMPLATE.encode_prompt(TOKENIZER, prompt)
        new = generate(model, torch.tensor(context), 6, greedy=True)[len(context):]
        assert answer == TEMPLATE.response_text(TOKENIZER, new)
    assert answers == generate_responses(model, TEMPLATE, TOKENIZER, prompts, 6)
    with pytest.raises(ValueError, match="does not fit block_size=24"):
        generate_responses(model, TEMPLATE, TOKENIZER, ["abcdefgh"], 15)
    with pytest.raises(ValueError, match="non-empty list"):
        generate_responses(model, TEMPLATE, TOKENIZER, "ab", 4)


def test_resize_token_embeddings_keeps_old_logits_and_tying():
    base = tiny_gpt(vocab_size=TOKENIZER.vocab_size)
    x = torch.tensor([ids("abc h")])
    with torch.no_grad():
        before = base(x)[0]
    grown = resize_token_embeddings(base, TEMPLATE.vocab_size, torch.Generator().manual_seed(0))
    assert grown.config.vocab_size == TEMPLATE.vocab_size
    assert grown.lm_head.weight is grown.wte.weight
    with torch.no_grad():
        after = grown(torch.tensor([TEMPLATE.encode_prompt(TOKENIZER, "abc")]))[0]
        old_part = grown(x)[0][..., :TOKENIZER.vocab_size]
    torch.testing.assert_close(old_part, before, atol=1e-6, rtol=1e-6)
    assert after.shape[-1] == TEMPLATE.vocab_size
    new_rows = grown.wte.weight[TOKENIZER.vocab_size:]
    assert torch.cdist(new_rows, new_rows).fill_diagonal_(1.0).min() > 0.01   # told apart
    with pytest.raises(ValueError, match="shrinking"):
        resize_token_embeddings(grown, 5)


# -- LoRA ----------------------------------------------------------------------------------

def test_lora_linear_computes_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    layer = LoRALinear(linear, r=2, alpha=6)
    bound = 1 / math.sqrt(6)                                   # kaiming_uniform(a=sqrt(5))
    assert layer.lora_A.shape == (2, 6) and layer.lora_A.abs().max() <= bound
    assert layer.lora_B.shape == (5, 2) and not layer.lora_B.any() and layer.scale == 3.0
    layer.lora_B.data.normal_()
    x = torch.randn(3, 4, 6)
    expected = x @ linear.weight.T + linear.bias + 3.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert not linear.weight.requires_grad and not linear.bias.requires_grad


def test_lora_dropout_acts_on_the_lora_path_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2, dropout=0.5)
    layer.lora_B.data.normal_()
    x = torch.randn(4, 8)
    base = layer.base(x)
    expected = base + x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer.eval()(x), expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(layer.train()(x), expected)
    layer.lora_B.data.zero_()                                  # no update: dropout has no effect
    assert torch.equal(layer.train()(x), base)


def test_lora_at_init_equals_the_base_model_exactly():
    base = tiny_gpt()
    lora = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    x = torch.randint(TEMPLATE.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lora(x)[0], base(x)[0])


def test_apply_lora_wraps_the_targets_and_counts_parameters():
    model = apply_lora(tiny_gpt(), r=4, alpha=8)
    names = sorted(lora_layers(model))
    assert names == sorted(f"h.{i}.{m}" for i in range(2)
                           for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    d, r = 32, 4
    per_block = r * (d + 3 * d) + r * (d + d) + r * (d + 4 * d) + r * (4 * d + d)
    counts = parameter_counts(model)
    assert counts["trainable"] == 2 * per_block == sum(p.numel() for p in lora_parameters(model))
    assert counts["total"] == tiny_gpt().num_parameters() + counts["trainable"]
    assert counts["fraction"] == pytest.approx(counts["trainable"] / counts["total"])
    only_attention = apply_lora(tiny_gpt(), r=2, alpha=2, targets=("attn.c_proj",))
    assert sorted(lora_layers(only_attention)) == ["h.0.attn.c_proj", "h.1.attn.c_proj"]
    assert "lm_head" not in str(lora_layers(model).keys())


def test_gradients_reach_only_lora_parameters():
    model = apply_lora(tiny_gpt(), r=4, alpha=8, dropout=0.1).train()
    randomize_b(model)
    inputs, targets = collate([TEMPLATE.encode(TOKENIZER, "abc", "cba")], PAD)
    model(inputs, targets)[1].backward()
    lora = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in lora:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_merged_equals_unmerged_and_unmerge_restores_the_weights():
    model = apply_lora(tiny_gpt(), r=4, alpha=8)
    randomize_b(model)
    original = {name: layer.base.weight.clone() for name, layer in lora_layers(model).items()}
    x = torch.randint(TEMPLATE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(x)[0]
        merged = merge_lora(model)(x)[0]
    assert all(layer.merged for layer in lora_layers(model).values())
    changed = [not torch.equal(original[n], m.base.weight) for n, m in lora_layers(model).items()]
    assert all(changed)                                       # the update is in the weights now
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, original[name], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], unmerged, atol=1e-5, rtol=1e-5)


def test_a_merged_checkpoint_loads_merged_into_a_fresh_lora_model(tmp_path):
    from lessons_lib.train import load_checkpoint, save_checkpoint
    model = apply_lora(tiny_gpt(), r=4, alpha=8)
    randomize_b(model)
    x = torch.randint(TEMPLATE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merge_lora(model)(x)[0]
    save_checkpoint(model, tmp_path / "merged.safetensors")
    fresh = apply_lora(tiny_gpt(), r=4, alpha=8)
    load_checkpoint(fresh, tmp_path / "merged.safetensors")
    assert all(layer.merged for layer in lora_layers(fresh).values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], expected, atol=1e-6, rtol=0)
    unmerge_lora(fresh)                               # and it unmerges like the original
    fresh.load_state_dict(unmerge_lora(model).state_dict())
    assert not any(layer.merged for layer in lora_layers(fresh).values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow                   # importing peft (and transformers) takes seconds
def test_lora_matches_peft_with_the_same_weights():
    peft = pytest.importorskip("peft")
    ours = apply_lora(tiny_gpt(), r=4, alpha=8)
    randomize_b(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["c_attn", "c_proj", "c_fc"])
    theirs = peft.inject_adapter_in_model(config, tiny_gpt())
    theirs_layers = {name: m for name, m in theirs.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(theirs_layers) == sorted(lora_layers(ours))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            theirs_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            theirs_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert trainable == parameter_counts(ours)["trainable"]
    x = torch.randint(TEMPLATE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-6, rtol=1e-6)
        merge_lora(ours)
        for layer in theirs_layers.values():
            layer.merge()
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.base.weight, theirs_layers[name].base_layer.weight,
                                   atol=1e-7, rtol=0)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive int"),
    ({"r": 2.5}, "r must be a positive int"),
    ({"alpha": 0}, "alpha must be a positive"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
    ({"targets": ("c_attn", "q_proj")}, r"targets \['q_proj'\] match no nn.Linear"),
    ({"targets": ()}, "targets must be non-empty"),
    ({"targets": ("lm_head",)}, r"lm_head.weight is tied to \['wte.weight'\]"),
])
def test_apply_lora_rejects_bad_arguments_and_changes_nothing(kwargs, message):
    model = tiny_gpt()
    with pytest.raises(ValueError, match=message):
        apply_lora(model, **kwargs)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_lora_state_errors():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_parameters(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(model)
    apply_lora(model, r=2, alpha=2)
    with pytest.raises(ValueError, match="LoRA layers already"):
        apply_lora(model, r=2, alpha=2)
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(ValueError, match="merged already"):
        merge_lora(model)
    with pytest.raises(ValueError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), r=1, alpha=1)


def test_template_and_dataset_reject_bad_input():
    with pytest.raises(ValueError, match="prompt is empty"):
        TEMPLATE.encode(TOKENIZER, "", "a")
    with pytest.raises(ValueError, match="response is empty"):
        TEMPLATE.encode(TOKENIZER, "a", "")
    with pytest.raises(ValueError, match="must be a str"):
        TEMPLATE.encode(TOKENIZER, "a", 3)
    with pytest.raises(ValueError, match="reserves 4 and up"):
        ChatTemplate(4).encode(TOKENIZER, "h", "a")         # 'h' is id 7: a special id here
    with pytest.raises(ValueError, match="at least one"):
        build_sft_dataset([], TEMPLATE, TOKENIZER, 8)
    with pytest.raises(ValueError, match="pair 0 must be"):
        build_sft_dataset(["ab"], TEMPLATE, TOKENIZER, 8)
    with pytest.raises(ValueError, match="prompt takes 10 positions"):
        build_sft_dataset([("abcdefgh", "a")], TEMPLATE, TOKENIZER, 8, too_long="truncate")
    with pytest.raises(ValueError, match="none of the 1 pairs fits"):
        build_sft_dataset([("abcdefgh", "a")], TEMPLATE, TOKENIZER, 8)
    with pytest.raises(ValueError, match="too_long must be"):
        build_sft_dataset(PAIRS, TEMPLATE, TOKENIZER, 8, too_long="cut")


def test_collate_and_loss_reject_bad_input():
    example = TEMPLATE.encode(TOKENIZER, "ab", "c")
    with pytest.raises(ValueError, match="non-empty list"):
        collate([], PAD)
    with pytest.raises(ValueError, match="pad_id=0 occurs in example 0"):
        collate([example], ids("a")[0])
    with pytest.raises(ValueError, match="no target to learn"):
        collate([Example(example.inputs, torch.full_like(example.targets, IGNORE))], PAD)
    with pytest.raises(ValueError, match="one length"):
        collate([Example(example.inputs, example.targets[:-1])], PAD)
    logits = torch.zeros(1, 3, 13)
    with pytest.raises(ValueError, match="nothing to compute"):
        sft_loss(logits, torch.full((1, 3), IGNORE))
    with pytest.raises(ValueError, match="targets must have shape"):
        sft_loss(logits, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="row 1 has no target"):
        sft_loss(torch.zeros(2, 3, 13), torch.tensor([[1, 2, 3], [IGNORE] * 3]), "per_example")
    with pytest.raises(ValueError, match=r"lie in 0..12, got 13"):
        sft_loss(logits, torch.tensor([[1, IGNORE, 13]]), "sum")
    with pytest.raises(ValueError, match="reduction must be"):
        sft_loss(logits, torch.zeros(1, 3, dtype=torch.long), "avg")
    with pytest.raises(ValueError, match="the val split has no examples"):
        sft_batch_fn([example], [], 2, PAD)


# -- end to end: lessons_lib.train fine-tunes on the template --------------------------------

def reversal_pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    words = ["".join("abcdefgh"[i] for i in torch.randint(8, (3,), generator=g)) for _ in range(n)]
    return [(w, w[::-1]) for w in words]


@pytest.mark.parametrize("use_lora", [False, True])
def test_fine_tuning_lowers_the_response_loss(use_lora):
    model = tiny_gpt()
    if use_lora:
        apply_lora(model, r=8, alpha=16)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_set = build_sft_dataset(reversal_pairs(200, 0), TEMPLATE, TOKENIZER, 16)
    val_set = build_sft_dataset(reversal_pairs(50, 1), TEMPLATE, TOKENIZER, 16)
    batch_fn = sft_batch_fn(train_set.examples, val_set.examples, 16, PAD, device="cpu")
    val_batches = [batch_fn("val", torch.Generator().manual_seed(i)) for i in range(4)]
    before = evaluate(model, val_batches)
    config = TrainConfig(max_steps=25, lr=1e-2, warmup_steps=2, eval_interval=25,
                         eval_batches=2, device="cpu", progress=False)
    train(model, batch_fn, config)
    after = evaluate(model, val_batches)
    # measured: 2.59 -> 1.44 (full), 2.59 -> 2.33 (LoRA: the random frozen base knows nothing)
    assert after < before - (0.15 if use_lora else 0.8), (before, after)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


# -- scoring fixed answers, and the new tokens beside LoRA -----------------------------------

def test_continuation_logprobs_equal_a_sum_over_one_sequence_at_a_time():
    model = tiny_gpt()
    contexts = [ids("abc"), ids("h"), ids("gg ab")]
    answers = [ids("de"), ids("f"), ids("a b")]
    got = continuation_logprobs(model, contexts, answers, batch_size=2)
    assert got.shape == (3, 3)
    for n, ctx in enumerate(contexts):
        for c, ans in enumerate(answers):
            with torch.no_grad():
                logits, _ = model(torch.tensor([ctx + ans]))
            log_probs = torch.log_softmax(logits[0], dim=-1)
            direct = sum(log_probs[len(ctx) - 1 + j, t] for j, t in enumerate(ans))
            torch.testing.assert_close(got[n, c], direct, atol=1e-5, rtol=1e-5)


def test_continuation_logprobs_reject_bad_input():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="non-empty"):
        continuation_logprobs(model, [], [ids("a")])
    with pytest.raises(ValueError, match=r"contexts\[1\] is empty"):
        continuation_logprobs(model, [ids("a"), []], [ids("a")])
    with pytest.raises(ValueError, match="block_size"):
        continuation_logprobs(model, [ids("abcdefgh" * 3)], [ids("a")])


def test_lora_on_the_token_table_acts_on_both_ends_and_merges_exactly():
    model = tiny_gpt()
    x = torch.tensor([TEMPLATE.encode_prompt(TOKENIZER, "abc") + [E]])
    with torch.no_grad():
        before = model(x)[0]
    table = model.wte.weight.detach().clone()
    apply_lora(model, r=2, alpha=4, targets=("wte", "c_fc"))
    assert isinstance(model.wte, LoRAEmbedding) and isinstance(model.lm_head, TiedHead)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], before, atol=0, rtol=0)    # B = 0: no change
    V, d = TEMPLATE.vocab_size, 32
    counts = parameter_counts(model)
    assert counts["trainable"] == 2 * (V + d) + 2 * 2 * (d + 4 * d)     # table + 2 c_fc layers
    assert counts["total"] == num_parameters(tiny_gpt()) + counts["trainable"]
    randomize_b(model)
    wte = model.wte
    # a direct computation: the updated table W + (alpha / r) B A, at the input and the output
    updated = table + 2.0 * wte.lora_B @ wte.lora_A
    with torch.no_grad():
        h = model.hidden_states(x)
        torch.testing.assert_close(model(x)[0], h @ updated.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wte(x), updated[x], atol=1e-6, rtol=1e-6)
        unmerged = model(x)[0]
        merge_lora(model)
        torch.testing.assert_close(model(x)[0], unmerged, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
    torch.testing.assert_close(wte.base.weight, table, atol=1e-6, rtol=0)
    _, loss = model(x, torch.tensor([x[0, 1:].tolist() + [E]]))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in with_grad if n.startswith("wte")} == {"wte.lora_A", "wte.lora_B"}
    assert wte.base.weight.grad is None


def test_lora_on_the_token_table_trains_with_the_library_loop():
    model = apply_lora(tiny_gpt(), r=2, alpha=4, targets=("wte",))
    table = model.wte.base.weight.detach().clone()
    config = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=0, eval_interval=3, eval_batches=1,
                         device="cpu", progress=False)
    data = build_sft_dataset([("ab", "ba"), ("cd", "dc")], TEMPLATE, TOKENIZER, 16)
    train(model, sft_batch_fn(data.examples, data.examples, 2, PAD, device="cpu"), config)
    assert torch.equal(model.wte.base.weight, table)
    assert model.wte.lora_B.abs().sum() > 0
    answers = generate_responses(model, TEMPLATE, TOKENIZER, ["ab", "cd"], 3)
    assert len(answers) == 2


@pytest.mark.slow                   # importing peft (and transformers) takes seconds
def test_lora_embedding_matches_peft_with_the_same_weights():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    table = nn.Embedding(13, 8)
    ours = LoRAEmbedding(copy.deepcopy(table), r=3, alpha=6)
    ours.lora_B.data = torch.randn(13, 3)
    holder = nn.Module()
    holder.wte = copy.deepcopy(table)
    config = peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0, target_modules=["wte"])
    theirs = peft.inject_adapter_in_model(config, holder).wte
    with torch.no_grad():     # peft's A is (r, vocab) and B (dim, r): the transposes of ours
        theirs.lora_embedding_A["default"].copy_(ours.lora_B.T)
        theirs.lora_embedding_B["default"].copy_(ours.lora_A.T)
    idx = torch.tensor([[0, 5, 12, 5]])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx), atol=1e-6, rtol=1e-6)


def test_token_table_target_needs_a_tied_gpt():
    with pytest.raises(ValueError, match="tied embeddings"):
        apply_lora(tiny_gpt(tie_weights=False), targets=("wte",))
    model = apply_lora(tiny_gpt(), targets=("wte",))
    with pytest.raises(ValueError, match="once per model"):
        apply_lora(model, targets=("wte",))
