"""Three estimates of KL(policy || reference) from one sampled token (Schulman, "Approximating
KL Divergence", 2020). A token ``x`` is drawn from the policy ``p``; the reference ``q`` gave it
``log q(x)``. With ``log r = log q(x) - log p(x)``:

- k1 ``= -log r``: unbiased; negative whenever the reference likes the token more than the
  policy, so one sample's estimate can be below 0 and its variance is high. PPO's penalty
  (InstructGPT) folds it into the reward, where its gradient is the KL's own.
- k2 ``= (log r)^2 / 2``: never negative, low variance, biased (its mean is a different
  divergence that only agrees with the KL to second order when ``p`` and ``q`` are close).
- k3 ``= (r - 1) - log r``: unbiased and never negative (``log r <= r - 1``), low variance
  when ``p`` and ``q`` are close. GRPO's KL term (DeepSeekMath).

All three are 0 where the two models agree. Each takes per-token log-probs of any shape.
"""

from __future__ import annotations

import torch

from ..checks import float_tensor, same_shape

__all__ = ["k1", "k2", "k3"]


def _log_r(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    float_tensor("logp", logp)
    float_tensor("ref_logp", ref_logp)
    same_shape(logp=logp, ref_logp=ref_logp)
    return ref_logp - logp


def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``log p(x) - log q(x)`` per sampled token: unbiased, can be negative."""
    return -_log_r(logp, ref_logp)


def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``(log q(x) - log p(x))^2 / 2`` per sampled token: never negative, biased."""
    return 0.5 * _log_r(logp, ref_logp).square()


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``exp(log r) - log r - 1`` per sampled token, ``log r = log q(x) - log p(x)`` clamped to
    [-20, 20] so that ``exp`` cannot overflow where the policy has left the reference far
    behind: unbiased (before the clamp) and never negative."""
    log_r = _log_r(logp, ref_logp).clamp(-20.0, 20.0)
    return log_r.exp() - log_r - 1.0
