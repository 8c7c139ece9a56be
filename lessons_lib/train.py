"""The training loop every chapter uses.

``train(model, data, config)`` runs AdamW with a linear warmup and a cosine decay, clips the
gradient norm, evaluates now and then on a few fixed validation batches, shows a tqdm bar with
the current loss, and returns a :class:`History` you can plot. It is deterministic for a seed
on a CPU. ``model(inputs, targets)`` must return ``(logits, loss)``, as ``lessons_lib.model.GPT``
does.

``data`` is either a pair ``(train_ids, val_ids)`` of 1-D token tensors, from which random
windows are drawn, or a function ``batch_fn(split, generator) -> (inputs, targets)`` for tasks
whose batches are built differently (instruction tuning, synthetic tasks).

Under ``torchrun`` (see :mod:`lessons_lib.distributed`) ``train`` runs with
DistributedDataParallel: ``config.batch_size`` stays the global batch, each of the N processes
computes the gradient of its own ``batch_size / N`` rows of it, DDP averages the gradients,
and every process takes the same step -- the same training as one process, N times less work
each. One process with no group runs exactly the single-process loop.

Checkpoints are safetensors files: :func:`save_checkpoint` / :func:`load_checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed
from .checks import eval_mode, positive_int, positive_number
from .data import get_batch
from .model import num_parameters
from .runtime import autocast, choose_device, choose_precision, model_device, threads_for, use_threads


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 12
    block_size: int = 64
    lr: float = 1e-3                 # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1        # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1        # applied to matrices only, not to biases, norms or gains
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0           # max gradient norm; 0 turns clipping off
    eval_interval: int = 250         # evaluate every this many steps (and at the end)
    eval_batches: int = 10           # fixed validation batches per evaluation
    precision: str = "fp32"          # "fp32", "bf16" (autocast) or "auto": lessons_lib.runtime decides
    threads: int | None = None       # CPU threads while training; None: runtime.threads_for(model size)
    seed: int = 1337
    device: str = "auto"             # "auto": CUDA if available, else CPU (MPS only if asked)
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "block_size", "eval_interval", "eval_batches"):
            positive_int(f"TrainConfig.{name}", getattr(self, name))
        positive_number("TrainConfig.lr", self.lr)
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.threads is not None:
            positive_int("TrainConfig.threads", self.threads)
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"TrainConfig.precision must be 'fp32', 'bf16' or 'auto', got {self.precision!r}")


@dataclass
class History:
    step: list[int] = field(default_factory=list)            # every training step
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)       # the steps at which we evaluated
    val_loss: list[float] = field(default_factory=list)
    eval_train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0                                     # wall time of the training steps
    tokens: int = 0                                          # training tokens seen
    precision: str = ""                                      # what the steps ran in: "fp32" or "bf16"
    threads: int = 0                                         # CPU threads the steps ran on
    from_cache: bool = False                                 # loaded by lessons_lib.pretrained


def resolve_precision(config: TrainConfig, device: torch.device) -> str:
    """``config.precision``, with "auto" replaced by what :mod:`lessons_lib.runtime` chooses."""
    if config.precision == "auto":
        return choose_precision(device)[0]
    return config.precision


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``config.lr``, then a cosine down to ``lr * min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (dim >= 2) only; fused where PyTorch offers it."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device = params[0].device if params else torch.device("cpu")
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _batch_function(data, config: TrainConfig, device):
    if callable(data):
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError("data must be (train_ids, val_ids), two 1-D token tensors, or a function "
                         f"batch_fn(split, generator) -> (inputs, targets); got {type(data).__name__}")
    splits = {"train": data[0], "val": data[1]}

    def batch_fn(split, generator):
        return get_batch(splits[split], config.batch_size, config.block_size, generator, device)
    return batch_fn


@torch.no_grad()
def evaluate(model, batches, device=None, precision: str = "fp32") -> float:
    """Mean loss over a fixed list of (inputs, targets) batches, in eval mode (restored after,
    also on an error), in ``precision`` ("fp32" or "bf16"), on ``device`` (default: the model's,
    :func:`lessons_lib.runtime.model_device`)."""
    batches = list(batches)
    if not batches:
        raise ValueError("evaluate needs at least one (inputs, targets) batch")
    device = torch.device(device) if device is not None else model_device(model)
    losses = []
    with eval_mode(model):
        for x, y in batches:
            with autocast(device, precision):
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.float().item())
    return sum(losses) / len(losses)


def train(model: torch.nn.Module, data, config: TrainConfig | None = None, *, callback=None) -> History:
    """Train ``model`` in place for ``config.max_steps`` steps; return the history.

    ``callback(step, model, history)``, if given, runs after each evaluation (e.g. to sample
    text during training).
    """
    config = config or TrainConfig()
    world = distributed.world_size()
    device = choose_device(config.device)
    if world > 1:
        if config.batch_size % world:
            raise ValueError(f"TrainConfig.batch_size={config.batch_size} is the global batch: it "
                             f"must be a multiple of the {world} processes")
        if device.type == "cuda":
            device = torch.device("cuda", distributed.local_rank())
    precision = resolve_precision(config, device)
    model.to(device).train()
    batch_fn = _batch_function(data, config, device)
    if world > 1:
        batch_fn = _rank_batches(batch_fn, distributed.rank(), world)
    torch.manual_seed(config.seed)
    train_gen = torch.Generator().manual_seed(config.seed)
    eval_gen = torch.Generator().manual_seed(config.seed + 1)
    val_batches = [batch_fn("val", eval_gen) for _ in range(config.eval_batches)]
    train_eval_batches = [batch_fn("train", eval_gen) for _ in range(config.eval_batches)]
    history = History(precision=precision)
    threads = config.threads or threads_for(max(1, num_parameters(model)))
    if world > 1 and not config.threads:      # the cores are shared by this machine's processes
        threads = max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    history.threads = threads
    with use_threads(threads):
        _train_loop(model, config, device, precision, batch_fn, train_gen, val_batches, train_eval_batches,
                    history, callback)
    return history


def _rank_batches(batch_fn, rank: int, world: int):
    """A distributed sampler for random batches: every rank draws the same global batch (the
    generators share a seed) and keeps its own rows of it."""
    def rank_batch_fn(split, generator):
        x, y = batch_fn(split, generator)
        return distributed.shard(x, rank, world), distributed.shard(y, rank, world)
    return rank_batch_fn


def _ddp(model, device):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _train_loop(model, config, device, precision, batch_fn, train_gen, val_batches, train_eval_batches,
                history, callback) -> None:
    optimizer = make_optimizer(model, config)
    world = distributed.world_size()
    # under DDP the wrapper's backward averages the gradients across the processes
    forward = _ddp(model, device) if world > 1 else model

    # redraw at most once a second: in Jupyter each redraw is a message to the front end
    bar = tqdm(range(config.max_steps), desc="training", disable=not config.progress or not distributed.is_main(),
               leave=False, mininterval=1.0)
    start = time.perf_counter()
    for i in bar:
        lr = lr_at(i, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batch_fn("train", train_gen)
        with autocast(device, precision):
            _, loss = forward(x, y)
        if world > 1:
            # the loss is the mean over this rank's counted targets (-100 is not counted) and
            # DDP averages the ranks' gradients: weigh each rank by its share of the counted
            # targets, so the step is the gradient of the mean over the whole global batch
            counted = (y != -100).sum().item()
            loss = loss * (counted * world / distributed.all_reduce_sum(counted))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        loss_value = loss.item() if world == 1 else distributed.all_reduce_mean(loss.item())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss became {loss_value} at step {i}; lower the learning rate")
        history.step.append(i)
        history.train_loss.append(loss_value)
        history.lr.append(lr)
        history.tokens += x.numel() * world
        if (i + 1) % config.eval_interval == 0 or i + 1 == config.max_steps:
            history.seconds += time.perf_counter() - start
            history.eval_step.append(i)
            # each rank evaluates its rows; the mean over ranks is the loss of the whole batches
            history.val_loss.append(distributed.all_reduce_mean(evaluate(model, val_batches, device, precision)))
            history.eval_train_loss.append(
                distributed.all_reduce_mean(evaluate(model, train_eval_batches, device, precision)))
            bar.set_postfix(train=f"{history.eval_train_loss[-1]:.3f}", val=f"{history.val_loss[-1]:.3f}",
                            refresh=False)
            if callback is not None:
                callback(i, model, history)
            start = time.perf_counter()
        elif i % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()


def save_checkpoint(model: torch.nn.Module, path, metadata: dict | None = None) -> None:
    """Save the weights as safetensors, with ``metadata`` (JSON-serialisable) stored beside them."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # tied weights share storage; safetensors refuses shared tensors, so store copies
    tensors = {k: v.clone() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"lessons_lib": json.dumps(metadata or {})})


def load_checkpoint(model: torch.nn.Module, path) -> dict:
    """Load weights saved by :func:`save_checkpoint` into ``model``; return the metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lessons_lib", "{}"))
    state = load_file(str(path))
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(ours[k].shape)} in the model"
             for k in sorted(set(state) & set(ours)) if state[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shapes {wrong[:3]}")
    model.load_state_dict(state)
    return metadata

