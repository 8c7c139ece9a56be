"""lessons_lib.llama (and attention.py's grouped-query option) against transformers'
LlamaForCausalLM, against hand-written references, and on SmolLM2-135M-Instruct itself."""

import numpy as np
import pytest
import torch

from lessons_lib import gguf_file as G
from lessons_lib.attention import (MultiHeadAttention, apply_rope, repeat_kv_heads,
                                   rope_tables)
from lessons_lib.generate import generate
from lessons_lib.model import KVCache
from lessons_lib.llama import (Llama, LlamaConfig, RMSNorm, SwiGLU, chat,
                               generate_until)

transformers = pytest.importorskip("transformers")

# our float32 model against transformers' float32 model with the same weights: the same
# operations in the same order, so the logits agree to rounding (measured: 0 to 6e-8)
LOGIT_ATOL = 1e-5


def hf_llama(n_head=4, n_kv_head=2, tied=False, seed=0, vocab=101, n_layer=2):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=8 * n_head, intermediate_size=48,
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
        max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():            # non-trivial norm gains, so a missed gain shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("n_head,n_kv_head,tied", [(4, 4, False), (4, 2, False), (4, 1, True),
                                                   (6, 3, True)])
def test_logits_equal_transformers_on_tiny_random_configs(n_head, n_kv_head, tied):
    hf = hf_llama(n_head, n_kv_head, tied)
    ours = Llama.from_hf_state_dict(LlamaConfig.from_hf(hf.config), hf.state_dict())
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    idx = torch.randint(0, 101, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, loss = ours(idx, targets=idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=LOGIT_ATOL)
    with torch.no_grad():
        hf_loss = hf(idx, labels=idx).loss     # transformers shifts the labels itself
        _, shifted_loss = ours(idx[:, :-1], targets=idx[:, 1:])
    torch.testing.assert_close(shifted_loss, hf_loss, rtol=1e-6, atol=1e-6)
    assert not torch.isclose(loss, hf_loss)    # unshifted targets: another task entirely
    # greedy continuation: the same tokens
    with torch.no_grad():
        hf_ids = hf.generate(idx[:1, :5], max_new_tokens=8, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert generate_until(ours, idx[0, :5], 8).ids == hf_ids[0, 5:].tolist()


def write_tiny_gguf(path, hf, extra=None):
    """A GGUF file holding ``hf``'s weights the way llama.cpp's converter writes them: names
    of GGUF, dimensions reversed, and the q/k rows permuted into adjacent-pair order."""
    gguf = pytest.importorskip("gguf")
    c = hf.config
    names = {v: k for k, v in G._HF_NAMES.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_rope_freq_base(500.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{layer}.{names[rest]}"
        else:
            gname = names[name]
        if gname.endswith("attn_q.weight"):
            t = G.permute_rope(t, c.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            t = G.permute_rope(t, c.num_key_value_heads)
        w.add_tensor(gname, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_from_gguf_undoes_the_rope_permutation(tmp_path, tied):
    hf = hf_llama(4, 2, tied=tied, seed=2)
    write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    ours = Llama.from_gguf(tmp_path / "tiny.gguf")
    expected = LlamaConfig.from_hf(hf.config)
    assert ours.config.norm_eps == pytest.approx(expected.norm_eps)   # stored as float32
    expected.norm_eps = ours.config.norm_eps
    assert ours.config == expected
    idx = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=0, atol=LOGIT_ATOL)


def rope_adjacent(x, pos, base):
    """llama.cpp's RoPE, written out: dimensions (2i, 2i + 1) turn together by pos * base^(-2i/d)."""
    half = x.shape[-1] // 2
    theta = pos[:, None] * base ** (-torch.arange(half, dtype=x.dtype) * 2 / x.shape[-1])
    cos, sin = theta.cos(), theta.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def test_adjacent_pair_rope_on_gguf_rows_equals_rotate_half_on_hf_rows():
    torch.manual_seed(0)
    n_head, head_dim, T, base = 3, 16, 11, 1e4
    w_hf = torch.randn(n_head * head_dim, 24, dtype=torch.float64)     # a query weight, HF rows
    w_gguf = G.permute_rope(w_hf, n_head)                             # as llama.cpp stores it
    x = torch.randn(T, 24, dtype=torch.float64)
    pos = torch.arange(T, dtype=torch.float64)
    cos, sin = rope_tables(T, head_dim, base=base, dtype=torch.float64)
    q_hf = apply_rope((x @ w_hf.T).view(T, n_head, head_dim).transpose(0, 1), cos, sin)
    q_gguf = rope_adjacent((x @ w_gguf.T).view(T, n_head, head_dim).transpose(0, 1), pos, base)
    # the same vectors, their features in another order: every dot product (score) agrees
    # (to float32: rope_tables computes its angles in float32, as the models do)
    scores_hf = q_hf @ q_hf.transpose(1, 2)
    scores_gguf = q_gguf @ q_gguf.transpose(1, 2)
    torch.testing.assert_close(scores_gguf, scores_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(G.unpermute_rope(q_gguf.transpose(0, 1).reshape(T, -1).T,
                                                n_head).T,
                               q_hf.transpose(0, 1).reshape(T, -1), rtol=1e-5, atol=1e-5)
    # without the permutation the two RoPEs disagree
    q_wrong = rope_adjacent((x @ w_hf.T).view(T, n_head, head_dim).transpose(0, 1), pos, base)
    assert (q_wrong @ q_wrong.transpose(1, 2) - scores_hf).abs().max() > 1e-2


def test_kv_cache_equals_the_full_forward():
    hf = hf_llama(6, 2, seed=4)
    model = Llama.from_hf_state_dict(LlamaConfig.from_hf(hf.config), hf.state_dict())
    idx = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2, max_len=24)
        assert isinstance(cache, KVCache)
        assert cache.k.shape == (2, 2, 2, 24, 8)              # only the 2 kv heads are kept
        assert cache.nbytes == 2 * 2 * 2 * 2 * 24 * 8 * 4
        parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 15),
                                                                     (15, 20))]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    with_cache = generate_until(model, idx[0, :6], 10)
    without = generate_until(model, idx[0, :6], 10, use_cache=False)
    assert with_cache.ids == without.ids and len(with_cache.ids) == 10
    assert with_cache.prompt_tokens == 6 and with_cache.tokens_per_second > 0
    # lessons_lib.generate runs the model too (same interface as GPT)
    out = generate(model, idx[0, :6], 10, greedy=True)
    assert out[6:].tolist() == with_cache.ids
    # a stop token ends the generation and is not kept
    stopped = generate_until(model, idx[0, :6], 10, stop_ids=[with_cache.ids[3]])
    assert stopped.ids == with_cache.ids[:with_cache.ids.index(with_cache.ids[3])]


def test_grouped_query_attention_equals_full_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    d, h, kv_h, T = 24, 6, 2, 9
    hd = d // h
    gqa = MultiHeadAttention(d, h, bias=True, causal=True, positions="rope", n_kv_heads=kv_h)
    assert gqa.c_attn.weight.shape == (d + 2 * kv_h * hd, d)
    full = MultiHeadAttention(d, h, bias=True, causal=True, positions="rope")
    w, b = gqa.c_attn.weight, gqa.c_attn.bias
    q_w, k_w, v_w = w.split((d, kv_h * hd, kv_h * hd))
    q_b, k_b, v_b = b.split((d, kv_h * hd, kv_h * hd))

    def repeat_rows(t):           # kv head j -> query heads j*3 .. j*3+2, written by hand
        heads = t.reshape(kv_h, hd, *t.shape[1:])
        return torch.cat([heads[j // (h // kv_h)] for j in range(h)])

    with torch.no_grad():
        full.c_attn.weight.copy_(torch.cat((q_w, repeat_rows(k_w), repeat_rows(v_w))))
        full.c_attn.bias.copy_(torch.cat((q_b, repeat_rows(k_b), repeat_rows(v_b))))
        full.c_proj.load_state_dict(gqa.c_proj.state_dict())
        x = torch.randn(2, T, d)
        torch.testing.assert_close(gqa(x), full(x), rtol=0, atol=1e-6)
        y, weights = gqa(x, return_weights=True)
        y_full, weights_full = full(x, return_weights=True)
    torch.testing.assert_close(y, y_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(weights, weights_full, rtol=0, atol=1e-6)
    assert "n_kv_heads=2" in repr(gqa)


def test_repeat_kv_heads_matches_indexing():
    x = torch.randn(2, 3, 5, 4)
    out = repeat_kv_heads(x, 4)
    assert out.shape == (2, 12, 5, 4)
    for i in range(12):
        assert torch.equal(out[:, i], x[:, i // 4])
    assert repeat_kv_heads(x, 1) is x
    with pytest.raises(ValueError, match="n_rep"):
        repeat_kv_heads(x, 0)
    with pytest.raises(ValueError, match="n_kv_heads, T, head_dim"):
        repeat_kv_heads(torch.randn(3, 4), 2)


def test_rmsnorm_and_swiglu_against_direct_formulas():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    norm = norm.double()
    rms = (x ** 2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(norm(x), x / rms * norm.weight, rtol=0, atol=1e-12)
    mlp = SwiGLU(8, 16).double()
    g, u = x @ mlp.gate.weight.T, x @ mlp.up.weight.T
    expected = (g / (1 + torch.exp(-g)) * u) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-12)
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 8 * 16
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        norm(torch.randn(3, 7, dtype=torch.float64))


def test_bad_input():
    with pytest.raises(ValueError, match="n_kv_head"):
        LlamaConfig(n_embd=32, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="even"):
        LlamaConfig(n_embd=12, n_head=4, n_kv_head=2)
    with pytest.raises(ValueError, match="not divisible"):
        LlamaConfig(n_embd=30, n_head=4, n_kv_head=2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        MultiHeadAttention(24, 6, n_kv_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads must be a positive int"):
        MultiHeadAttention(24, 6, n_kv_heads=0)
    with pytest.raises(ValueError, match="LlamaConfig"):
        Llama({"n_layer": 2})
    hf = hf_llama(4, 2)
    config = LlamaConfig.from_hf(hf.config)
    model = Llama.from_hf_state_dict(config, hf.state_dict())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0\.\.100"):
        model(torch.full((1, 3), 101))
    with pytest.raises(ValueError):
        model(torch.zeros(3, dtype=torch.long))
    cache = model.new_kv_cache(1, max_len=4)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    sd = hf.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        Llama.from_hf_state_dict(config, {k: v for k, v in sd.items() if "layers.1" not in k})
    with pytest.raises(ValueError, match="shape"):
        Llama.from_hf_state_dict(LlamaConfig.from_hf(hf.config).__class__(
            **{**config.__dict__, "n_ff": 40}), sd)
    with pytest.raises(ValueError, match="does not use"):
        Llama.from_hf_state_dict(config, {**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="Llama"):
        generate_until(hf, [1, 2], 3)
    with pytest.raises(ValueError, match="empty"):
        generate_until(model, [], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_until(model, [1], 0)


def test_llama_speaks_the_gpts_names():
    """One vocabulary for both models: the config fields and module names of model.py's GPT
    (nanoGPT's), and the members both take from DecoderLM."""
    from lessons_lib.model import GPT, DecoderLM, GPTConfig
    shared = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "tie_weights"}
    assert shared <= set(vars(LlamaConfig())) and shared <= set(vars(GPTConfig()))
    sizes = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    llama = Llama(LlamaConfig(**sizes, n_kv_head=1, n_ff=12))
    gpt = GPT(GPTConfig(**sizes))
    assert isinstance(llama, DecoderLM) and isinstance(gpt, DecoderLM)
    children = lambda m: [name for name, _ in m.named_children()]
    assert children(llama) == ["wte", "h", "ln_f", "lm_head"]
    assert [n for n in children(gpt) if n not in ("wpe", "drop")] == children(llama)
    assert children(llama.h[0]) == children(gpt.h[0]) == ["ln_1", "attn", "ln_2", "mlp"]
    assert llama.lm_head.weight is llama.wte.weight             # tie_weights=True
    untied = Llama(LlamaConfig(**sizes, n_kv_head=1, n_ff=12, tie_weights=False))
    assert untied.num_parameters() == llama.num_parameters() + 11 * 8
    assert llama.block_size == 8 and llama.new_kv_cache(1).k.shape == (2, 1, 1, 8, 4)


# -- SmolLM2-135M-Instruct: our code against transformers on the same file -----------------

@pytest.fixture(scope="module")
def smol():
    gguf = G.load_smollm2()
    return gguf, Llama.from_gguf(gguf), gguf.tokenizer()


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smol):
    gguf, ours, tok = smol
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.path.parent), gguf_file=gguf.path.name, dtype=torch.float32).eval()
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters()) == 134_515_008
    prompt = gguf.render_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    idx = torch.tensor([tok.encode(prompt, allowed_special="all")])
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    worst = (logits - expected).abs().max().item()
    # measured: 2.7e-5 on logits of size ~20 (float32 rounding through 30 layers)
    assert worst < 1e-3, f"max |ours - transformers| = {worst}"
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smol):
    gguf, model, tok = smol
    answer, result = chat(model, gguf, "What is the capital of France?", max_new_tokens=24,
                          tokenizer=tok)
    assert "Paris" in answer, answer
    assert len(result.ids) < 24                      # it stopped at <|im_end|>
    again, _ = chat(model, gguf, "What is the capital of France?", max_new_tokens=24,
                    tokenizer=tok, use_cache=False)
    assert again == answer
    with pytest.raises(ValueError, match="question"):
        chat(model, gguf, "", tokenizer=tok)


def test_rmsnorm_computes_in_float32_like_transformers():
    """In bfloat16 the mean of squares is taken in float32 and rounded once at the end, as
    transformers' LlamaRMSNorm does; computing it in bfloat16 rounds every step."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    ours, theirs = RMSNorm(64, eps=1e-6), LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.3 * torch.randn(64))
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.bfloat16(), theirs.bfloat16()
    x = (torch.randn(8, 16, 64) * 30).bfloat16()
    assert torch.equal(ours(x), theirs(x))
    assert ours(x).dtype == torch.bfloat16
    x64 = torch.randn(3, 64, dtype=torch.float64)     # float64 stays float64
    expected = x64 / (x64 ** 2).mean(-1, keepdim=True).add(1e-6).sqrt() * ours.weight.double()
    torch.testing.assert_close(ours.double()(x64), expected, rtol=0, atol=1e-12)


def test_rope_scaling_is_refused_not_ignored(tmp_path):
    hf = hf_llama(4, 2)
    scaled = transformers.LlamaConfig(**{**hf.config.to_dict(), "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}})
    with pytest.raises(ValueError, match="rope_scaling of type 'llama3'"):
        LlamaConfig.from_hf(scaled)
    linear = transformers.LlamaConfig(**{**hf.config.to_dict(),
                                         "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="'linear'"):
        LlamaConfig.from_hf(linear)
    write_tiny_gguf(tmp_path / "scaled.gguf", hf, {"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match="rescales RoPE"):
        Llama.from_gguf(tmp_path / "scaled.gguf")
