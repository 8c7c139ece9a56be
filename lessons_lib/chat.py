"""Talk to a model of the course in a terminal: ``python -m lessons_lib.chat``.

Each message is answered on its own, and the answer is printed token by token as it is
sampled. ``--model`` picks who answers (:data:`MODELS`):

* ``assistant`` (the default): chapter 9's assistant, the movie-review GPT fine-tuned on written
  instructions ("Write a short review.", "Write a long review.", "Write a positive review.",
  "Write a negative review."), which reads your message in chapter 9's chat template;
* ``base``: the GPT it was fine-tuned from, pre-trained on movie-review snippets: it continues
  your text instead of answering it;
* ``shakespeare``: chapter 7's character-level GPT, which continues your text as Shakespeare
  might have (it knows only the characters of its training text);
* ``yours``: chapter 17's assistant, what ``python -m lessons_lib.assistant build`` makes
  (it also declines to insult a person); ``yours-sft`` is the same before its DPO and GRPO
  stages, ``yours-student`` the student a quarter of its size distilled from it.

The models come from the cache of :mod:`lessons_lib.pretrained`; one that is not there yet is
trained first, once (a few minutes on a laptop CPU). ``--temperature`` and ``--top-k`` change
the sampling, ``--max-new-tokens`` caps an answer and ``--seed`` makes a session repeatable.
An empty line, ``/quit`` or the end of input (Ctrl-D) ends the chat.

:func:`reply` answers one message and :func:`chat` is the loop, for any model of the course's
LM protocol with its tokenizer (and a :class:`lessons_lib.finetune.ChatTemplate`, or None to
continue text), e.g. one you trained in a notebook.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .finetune import ChatTemplate
from .generate import generate
from .model import num_parameters

__all__ = ["reply", "chat", "MODELS", "main"]


def _stop_ids(tokenizer, template: ChatTemplate | None) -> list[int]:
    if template is not None:
        return template.stop_ids(tokenizer)
    specials = getattr(tokenizer, "special_tokens", None) or {}
    return sorted(int(i) for i in specials.values())


def _text(tokenizer, template: ChatTemplate | None, ids: list[int], stops: set[int]) -> str:
    if template is not None:
        return template.response_text(tokenizer, ids)
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end])


def reply(model, tokenizer, message: str, template: ChatTemplate | None = None, *,
          max_new_tokens: int | None = None, temperature: float = 0.8, top_k: int | None = None,
          generator: torch.Generator | None = None, on_text=None) -> str:
    """The model's answer to ``message``, sampled at ``temperature`` (from the ``top_k`` most
    likely tokens, if given) with ``generator``.

    With a ``template`` the message is the prompt and the answer ends at the template's end
    marker or when the model's window is full; without one the model continues the message's
    tokens, for up to one window (``block_size`` tokens) or until it writes one of the
    tokenizer's special tokens (such as ``<|endoftext|>``). ``max_new_tokens`` caps the answer.
    ``on_text(piece)``, if given, receives the answer's text as it grows, one piece per new
    token that completes a character (a byte-level tokenizer may split one over several)."""
    if not isinstance(message, str) or not message.strip():
        raise ValueError(f"message must be a non-empty str, got {message!r}")
    if max_new_tokens is not None and not (isinstance(max_new_tokens, int)
                                           and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an int >= 1 or None, got {max_new_tokens!r}")
    if on_text is not None and not callable(on_text):
        raise ValueError(f"on_text must be callable or None, got {type(on_text).__name__}")
    block_size = model.config.block_size
    if template is not None:
        ids = template.encode_prompt(tokenizer, message)
        room = block_size - len(ids)
        if room < 1:
            raise ValueError(f"the message takes {len(ids)} tokens with the template's markers; "
                             f"the model's window holds {block_size}: write a shorter one")
    else:
        ids = list(tokenizer.encode(message))
        room = block_size
    new = min(room, max_new_tokens or room)
    stop_ids = _stop_ids(tokenizer, template)
    stops = set(stop_ids)
    answer: list[int] = []
    shown = ""

    def stream(token: torch.Tensor) -> None:
        nonlocal shown
        answer.append(int(token[0]))
        text = _text(tokenizer, template, answer, stops)
        if on_text is not None and not text.endswith("\ufffd") and len(text) > len(shown):
            on_text(text[len(shown):])
            shown = text

    generate(model, torch.tensor([ids]), new, temperature=temperature, top_k=top_k,
             generator=generator, stop_ids=stop_ids, on_token=stream)
    text = _text(tokenizer, template, answer, stops)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])                  # what a last partial character left
    return text


def chat(model, tokenizer, template: ChatTemplate | None = None, *, name: str = "model",
         temperature: float = 0.8, top_k: int | None = None, max_new_tokens: int | None = None,
         seed: int | None = None, read=None, out=None) -> int:
    """Answer messages read with ``read(prompt)`` (the terminal's ``input`` by default) until an
    empty line, ``/quit`` or the end of input, streaming each answer to ``out`` (standard
    output by default) after ``name + "> "``. A message the model cannot take (too long, or a
    character its tokenizer lacks) is answered with the reason; Ctrl-C stops an answer. Returns
    the number of messages answered."""
    read = input if read is None else read
    out = sys.stdout if out is None else out
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    answered = 0
    while True:
        try:
            message = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        if not message or message == "/quit":
            break
        out.write(f"{name}> ")
        out.flush()

        def show(piece: str) -> None:
            out.write(piece)
            out.flush()

        try:
            reply(model, tokenizer, message, template, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, generator=generator, on_text=show)
            answered += 1
        except ValueError as err:
            out.write(f"[{err}]")
        except KeyboardInterrupt:                   # Ctrl-C stops this answer, not the chat
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
    return answered


def _assistant():
    from .pretrained import movie_assistant, movie_gpt

    _, tokenizer, _ = movie_gpt()
    model, template, _ = movie_assistant()
    return model, tokenizer, template


def _base():
    from .pretrained import movie_gpt

    model, tokenizer, _ = movie_gpt()
    return model.eval(), tokenizer, None


def _shakespeare():
    from .pretrained import shakespeare_char

    model, tokenizer, _ = shakespeare_char()
    return model.eval(), tokenizer, None


def _yours(name: str, until: str = "grpo"):
    def load():
        from .assistant import build_assistant

        build = build_assistant(until=until)
        return build.models[name], build.tokenizer, build.template
    return load


#: name -> (what it is, a loader returning ``(model, tokenizer, template or None)``); add yours.
MODELS = {
    "yours": ("the assistant that `python -m lessons_lib.assistant build` makes (chapter 17): "
              "ask for a short, long, positive or negative review", _yours("SFT + DPO + GRPO")),
    "yours-sft": ("that assistant after its supervised fine-tuning only, before DPO and GRPO",
                  _yours("SFT")),
    "yours-student": ("that assistant distilled into a student a quarter of its size, on its "
                      "logits", _yours("student (logits)", "distill")),
    "assistant": ("chapter 9's assistant: ask it to write a short, long, positive or negative "
                  "review", _assistant),
    "base": ("chapter 9's base model, pre-trained on movie reviews: it continues your text",
             _base),
    "shakespeare": ("chapter 7's character-level Shakespeare model: it continues your text",
                    _shakespeare),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lessons_lib.chat",
        description="Talk to a model of the course; each answer streams as it is sampled.")
    parser.add_argument("--model", default="assistant", choices=sorted(MODELS),
                        help="who answers (default: assistant)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature, > 0 (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample from the k most likely tokens only (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="the longest answer in tokens (default: what the window holds)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the sampler, for a repeatable session (default: random)")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.temperature > 0 or args.temperature == float("inf"):
        parser.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    for flag, value in (("--top-k", args.top_k), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    about, load = MODELS[args.model]
    print(f"loading {args.model!r} (a model not yet in the cache is trained first, once) ...",
          flush=True)
    model, tokenizer, template = load()
    sampling = f"temperature {args.temperature:g}" + (
        f", top-k {args.top_k}" if args.top_k else "")
    print(f"{about}.\n{args.model}: {num_parameters(model):,} parameters, a window of "
          f"{model.config.block_size} tokens; sampling at {sampling}. Each message is answered "
          "on its own; an empty line or Ctrl-D ends the chat.", flush=True)
    chat(model, tokenizer, template, name=args.model, temperature=args.temperature,
         top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
