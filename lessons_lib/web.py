"""The course's models in the reader's browser: the files the website's boxes read.

Three chapters of the website carry a box that runs a model in the page, with no server
behind it: chapter 2's tokenizers, chapter 7's Shakespeare GPT and chapter 17's assistant.
The browser runs ``_static/llm/gpt.js``, the GPT of :mod:`lessons_lib.model` written again in
plain JavaScript, and ``_static/llm/tokenizers.js``, the tokenizers of
:mod:`lessons_lib.tokenizers`; ``_static/llm/boxes.js`` draws the boxes. This module writes
what they read, from the very models a chapter trained:

* :func:`export_tokenizer` -- a tokenizer as JSON (``BPETokenizer.to_dict()``, or the
  characters of a ``CharTokenizer``); :func:`load_tokenizer` reads it back;
* :func:`export_gpt` -- a GPT's weights as a safetensors file in float32 (a head tied to the
  token table is stored once), its :class:`~lessons_lib.model.GPTConfig`, tokenizer and chat
  template in the file's metadata; :func:`load_gpt` reads it back as a PyTorch model;
* :func:`greedy_tokens` -- what the page must write with "greedy" ticked: PyTorch's greedy
  tokens, with the gap between the two best logits at each step.

The chapters write to ``_static/models/`` beside the book, which the site build copies.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .finetune import ChatTemplate
from .generate import generate
from .model import GPT, GPTConfig
from .tokenizers import GPT2_SPLIT_PATTERN, BPETokenizer, CharTokenizer

__all__ = ["SITE_MODELS", "export_tokenizer", "load_tokenizer", "export_gpt", "load_gpt",
           "greedy_tokens"]

# where a notebook (its kernel starts in book/) writes the files; the site serves _static/
SITE_MODELS = Path("..") / "_static" / "models"
FORMAT = "lessons_lib.web/1"
CHAR_FORMAT = "lessons_lib.CharTokenizer/1"


def _tokenizer_dict(tokenizer) -> dict:
    if isinstance(tokenizer, CharTokenizer):
        return {"format": CHAR_FORMAT, "chars": list(tokenizer.chars)}
    if isinstance(tokenizer, BPETokenizer):
        if tokenizer.pattern != GPT2_SPLIT_PATTERN:
            raise ValueError("the page's tokenizer splits text with GPT-2's pattern only, "
                             f"got a BPETokenizer with pattern {tokenizer.pattern!r}")
        return tokenizer.to_dict()
    raise ValueError("expected a lessons_lib BPETokenizer or CharTokenizer, "
                     f"got {type(tokenizer).__name__}")


def _tokenizer_from_dict(data, source: str):
    if isinstance(data, dict) and data.get("format") == CHAR_FORMAT:
        return CharTokenizer(data["chars"])
    return BPETokenizer.from_dict(data, source=source)


def _target(path, suffix: str) -> Path:
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"expected a path ending in {suffix}, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def export_tokenizer(tokenizer, path) -> Path:
    """Write ``tokenizer`` (a BPETokenizer with GPT-2's split pattern, or a CharTokenizer) to
    ``path`` (``.json``) for the page's tokenizers.js; returns the path."""
    path = _target(path, ".json")
    path.write_text(json.dumps(_tokenizer_dict(tokenizer), separators=(",", ":")))
    return path


def load_tokenizer(path):
    """The tokenizer :func:`export_tokenizer` wrote, as a lessons_lib tokenizer."""
    return _tokenizer_from_dict(json.loads(Path(path).read_text()), str(path))


def export_gpt(model: GPT, tokenizer, path, template: ChatTemplate | None = None) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``, float32) for the page's gpt.js,
    with its config, ``tokenizer`` and the chat ``template`` (or none: the model continues
    text) in the metadata; returns the path.

    The page runs a GPT with learned positions (``GPTConfig.positions="learned"``); the
    tokenizer must cover the model's vocabulary, less the template's four special tokens."""
    if not isinstance(model, GPT):
        raise ValueError(f"expected a lessons_lib.model.GPT, got {type(model).__name__}")
    config = model.config
    if config.positions != "learned":
        raise ValueError("the page's forward pass adds learned positions (GPT-2's wpe), got "
                         f"a GPT with positions={config.positions!r}")
    if template is not None and not isinstance(template, ChatTemplate):
        raise ValueError(f"template must be a ChatTemplate or None, got {type(template).__name__}")
    vocab = tokenizer.vocab_size if template is None else template.vocab_size
    if template is not None and template.base_vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the template was built for {template.base_vocab_size} ids, the "
                         f"tokenizer has {tokenizer.vocab_size}")
    if vocab != config.vocab_size:
        raise ValueError(f"the model reads {config.vocab_size} ids, the tokenizer"
                         f"{' and template' if template else ''} give {vocab}")
    tied = model.lm_head.weight is model.wte.weight
    state = {name: t.detach().to("cpu", torch.float32).contiguous()
             for name, t in model.state_dict().items()
             if not (tied and name == "lm_head.weight")}
    metadata = {
        "format": FORMAT,
        "config": json.dumps({**asdict(config), "tie_weights": tied}),
        "tokenizer": json.dumps(_tokenizer_dict(tokenizer), separators=(",", ":")),
        "template": json.dumps(None if template is None
                               else {"base_vocab_size": template.base_vocab_size,
                                     **template.special_tokens}),
    }
    path = _target(path, ".safetensors")
    save_file(state, str(path), metadata=metadata)
    path.chmod(0o644)                   # readable by a web server, like the site's other files
    return path


def load_gpt(path) -> tuple[GPT, object, ChatTemplate | None]:
    """``(model, tokenizer, template)`` from a file :func:`export_gpt` wrote: the model in
    float32 on the CPU, in eval mode."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a safetensors file: {err}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by lessons_lib.web.export_gpt "
                         f"(format {metadata.get('format')!r})")
    model = GPT(GPTConfig(**json.loads(metadata["config"])))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != ({"lm_head.weight"} if model.config.tie_weights else set()):
        raise ValueError(f"{path} does not hold a GPT of its config: missing {missing}, "
                         f"unexpected {unexpected}")
    tokenizer = _tokenizer_from_dict(json.loads(metadata["tokenizer"]), str(path))
    template = json.loads(metadata["template"])
    if template is not None:
        template = ChatTemplate(template["base_vocab_size"])
    return model.eval(), tokenizer, template


def greedy_tokens(model, prompt, max_new_tokens: int,
                  stop_ids=()) -> tuple[list[int], list[float]]:
    """PyTorch's greedy continuation of ``prompt`` (a list of ids) by ``model`` in float32
    (:func:`lessons_lib.generate.generate`), and at each step the gap between the largest and
    the second largest logit. Two implementations that round differently (the page's
    JavaScript and PyTorch) can pick different tokens only where that gap is about as small
    as their rounding, around 1e-6 of the logits in float32."""
    if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        raise ValueError(f"prompt must be a non-empty list of int ids, got {prompt!r}")
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    out = generate(model, torch.tensor([prompt]), max_new_tokens, greedy=True,
                   stop_ids=stop_ids)[0, len(prompt):].tolist()
    gaps = []
    with torch.no_grad():
        for i in range(len(out)):
            context = (prompt + out[:i])[-model.config.block_size:]
            top2 = model(torch.tensor([context]))[0][0, -1].topk(2).values
            gaps.append(float(top2[0] - top2[1]))
    return out, gaps
