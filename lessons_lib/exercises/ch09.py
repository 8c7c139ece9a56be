"""Checkers for chapter 09's exercises (supervised fine-tuning and LoRA).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (the ``<|response|>`` target
left in the loss, a mean over every position instead of the counted ones, ``alpha`` where
``alpha / r`` belongs, a ``c_proj`` counted once where it names two layers).

The references are written here with plain loops and matrix products, independently of
:mod:`lessons_lib.finetune` (whose ``ChatTemplate.encode``, ``sft_loss``, ``LoRALinear`` and
``parameter_counts`` the exercises teach).
"""

from __future__ import annotations

import math

import torch

from ._core import Case, _short, as_int, as_number, compare_close, randn, randn_call, run_cases

__all__ = ["check_training_example", "check_masked_loss", "check_lora_forward",
           "check_lora_parameter_count"]

IGNORE = -100


# -----------------------------------------------------------------------------
# exercise 1: one (prompt, response) pair -> inputs and masked targets


def _example_reference(prompt_ids, response_ids, prompt_id, response_id, end_id):
    sequence = [prompt_id, *prompt_ids, response_id, *response_ids, end_id]
    inputs, targets = sequence[:-1], sequence[1:]
    n_prompt_targets = len(prompt_ids) + 1            # the prompt's tokens and <|response|>
    targets = [IGNORE] * n_prompt_targets + targets[n_prompt_targets:]
    return inputs, targets


def _as_id_list(value, what: str) -> tuple[list[int] | None, str | None]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            return None, f"{what} must be 1-D, got a tensor of shape {tuple(value.shape)}"
        if value.is_floating_point():
            return None, f"{what} must hold integer token ids, got dtype {value.dtype}"
        return value.tolist(), None
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value), None
    return None, f"{what} must be a 1-D tensor (or list) of ints, got {_short(value)}"


def _compare_example(prompt_ids, response_ids, prompt_id, response_id, end_id):
    def compare(got, expected) -> str | None:
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            return f"expected a pair (inputs, targets), got {_short(got)}"
        inputs, problem = _as_id_list(got[0], "inputs")
        if problem:
            return problem
        targets, problem = _as_id_list(got[1], "targets")
        if problem:
            return problem
        e_inputs, e_targets = expected
        if inputs == e_inputs and targets == e_targets:
            return None
        whole = [prompt_id, *prompt_ids, response_id, *response_ids, end_id]
        if len(inputs) == len(whole) or len(targets) == len(whole):
            return (f"inputs and targets should have {len(e_inputs)} positions, got "
                    f"{len(inputs)} and {len(targets)}: the targets are the sequence shifted by "
                    "one (targets[t] is the token after inputs[t]), so drop the last token "
                    "from the inputs and the first from the targets")
        if inputs != e_inputs:
            return f"inputs: expected {e_inputs}\n     got {inputs}"
        kept_response = e_targets.copy()
        kept_response[len(prompt_ids)] = response_id
        if targets == kept_response:
            return ("the target at the last prompt position is <|response|>: mask it too. We "
                    "always write <|response|> ourselves, so the model need not learn to "
                    "predict it; only the response and <|end|> count")
        if len(targets) == len(e_targets) and targets[len(prompt_ids) + 1] == IGNORE:
            return ("the first response token is masked: the model must learn to predict it "
                    f"from the prompt. Expected targets {e_targets}\n     got {targets}")
        if IGNORE not in targets:
            return f"no target is {IGNORE}: the prompt's positions must not count in the loss"
        return f"targets: expected {e_targets}\n     got {targets}"
    return compare


def check_training_example(fn) -> None:
    """Grade ``fn(prompt_ids, response_ids, prompt_id, response_id, end_id) -> (inputs, targets)``:
    the sequence ``<|prompt|> prompt <|response|> response <|end|>`` shifted by one, with the
    targets inside the prompt (up to and including ``<|response|>``) set to -100."""
    __tracebackhide__ = True
    specials = (1024, 1025, 1026)
    cases = []
    for desc, prompt, response in [
            ("a 3-token prompt and a 2-token response", [7, 8, 9], [40, 41]),
            ("a 1-token prompt and a 1-token response", [5], [6]),
            ("a 6-token prompt and the 3-token label 'negative'",
             [290, 12, 613, 77, 5, 901], [559, 103, 676])]:
        args = (prompt, response, *specials)
        cases.append(Case(desc, args=args, expected=_example_reference(*args),
                          compare=_compare_example(*args),
                          hint="build the whole sequence first, then inputs = sequence[:-1], "
                               "targets = sequence[1:], and set the first len(prompt_ids) + 1 "
                               "targets to -100"))
    run_cases("check_training_example", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: the loss on response tokens only


def _masked_loss_reference(logits, targets) -> float:
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            y = int(targets[b, t])
            if y == IGNORE:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[y])
            count += 1
    return total / count


