"""lessons_lib.chat: one answer streamed piece by piece, the chat loop, and the command in a
pseudo-terminal."""

import io
import os
import pty
import select
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

from lessons_lib import chat as chat_module
from lessons_lib.chat import chat, main, reply
from lessons_lib.finetune import ChatTemplate, generate_responses
from lessons_lib.generate import generate
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.tokenizers import BPETokenizer, CharTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz .!?"
TOKENIZER = CharTokenizer(CHARS)
TEMPLATE = ChatTemplate.for_tokenizer(TOKENIZER)


def tiny_model(vocab_size=TEMPLATE.vocab_size, block_size=24, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2,
                         n_embd=16)).eval()


class Parrot(nn.Module):
    """Answers every prompt with the characters of ``says``, then the token ``then`` (or the
    last character again and again): the next token depends on how many follow the last
    ``<|response|>``."""

    def __init__(self, says: str, then: int | None = None):
        super().__init__()
        self.ids = TOKENIZER.encode(says) + ([then] if then is not None else [])
        self.config = GPTConfig(vocab_size=TEMPLATE.vocab_size, block_size=24, n_layer=1,
                                n_head=1, n_embd=4)
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None):
        row = idx[0].tolist()
        start = len(row) - row[::-1].index(TEMPLATE.response_id)
        logits = torch.full((*idx.shape, TEMPLATE.vocab_size), -30.0)
        logits[:, -1, self.ids[min(len(row) - start, len(self.ids) - 1)]] = 30.0
        return logits, None


def parrot(says: str, then: int | None = None) -> Parrot:
    return Parrot(says, then).eval()


def test_reply_streams_the_answer_generate_gives():
    model = tiny_model()
    pieces = []
    text = reply(model, TOKENIZER, "write a review.", TEMPLATE, temperature=1.0,
                 generator=torch.Generator().manual_seed(3), on_text=pieces.append)
    expected = generate_responses(model, TEMPLATE, TOKENIZER, ["write a review."],
                                  24 - len(TEMPLATE.encode_prompt(TOKENIZER, "write a review.")),
                                  greedy=False, temperature=1.0,
                                  generator=torch.Generator().manual_seed(3))[0]
    assert text == expected and "".join(pieces) == text
    assert all(len(p) == 1 for p in pieces)               # one character per new token


def test_reply_stops_at_the_end_marker_and_at_max_new_tokens():
    model = parrot("great", then=TEMPLATE.end_id)
    assert reply(model, TOKENIZER, "hi", TEMPLATE) == "great"
    model = parrot("great", then=TEMPLATE.end_id)
    assert reply(model, TOKENIZER, "hi", TEMPLATE, max_new_tokens=3) == "gre"
    model = parrot("ab")                                  # never ends: the window does
    room = 24 - len(TEMPLATE.encode_prompt(TOKENIZER, "hi"))
    assert reply(model, TOKENIZER, "hi", TEMPLATE) == "ab" + "b" * (room - 2)


def test_reply_without_a_template_continues_the_text_and_stops_at_special_tokens():
    text = "the movie was fun. " * 8
    tokenizer = BPETokenizer().train(text, vocab_size=270).add_special_tokens(["<|endoftext|>"])
    eot = tokenizer.special_tokens["<|endoftext|>"]
    model = tiny_model(vocab_size=tokenizer.vocab_size, block_size=16)
    out = generate(model, torch.tensor([tokenizer.encode("the")]), 16, temperature=1.0,
                   generator=torch.Generator().manual_seed(0), stop_ids=[eot])[0, 1:].tolist()
    end = out.index(eot) if eot in out else len(out)
    pieces = []
    got = reply(model, tokenizer, "the", None, temperature=1.0,
                generator=torch.Generator().manual_seed(0), on_text=pieces.append)
    assert got == tokenizer.decode(out[:end]) == "".join(pieces)


def test_reply_rejects_bad_input_with_a_reason():
    model = tiny_model()
    with pytest.raises(ValueError, match="message must be a non-empty str"):
        reply(model, TOKENIZER, "   ", TEMPLATE)
    with pytest.raises(ValueError, match="window holds 24: write a shorter one"):
        reply(model, TOKENIZER, "a" * 30, TEMPLATE)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        reply(model, TOKENIZER, "hi", TEMPLATE, max_new_tokens=0)
    with pytest.raises(ValueError, match="on_text must be callable"):
        reply(model, TOKENIZER, "hi", TEMPLATE, on_text="print")
    with pytest.raises(ValueError, match="temperature"):
        reply(model, TOKENIZER, "hi", TEMPLATE, temperature=0.0)


