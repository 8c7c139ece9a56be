"""Checkers for chapter 17's exercises (your own assistant: distillation, a GPT's size, a
reward a program can compute).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (the KL taken the other way
round, ``T^2`` left out, the mask ignored, a sum where a mean belongs, the logits not softened;
the tied head counted twice, the position embeddings or the biases forgotten; a refusal
rewarded where an answer belongs, an empty answer rewarded, a refusal in capitals or after a
space not recognised).

The references are written here, independently of :mod:`lessons_lib.distill`,
:mod:`lessons_lib.model` and :mod:`lessons_lib.assistant`: the distillation loss position by
position with ``math.exp`` and ``math.log`` of plain floats (each softmax shifted by its
maximum), the GPT's parameters as a formula summed layer by layer, and the safety reward as
the two rules the exercise states.
"""

from __future__ import annotations

import math

import torch

from ._core import Case, _short, as_int, as_number, randn, randn_call, run_cases
from ._core import number_close as _number_close

__all__ = ["check_distillation_loss", "check_gpt_parameters", "check_safety_reward"]


def _close(a: float, b: float, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


# -----------------------------------------------------------------------------
# exercise 1: the distillation loss, T^2 * KL(teacher || student) over the answer positions

def _log_softmax(row: list[float], temperature: float) -> list[float]:
    z = [x / temperature for x in row]
    top = max(z)
    log_total = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - log_total for v in z]


def _kl(p_logits: list[float], q_logits: list[float], t_p: float, t_q: float) -> float:
    """KL(p || q) of softmax(p_logits / t_p) and softmax(q_logits / t_q)."""
    log_p, log_q = _log_softmax(p_logits, t_p), _log_softmax(q_logits, t_q)
    return sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))


def _position_kls(student, teacher, t_student: float, t_teacher: float,
                  reverse: bool = False) -> list[list[float]]:
    """KL(teacher || student) (or the reverse) at every position, row by row."""
    rows = []
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        if reverse:
            rows.append([_kl(s, t, t_student, t_teacher) for s, t in zip(s_row, t_row)])
        else:
            rows.append([_kl(t, s, t_teacher, t_student) for s, t in zip(s_row, t_row)])
    return rows


def _masked(kls: list[list[float]], mask) -> list[float]:
    return [k for row, m_row in zip(kls, mask.tolist()) for k, m in zip(row, m_row) if m]


def _distill_reference(student, teacher, mask, temperature: float) -> float:
    kept = _masked(_position_kls(student, teacher, temperature, temperature), mask)
    return temperature ** 2 * sum(kept) / len(kept)


def _distill_slips(student, teacher, mask, temperature: float):
    T = temperature
    B, n_pos = mask.shape
    kls = _position_kls(student, teacher, T, T)
    kept = _masked(kls, mask)
    n = len(kept)
    mean = sum(kept) / n

    def masked_mean(t_student: float, t_teacher: float, reverse: bool = False) -> float:
        values = _masked(_position_kls(student, teacher, t_student, t_teacher, reverse), mask)
        return sum(values) / len(values)

    candidates = [
        (T * T * masked_mean(T, T, reverse=True),
         "that is KL(student || teacher), the KL the other way round: distillation takes "
         "KL(p_teacher || p_student) = sum_v p_t(v) * (log p_t(v) - log p_s(v)), the teacher's "
         "probabilities weighting the difference"),
        (mean, f"the factor temperature ** 2 = {T * T:g} is missing: multiply the KL by T^2 so "
               "the gradient keeps its size as the temperature changes"),
        (T * mean, f"that multiplies by temperature = {T:g}; the factor is temperature ** 2 = "
                   f"{T * T:g}"),
        (T * T * sum(kls[b][t] for b in range(B) for t in range(n_pos)) / (B * n_pos),
         "the mask was ignored: that is the mean over every position, the prompt's and the "
         "padding's included; average over the positions where mask is True"),
        (T * T * sum(kept), f"that is the sum over the {n} positions the mask keeps; take the "
                            "mean over them"),
        (T * T * sum(kept) / (B * n_pos),
         f"that divides the masked sum by every position, B * T = {B * n_pos}; divide by the "
         f"number of positions the mask keeps, mask.sum() = {n}"),
        (T * T * sum(kept) / B,
         f"that divides the masked sum by the batch size B = {B} (what F.kl_div's "
         "reduction='batchmean' does on (B, T, V) inputs); divide by the number of positions "
         f"the mask keeps, mask.sum() = {n}"),
        (T * T * masked_mean(1.0, 1.0),
         f"the logits were not divided by the temperature ({T:g}) before the softmax: both "
         "distributions are softened, softmax(logits / temperature)"),
        (T * T * masked_mean(1.0, T),
         f"only the teacher's logits were divided by the temperature ({T:g}); soften the "
         "student's too"),
        (T * T * masked_mean(T, 1.0),
         f"only the student's logits were divided by the temperature ({T:g}); soften the "
         "teacher's too"),
    ]
    reference = T * T * mean

    def slips(value: float) -> str | None:
        for wrong, message in candidates:
            if not _close(wrong, reference) and _close(value, wrong):
                return message
        return None
    return slips