def _masked_loss_inputs():
    cases = []
    g_targets = torch.Generator().manual_seed(92)
    for k, (B, T, V, desc) in enumerate([(1, 4, 5, "one row of 4 positions, vocabulary 5"),
                                         (3, 6, 11, "3 rows with different numbers of counted "
                                                    "targets"),
                                         (4, 9, 17, "4 rows, right padding at the ends")], 1):
        logits = randn(B, T, V, seed=900 + k)
        targets = torch.randint(V, (B, T), generator=g_targets)
        for b in range(B):                         # a prompt, then a response, then padding
            start = 1 + (b * 2) % (T - 2)
            stop = max(start + 1, T - b)
            targets[b, :start] = IGNORE
            targets[b, stop:] = IGNORE
        cases.append((logits, targets, desc, (B, T, V, 900 + k)))
    return cases


def _compare_masked_loss(logits, targets):
    def compare(got, expected) -> str | None:
        value, problem = as_number(got, "one number (the mean over counted tokens)")
        if problem:
            return problem
        if math.isclose(value, expected, rel_tol=1e-4, abs_tol=1e-5):
            return None
        counted = targets != IGNORE
        per_token = torch.zeros(targets.shape, dtype=torch.float64)
        safe = targets.clamp(min=0)
        lp = torch.log_softmax(logits.double(), -1).gather(-1, safe[..., None])[..., 0]
        per_token[counted] = -lp[counted]
        over_all = float(per_token.sum() / targets.numel())
        row_means = float((per_token.sum(1) / counted.sum(1)).mean())
        every = float(-lp.mean())
        if math.isclose(value, over_all, rel_tol=1e-4):
            return (f"expected {expected:.6g}, got {value:.6g}: that divides by every position, "
                    "padding and prompt included; divide by the number of targets that are not "
                    "-100")
        if math.isclose(value, row_means, rel_tol=1e-4):
            return (f"expected {expected:.6g}, got {value:.6g}: that is the mean of each row's "
                    "mean, which weighs a short response as much as a long one; average over "
                    "all counted tokens of the batch at once")
        if math.isclose(value, every, rel_tol=1e-4):
            return (f"expected {expected:.6g}, got {value:.6g}: every position counted, with "
                    "the -100 targets read as token 0 (clamped); leave them out")
        if math.isclose(value, -expected, rel_tol=1e-4):
            return f"expected {expected:.6g}, got {value:.6g}: the sign is flipped"
        return f"expected {expected:.6g}, got {value:.6g}"
    return compare


