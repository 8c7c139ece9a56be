"""The measuring process of :func:`lessons_lib.recurrent.attention_peak_memory`, run as
``python -m lessons_lib._attention_memory_child '<json settings>'`` in a fresh process.

The settings: ``sizes`` (sequence lengths), ``batch_size``, ``n_heads``, ``head_dim``,
``fused`` (PyTorch's fused kernel, else the explicit
:func:`lessons_lib.attention.attention_with_weights`) and optionally ``no_reset`` (act as if
the peak could not be reset: the tests' way to try the path other systems take).

For each length: make q, k, v, run attention once on a tiny slice (so one-off allocations
such as thread pools are not counted), note the memory in use, run attention at full size,
note the peak, and report the difference in bytes. The last line printed is JSON:
``{"extra_bytes": [...]}``, one number per length, or ``{"separate": true}``.

On Linux the kernel's high-water mark can be reset to the memory in use now, so one process
measures every length in turn and no earlier peak (importing torch, a longer sequence) can
hide a later one. Elsewhere the peak so far is the baseline, so each length needs a process
of its own: with more than one length this process answers ``separate`` and the parent
starts one per length.
"""

import gc
import json
import sys

import torch
import torch.nn.functional as F

from lessons_lib.attention import attention_with_weights


def proc_status(key: str) -> int | None:
    """A line of /proc/self/status (Linux) in bytes, e.g. ``VmRSS``; None if it is missing."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024          # the kernel reports kB
    return None


def reset_peak() -> bool:
    """Reset the kernel's high-water mark to the memory in use now; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:       # Linux: "5" resets the high-water mark
            f.write("5")
        return proc_status("VmHWM") is not None
    except OSError:
        return False


def peak_so_far() -> int:
    """The process's peak resident set size so far, in bytes, where it cannot be reset."""
    try:
        import resource
    except ImportError:                                      # Windows
        import psutil
        return psutil.Process().memory_info().peak_wset
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # bytes on macOS, KiB elsewhere


def attention_fn(fused: bool):
    """``attend(q, k, v) -> output``, fused or explicit."""
    if fused:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    return lambda q, k, v: attention_with_weights(q, k, v)[0]


def extra_bytes(settings: dict, can_reset: bool) -> list[int]:
    """For each length of ``settings["sizes"]``, the rise of the peak during one attention call."""
    attend = attention_fn(settings["fused"])
    extra = []
    for n in settings["sizes"]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(settings["batch_size"], settings["n_heads"], n,
                               settings["head_dim"]) for _ in range(3))
        attend(q[..., :8, :], k[..., :8, :], v[..., :8, :])
        gc.collect()
        if can_reset:
            reset_peak()
            before = proc_status("VmRSS")
            out = attend(q, k, v)
            after = proc_status("VmHWM")
        else:
            before = peak_so_far()
            out = attend(q, k, v)
            after = peak_so_far()
        extra.append(max(0, after - before))
        del q, k, v, out
        gc.collect()
    return extra


def main(argv: list[str]) -> None:
    settings = json.loads(argv[1])
    can_reset = False if settings.get("no_reset") else reset_peak()
    if not can_reset and len(settings["sizes"]) > 1:
        print(json.dumps({"separate": True}))
        return
    print(json.dumps({"extra_bytes": extra_bytes(settings, can_reset)}))


if __name__ == "__main__":
    main(sys.argv)
