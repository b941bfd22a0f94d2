"""Reward functions (objectives) of the multi-objective RL trainer.

* :class:`Objective`, :func:`token_reward`, :func:`reward_model`, :func:`score` and :func:`signed`: named
  reward columns of three kinds (batched Python callables with TRL's signature, JAX functions of token ids,
  reward models) and their evaluation into f32[B, n], None -> NaN.
* :func:`resolve` and ``BUILTIN_REWARDS``: objectives from configuration entries.
* :func:`init_normalizer`, :func:`update_normalizer`, :func:`normalize`: running per-objective standardisation.
* Built-in rewards: ``char_fraction``, ``char_count``, ``conciseness``, ``format``, ``exact_match``,
  ``refusal`` (standard library), ``sentiment`` (vaderSentiment), ``readability`` (pyphen) and
  ``non_toxicity`` (numpy and the shipped profanity-check arrays).
"""

from mojax.rl.rewards.lexical import flesch_reading_ease, readability, sentiment
from mojax.rl.rewards.normalizer import NormalizerState, init_normalizer, normalize, update_normalizer
from mojax.rl.rewards.objectives import (
    Objective,
    RewardModel,
    TokenReward,
    reward_model,
    reward_model_digests,
    score,
    signed,
    token_reward,
)
from mojax.rl.rewards.profanity import non_toxicity, offensive_probability
from mojax.rl.rewards.registry import BUILTIN_REWARDS, resolve
from mojax.rl.rewards.text import (
    REFUSAL_PHRASES,
    char_count,
    char_fraction,
    conciseness,
    exact_match,
    format_match,
    per_completion,
    refusal,
)

__all__ = [
    "BUILTIN_REWARDS",
    "REFUSAL_PHRASES",
    "NormalizerState",
    "Objective",
    "RewardModel",
    "TokenReward",
    "char_count",
    "char_fraction",
    "conciseness",
    "exact_match",
    "flesch_reading_ease",
    "format_match",
    "init_normalizer",
    "non_toxicity",
    "normalize",
    "offensive_probability",
    "per_completion",
    "readability",
    "refusal",
    "reward_model",
    "reward_model_digests",
    "resolve",
    "score",
    "sentiment",
    "signed",
    "token_reward",
    "update_normalizer",
]
