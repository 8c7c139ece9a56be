"""Training throughput: our GPT against Hugging Face's GPT2LMHeadModel, same sizes, one run.

    python benchmarks/throughput.py                 # the default: 4 layers x 128, block 64, batch 32
    python benchmarks/throughput.py --rounds 20 --steps 10 --threads 2

Both models get the same configuration (4 layers, 4 heads, 128 wide, block 64, batch 32,
vocabulary 65, no dropout, fp32, tied embeddings), the same random batches and the same
optimizer (AdamW, fused where PyTorch offers it). Each timed step is a full training step:
forward, cross-entropy loss, backward, optimizer step, ``loss.item()``.

The two models are timed in alternating rounds (ours, theirs, ours, theirs, ...) so that a
machine shared with other work slows both alike; the report uses the median tokens/s over the
rounds, and also the median of the per-round-pair ratios, which is the more robust number on
a busy machine. This is a script for maintainers, not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def build_models(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lessons_lib.model import GPT, GPTConfig

    torch.manual_seed(seed)
    ours = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                         n_head=n_head, n_embd=n_embd, dropout=0.0))
    hf_config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd,
                           n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, use_cache=False)
    try:
        hf_config._attn_implementation = "sdpa"          # PyTorch's fused attention, as ours
    except AttributeError:
        pass
    torch.manual_seed(seed)
    theirs = GPT2LMHeadModel(hf_config)
    if ours.num_parameters() != sum(p.numel() for p in theirs.parameters()):
        raise RuntimeError("the two models do not have the same number of parameters")
    return ours.train(), theirs.train()


def make_optimizer(model):
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def step_ours(model, optimizer, x, y) -> float:
    _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def step_theirs(model, optimizer, x, y) -> float:
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def time_round(step, model, optimizer, batches) -> float:
    """Seconds for one round of training steps, one per batch."""
    start = time.perf_counter()
    for x, y in batches:
        step(model, optimizer, x, y)
    return time.perf_counter() - start


def run(rounds: int = 12, steps: int = 10, batch_size: int = 32, block_size: int = 64,
        n_layer: int = 4, n_head: int = 4, n_embd: int = 128, vocab_size: int = 65,
        warmup: int = 5, seed: int = 0, verbose: bool = True) -> dict:
    """Time ``rounds`` alternating rounds of ``steps`` training steps per model; return the numbers."""
    ours, theirs = build_models(vocab_size, block_size, n_layer, n_head, n_embd, seed)
    opt_ours, opt_theirs = make_optimizer(ours), make_optimizer(theirs)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(vocab_size, (batch_size, block_size), generator=g),
                torch.randint(vocab_size, (batch_size, block_size), generator=g)) for _ in range(steps)]
    tokens = steps * batch_size * block_size

    time_round(step_ours, ours, opt_ours, batches[:warmup])          # warm up allocators and kernels
    time_round(step_theirs, theirs, opt_theirs, batches[:warmup])
    t_ours, t_theirs = [], []
    for r in range(rounds):
        order = [(step_ours, ours, opt_ours, t_ours), (step_theirs, theirs, opt_theirs, t_theirs)]
        if r % 2:                                                     # alternate who goes first
            order.reverse()
        for step, model, opt, times in order:
            times.append(time_round(step, model, opt, batches))
        if verbose:
            print(f"round {r + 1:2d}/{rounds}: ours {tokens / t_ours[-1]:8,.0f} tok/s   "
                  f"HF GPT2LMHeadModel {tokens / t_theirs[-1]:8,.0f} tok/s   "
                  f"ratio {t_theirs[-1] / t_ours[-1]:.3f}")

    result = {
        "parameters": ours.num_parameters(),
        "ours_tokens_per_s": tokens / statistics.median(t_ours),
        "hf_tokens_per_s": tokens / statistics.median(t_theirs),
        "ratio_of_medians": statistics.median(t_theirs) / statistics.median(t_ours),
        "median_pair_ratio": statistics.median(b / a for a, b in zip(t_ours, t_theirs)),
        "threads": torch.get_num_threads(),
    }
    if verbose:
        print(f"\n{result['parameters']:,} parameters each; {batch_size} x {block_size} tokens per step; "
              f"{result['threads']} threads; torch {torch.__version__}")
        print(f"ours                : {result['ours_tokens_per_s']:10,.0f} tokens/s (median of {rounds} rounds)")
        print(f"HF GPT2LMHeadModel  : {result['hf_tokens_per_s']:10,.0f} tokens/s")
        print(f"ratio (ours / HF)   : {result['ratio_of_medians']:.3f} (medians), "
              f"{result['median_pair_ratio']:.3f} (median of per-round ratios)")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(rounds=args.rounds, steps=args.steps, batch_size=args.batch_size, block_size=args.block_size)


if __name__ == "__main__":
    main()