def _non_finite(got) -> bool:
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            return False
        got = got.detach().reshape(()).item()
    try:
        return not math.isfinite(float(got))
    except (TypeError, ValueError):
        return False


def _distill_compare(student, teacher, mask, temperature: float, large: bool):
    close = _number_close(rtol=1e-4, atol=1e-5,
                          slips=_distill_slips(student, teacher, mask, temperature))

    def compare(got, expected) -> str | None:
        if large and _non_finite(got):
            return (f"expected about {expected:.6g}, got {_short(got)}: with logits this far "
                    "apart, softmax rounds the smallest probabilities to 0 and log(0) = -inf "
                    "(0 * -inf is nan). Compute the log-probabilities with torch.log_softmax, "
                    "and the probabilities as their exp")
        return close(got, expected)
    return compare


def _mask_tensor(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _mask_call(rows: list[list[int]]) -> str:
    return f"torch.tensor({[[bool(m) for m in row] for row in rows]})"


def check_distillation_loss(fn) -> None:
    """``fn(student_logits, teacher_logits, mask, temperature)``: ``student_logits`` and
    ``teacher_logits`` (B, T, V) float, ``mask`` (B, T) bool (True at the positions that count,
    an answer's), ``temperature`` a float > 0. Returns a single number: ``temperature ** 2``
    times the mean, over the positions where ``mask`` is True, of KL(p_teacher || p_student) =
    sum_v p_t(v) * (log p_t(v) - log p_s(v)), with ``p = softmax(logits / temperature)`` over
    the vocabulary."""
    __tracebackhide__ = True
    hint = ("log_softmax(logits / temperature, dim=-1) for both; the KL at each position is "
            "(p_t * (log p_t - log p_s)).sum(-1); keep the positions where mask is True, "
            "average them and multiply by temperature ** 2")
    cases = []
    same = torch.tensor([[[1.0, -2.0, 0.5, 3.0, 0.0], [0.2, 0.2, -1.0, 2.5, 1.0],
                          [-3.0, 1.0, 1.0, 0.0, 2.0]]])
    small_s = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]],
                            [[-1.0, 0.0, 1.0], [3.0, 0.0, 0.0]]])
    small_t = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, -2.0]],
                            [[0.0, 0.0, 0.0], [1.0, 2.0, 1.5]]])
    fixed = [
        (same, same.clone(), [[0, 1, 1]], 2.0,
         "a student whose logits equal the teacher's: the loss is 0"),
        (small_s, small_t, [[1, 1], [1, 1]], 1.0,
         "2 rows of 2 positions, all counted, vocabulary 3, temperature 1"),
    ]
    for student, teacher, rows, temperature, description in fixed:
        mask = _mask_tensor(rows)
        cases.append(Case(description, (student, teacher, mask, temperature),
                          _distill_reference(student, teacher, mask, temperature),
                          compare=_distill_compare(student, teacher, mask, temperature, False),
                          hint=hint))
    randoms = [
        (171, [[0, 1, 1, 1], [0, 1, 1, 0]], 6, 2.0, 1.0, False,
         "2 rows of 4 positions, vocabulary 6, temperature 2, the prompts' positions masked"),
        (173, [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], 9, 0.5, 1.0, False,
         "3 rows of 5 positions with padding, vocabulary 9, temperature 0.5"),
        (175, [[0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], 11, 4.0, 2.0, False,
         "2 rows of 6 positions, vocabulary 11, temperature 4"),
        (177, [[0, 1, 1], [1, 1, 0]], 5, 1.0, 60.0, True,
         "logits about 60 apart, temperature 1: softmax rounds the smallest probabilities "
         "to 0"),
    ]
    for seed, rows, V, temperature, scale, large, description in randoms:
        B, T = len(rows), len(rows[0])
        student = scale * randn(B, T, V, seed=seed)
        teacher = 2.0 * scale * randn(B, T, V, seed=seed + 1)
        mask = _mask_tensor(rows)
        cases.append(Case(
            f"{description} (seeded)", (student, teacher, mask, temperature),
            _distill_reference(student, teacher, mask, temperature),
            compare=_distill_compare(student, teacher, mask, temperature, large), hint=hint,
            rebuild=f"student_logits = {scale} * {randn_call(B, T, V, seed=seed)}; "
                    f"teacher_logits = {2.0 * scale} * {randn_call(B, T, V, seed=seed + 1)}; "
                    f"mask = {_mask_call(rows)}; temperature = {temperature}"))
    run_cases("check_distillation_loss", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: the parameters of a GPT, from its sizes

def _gpt_parts(vocab_size: int, block_size: int, n_layer: int, n_embd: int) -> dict[str, int]:
    """The parameters of GPT(GPTConfig(...)) with the defaults (biases, a tied head, learned
    positions), part by part."""
    V, P, L, d = vocab_size, block_size, n_layer, n_embd
    return {
        "wte": V * d,                                   # token embedding = the tied head
        "wpe": P * d,                                   # learned position embeddings
        "linear_weights": L * (d * 3 * d + d * d + d * 4 * d + 4 * d * d),
        "linear_biases": L * (3 * d + d + 4 * d + d),   # c_attn, attn.c_proj, c_fc, mlp.c_proj
        "ln_weights": (2 * L + 1) * d,                  # ln_1 and ln_2 per block, then ln_f
        "ln_biases": (2 * L + 1) * d,
    }


def _gpt_reference(vocab_size: int, block_size: int, n_layer: int, n_embd: int) -> int:
    return sum(_gpt_parts(vocab_size, block_size, n_layer, n_embd).values())


def _gpt_deltas(vocab_size: int, block_size: int, n_layer: int,
                n_embd: int) -> list[tuple[int, frozenset, str]]:
    """Each slip as how far its count is from the right one, the parts it gets wrong (two
    slips combine only when these do not overlap) and what the message says."""
    parts = _gpt_parts(vocab_size, block_size, n_layer, n_embd)
    d, L = n_embd, n_layer
    block = (parts["linear_weights"] + parts["linear_biases"]
             + 2 * L * d * 2) // L                      # one block, its two LayerNorms included
    deltas = [
        (parts["wte"], {"head"},
         "the tied output head is counted twice: lm_head.weight is the token embedding's "
         "matrix itself (wte.weight), one tensor counted once"),
        (-parts["wpe"], {"wpe"},
         "the position embeddings are forgotten: block_size x n_embd learned vectors (wpe)"),
        (-parts["linear_biases"], {"linear_b"},
         "the Linear layers' biases are forgotten: c_attn (3d), attn.c_proj (d), c_fc (4d) "
         "and mlp.c_proj (d) in every block"),
        (-parts["ln_biases"], {"ln_b", "ln_f_b"},
         "the LayerNorms' biases are forgotten: each LayerNorm has a weight and a bias of "
         "n_embd numbers"),
        (-parts["linear_biases"] - parts["ln_biases"], {"linear_b", "ln_b", "ln_f_b"},
         "every bias is forgotten, the Linear layers' and the LayerNorms'"),
        (-parts["ln_weights"] - parts["ln_biases"], {"ln_w", "ln_b", "ln_f_w", "ln_f_b"},
         "the LayerNorms are forgotten: ln_1 and ln_2 in every block and the final ln_f, "
         "each a weight and a bias of n_embd numbers"),
        (-4 * L * d, {"ln_w", "ln_b"},
         "the blocks' LayerNorms are forgotten (ln_1 and ln_2, a weight and a bias of n_embd "
         "numbers each)"),
        (-2 * d, {"ln_f_w", "ln_f_b"},
         "the final LayerNorm ln_f is forgotten (a weight and a bias of n_embd numbers)"),
        (-L * (2 * d * d + 2 * d), {"c_attn"},
         "c_attn maps n_embd to 3 * n_embd (queries, keys and values), not to n_embd"),
        (-L * (6 * d * d + 3 * d), {"mlp"},
         "the MLP's hidden layer is 4 * n_embd wide, not n_embd"),
    ]
    if L > 1:
        deltas.append((-(L - 1) * block, {"blocks", "linear_b", "ln_w", "ln_b", "c_attn", "mlp"},
                       f"that counts one block; the GPT has {L}"))
    return [(delta, frozenset(tags), message) for delta, tags, message in deltas]


def _gpt_slips(vocab_size: int, block_size: int, n_layer: int, n_embd: int):
    deltas = _gpt_deltas(vocab_size, block_size, n_layer, n_embd)
    reference = _gpt_reference(vocab_size, block_size, n_layer, n_embd)

    def slips(value: int) -> str | None:
        for delta, _, message in deltas:
            if value == reference + delta:
                return message
        for i, (delta_a, tags_a, message_a) in enumerate(deltas):    # two slips at once
            for delta_b, tags_b, message_b in deltas[i + 1:]:
                if not tags_a & tags_b and value == reference + delta_a + delta_b:
                    return f"two slips: {message_a}; and {message_b}"
        return None
    return slips


def _gpt_compare(vocab_size: int, block_size: int, n_layer: int, n_embd: int):
    slips = _gpt_slips(vocab_size, block_size, n_layer, n_embd)

    def compare(got, expected) -> str | None:
        value, problem = as_int(got, "a whole number of parameters (an int)")
        if problem:
            return problem
        if value == expected:
            return None
        named = slips(value)
        message = f"expected {expected:,}, got {value:,} ({value - expected:+,})"
        return f"{message}: {named}" if named else message
    return compare


# (vocab_size, block_size, n_layer, n_embd): sizes where no two slips give one count
_GPT_CASES = [
    ((17, 64, 1, 8), "a tiny GPT: vocabulary 17, 64 positions, 1 block of width 8"),
    ((65, 32, 2, 12), "vocabulary 65 (characters), 32 positions, 2 blocks of width 12"),
    ((1024, 128, 4, 128), "vocabulary 1024, 128 positions, 4 blocks of width 128"),
    ((300, 64, 3, 48), "vocabulary 300, 64 positions, 3 blocks of width 48"),
    ((50257, 1024, 12, 768), "GPT-2 small: vocabulary 50257, 1024 positions, 12 blocks of "
                             "width 768"),
]


def check_gpt_parameters(fn) -> None:
    """``fn(vocab_size, block_size, n_layer, n_embd)`` returns, as an int, the number of
    parameters of ``GPT(GPTConfig(vocab_size=..., block_size=..., n_layer=..., n_head=...,
    n_embd=...))`` with the other settings left at their defaults: biases in every Linear and
    LayerNorm, the output head tied to the token embedding, learned position embeddings. (The
    number of heads does not change the count.)"""
    __tracebackhide__ = True
    hint = ("the token embedding (vocab_size x n_embd, which is also the head), the position "
            "embeddings (block_size x n_embd), then per block two LayerNorms, c_attn "
            "(d -> 3d), attn.c_proj (d -> d), c_fc (d -> 4d) and mlp.c_proj (4d -> d), each "
            "Linear with a bias; then the final LayerNorm")
    cases = []
    for args, description in _GPT_CASES:
        cases.append(Case(description, args, _gpt_reference(*args), compare=_gpt_compare(*args),
                          hint=hint))
    run_cases("check_gpt_parameters", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: a reward a program computes for a safety request

_REFUSAL_START = "i won't write insults"


def _declines(answer: str) -> bool:
    return answer.strip().lower().startswith(_REFUSAL_START)


def _safety_reference(answer: str, harmful: bool) -> float:
    if harmful:
        return 1.0 if _declines(answer) else 0.0
    return 1.0 if answer.strip() and not _declines(answer) else 0.0


# each slip as the reward it computes, with what the message says
_SAFETY_SLIPS = [
    (lambda a, h: _safety_reference(a, not h),
     "the two kinds of request are swapped: a harmful request (harmful=True) earns 1.0 for a "
     "refusal, a look-alike request (harmful=False) earns 1.0 for an answer"),
    (lambda a, h: float(_declines(a)) if h else float(not _declines(a)),
     "an empty (or blank) answer is rewarded for a look-alike request: it must be answered, "
     "so check answer.strip() is not empty too"),
    (lambda a, h: float(_declines(a)) if h else float(bool(a) and not _declines(a)),
     "an answer of only whitespace is rewarded for a look-alike request: test "
     "answer.strip(), not answer, for emptiness"),
    (lambda a, h: (float(a.strip().startswith(_REFUSAL_START)) if h else
                   float(bool(a.strip()) and not a.strip().startswith(_REFUSAL_START))),
     "the match is case-sensitive: lower-case the answer (answer.strip().lower()) before "
     "comparing, so that 'I won't write insults' and 'I WON'T WRITE INSULTS' decline too"),
    (lambda a, h: (float(a.strip().startswith("I won't write insults")) if h else
                   float(bool(a.strip()) and not a.strip().startswith("I won't write insults"))),
     "the match is case-sensitive: lower-case the answer (answer.strip().lower()) before "
     "comparing, so that 'i won't write insults' and 'I WON'T WRITE INSULTS' decline too"),
    (lambda a, h: (float(a.lower().startswith(_REFUSAL_START)) if h else
                   float(bool(a.strip()) and not a.lower().startswith(_REFUSAL_START))),
     "the leading spaces are not stripped: '  i won't write insults' declines too; "
     "strip the answer (answer.strip()) before comparing"),
    (lambda a, h: (float(_REFUSAL_START in a.lower()) if h else
                   float(bool(a.strip()) and _REFUSAL_START not in a.lower())),
     "that looks for the refusal anywhere in the answer; an answer declines when it STARTS "
     "with it (startswith)"),
]


def _safety_bool_message(got) -> str:
    return (f"expected a float reward (1.0 or 0.0), got {got!r}, a bool: a reward is a number "
            "the trainer averages; return float(...) of your condition")


def _safety_value(got) -> tuple[float | None, str | None]:
    if isinstance(got, bool):
        return None, _safety_bool_message(got)
    if got is None:
        return None, "expected a float reward (1.0 or 0.0), got None: did you forget to return?"
    return as_number(got, "a float reward (1.0 or 0.0)")


def _safety_profile(fn, cases: list[tuple[str, bool]]) -> list[float] | None:
    """The learner's reward on every case, or None when it raises or returns a non-number."""
    values = []
    for answer, harmful in cases:
        try:
            value, problem = _safety_value(fn(answer, harmful))
        except Exception:                               # noqa: BLE001 - any failure: no profile
            return None
        if problem:
            return None
        values.append(value)
    return values


def _safety_compare(fn, inputs: list[tuple[str, bool]], answer: str, harmful: bool):
    def compare(got, expected) -> str | None:
        value, problem = _safety_value(got)
        if problem:
            return problem
        if value == expected:
            return None
        if harmful:
            why = ("the answer declines, and a harmful request (harmful=True) that is declined "
                   "earns 1.0" if _declines(answer) else
                   "the answer does not decline, and a harmful request (harmful=True) that is "
                   "not declined earns 0.0")
        elif _declines(answer):
            why = ("the answer declines, and a look-alike request (harmful=False) deserves an "
                   "answer: declining it earns 0.0")
        elif not answer.strip():
            why = ("an empty answer earns 0.0: a look-alike request (harmful=False) deserves "
                   "an answer")
        else:
            why = ("the answer answers without declining, and a look-alike request "
                   "(harmful=False) answered so earns 1.0")
        message = f"expected {expected!r}, got {value!r}: {why}"
        profile = _safety_profile(fn, inputs)
        if profile is not None:                         # which slip gives every reward it gave
            for slip, named in _SAFETY_SLIPS:
                if profile == [slip(a, h) for a, h in inputs]:
                    return f"{message}\n  {named}"
        return message
    return compare


_SAFETY_CASES = [
    ("I won't write insults about people.", True, "the refusal, on a harmful request"),
    ("A warm, funny film.", False, "an answer, on a look-alike request"),
    ("A warm, funny film.", True, "an answer, on a harmful request"),
    ("I won't write insults about people.", False, "the refusal, on a look-alike request"),
    ("", False, "an empty answer, on a look-alike request"),
    ("   ", False, "an answer of three spaces, on a look-alike request"),
    ("", True, "an empty answer, on a harmful request"),
    ("  i won't write insults, sorry", True,
     "a refusal in lower case after two spaces, on a harmful request"),
    ("I WON'T WRITE INSULTS ABOUT ANYONE.", True, "a refusal in capitals, on a harmful request"),
    ("i won't write insults about people.\n", False,
     "a refusal in lower case, on a look-alike request"),
    ("\n I won't write insults about people.", True,
     "a refusal after a newline and a space, on a harmful request"),
    ("I won't spoil the ending.", False,
     "an answer that starts like a refusal ('I won't spoil the ending.'), on a look-alike "
     "request"),
    ("I won't spoil the ending.", True,
     "an answer that starts like a refusal ('I won't spoil the ending.'), on a harmful request"),
    ("Dull. I won't write insults, but it bored me.", False,
     "an answer with the refusal's words in the middle, on a look-alike request"),
    ("  Sharp and funny, a delight.  ", False,
     "an answer with spaces around it, on a look-alike request"),
]


def check_safety_reward(fn) -> None:
    """``fn(answer, harmful) -> float``: the reward for ``answer`` (a str) to a safety request.
    For a harmful request (``harmful=True``) it is 1.0 when the answer declines, else 0.0; for
    a look-alike request (``harmful=False``) it is 1.0 when the answer is not empty (not only
    whitespace) and does not decline, else 0.0. An answer declines when, stripped of the
    whitespace around it and lower-cased, it starts with "i won't write insults"."""
    __tracebackhide__ = True
    inputs = [(answer, harmful) for answer, harmful, _ in _SAFETY_CASES]
    hint = ("declines = answer.strip().lower().startswith(\"i won't write insults\"); then "
            "float(declines) for a harmful request, float(answer.strip() != '' and not "
            "declines) for a look-alike one")
    cases = [Case(description, (answer, harmful), _safety_reference(answer, harmful),
                  compare=_safety_compare(fn, inputs, answer, harmful), hint=hint)
             for answer, harmful, description in _SAFETY_CASES]
    run_cases("check_safety_reward", fn, cases)
