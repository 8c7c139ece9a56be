"""Training on more than one process: PyTorch's own distributed engine, in a few helpers.

The pieces, in the order a distributed run meets them:

1. :func:`launch` starts ``nproc`` copies of a script on this machine through
   ``torch.distributed.run`` (the ``torchrun`` command), which gives each copy its rank in the
   environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
2. Inside the script, :func:`process_group` joins the copies into one process group: gloo on
   CPUs, NCCL on CUDA GPUs (:func:`backend_for`); :func:`rank`, :func:`world_size`,
   :func:`local_rank` and :func:`is_main` say who is who (rank 0 and a world of 1 when no group
   is running, so the same script also runs as one plain process).
3. ``lessons_lib.train.train`` sees the group and trains with DistributedDataParallel: every
   rank draws the same global batch from the same seeded generator and keeps its own rows
   (:func:`shard`, a distributed sampler for random windows), DDP averages the gradients
   across ranks during ``backward``, and every rank takes the same optimizer step. With equal
   rows per rank the average of the ranks' gradients is the gradient of the whole batch, so N
   processes train the same model as one process on the combined batch, up to the order of
   float32 additions.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from .checks import is_int, positive_int

__all__ = ["backend_for", "is_distributed", "rank", "world_size", "local_rank", "is_main",
           "setup", "cleanup", "process_group", "shard", "all_reduce_sum", "all_reduce_mean",
           "free_port", "launch"]


def backend_for(device: str | torch.device) -> str:
    """The collective-communication library for ``device``: "nccl" for CUDA, "gloo" otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group (0 with no group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many processes the group holds (1 with no group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its own machine (``LOCAL_RANK``, set by torchrun; 0 without it):
    the GPU it should use."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0: the one process that prints, plots and saves."""
    return rank() == 0


_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def setup(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun described in the environment; return ``(rank, world_size)``.

    ``backend`` defaults to NCCL when CUDA is available, else gloo. Without torchrun's
    variables this is a plain single process: nothing is started and ``(0, 1)`` comes back.
    """
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None (choose), got {backend!r}")
    if dist.is_initialized():
        return rank(), world_size()
    missing = [name for name in _ENV if name not in os.environ]
    if missing == list(_ENV):
        return 0, 1
    if missing:
        raise ValueError(f"torchrun's environment is incomplete: {missing} missing; start the "
                         "script with lessons_lib.distributed.launch or torchrun")
    if backend is None:
        from .runtime import runtime
        backend = backend_for(runtime().device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return rank(), world_size()


def cleanup() -> None:
    """Leave the process group, if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: str | None = None):
    """``with process_group(): ...``: :func:`setup` before the body, :func:`cleanup` after it
    (also on an error). Yields ``(rank, world_size)``."""
    ranks = setup(backend)
    try:
        yield ranks
    finally:
        cleanup()


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a global ``batch``: rows ``rank * n`` to ``(rank + 1) * n`` with
    ``n = len(batch) // world_size``. Every rank gets as many rows, or a ValueError."""
    positive_int("world_size", world_size)
    if not is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if not isinstance(batch, torch.Tensor) or batch.dim() == 0:
        raise ValueError("batch must be a tensor with a batch dimension first")
    if len(batch) % world_size:
        raise ValueError(f"a batch of {len(batch)} rows does not split evenly over {world_size} "
                         f"processes: make the batch size a multiple of {world_size}")
    rows = len(batch) // world_size
    return batch[rank * rows:(rank + 1) * rows]


def all_reduce_sum(value: float | torch.Tensor) -> float:
    """The sum of ``value`` over all ranks (the value itself with no group)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.item()


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of ``value`` over all ranks (the value itself with no group)."""
    return all_reduce_sum(value) / world_size()


def free_port() -> int:
    """A TCP port no one listens on right now, for the rendezvous of a local run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, nproc: int, args: Sequence[str] = (), threads: int = 1,
           timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --nproc_per_node nproc script *args`` on this
    machine (what ``torchrun`` does), each process with ``threads`` PyTorch threads; wait for
    it and return the finished process (its ``stdout``/``stderr`` as text).

    Raises RuntimeError with the end of the processes' output when any of them fails.
    """
    positive_int("nproc", nproc)
    positive_int("threads", threads)
    script = Path(script)
    if not script.is_file():
        raise ValueError(f"no script at {script}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for name in _ENV + ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)                  # a launch from inside a run starts a group of its own
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), *map(str, args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{nproc} processes of {script.name} failed (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return done