def test_chat_answers_until_an_empty_line_and_explains_what_it_cannot_take():
    lines = iter(["hi", "HI", "a" * 30, "hi there", ""])
    out = io.StringIO()
    answered = chat(parrot("ok", then=TEMPLATE.end_id), TOKENIZER, TEMPLATE, name="bot",
                    read=lambda prompt: next(lines), out=out, seed=0)
    said = out.getvalue().splitlines()
    assert answered == 2 and said[0] == "bot> ok"
    assert said[1].startswith("bot> [") and "'H'" in said[1]      # not in the vocabulary
    assert "write a shorter one" in said[2] and said[3] == "bot> ok"
    lines = iter(["hi", "/quit", "hi"])
    assert chat(parrot("ok", then=TEMPLATE.end_id), TOKENIZER, TEMPLATE,
                read=lambda prompt: next(lines), out=io.StringIO()) == 1


def test_chat_is_repeatable_with_a_seed_and_ends_at_end_of_input():
    def session(seed):
        lines = iter(["hi", "hi"])

        def read(prompt):
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None

        out = io.StringIO()
        assert chat(tiny_model(), TOKENIZER, TEMPLATE, read=read, out=out, seed=seed) == 2
        return out.getvalue()

    assert session(1) == session(1) != session(2)


def test_main_checks_its_flags(capsys):
    for flags, message in ((["--temperature", "0"], "--temperature must be a finite number"),
                           (["--top-k", "0"], "--top-k must be >= 1"),
                           (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1"),
                           (["--seed", "-2"], "--seed must be >= 0"),
                           (["--model", "gpt5"], "invalid choice: 'gpt5'")):
        with pytest.raises(SystemExit) as exit_:
            main(flags)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_main_loads_the_named_model_and_chats(monkeypatch, capsys):
    loaded = []

    def load():
        loaded.append(True)
        return parrot("yes", then=TEMPLATE.end_id), TOKENIZER, TEMPLATE

    monkeypatch.setitem(chat_module.MODELS, "parrot", ("a test parrot", load))
    lines = iter(["hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    assert main(["--model", "parrot", "--seed", "0", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert loaded and "loading 'parrot'" in out and "a test parrot." in out and "top-k 3" in out
    assert "parrot> yes\n" in out


SCRIPT = """
import torch
from lessons_lib import chat
from lessons_lib.finetune import ChatTemplate
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.tokenizers import CharTokenizer

def load():
    tokenizer = CharTokenizer({chars!r})
    template = ChatTemplate.for_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=template.vocab_size, block_size=24, n_layer=1,
                          n_head=2, n_embd=16)).eval()
    return model, tokenizer, template

chat.MODELS["tiny"] = ("a tiny untrained model", load)
chat.main(["--model", "tiny", "--seed", "0"])
"""


def _read_until(fd, marker: bytes, timeout: float = 60.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while marker not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {got!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 1024)
            except OSError:                          # the child closed the terminal
                break
            if not chunk:
                break
            got += chunk
    return got


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_the_command_answers_in_a_pseudo_terminal(tmp_path):
    script = tmp_path / "chat_tiny.py"
    script.write_text(textwrap.dedent(SCRIPT.format(chars=CHARS)))
    model = tiny_model()
    expected = reply(model, TOKENIZER, "write a review.", TEMPLATE,
                     generator=torch.Generator().manual_seed(0))
    pid, fd = pty.fork()
    if pid == 0:                                      # the child: the chat on the terminal
        os.execv(sys.executable, [sys.executable, str(script)])
    try:
        banner = _read_until(fd, b"you> ")
        assert b"parameters" in banner and b"Ctrl-D ends the chat" in banner
        os.write(fd, b"write a review.\r")
        answer = _read_until(fd, b"you> ")
        assert f"tiny> {expected}".encode() in answer.replace(b"\r\n", b"\n")
        os.write(fd, b"\x04")                          # Ctrl-D: the end of input
        _read_until(fd, b"\n")
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.slow
def test_python_dash_m_prints_its_help():
    done = subprocess.run([sys.executable, "-m", "lessons_lib.chat", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--temperature" in done.stdout and "assistant" in done.stdout


def test_generate_hands_on_token_every_new_column():
    model = tiny_model()
    seen = []
    idx = torch.tensor([[1, 2], [3, 4]])
    out = generate(model, idx, 6, generator=torch.Generator().manual_seed(0),
                   on_token=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 2:])
    assert torch.equal(out, generate(model, idx, 6, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="on_token must be callable or None"):
        generate(model, idx, 2, on_token=1)
