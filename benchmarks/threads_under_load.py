"""How much does a busy core slow down training on 1 and 2 threads, and does OpenMP's wait
policy matter?

Each measurement runs in a fresh process (OpenMP reads ``OMP_WAIT_POLICY`` once, when PyTorch
loads it): a GPT of chapters 9-11's size (4 layers x 128, about 0.9M parameters) takes training
steps of 16 x 64 tokens, and the median step time is printed, on a quiet machine and beside a
process that keeps one core busy:

    python benchmarks/threads_under_load.py            # the table
    python benchmarks/threads_under_load.py --steps 40

With ``OMP_WAIT_POLICY`` unset, GNU OpenMP (PyTorch's, on Linux) lets a thread that reaches the
end of a parallel region spin for a while before it sleeps; ``PASSIVE`` makes it sleep at once,
``ACTIVE`` makes it spin. A parallel region ends only when its slowest thread does, so when the
scheduler takes one of the threads off its core to run the busy program, every small matrix
product waits for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STEP = r"""
import json, statistics, sys, time
import torch
from lessons_lib.model import GPT, GPTConfig
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=1024, block_size=64, n_layer=4, n_head=4, n_embd=128))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(1024, (16, 64))
times = []
for step in range(int(sys.argv[2])):
    start = time.perf_counter()
    _, loss = model(x, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times[3:])))
"""

BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass"


def step_ms(threads: int, steps: int, policy: str | None, busy: bool) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    other = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        if other:
            time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", STEP, str(threads), str(steps)], env=env,
                             capture_output=True, text=True, check=True)
    finally:
        if other:
            other.kill()
            other.wait()
    return 1e3 * json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; median ms per training step of a 4 x 128 GPT, "
          f"batch 16 x 64")
    print(f"{'OMP_WAIT_POLICY':>16} {'threads':>7} {'quiet':>8} {'busy core':>10} {'ratio':>6}")
    for policy in (None, "PASSIVE", "ACTIVE"):
        for threads in (1, 2):
            quiet = step_ms(threads, args.steps, policy, busy=False)
            loaded = step_ms(threads, args.steps, policy, busy=True)
            print(f"{policy or '(unset)':>16} {threads:>7} {quiet:8.1f} {loaded:10.1f} "
                  f"{loaded / quiet:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
