"""Learning from feedback (chapters 10 and 11): a module per idea, each read top to bottom.

- :mod:`~lessons_lib.rlhf.trainer`: what every trainer shares (seed, optimizer, threads,
  progress bar, clock, model modes; the policy checks).
- :mod:`~lessons_lib.rlhf.rollouts`: sampling responses from a policy, their mask and
  log-probabilities, the one reward signature ``reward_fn(batch: Rollout) -> (B,)``.
- :mod:`~lessons_lib.rlhf.kl`: the k1, k2 and k3 estimates of KL(policy || reference).
- :mod:`~lessons_lib.rlhf.reward_model`: a reward model trained on human ratings.
- :mod:`~lessons_lib.rlhf.ppo`: PPO with a value head, GAE and a KL penalty (InstructGPT).
- :mod:`~lessons_lib.rlhf.evaluation`: measuring a policy; best-of-n; pass@k.
- :mod:`~lessons_lib.rlhf.dpo`: DPO, preferences without a reward model.
- :mod:`~lessons_lib.rlhf.grpo`: GRPO (and RLOO's and Dr. GRPO's variants), group baselines.
- :mod:`~lessons_lib.rlhf.expert_iteration`: sample, keep what passes a check, fine-tune.

Every policy and reference is a language model of the course (a GPT or a Llama: anything
:class:`lessons_lib.model.LanguageModel` describes; a value or reward head needs its hidden
states, i.e. a :class:`lessons_lib.model.DecoderLM`). Everything is importable from here:
``from lessons_lib.rlhf import train_ppo``.
"""

from . import dpo, evaluation, expert_iteration, grpo, kl, ppo, reward_model, rollouts, trainer
from .dpo import *  # noqa: F401,F403
from .evaluation import *  # noqa: F401,F403
from .expert_iteration import *  # noqa: F401,F403
from .grpo import *  # noqa: F401,F403
from .kl import *  # noqa: F401,F403
from .ppo import *  # noqa: F401,F403
from .reward_model import *  # noqa: F401,F403
from .rollouts import *  # noqa: F401,F403
from .trainer import *  # noqa: F401,F403

__all__ = (dpo.__all__ + evaluation.__all__ + expert_iteration.__all__ + grpo.__all__
           + kl.__all__ + ppo.__all__ + reward_model.__all__ + rollouts.__all__
           + trainer.__all__)
