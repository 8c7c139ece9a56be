"""Where and how the course computes: the device, the precision and the threads, decided once.

Every chapter and :func:`lessons_lib.train.train` ask this module instead of deciding for
themselves:

    from lessons_lib.runtime import runtime
    rt = runtime()
    print(rt.describe())      # e.g. "cpu, fp32, 2 threads: AMD EPYC has no native bfloat16 ..."

**Device.** CUDA when PyTorch sees a GPU, else the CPU. Apple's MPS only when asked for by
name (``device="mps"``): learners of other courses got wrong losses on it.

**Precision.** ``"bf16"`` (bfloat16 autocast: matrix products in bfloat16, weights and the
loss in float32) only where the hardware computes bfloat16 natively, else ``"fp32"``:

* on a CPU, when its flags include ``avx512_bf16`` or ``amx_bf16`` (read from
  ``/proc/cpuinfo``; elsewhere PyTorch's own CPU probe). Without them PyTorch emulates
  bfloat16 and a training step of chapter 7's model is about 10x *slower* than in float32
  (measured on an AVX2-only AMD EPYC: 460-480 ms against 44-56 ms);
* on CUDA, when ``torch.cuda.is_bf16_supported()`` (Ampere and newer);
* never on MPS.

The environment variable ``LESSONS_LIB_PRECISION`` (``fp32``, ``bf16`` or ``auto``, the
default) overrides the choice, e.g. to measure both paths on one machine.

**Threads.** Training uses one thread per core (or ``LESSONS_LIB_THREADS`` threads, when
that variable is set), except for small models (:func:`threads_for`), which train on one.
The count depends on the model and the machine only, never on what else is running: with
the same thread count the same seed gives the same numbers, bit for bit, while a count that
followed the machine's load would change how every sum is split up, and with it the last
bits of every result. Timings that the chapters compare use one thread (:func:`one_thread`):
it measures the work itself, and a second program busy on the machine disturbs it far less
than a team of threads that wait for each other.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import non_negative_int, positive_int

__all__ = ["PRECISIONS", "ENV_VAR", "cpu_flags", "cpu_model", "cpu_has_native_bf16",
           "choose_device", "model_device", "choose_precision", "Runtime", "runtime", "autocast", "one_thread",
           "use_threads", "threads_for", "default_threads", "cpu_cores", "THREADS_VAR",
           "time_interleaved"]

PRECISIONS = ("fp32", "bf16")
ENV_VAR = "LESSONS_LIB_PRECISION"
THREADS_VAR = "LESSONS_LIB_THREADS"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


# -----------------------------------------------------------------------------
# 1. what the CPU is

def _cpuinfo_field(text: str, name: str) -> str | None:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (or from the text ``cpuinfo``), or None
    where there is no such file (macOS, Windows)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return None
    flags = _cpuinfo_field(cpuinfo, "flags") or _cpuinfo_field(cpuinfo, "Features")
    return set(flags.split()) if flags is not None else None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name, e.g. "AMD EPYC" or "Intel(R) Xeon(R) Platinum 8480+"."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            cpuinfo = ""
    return _cpuinfo_field(cpuinfo, "model name") or platform.processor() or platform.machine() or "unknown"


def _torch_probe() -> bool:
    """PyTorch's own check, for systems without /proc/cpuinfo (private API: guarded)."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            pass
    return False


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """True when the CPU computes bfloat16 in hardware (``avx512_bf16`` or ``amx_bf16``).

    ``flags`` defaults to :func:`cpu_flags`; where those are unknown, PyTorch's probe decides.
    """
    if flags is None:
        flags = cpu_flags()
    if flags is None:
        return _torch_probe()
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


# -----------------------------------------------------------------------------
# 2. the decisions

