"""Rollout: prompts -> completions with everything the update needs (log-probs, reference log-probs, groups).

``Rollout`` is the contract between sampling and the update (f32[B, T] over the T response tokens):

* ``prompt_ids`` / ``prompt_mask`` i32[B, P]: the left-padded prompts (bucketed width);
* ``tokens`` i32[B, T], ``response_mask`` f32[B, T] (a prefix mask: response tokens, then padding);
* ``sampler_logp``: log-probabilities under the sampling distribution (temperature, top-k, top-p applied);
* ``old_logp``: log-probabilities of the policy that sampled, from the *training* forward (the PPO ratio's
  denominator; sampler and trainer numerics differ, so the training forward is the consistent one), or from the
  sampler when ``policy_logp`` is None (equal to float rounding);
* ``ref_logp``: log-probabilities under the reference policy (zeros when no reference is materialised);
* ``group_ids`` i32[B]: the prompt each completion answers (``num_generations`` consecutive completions share one);
* ``truncated`` bool[B]: the completion hit ``max_completion_length`` without a stop token;
* ``values`` f32[n, B, T]: the vector critic's value before each response token (gae only, else None).

Prompts are tokenised once, truncated on the left (or rejected) at ``max_prompt_length``, and left-padded to a
multiple of ``prompt_bucket_multiple`` so that nearby lengths share one compiled sampler. The sampler always draws
``max_completion_length`` tokens; the update then runs on the smallest of ``length_buckets`` that holds the longest
completion (:func:`response_bucket`), the padded tail columns cut, so it compiles at most once per bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mojax import _checks as checks
from mojax.models.generate import SamplingConfig, generate


class Rollout(NamedTuple):
    """One batch of completions; see the module docstring for every field."""

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    response_mask: jax.Array
    sampler_logp: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array
    group_ids: jax.Array
    truncated: jax.Array
    values: jax.Array | None = None


def without_prompts(rollout: Rollout) -> Rollout:
    """`rollout` with its prompt fields set to None: all that the per-response computations (the advantages, the
    interference statistics) read, so that their compiled programs depend on the response width alone and not also
    on each batch's prompt width (``rollout.prompt_bucket_multiple`` pads prompts to one of several widths)."""
    return rollout._replace(prompt_ids=None, prompt_mask=None)


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], *, max_length: int, truncate: str = "left", bucket_multiple: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(ids i32[B, P], mask i32[B, P]) left-padded to a multiple of `bucket_multiple`; long prompts cut or rejected.

    Args:
      tokenizer: a ``transformers`` tokenizer (no special tokens are added; a chat template has already been applied).
      prompts: the prompt strings.
      max_length: the longest prompt kept, in tokens.
      truncate: ``"left"`` keeps the last `max_length` tokens; ``"error"`` raises for a longer prompt.
      bucket_multiple: the padded width is the smallest multiple of it that holds the longest prompt.

    Returns:
      Left-padded ids (pad = the tokenizer's pad id) and the mask of real tokens.
    """
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    for index, ids in enumerate(encoded):
        if len(ids) > max_length and truncate == "error":
            raise ValueError(
                checks.message(
                    "encode_prompts",
                    "prompts",
                    f"holds prompt {index} of {len(ids)} tokens",
                    f"at most rollout.max_prompt_length = {max_length} (or rollout.truncate_prompts=left)",
                )
            )
        if not ids:
            raise ValueError(
                checks.message("encode_prompts", "prompts", f"holds an empty prompt at {index}", "non-empty prompts")
            )
    encoded = [ids[-max_length:] for ids in encoded]
    width = -(-max(len(ids) for ids in encoded) // bucket_multiple) * bucket_multiple
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(encoded), width), pad, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :] = tokens
        mask[row, width - len(tokens) :] = 1
    return ids, mask


def response_bucket(response_mask: Any, buckets: Sequence[int], max_length: int) -> int:
    """The update's response width: the smallest of `buckets` (then `max_length`) holding the longest completion.

    Args:
      response_mask: f32[B, T] prefix masks of the completions (T = `max_length`).
      buckets: increasing widths, each at most `max_length` (``rollout.length_buckets``; empty: no bucketing).
      max_length: ``rollout.max_completion_length``, the last bucket.

    Returns:
      The width W: columns W.. of the response arrays are padding in every row.

    Example:
      >>> import numpy as np
      >>> mask = np.asarray([[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], np.float32)
      >>> response_bucket(mask, (2, 4), 8), response_bucket(mask, (), 8), response_bucket(mask[:, :0], (2,), 8)
      (4, 8, 2)
    """
    longest = int(np.asarray(response_mask).sum(axis=1).max(initial=0))
    return next(width for width in (*buckets, max_length) if width >= longest)


def repeat_prompts(
    ids: np.ndarray, mask: np.ndarray, num_generations: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, group_ids): each prompt repeated `num_generations` times consecutively, group id = prompt index."""
    groups = np.repeat(np.arange(ids.shape[0], dtype=np.int32), num_generations)
    return np.repeat(ids, num_generations, axis=0), np.repeat(mask, num_generations, axis=0), groups


def sample_rollout(
    model: Any,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    num_generations: int,
    key: jax.Array,
    sampling: SamplingConfig,
    *,
    policy_logp: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None,
    reference_logp: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
    mask_truncated_completions: bool = False,
) -> Rollout:
    """Sample `num_generations` completions per prompt, then score them under the policy (and the reference) with the
    training forward.

    Args:
      model: the policy (an NNX ``LlamaForCausalLM`` or its ``nnx.split`` pair).
      prompt_ids, prompt_mask: i32[P, W] left-padded prompts, one row per prompt; each is prefilled once and its
        KV cache shared by its completions (:func:`mojax.models.generate.generate`'s ``num_generations``).
      num_generations: completions per prompt; the rollout's B = P * num_generations rows hold prompt i's in rows
        i * num_generations ... (group id i).
      key: the sampling key.
      sampling: the sampler's settings.
      policy_logp: (prompt_ids, prompt_mask, tokens) -> f32[B, T] response log-probs of the policy; None takes the
        sampler's (``GenerationResult.model_logprobs``: the same policy on the same tokens, to float rounding).
      reference_logp: the same under the reference policy, or None (then ``ref_logp`` is zeros).
      mask_truncated_completions: zero the response mask of completions that never emitted a stop token.

    Returns:
      A :class:`Rollout`.
    """
    result = generate(model, prompt_ids, prompt_mask, key, sampling, num_generations=num_generations)
    prompt_ids, prompt_mask, group_ids = repeat_prompts(
        np.asarray(prompt_ids), np.asarray(prompt_mask), num_generations
    )
    response_mask = result.response_mask.astype(jnp.float32)
    stopped = jnp.isin(result.tokens, jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)) & (response_mask > 0)
    truncated = ~jnp.any(stopped, axis=1)
    if mask_truncated_completions:
        response_mask = response_mask * (~truncated)[:, None]
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    if policy_logp is None:
        old_logp = result.model_logprobs * response_mask
    else:
        old_logp = policy_logp(prompt_ids, prompt_mask, result.tokens) * response_mask
    ref_logp = (
        jnp.zeros_like(old_logp)
        if reference_logp is None
        else reference_logp(prompt_ids, prompt_mask, result.tokens) * response_mask
    )
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        tokens=result.tokens,
        response_mask=response_mask,
        sampler_logp=result.sampler_logprobs * response_mask,
        old_logp=old_logp,
        ref_logp=ref_logp,
        group_ids=jnp.asarray(group_ids, jnp.int32),
        truncated=truncated,
    )
