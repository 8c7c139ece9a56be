"""lessons_lib.web and the JavaScript the website runs (_static/llm/gpt.js, tokenizers.js).

The export round-trips exactly, and bad input gets a ValueError. The JavaScript is run with
Node.js (skipped where there is none; the browser test of the site runs it in Chromium too):
its logits match PyTorch's GPT in float32, its greedy tokens are lessons_lib.generate's,
and its tokenizers give the ids of lessons_lib's and of tiktoken.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lessons_lib import web
from lessons_lib.finetune import ChatTemplate
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.tokenizers import BPETokenizer, CharTokenizer, tiktoken_gpt2

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "_static" / "llm"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")

# a few strings that are hard for a tokenizer: spaces, digits, accents, emoji, scripts
HARD_STRINGS = [
    "Hello world, it's 2026!   Ready?", "  leading and trailing spaces  ", "\n\n\tTabs\t\n",
    "1234567890 3.14159 $1,234,567.89", "naïve café, Ærøskøbing, São Paulo, Đặng",
    "Good morning 👋🌍! ❤️‍🔥 🇫🇷 👩🏽‍💻", "東京大学 生存还是毁灭 Ромео και Ιουλιέτα",
    "I'm sure they'd've said you'll see it's theirs", "a\u00a0b\u2009c\u3000d\u0085e\ufeff",
    "ROMEO:\nBut soft, what light through yonder window breaks?", "",
]


def _tiny_gpt(seed=0, **sizes) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**{"vocab_size": 40, "block_size": 16, "n_layer": 2, "n_head": 2,
                          "n_embd": 16, **sizes})
    model = GPT(config).eval()
    with torch.no_grad():                 # larger weights than at initialisation: varied logits
        for p in model.parameters():
            p.mul_(8.0)
    return model


def _char_tokenizer(n=40) -> CharTokenizer:
    return CharTokenizer([chr(ord("!") + i) for i in range(n)])


# -----------------------------------------------------------------------------
# the files: a round trip, and clear errors

def test_gpt_round_trip(tmp_path):
    model = _tiny_gpt()
    tok = _char_tokenizer()
    path = web.export_gpt(model, tok, tmp_path / "m.safetensors")
    back, tok2, template = web.load_gpt(path)
    assert template is None and tok2.chars == tok.chars
    assert back.config == model.config
    assert back.lm_head.weight is back.wte.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randint(0, 40, (1, 16))
    assert torch.equal(model(x)[0], back(x)[0])


def test_untied_gpt_with_template_round_trip(tmp_path):
    tok = BPETokenizer().train("the cat sat on the mat " * 20, vocab_size=270)
    template = ChatTemplate.for_tokenizer(tok)
    model = _tiny_gpt(vocab_size=template.vocab_size, tie_weights=False, bias=False)
    path = web.export_gpt(model, tok, tmp_path / "chat.safetensors", template=template)
    back, tok2, template2 = web.load_gpt(path)
    assert template2 == template and tok2.to_dict() == tok.to_dict()
    assert back.config == model.config and back.lm_head.weight is not back.wte.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 back.state_dict().values()))


def test_tokenizer_round_trip(tmp_path):
    bpe = BPETokenizer().train("hello hello world, wonderful world " * 10, vocab_size=280)
    bpe.add_special_tokens(["<|endoftext|>"])
    assert web.load_tokenizer(web.export_tokenizer(bpe, tmp_path / "b.json")).to_dict() \
        == bpe.to_dict()
    chars = _char_tokenizer()
    assert web.load_tokenizer(web.export_tokenizer(chars, tmp_path / "c.json")).chars \
        == chars.chars


def test_bad_input(tmp_path):
    model, tok = _tiny_gpt(), _char_tokenizer()
    with pytest.raises(ValueError, match="lessons_lib.model.GPT"):
        web.export_gpt(torch.nn.Linear(2, 2), tok, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="learned positions"):
        web.export_gpt(GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2,
                                     n_embd=8, positions="rope")), tok, tmp_path / "r.safetensors")
    with pytest.raises(ValueError, match="reads 40 ids"):
        web.export_gpt(model, _char_tokenizer(30), tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="ending in .safetensors"):
        web.export_gpt(model, tok, tmp_path / "m.bin")
    with pytest.raises(ValueError, match="template"):
        web.export_gpt(model, tok, tmp_path / "t.safetensors", template="chat")
    with pytest.raises(ValueError, match="GPT-2's pattern"):
        web.export_tokenizer(BPETokenizer(pattern=r"\S+|\s+"), tmp_path / "p.json")
    with pytest.raises(ValueError, match="BPETokenizer or CharTokenizer"):
        web.export_tokenizer(tiktoken_gpt2(), tmp_path / "k.json")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        web.load_gpt(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not written by lessons_lib.web"):
        web.load_gpt(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="non-empty list of int ids"):
        web.greedy_tokens(model, torch.tensor([1, 2]), 3)


# -----------------------------------------------------------------------------
# the JavaScript, run by Node.js

HARNESS = """
const fs = require("fs");
const {GPT, generate, pickToken, seededRandom} = require(process.argv[2] + "/gpt.js");
const {tokenizerFromDict} = require(process.argv[2] + "/tokenizers.js");
const job = JSON.parse(fs.readFileSync(0, "utf8"));
const out = {};
if (job.model) {
  const buf = fs.readFileSync(job.model);
  const model = GPT.fromSafetensors(buf.buffer.slice(buf.byteOffset,
                                                     buf.byteOffset + buf.length));
  out.parameters = model.numParameters;
  out.logits = job.ids.map((t, i) => {
    if (i === 0) model.reset();
    return Array.from(model.step(t));
  });
  out.greedy = Array.from(generate(model, job.prompt, job.new_tokens,
                                   {greedy: true, stopIds: job.stop_ids || []}));
}
if (job.tokenizer) {
  const tok = tokenizerFromDict(JSON.parse(fs.readFileSync(job.tokenizer, "utf8")));
  out.ids = job.texts.map((t) => {
    try {
      return tok.encodeOrdinary ? tok.encodeOrdinary(t) : tok.encode(t);
    } catch (err) {
      return err.message;
    }
  });
  out.decoded = out.ids.map((ids) => (Array.isArray(ids) ? tok.decode(ids) : null));
}
if (job.sample) {
  const random = seededRandom(job.sample.seed);
  out.draws = [];
  for (let i = 0; i < job.sample.n; i++) {
    out.draws.push(pickToken(Float32Array.from(job.sample.logits),
                             {temperature: job.sample.temperature, topK: job.sample.top_k,
                              random}));
  }
}
process.stdout.write(JSON.stringify(out));
"""


def run_js(tmp_path, job: dict) -> dict:
    script = tmp_path / "harness.js"
    script.write_text(HARNESS)
    done = subprocess.run([NODE, str(script), str(JS)], input=json.dumps(job), text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@needs_node
@pytest.mark.parametrize("sizes", [{}, {"bias": False, "tie_weights": False, "n_head": 4}])
def test_js_forward_matches_pytorch(tmp_path, sizes):
    model = _tiny_gpt(**sizes)
    path = web.export_gpt(model, _char_tokenizer(), tmp_path / "m.safetensors")
    ids = [random.Random(1).randrange(40) for _ in range(16)]
    prompt = ids[:5]
    # past block_size=16: the window slides, read again from position 0 at every step
    want, gaps = web.greedy_tokens(model, prompt, 30)
    got = run_js(tmp_path, {"model": str(path), "ids": ids, "prompt": prompt, "new_tokens": 30})
    assert got["parameters"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0]
    js = torch.tensor(got["logits"])
    assert js.shape == logits.shape
    assert torch.allclose(js, logits, atol=1e-4, rtol=1e-4), (js - logits).abs().max()
    agree = next((i for i, g in enumerate(gaps) if g < 1e-3), len(gaps))
    assert agree >= 20, gaps
    assert got["greedy"][:agree] == want[:agree]


@needs_node
def test_js_greedy_stops_at_a_stop_id(tmp_path):
    model = _tiny_gpt(seed=3)
    path = web.export_gpt(model, _char_tokenizer(), tmp_path / "m.safetensors")
    free, _ = web.greedy_tokens(model, [1, 2, 3], 12)
    stop = free[4]
    want, _ = web.greedy_tokens(model, [1, 2, 3], 12, stop_ids=[stop])
    got = run_js(tmp_path, {"model": str(path), "ids": [0], "prompt": [1, 2, 3],
                            "new_tokens": 12, "stop_ids": [stop]})
    assert got["greedy"] == want == free[:free.index(stop) + 1]


@needs_node
def test_js_sampling_follows_the_distribution(tmp_path):
    logits = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]
    job = {"sample": {"seed": 7, "n": 20000, "logits": logits, "temperature": 0.7,
                      "top_k": 0}}
    draws = run_js(tmp_path, job)["draws"]
    p = torch.softmax(torch.tensor(logits) / 0.7, dim=0)
    freq = torch.bincount(torch.tensor(draws), minlength=6) / len(draws)
    assert (freq - p).abs().max() < 0.015, (freq, p)
    assert run_js(tmp_path, job)["draws"] == draws            # the same seed, the same draws
    job["sample"].update(top_k=2, n=2000)
    assert set(run_js(tmp_path, job)["draws"]) == {0, 1}


def _random_texts(n=200, seed=0) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + " " * 12
                + "\n\t.,;:!?'\"-()$%&*/" + "éèüßñçøå" + "αβγδεζηθ" + "абвгдежз"
                + "अआइकखगमसौ्ा" + "東京大学生存" + "🙂🌍👋🔥" + "\u200d\ufe0f\u00a0\u0085\u2028")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
            for _ in range(n)]


@needs_node
def test_js_gpt2_tokenizer_matches_tiktoken_and_ours(tmp_path):
    gpt2 = BPETokenizer.from_gpt2()
    path = web.export_tokenizer(gpt2, tmp_path / "gpt2.json")
    texts = HARD_STRINGS + _random_texts()
    got = run_js(tmp_path, {"tokenizer": str(path), "texts": texts})
    reference = tiktoken_gpt2()
    for text, ids, decoded in zip(texts, got["ids"], got["decoded"]):
        assert ids == gpt2.encode(text) == reference.encode(text), text
        assert decoded == text


@needs_node
def test_js_trained_tokenizers_match_ours(tmp_path):
    bpe = BPETokenizer().train("To be, or not to be: that is the question. " * 30
                               + "Whether 'tis nobler in the mind to suffer 1600 times",
                               vocab_size=320)
    path = web.export_tokenizer(bpe, tmp_path / "bpe.json")
    texts = HARD_STRINGS + _random_texts(100, seed=1)
    got = run_js(tmp_path, {"tokenizer": str(path), "texts": texts})
    assert got["ids"] == [bpe.encode(t) for t in texts]
    chars = CharTokenizer.from_text("ROMEO:\nBut soft, what light!")
    path = web.export_tokenizer(chars, tmp_path / "chars.json")
    got = run_js(tmp_path, {"tokenizer": str(path), "texts": ["ROMEO:\n", "what light", "Juliet"]})
    assert got["ids"][:2] == [chars.encode("ROMEO:\n"), chars.encode("what light")]
    assert "not in this tokenizer's vocabulary" in got["ids"][2]