def choose_device(device: str | torch.device = "auto") -> torch.device:
    """CUDA when available, else the CPU; any other device (``"mps"``, ``"cuda:1"``) by name."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto' or a device name such as 'cpu', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or 'mps'") from err


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model lives on: that of its first parameter (or buffer); the CPU if it has none."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _check_precision(value, what: str) -> str:
    if value not in (*PRECISIONS, "auto"):
        raise ValueError(f"{what} must be one of 'fp32', 'bf16' or 'auto', got {value!r}")
    return value


def choose_precision(device: str | torch.device = "auto", precision: str | None = None,
                     flags: set[str] | None = None, environ=None) -> tuple[str, str]:
    """``(precision, reason)``: ``"bf16"`` or ``"fp32"``, and one sentence saying why.

    ``precision`` (``"fp32"``, ``"bf16"``, ``"auto"`` or None) is what the caller asks for;
    None means: what ``LESSONS_LIB_PRECISION`` says, ``"auto"`` when it is unset. ``flags``
    (CPU flags) and ``environ`` (a mapping in place of ``os.environ``) are for tests.
    """
    environ = os.environ if environ is None else environ
    if precision is None:
        env_value = environ.get(ENV_VAR, "").strip().lower()
        if env_value and env_value != "auto":
            return _check_precision(env_value, ENV_VAR), f"set by {ENV_VAR}={env_value}"
        precision = "auto"
    _check_precision(precision, "precision")
    if precision != "auto":
        return precision, f"asked for {precision}"

    device = choose_device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "this GPU computes bfloat16 natively"
        return "fp32", "this GPU has no native bfloat16"
    if device.type != "cpu":
        return "fp32", f"bfloat16 autocast is not used on {device.type}"
    if cpu_has_native_bf16(flags):
        return "bf16", "this CPU computes bfloat16 natively (avx512_bf16 or amx_bf16)"
    return "fp32", ("this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag): "
                    "bfloat16 would be emulated, about 10x slower than float32")


@dataclass(frozen=True)
class Runtime:
    """The device, precision and thread count a run uses, and why."""

    device: str            # "cpu", "cuda", ...
    precision: str         # "fp32" or "bf16"
    threads: int           # threads for training a model too large for one thread
    reason: str            # why this precision
    cpu: str               # the CPU's model name
    capability: str        # PyTorch's CPU kernel level: "AVX2", "AVX512", ...

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def autocast(self):
        """The context to run forward passes in: bfloat16 autocast, or nothing."""
        return autocast(self.device, self.precision)

    def describe(self) -> str:
        return (f"{self.device}, {self.precision}, {self.threads} thread(s) on {self.cpu} "
                f"(PyTorch CPU kernels: {self.capability}): {self.reason}")


def runtime(device: str | torch.device = "auto", precision: str | None = None) -> Runtime:
    """What a run on this machine uses: see the module's docstring."""
    dev = choose_device(device)
    chosen, reason = choose_precision(dev, precision)
    return Runtime(device=str(dev), precision=chosen, threads=default_threads(), reason=reason,
                   cpu=cpu_model(), capability=torch.backends.cpu.get_cpu_capability())


# -----------------------------------------------------------------------------
# 3. contexts

def autocast(device: str | torch.device, precision: str):
    """bfloat16 autocast for ``precision == "bf16"``, else nothing.

    On a CPU it also picks PyTorch's plain ("math") attention kernel: in bfloat16 the fused
    flash kernel's backward pass is 2.5-4x slower there (torch 2.13, 64-token windows,
    measured on a CPU with native bfloat16), which made a whole training step about 20% slower.
    """
    _check_precision(precision, "precision")
    if precision == "auto":
        raise ValueError("resolve 'auto' first: choose_precision(device) gives 'fp32' or 'bf16'")
    if precision == "fp32":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device(device)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


SMALL_MODEL_PARAMETERS = 250_000


def threads_for(n_parameters: int, environ=None) -> int:
    """The thread count to train a model of ``n_parameters`` with: one below
    :data:`SMALL_MODEL_PARAMETERS` (its matrix products are too small to share out: a second
    thread gains little, and threads that wait for each other at every small product lose more
    than they gain when another program shares the cores), else :func:`default_threads`.

    A pure function of the model's size and the machine (and ``LESSONS_LIB_THREADS``): the
    same seed on the same machine gives the same numbers whatever else is running.
    """
    positive_int("n_parameters", n_parameters)
    if n_parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return default_threads(environ)


def cpu_cores() -> int:
    """The cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def default_threads(environ=None) -> int:
    """Threads for training: ``LESSONS_LIB_THREADS`` when it is set (a whole number >= 1), else
    one per core this process may run on. ``environ`` (a mapping) is for tests."""
    environ = os.environ if environ is None else environ
    value = environ.get(THREADS_VAR, "").strip()
    if not value:
        return cpu_cores()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{THREADS_VAR} must be a whole number of threads >= 1, got {value!r}")
    return threads


@contextlib.contextmanager
def use_threads(n: int):
    """Run the body with ``n`` PyTorch threads, then restore the previous count."""
    positive_int("the thread count", n)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread():
    """One PyTorch thread: the setting for timings that a chapter compares."""
    return use_threads(1)


# -----------------------------------------------------------------------------
# 4. timings that hold on a busy machine

def time_interleaved(fns: dict, repeats: int = 5, warmup: int = 1, number: int = 1) -> dict:
    """The best (shortest) wall time in seconds of each function in ``fns`` (name -> callable
    with no arguments), measured in ``repeats`` interleaved rounds: a, b, c, a, b, c, ...
    Each round calls every function ``number`` times in a row and the time is per call, for
    steps too short to time one by one (one generated token), as ``timeit``'s ``number``.

    Interleaving makes a slow spell on the machine (another program, a frequency change) hit
    every function alike instead of one of them; the shortest of several calls is the best
    estimate of the cost itself, since other work can only add time. Waits for queued CUDA work
    around each call so GPU timings are honest. Returns ``{name: seconds}`` and, under the key
    ``"spread"``, ``{name: slowest / fastest}`` over the rounds, to set margins from.
    """
    if not isinstance(fns, dict) or not fns or not all(callable(f) for f in fns.values()):
        raise ValueError("fns must be a non-empty dict of name -> function with no arguments, got "
                         f"{type(fns).__name__}")
    if "spread" in fns:
        raise ValueError("'spread' is the name of the result's spread entry; rename that function")
    positive_int("repeats", repeats)
    non_negative_int("warmup", warmup)
    positive_int("number", number)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / number)
    best = {name: min(t) for name, t in times.items()}
    best["spread"] = {name: max(t) / min(t) for name, t in times.items()}
    return best
