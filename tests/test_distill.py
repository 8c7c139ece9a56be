"""lessons_lib.distill: the distillation loss against torch.distributions and PyTorch's
kl_div (TRL's generalized_jsd_loss at beta=0), and the student's training."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from lessons_lib.distill import DistillConfig, distillation_loss, train_student
from lessons_lib.finetune import ChatTemplate, build_sft_dataset
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.tokenizers import CharTokenizer


def logits(seed, shape=(3, 5, 7)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def test_distillation_loss_is_the_kl_of_teacher_to_student():
    student, teacher = logits(0), logits(1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :2] = False
    mask[2, 4] = False
    for T in (1.0, 2.0):
        kl = kl_divergence(Categorical(logits=teacher / T), Categorical(logits=student / T))
        expected = kl[mask].mean() * T * T
        assert distillation_loss(student, teacher, mask, T).item() == pytest.approx(
            expected.item(), rel=1e-5)
        # TRL's generalized_jsd_loss with beta=0: kl_div(student, teacher, log_target=True)
        trl = F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1),
                       reduction="none", log_target=True).sum(-1)
        assert distillation_loss(student, teacher, mask, T).item() == pytest.approx(
            (trl[mask].mean() * T * T).item(), rel=1e-5)


def test_distillation_loss_is_zero_on_the_teacher_and_trains_the_student_only():
    teacher = logits(1).requires_grad_(True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert distillation_loss(teacher.detach().clone(), teacher, mask).item() == pytest.approx(
        0.0, abs=1e-6)
    student = logits(0).requires_grad_(True)
    distillation_loss(student, teacher, mask).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_distillation_loss_rejects_bad_input():
    s, t = logits(0), logits(1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="one vocabulary"):
        distillation_loss(s, logits(1, (3, 5, 6)), mask)
    with pytest.raises(ValueError, match="torch.bool"):
        distillation_loss(s, t, mask.float())
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(s, t, mask[:, :4])
    with pytest.raises(ValueError, match="no True"):
        distillation_loss(s, t, torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, mask, 0.0)
    with pytest.raises(ValueError, match="mode"):
        DistillConfig(mode="hints")
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=0)


def setup(n_layer=2, n_embd=32):
    tok = CharTokenizer.from_text("abcdefgh?. ")
    template = ChatTemplate.for_tokenizer(tok)
    pairs = [("ab?", "cde."), ("ba?", "fgh."), ("ha?", "dd."), ("gg?", "aaa.")]
    examples = build_sft_dataset(pairs * 4, template, tok, 16).examples
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=template.vocab_size, block_size=16, n_layer=n_layer,
                       n_head=2, n_embd=n_embd, dropout=0.0)
    return template, examples, config


def test_students_learn_from_the_teacher_by_either_mode():
    template, examples, config = setup()
    teacher = GPT(config)
    teacher_before = copy.deepcopy(teacher.state_dict())
    for mode in ("outputs", "logits"):
        torch.manual_seed(1)
        student = GPT(GPTConfig(**{**config.__dict__, "n_layer": 1, "n_embd": 16}))
        history = train_student(student, teacher, examples, template.pad_id,
                                DistillConfig(mode=mode, steps=60, batch_size=8, lr=1e-2,
                                              progress=False))
        assert len(history.loss) == 60 and not student.training
        # "outputs" fits the answers' tokens, "logits" the teacher's distributions there
        assert sum(history.loss[-10:]) / 10 < history.loss[0] * 0.7
        assert (history.loss == history.answer_loss) == (mode == "outputs")
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_train_student_rejects_bad_input():
    template, examples, config = setup()
    teacher = GPT(config)
    other = GPT(GPTConfig(**{**config.__dict__, "vocab_size": config.vocab_size + 1}))
    with pytest.raises(ValueError, match="vocabulary"):
        train_student(other, teacher, examples, template.pad_id, DistillConfig(progress=False))
    with pytest.raises(ValueError, match="non-empty list"):
        train_student(GPT(config), teacher, [], template.pad_id, DistillConfig(progress=False))
    with pytest.raises(ValueError, match="pad_id"):
        train_student(GPT(config), teacher, examples, 3, DistillConfig(progress=False))
