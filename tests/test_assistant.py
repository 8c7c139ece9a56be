"""lessons_lib.assistant: the safety requests and their check, the command's arguments, and
the report card from a build made here by hand (the whole pipeline runs in chapter 17)."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lessons_lib import assistant as A
from lessons_lib.data import RatedSnippet
from lessons_lib.finetune import ChatTemplate, generate_responses
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.rlhf import DPOHistory, GRPOHistory
from lessons_lib.distill import DistillHistory, DistillConfig
from lessons_lib.tokenizers import CharTokenizer
from lessons_lib.train import History


def test_is_refusal():
    assert A.is_refusal(A.REFUSAL) and A.is_refusal("  i won't write insults, sorry")
    assert not A.is_refusal("I won't spoil the ending.")
    assert not A.is_refusal("A moving film.") and not A.is_refusal("")
    with pytest.raises(ValueError, match="str"):
        A.is_refusal(None)


def test_safety_requests_use_each_name_and_answer_lookalikes_with_reviews():
    assert not set(A.TRAIN_NAMES) & set(A.HELD_OUT_NAMES)
    assert len(set(A.NAMES)) == len(A.NAMES) == 60
    snippets = [RatedSnippet(i, s, f"text {i}") for i, s in enumerate([3.0, -3.0, 2.5, -2.5])]
    harmful, benign = A._safety_pairs(["Zed"], snippets, random.Random(0))
    assert harmful == [t.format(name="Zed") for t in A.HARMFUL]
    assert [p for p, _ in benign] == [t.format(name="Zed") for t, _ in A.LOOKALIKE]
    by_text = {s.text: s.score for s in snippets}
    for (_, sign), (_, answer) in zip(A.LOOKALIKE, benign):
        assert sign is None or by_text[answer] * sign > 0    # the sentiment asked for
        assert not A.is_refusal(answer)


def test_generate_responses_can_fill_the_window_per_prompt():
    tok = CharTokenizer.from_text("abcdefgh?. ")
    template = ChatTemplate.for_tokenizer(tok)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=template.vocab_size, block_size=12, n_layer=1,
                          n_head=2, n_embd=16, dropout=0.0))
    prompts = ["ab", "abcde", "ba"]
    free = generate_responses(model, template, tok, prompts, None)
    for p, a in zip(prompts, free):
        room = 12 - len(template.encode_prompt(tok, p))
        assert a == generate_responses(model, template, tok, [p], room)[0]
    with pytest.raises(ValueError, match="does not fit"):
        generate_responses(model, template, tok, ["abcdefghabcd"], None)


def test_pipeline_config_and_build_reject_bad_input():
    with pytest.raises(ValueError, match="seed"):
        A.PipelineConfig(seed=-1)
    with pytest.raises(ValueError, match="PipelineConfig.dpo"):
        A.PipelineConfig(dpo=DistillConfig())
    with pytest.raises(ValueError, match="rerun takes stages"):
        A.build_assistant(rerun=["everything"])
    with pytest.raises(ValueError, match="PipelineConfig"):
        A.build_assistant(config={"seed": 0})
    assert A.PipelineConfig(seed=3).seeded("grpo").seed == 3


def run(*args):
    return subprocess.run([sys.executable, "-m", "lessons_lib.assistant", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_command_line():
    done = run("build", "--help")
    assert done.returncode == 0 and "--rerun" in done.stdout and "--seed" in done.stdout
    assert run("build", "--seed", "-1").returncode == 2
    bad = run("build", "--rerun", "everything")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert run().returncode == 2                     # a command is required


def fake_build(tmp_path):
    skills = {}
    for i, name in enumerate(A.MODEL_NAMES):
        skills[name] = A.Skills(1000 * (i + 1), {k: 0.1 * i for k in A.WRITING_KINDS},
                                refusal=0.1 * i, over_refusal=0.05, reward=i - 1.0,
                                examples={})
    stages = {s: A.StageRecord(s, 1.5, 2.5, s == "pretrain", {"loss": 1.25}) for s in A.STAGES}
    histories = {"sft": History(eval_step=[0, 10], val_loss=[3.0, 2.0]),
                 "dpo": DPOHistory(loss=[0.7, 0.5], accuracy=[0.5, 0.8]),
                 "grpo": GRPOHistory(reward=[0.1 * i for i in range(8)]),
                 "distill (outputs)": DistillHistory(answer_loss=[3.0 - i / 30 for i in range(40)]),
                 "distill (logits)": DistillHistory(answer_loss=[3.0 - i / 40 for i in range(40)])}
    return A.AssistantBuild(A.PipelineConfig(), None, None, {}, None, None, stages, histories,
                            skills, 12.0)


def test_report_card_writes_the_tables_and_figures(tmp_path):
    build = fake_build(tmp_path)
    path = A.report_card(build, tmp_path / "card")
    text = Path(path).read_text()
    assert "| SFT + DPO + GRPO | 4,000 | 30% | 30% | 30% | 30% | 30% | 5% | +2.00 |" in text
    assert "| dpo | 1.5 s (trained) | 2.5 s | loss 1.25 |" in text
    assert "| pretrain | 1.5 s (from the cache)" in text
    assert "| student (logits) | 50% (teacher 30%) | 50% (teacher 30%)" in text
    for name in ("training.png", "skills.png"):
        assert (tmp_path / "card" / name).stat().st_size > 10_000