def check_masked_loss(fn) -> None:
    """Grade ``fn(logits, targets) -> loss``: the mean cross-entropy over the positions whose
    target is not -100. ``logits`` is (B, T, V), ``targets`` (B, T) int64."""
    __tracebackhide__ = True
    cases = []
    for logits, targets, desc, (B, T, V, seed) in _masked_loss_inputs():
        cases.append(Case(desc, args=(logits, targets),
                          expected=_masked_loss_reference(logits, targets),
                          compare=_compare_masked_loss(logits, targets),
                          rebuild=(f"logits = {randn_call(B, T, V, seed=seed)}; "
                                   f"targets = {targets.tolist()}"),
                          hint="log_softmax over the vocabulary, pick each target's entry, "
                               "keep the positions where targets != -100, and average those"))
    run_cases("check_masked_loss", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: a LoRA layer's forward pass


def _lora_reference(x, weight, bias, A, B, alpha):
    r = A.shape[0]
    y = x.double() @ weight.double().T + bias.double()
    return (y + (alpha / r) * (x.double() @ A.double().T @ B.double().T)).float()


def _compare_lora(x, weight, bias, A, B, alpha):
    check = compare_close(rtol=1e-4, atol=1e-5)

    def compare(got, expected) -> str | None:
        problem = check(got, expected)
        if problem is None or not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return problem
        r = A.shape[0]
        base = x @ weight.T + bias
        update = x @ A.T @ B.T
        for wrong, message in [
                (base + alpha * update, f"the update is scaled by alpha = {alpha:g}; the "
                                        f"scale is alpha / r = {alpha / r:g}"),
                (base + update, f"the update is not scaled; multiply it by alpha / r = "
                                f"{alpha / r:g}"),
                (base, "that is the frozen layer alone: add the low-rank path "
                       "scale * (x @ A.T) @ B.T"),
                (x @ (weight + (alpha / r) * B @ A).T, "the bias is missing")]:
            if torch.allclose(got.float(), wrong.float(), rtol=1e-4, atol=1e-5):
                return message
        return problem
    return compare


def check_lora_forward(fn) -> None:
    """Grade ``fn(x, weight, bias, A, B, alpha) -> y``: a LoRA layer's output
    ``x @ weight.T + bias + (alpha / r) * (x @ A.T) @ B.T`` with ``r = A.shape[0]``;
    ``weight`` (out, in), ``A`` (r, in), ``B`` (out, r), ``x`` (..., in)."""
    __tracebackhide__ = True
    cases = []
    for k, (shape_x, n_in, n_out, r, alpha, desc) in enumerate([
            ((2, 4), 4, 3, 1, 2.0, "x of shape (2, 4), a rank-1 update, alpha 2"),
            ((3, 5, 8), 8, 6, 2, 16.0, "x of shape (3, 5, 8) (batch, T, features), r 2, "
                                       "alpha 16"),
            ((7, 16), 16, 48, 8, 8.0, "x of shape (7, 16), r 8, alpha 8 (scale 1)")], 1):
        seed = 930 + 10 * k
        args = (randn(*shape_x, seed=seed), randn(n_out, n_in, seed=seed + 1),
                randn(n_out, seed=seed + 2), randn(r, n_in, seed=seed + 3),
                randn(n_out, r, seed=seed + 4), alpha)
        rebuild = "; ".join(f"{name} = {randn_call(*shape, seed=seed + i)}" for i, (name, shape)
                            in enumerate([("x", shape_x), ("weight", (n_out, n_in)),
                                          ("bias", (n_out,)), ("A", (r, n_in)),
                                          ("B", (n_out, r))])) + f"; alpha = {alpha}"
        cases.append(Case(desc, args=args, expected=_lora_reference(*args),
                          compare=_compare_lora(*args), rebuild=rebuild,
                          hint="the frozen path is x @ weight.T + bias; the low-rank path "
                               "first maps x down to r numbers with A, then up with B"))
    run_cases("check_lora_forward", fn, cases)


# -----------------------------------------------------------------------------
# exercise 4: how many numbers LoRA trains


# the Linear layers of one GPT block: (name, out_features / d, in_features / d)
_BLOCK_LINEARS = [("attn.c_attn", 3, 1), ("attn.c_proj", 1, 1), ("mlp.c_fc", 4, 1),
                  ("mlp.c_proj", 1, 4)]


def _lora_count_reference(n_layer, n_embd, r, targets) -> int:
    total = 0
    for name, out_mult, in_mult in _BLOCK_LINEARS:
        if any(name == t or name.endswith("." + t) for t in targets):
            total += r * (in_mult * n_embd + out_mult * n_embd)
    return n_layer * total


def _compare_count(n_layer, n_embd, r, targets):
    def compare(got, expected) -> str | None:
        value, problem = as_int(got, "a whole number of parameters (an int)")
        if problem:
            return problem
        if value == expected:
            return None
        if value == expected // n_layer:
            return f"expected {expected}, got {value}: that is one block; the GPT has {n_layer}"
        if "c_proj" in targets:
            once = _lora_count_reference(n_layer, n_embd, r,
                                         [t for t in targets if t != "c_proj"] + ["attn.c_proj"])
            if value == once:
                return (f"expected {expected}, got {value}: 'c_proj' names two layers in each "
                        "block, attn.c_proj (d -> d) and mlp.c_proj (4d -> d); count both")
        square = 0
        for name, out_mult, in_mult in _BLOCK_LINEARS:
            if any(name == t or name.endswith("." + t) for t in targets):
                square += out_mult * in_mult * n_embd * n_embd
        if value == n_layer * square:
            return (f"expected {expected}, got {value}: that is the size of the full weight "
                    "matrices; LoRA trains only A (r x in) and B (out x r) for each")
        return f"expected {expected}, got {value}"
    return compare


def check_lora_parameter_count(fn) -> None:
    """Grade ``fn(n_layer, n_embd, r, targets) -> int``: the numbers LoRA trains in a GPT whose
    blocks hold attn.c_attn (d -> 3d), attn.c_proj (d -> d), mlp.c_fc (d -> 4d) and mlp.c_proj
    (4d -> d), when the layers whose name ends with one of ``targets`` are wrapped."""
    __tracebackhide__ = True
    cases = []
    for desc, args in [
            ("one block of width 4, r 1, only c_attn", (1, 4, 1, ("c_attn",))),
            ("this chapter's GPT (4 x 128), r 8, every Linear", (4, 128, 8,
                                                                 ("c_attn", "c_proj", "c_fc"))),
            ("2 blocks of width 64, r 4, only the MLP", (2, 64, 4, ("c_fc", "mlp.c_proj"))),
            ("6 blocks of width 32, r 2, c_attn and c_proj", (6, 32, 2, ("c_attn", "c_proj")))]:
        cases.append(Case(desc, args=args, expected=_lora_count_reference(*args),
                          compare=_compare_count(*args),
                          hint="a wrapped Linear with in_features m and out_features n trains "
                               "r * (m + n) numbers; 'c_proj' matches a layer in the attention "
                               "and one in the MLP"))
    run_cases("check_lora_parameter_count", fn, cases)
