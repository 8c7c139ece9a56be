"""Knowledge distillation: a small student learns from a large teacher. Read top to bottom.

Two ways, on the same answers that the teacher wrote:

* **on the teacher's outputs** (sequence-level distillation, Kim & Rush, 2016): sample the
  teacher's answers to a set of prompts and fine-tune the student on them with the ordinary
  next-token loss, as if they were human-written;
* **on the teacher's logits** (Hinton et al., 2015): at every answer position the student
  matches the teacher's whole distribution over the next token, not just the token it drew,
  by minimising KL(teacher || student) at a temperature T, times T^2 (so the gradient keeps its
  size as T changes). This is TRL's ``generalized_jsd_loss`` at ``beta=0``.

1. :func:`distillation_loss`.
2. :class:`DistillConfig`, :class:`DistillHistory`, :func:`train_student`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import bool_mask, finite, float_tensor, positive_int, positive_number
from .finetune import IGNORE, Example, collate, sft_loss
from .rlhf.trainer import History, Trainer, check_policy, check_run_fields
from .model import num_parameters
from .runtime import model_device, threads_for

__all__ = ["distillation_loss", "MODES", "DistillConfig", "DistillHistory", "train_student"]


# -----------------------------------------------------------------------------
# 1. the loss

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` averaged over the positions where ``mask`` is True.

    ``student_logits`` and ``teacher_logits`` are (B, T, V) over one vocabulary; ``mask`` (B, T)
    picks the positions that count (an answer's, not its prompt's or padding's). Both
    distributions are softened by ``temperature``. The teacher's side carries no gradient.
    """
    float_tensor("student_logits", student_logits, ndim=3)
    float_tensor("teacher_logits", teacher_logits, ndim=3)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have one shape (batch, T, "
                         f"vocab), got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}: the two models need one vocabulary")
    mask = bool_mask("mask", mask, tuple(student_logits.shape[:2]), of="(batch, T)")
    if not mask.any():
        raise ValueError("mask selects no position: there is nothing to distil")
    T = positive_number("temperature", temperature)
    student = F.log_softmax(student_logits.float() / T, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)          # (B, T)
    return finite("the distillation loss", kl[mask].mean() * T * T)


# -----------------------------------------------------------------------------
# 2. training the student

MODES = ("outputs", "logits")


@dataclass
class DistillConfig:
    """``mode`` "outputs": the next-token loss on the tokens the teacher wrote; "logits": the
    :func:`distillation_loss` to the teacher's distributions at those positions."""

    mode: str = "logits"
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    temperature: float = 1.0         # "logits" only
    weight_decay: float = 0.1        # AdamW's, on the weight matrices only
    grad_clip: float = 1.0
    seed: int = 0
    threads: int | None = None       # None: runtime.threads_for(the teacher's size)
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"DistillConfig.mode must be one of {MODES}, got {self.mode!r}")
        positive_int("DistillConfig.steps", self.steps)
        positive_int("DistillConfig.batch_size", self.batch_size)
        positive_number("DistillConfig.temperature", self.temperature)
        check_run_fields(self)


@dataclass
class DistillHistory(History):
    loss: list[float] = field(default_factory=list)      # one per step: the loss trained on
    answer_loss: list[float] = field(default_factory=list)   # the next-token loss, every mode


def train_student(student: nn.Module, teacher: nn.Module, examples: list[Example], pad_id: int,
                  config: DistillConfig | None = None) -> DistillHistory:
    """Train ``student`` in place on ``examples`` (prompt and teacher's answer, the prompt's
    targets -100, as :func:`lessons_lib.finetune.build_sft_dataset` makes them), drawn at
    random ``config.batch_size`` at a time and padded with ``pad_id``. The two models share one
    vocabulary; the teacher is frozen (read only in "logits" mode). The student comes back in
    eval mode."""
    config = config or DistillConfig()
    check_policy("student", student)
    check_policy("teacher", teacher)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"the student's vocabulary ({student.config.vocab_size}) must be the "
                         f"teacher's ({teacher.config.vocab_size})")
    if isinstance(examples, Example) or not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError("examples must be a non-empty list of Examples "
                         "(lessons_lib.finetune.build_sft_dataset(...).examples)")
    collate(examples, pad_id)                  # checks every example and the pad id once
    if config.threads is None:                 # the teacher's share of the work sets them
        config = replace(config, threads=threads_for(num_parameters(teacher)))
    device = model_device(student)
    trainer = Trainer.for_config(student, config, total=config.steps,
                                 desc=f"distillation ({config.mode})",
                                 weight_decay=config.weight_decay)
    history = DistillHistory()
    with trainer.running(history, teacher, train_mode=True):
        for _ in range(config.steps):
            rows = torch.randint(len(examples), (config.batch_size,), generator=trainer.generator)
            inputs, targets = collate([examples[i] for i in rows.tolist()], pad_id)
            inputs, targets = inputs.to(device), targets.to(device)
            logits, _ = student(inputs)
            answer_loss = sft_loss(logits, targets)
            if config.mode == "outputs":
                loss = answer_loss
            else:
                with torch.no_grad():
                    teacher_logits, _ = teacher(inputs)
                loss = distillation_loss(logits, teacher_logits, targets != IGNORE,
                                         config.temperature)
            trainer.step(loss)
            history.loss.append(loss.item())
            history.answer_loss.append(answer_loss.item())
            trainer.tick(loss=history.loss[-1])
    return history
