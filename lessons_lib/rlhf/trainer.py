"""What every trainer of this package shares: a seeded generator, the optimizer, the CPU
threads, a progress bar, the clock and the model modes. The trainers (reward model, PPO, DPO,
GRPO, expert iteration) differ only in what one step computes; each builds a :class:`Trainer`
from its config and runs its loop inside :meth:`Trainer.running`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..checks import eval_mode, non_negative_int, number_in, positive_int, positive_number
from ..model import DecoderLM, LanguageModel, num_parameters
from ..runtime import threads_for, use_threads

__all__ = ["History", "Trainer", "check_run_fields", "optimizer_step", "check_policy",
           "check_policy_and_reference", "check_callback"]


@dataclass
class History:
    """What every trainer's history records besides its own numbers."""

    seconds: float = 0.0             # the training itself; a callback's time is left out
    threads: int = 0                 # CPU threads it ran on
    from_cache: bool = False         # loaded by lessons_lib.pretrained, not trained here


def check_run_fields(config) -> None:
    """Check the fields every trainer's config has: ``lr`` > 0, ``grad_clip`` >= 0 (where it
    has one), ``seed`` >= 0, ``threads`` None or >= 1; messages name the config's class."""
    name = type(config).__name__
    positive_number(f"{name}.lr", config.lr)
    if hasattr(config, "grad_clip"):
        number_in(f"{name}.grad_clip", config.grad_clip, low=0.0)
    non_negative_int(f"{name}.seed", config.seed)
    if config.threads is not None:
        positive_int(f"{name}.threads", config.threads)


def check_policy(name: str, model, needs_hidden_states: bool = False) -> None:
    """A model of the course's protocol (:class:`lessons_lib.model.LanguageModel`: GPT,
    Llama, ...); one that exposes ``hidden_states`` and ``lm_head`` (a
    :class:`lessons_lib.model.DecoderLM`) when a head reads its hidden states."""
    if needs_hidden_states and not isinstance(model, DecoderLM):
        raise ValueError(f"{name} must be a lessons_lib.model.DecoderLM (a GPT or a Llama: a "
                         f"head reads its hidden states), got {type(model).__name__}")
    if not (isinstance(model, nn.Module) and isinstance(model, LanguageModel)):
        raise ValueError(f"{name} must be a language model of the course (a GPT, a Llama, "
                         f"...), got {type(model).__name__}")


def check_policy_and_reference(policy, reference, hint: str = "copy.deepcopy(reference)"
                               ) -> None:
    """Both are language models, and they share no weight: training the policy must leave
    the reference where it was."""
    check_policy("policy", policy)
    check_policy("reference", reference)
    if {id(p) for p in reference.parameters()} & {id(p) for p in policy.parameters()}:
        raise ValueError("policy and reference share weights, so training the policy would move "
                         f"the reference too: train a copy, {hint}")


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, model: nn.Module,
                   grad_clip: float = 0.0) -> None:
    """One step on ``loss``: gradients zeroed, back-propagated, their norm over ``model``'s
    parameters clipped to ``grad_clip`` (0: not clipped), then the optimizer's update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


class Trainer:
    """One training run's machinery.

    ``Trainer(model, lr=..., seed=..., threads=..., progress=..., total=..., desc=...)``
    makes the generator every random draw of the run takes (seeded: one seed, one run), Adam
    on the model's trainable parameters (AdamW with decay on the weight matrices only when
    ``weight_decay`` is given), the thread count (``threads``, or
    :func:`lessons_lib.runtime.threads_for` the model's size) and a progress bar of ``total``
    ticks. Inside ``with trainer.running(history, ...)``: the threads are set, the models are
    in eval mode (dropout off: a batch's first PPO or GRPO ratio is exactly 1) or, with
    ``train_mode``, the model in train mode; on leaving, ``history.seconds`` and
    ``history.threads`` are filled in and the bar closed.
    """

    def __init__(self, model: nn.Module, *, lr: float, seed: int, threads: int | None,
                 progress: bool, total: int, desc: str, grad_clip: float = 0.0,
                 weight_decay: float | None = None):
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if weight_decay is None:
            self.optimizer = torch.optim.Adam(params, lr=lr)
        else:
            groups = [{"params": [p for p in params if p.dim() >= 2],
                       "weight_decay": weight_decay},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
            self.optimizer = torch.optim.AdamW(groups, lr=lr)
        self.grad_clip = grad_clip
        self.threads = threads or threads_for(num_parameters(model))
        self.bar = tqdm(total=total, desc=desc, disable=not progress, leave=False,
                        mininterval=1.0)
        self._paused = 0.0

    @classmethod
    def for_config(cls, model: nn.Module, config, *, total: int, desc: str,
                   weight_decay: float | None = None) -> "Trainer":
        """A trainer from a config's ``lr``, ``seed``, ``threads``, ``progress`` and
        ``grad_clip`` (0 where it has none)."""
        return cls(model, lr=config.lr, seed=config.seed, threads=config.threads,
                   progress=config.progress, total=total, desc=desc,
                   grad_clip=getattr(config, "grad_clip", 0.0), weight_decay=weight_decay)

    @contextlib.contextmanager
    def running(self, history: History, *frozen: nn.Module, train_mode: bool = False):
        """Run the loop: threads set, ``frozen`` models (and the model, unless
        ``train_mode``) in eval mode; the time spent, less callbacks, goes to ``history``."""
        history.threads = self.threads
        modes = [eval_mode(m) for m in frozen]
        if not train_mode:
            modes.append(eval_mode(self.model))
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            stack.enter_context(use_threads(self.threads))
            if train_mode:
                self.model.train()
            try:
                yield self
            finally:
                self.bar.close()
                if train_mode:
                    self.model.eval()
        history.seconds = time.perf_counter() - start - self._paused

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss``, the gradient's norm clipped to ``grad_clip`` (> 0)."""
        optimizer_step(self.optimizer, loss, self.model, self.grad_clip)

    def tick(self, **shown: float) -> None:
        """Advance the progress bar by one and show ``shown`` (name -> number) beside it."""
        self.bar.update()
        if shown:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def call_back(self, callback, iteration: int, history: History) -> None:
        """Run ``callback(iteration, model, history)``, if given; its time is not training's."""
        if callback is None:
            return
        start = time.perf_counter()
        callback(iteration, self.model, history)
        self._paused += time.perf_counter() - start


def check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
