"""The preference-optimisation trainer (``mojax dpo``): DPO-family losses on fixed pairs, with gradient entanglement
measured while training, its two mitigations, and multi-objective DPO through the combiners.

One step of :class:`DPOTrainer`:

1. take ``data.pairs_per_step`` pairs of each objective's pair set (a fresh permutation per pass, from ``seed``);
   each prompt is tokenised once and shared by its chosen and rejected responses;
2. one forward pass of the 2B sequences gives the policy's sequence log-probs of chosen and rejected responses
   (summed, or length-averaged for ipo and simpo as TRL does); the reference's are the initial policy's, computed once
   for every pair before training (``reference: precompute``) or per batch from a frozen copy (``on_the_fly``);
3. ``preference_loss`` per pair, averaged over each objective's pairs into f32[n]; ``per_objective_grads`` (full mode:
   every parameter) -> the combiner -> one AdamW step, all in one jitted function whose state is donated;
4. metrics under TRL's names (``loss``, ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``)
   and the gradient-entanglement statistics of Yuan et al. (arXiv 2410.13828) on the probe set for the first
   ``preference.entanglement_pairs`` pairs of the batch, at every ``preference.entanglement_every``-th step (the
   steps between run the same step compiled without them); each measured response's probe gradient comes from its
   own forward pass and one pullback (``response_entanglement``).

How the entanglement paper was read: a step on any per-pair loss l(lp_w, lp_l) moves the parameters by
-eta (dl/dlp_w g_w + dl/dlp_l g_l), so to first order log pi_w moves by eta (a_w |g_w|^2 - a_l <g_w, g_l>) and
log pi_l by eta (a_w <g_w, g_l> - a_l |g_l|^2), with a_w = -dl/dlp_w and a_l = dl/dlp_l. The trainer takes a_w, a_l
by autodiff of the loss it actually optimises (so an SFT term, length averaging or NPO's normalisation are all in
them), predicts the signs of both moves on the probe gradients, and after the step compares them with the observed
moves of the same log-probs on the same pairs. The prediction is for plain gradient descent on the pair alone; the
observed step is AdamW on every parameter and the whole batch, so the agreement fraction measures how far the
per-pair first-order picture carries.

Mitigations (one or a list): ``npo`` feeds the loss log-probs whose gradients are divided by their per-pair probe
norms (``normalised_gradient_logps``); ``shared_prefix`` leaves the common prefix of chosen and rejected out of both
sequence log-probs (``shared_prefix_mask``; those tokens are still attended to); ``learned_mask`` multiplies the token
log-probs of policy and reference by sigmoid(per-token logits) trained with an L1 penalty (the sparse token masks of
the entanglement paper, after SparsePO, arXiv 2410.05102). Losses with state or side data: ``rdpo`` reads the response
lengths, ``bco_pair`` BCO's running shift, updated with each batch before the loss reads it as in TRL. MODPO
(Zhou et al., arXiv 2310.03708) shifts the margin by weighted reward margins of other objectives, scored once per pair
with the rewards of the RL trainer; multi-objective DPO also takes one pair set per objective and a combiner that
reads no per-sample rewards (``check_combiner_for_preference``). The checkpoint holds the trained parameters (with
LoRA the adapters alone), optimizer and combiner state, BCO's shift, the mask logits and the step, and nothing in a
step is random, so a resumed run equals an uninterrupted one bit for bit on CPU. ``docs/preference.md`` describes the
options.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from mojax import _checks as checks
from mojax.combiners import REGISTRY, make
from mojax.combiners.grads import per_objective_grads
from mojax.diagnostics import shared_prefix_mask
from mojax.models import adapters_only, lora_mask
from mojax.models.sharding import batch_sharding, make_mesh, state_shardings
from mojax.rl import config as rl_config
from mojax.rl.dpo_config import DPOConfig, PairObjectiveSection, load_dpo_config
from mojax.rl.preference import (
    BcoShift,
    implicit_rewards,
    init_bco_shift,
    modpo_loss,
    preference_loss,
    preference_metrics,
    sequence_logps,
    stack_preference_losses,
    update_bco_shift,
)
from mojax.rl.preference_entanglement import (
    learned_token_mask,
    normalised_gradient_logps,
    observed_moves_agree,
    response_entanglement,
    token_mask_penalty,
)
from mojax.rl.rewards import Objective, resolve, score, signed
from mojax.rl.rollout import encode_prompts
from mojax.rl.run import Run
from mojax.rl.tiny import ALPHABET
from mojax.rl.trainer import (
    attach_lora,
    build_optimizer,
    build_policy,
    combiner_options,
    policy_weight_digests,
    probe_flags,
    response_fn,
)
from mojax.rl.update import all_finite, keep_if, objective_cosines, step_if_finite, zeros_where_masked
from mojax.xla_cpu import batched_pullback_options

__all__ = ["DPOConfig", "DPOState", "DPOTrainer", "PairBatch", "load_dpo_config", "run_dpo", "tiny_preference_pairs"]

SINGLE_OBJECTIVE = "preference"
"""The objective's name in a run without ``objectives`` (its metrics are ``rewards/preference/...``)."""
SENTIMENT_PROMPT_WORDS = 6
"""Words of a review that open the prompt of a ``"sentiment_synthetic"`` pair (the rest is the shared prefix)."""
RICH_LETTER = "a"
"""The letter the chosen responses of the tiny synthetic pairs have more of."""


# ------------------------------------------------------------------------------------------------------- data
def tiny_preference_pairs(
    n: int, *, seed: int = 0, setting: str = "one_token", completion_length: int = 8
) -> list[dict[str, str]]:
    """`n` deterministic preference pairs over the tiny character vocabulary: chosen responses have more "a"s.

    * ``one_token``: the chosen response is rich in "a" (each character "a" with probability 0.6); the rejected one
      is the same string with one "a" replaced by another letter, so the two differ in exactly one token.
    * ``shared_prefix``: both start with the same random letters (half the length); the chosen one ends in "a"s,
      the rejected one in other letters.

    Args:
      n: number of pairs (>= 0).
      seed: the same seed gives the same pairs.
      setting: ``"one_token"`` or ``"shared_prefix"``.
      completion_length: characters per response (>= 2).

    Returns:
      Rows ``{"prompt", "chosen", "rejected"}``; prompts are 3 to 8 random letters.

    References:
      Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
      ICLR 2025, arXiv 2410.13828 (the one-token-differs and shared-prefix settings).

    Example:
      >>> (pair,) = tiny_preference_pairs(1, seed=0)
      >>> sum(a != b for a, b in zip(pair["chosen"], pair["rejected"]))
      1
      >>> pair["chosen"].count("a") - pair["rejected"].count("a")
      1
    """
    where = "tiny_preference_pairs"
    n = checks.integer(where, "n", n, minimum=0)
    length = checks.integer(where, "completion_length", completion_length, minimum=2)
    checks.choice(where, "setting", setting, ("one_token", "shared_prefix"))
    rng = random.Random(seed)
    letters = ALPHABET[:26]
    others = letters.replace(RICH_LETTER, "")
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
        if setting == "one_token":
            chosen = [RICH_LETTER if rng.random() < 0.6 else rng.choice(others) for _ in range(length)]
            positions = [index for index, char in enumerate(chosen) if char == RICH_LETTER] or [0]
            chosen[positions[0]] = RICH_LETTER
            rejected = list(chosen)
            rejected[rng.choice(positions)] = rng.choice(others)
            chosen, rejected = "".join(chosen), "".join(rejected)
        else:
            prefix = "".join(rng.choice(letters) for _ in range(length // 2))
            chosen = prefix + RICH_LETTER * (length - length // 2)
            rejected = prefix + "".join(rng.choice(others) for _ in range(length - length // 2))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


class PairBatch(NamedTuple):
    """Tokenised pairs; every field has the pair axis first. Responses are right-padded and end with EOS."""

    prompt_ids: Any  # i32[B, P], left-padded, shared by chosen and rejected
    prompt_mask: Any  # i32[B, P]
    chosen_ids: Any  # i32[B, T]
    chosen_mask: Any  # f32[B, T] real tokens (attended to)
    chosen_weights: Any  # f32[B, T] tokens the sequence log-prob sums over (the shared prefix masked out or not)
    rejected_ids: Any  # i32[B, T]
    rejected_mask: Any  # f32[B, T]
    rejected_weights: Any  # f32[B, T]
    ref_chosen: Any  # f32[B] the reference's sequence log-prob of the chosen response
    ref_rejected: Any  # f32[B]
    objective_ids: Any  # i32[B]
    pair_ids: Any  # i32[B] the pair's row in the run's learned masks (its index among all objectives' pairs)
    margin_chosen: Any  # f32[B, K] MODPO: the K margin rewards of the chosen response (K = 0 without MODPO)
    margin_rejected: Any  # f32[B, K]


class DPOState(NamedTuple):
    """The checkpointed state of a preference run: the update's :class:`mojax.rl.update.TrainState` fields, BCO's
    running shift and the learned token masks."""

    params: Any
    opt_state: Any
    combiner_state: Any
    consecutive_skips: jax.Array  # i32[]
    skipped_updates: jax.Array  # i32[]
    bco_shift: BcoShift  # f32[] each; stays at its initial value unless bco_pair is a loss
    mask_logits: Any  # f32[N, 2, T] logits of the chosen (0) and rejected (1) tokens of all N pairs, or None


def _take(batch: PairBatch, index: Any) -> PairBatch:
    """The pairs at `index` (an index array or a slice) of every field."""
    return PairBatch(*(field[index] for field in batch))


def _encode_responses(tokenizer: Any, texts: Sequence[str], width: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids i32[B, width], mask f32[B, width]): each text's tokens then EOS, cut to `width`, right-padded."""
    ids = np.full((len(texts), width), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(texts), width), np.float32)
    for row, text in enumerate(texts):
        tokens = (tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id])[:width]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1.0
    return ids, mask


def encode_pairs(
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    *,
    max_prompt_length: int,
    max_completion_length: int,
    eos_id: int,
    mask_shared_prefix: bool = False,
    objective_id: int = 0,
    first_pair_id: int = 0,
) -> PairBatch:
    """Every pair tokenised (numpy arrays), the reference log-probs left at 0 and no MODPO margin.

    Args:
      tokenizer: a ``transformers`` tokenizer (no special tokens are added).
      rows: ``{prompt, chosen, rejected}`` rows.
      max_prompt_length: prompts keep their last this many tokens; the width is a multiple of 8.
      max_completion_length: responses (EOS included) are cut to this many tokens; the width.
      eos_id: the end-of-sequence token appended to every response.
      mask_shared_prefix: give the longest common prefix of chosen and rejected weight 0 in the log-probs.
      objective_id: the objective the pairs belong to.
      first_pair_id: the ``pair_ids`` of the rows are first_pair_id, first_pair_id + 1, ...

    Returns:
      A :class:`PairBatch` of numpy arrays.

    Raises:
      ValueError: a pair whose chosen and rejected tokens are identical after the cut (nothing to prefer).
    """
    prompt_ids, prompt_mask = encode_prompts(
        tokenizer, [row["prompt"] for row in rows], max_length=max_prompt_length, truncate="left"
    )
    chosen_ids, chosen_mask = _encode_responses(
        tokenizer, [row["chosen"] for row in rows], max_completion_length, eos_id
    )
    rejected_ids, rejected_mask = _encode_responses(
        tokenizer, [row["rejected"] for row in rows], max_completion_length, eos_id
    )
    identical = np.flatnonzero(np.all((chosen_ids == rejected_ids) & (chosen_mask == rejected_mask), axis=1))
    if identical.size:
        raise ValueError(
            checks.message(
                "encode_pairs",
                "max_completion_length",
                f"is {max_completion_length}: pair {int(identical[0])} has the same chosen and rejected tokens",
                "a length that keeps the part where the responses differ",
            )
        )
    chosen_weights, rejected_weights = chosen_mask, rejected_mask
    if mask_shared_prefix:
        chosen_weights, rejected_weights = (
            np.asarray(mask, np.float32)
            for mask in shared_prefix_mask(chosen_ids, rejected_ids, chosen_mask, rejected_mask)
        )
    count = len(rows)
    return PairBatch(
        np.asarray(prompt_ids, np.int32),
        np.asarray(prompt_mask, np.int32),
        chosen_ids,
        chosen_mask,
        chosen_weights,
        rejected_ids,
        rejected_mask,
        rejected_weights,
        np.zeros((count,), np.float32),
        np.zeros((count,), np.float32),
        np.full((count,), objective_id, np.int32),
        np.arange(first_pair_id, first_pair_id + count, dtype=np.int32),
        np.zeros((count, 0), np.float32),
        np.zeros((count, 0), np.float32),
    )


def review_snippets(snippets: Any) -> list[str]:
    """The snippets of ``data.snippets``: a list of strings, the lines of a text file, or (None) the texts of
    ``mojax.data.movie_reviews``."""
    from mojax.data import movie_reviews

    if snippets is None:
        return [row["text"] for row in movie_reviews()]
    if isinstance(snippets, str | os.PathLike):
        return [line.strip() for line in Path(snippets).read_text().splitlines() if line.strip()]
    return [str(snippet) for snippet in snippets]


def fitting_sentiment_pairs(snippets: Sequence[str], setting: str, config: DPOConfig, seed: int, tokenizer: Any):
    """``data.num_pairs`` synthetic sentiment pairs whose responses fit in ``data.max_completion_length`` tokens (EOS
    included), so that the cut never removes the part where chosen and rejected differ: the pairs of all usable
    snippets, in their seeded order, filtered by length."""
    from mojax.data import synthetic_sentiment_pairs

    data = config.data
    usable = sum(len(snippet.split()) > SENTIMENT_PROMPT_WORDS for snippet in snippets)
    rows = synthetic_sentiment_pairs(snippets, setting, n=usable, seed=seed, words=SENTIMENT_PROMPT_WORDS)

    fitting, chunk = [], 4 * data.num_pairs
    for start in range(0, len(rows), chunk):  # tokenise only as many as it takes
        part = rows[start : start + chunk]
        lengths = [
            [len(ids) for ids in tokenizer([row[key] for row in part], add_special_tokens=False)["input_ids"]]
            for key in ("chosen", "rejected")
        ]
        fitting += [row for row, *sizes in zip(part, *lengths, strict=True) if max(sizes) < data.max_completion_length]
        if len(fitting) >= data.num_pairs:
            break
    fitting = fitting[: data.num_pairs]
    if len(fitting) < data.num_pairs:
        raise ValueError(
            checks.message(
                "DPOTrainer",
                "data.num_pairs",
                f"is {data.num_pairs}, but only {len(fitting)} {setting} pairs fit in data.max_completion_length = "
                f"{data.max_completion_length} tokens",
                "fewer pairs, a longer data.max_completion_length or more (shorter) data.snippets",
            )
        )
    return fitting


def load_pair_rows(
    source: Any, setting: str, config: DPOConfig, index: int = 0, tokenizer: Any = None
) -> list[dict[str, str]]:
    """``{prompt, chosen, rejected}`` rows of the `index`-th pair source: ``"tiny_synthetic"`` or
    ``"sentiment_synthetic"`` (seeded by ``data.seed + index``, so objectives get different pairs; the sentiment
    pairs are those that fit, measured with `tokenizer`), a file, or a list of rows."""
    from mojax.data import load_pairs

    data = config.data
    if source == "tiny_synthetic":
        return tiny_preference_pairs(data.num_pairs, seed=data.seed + index, setting=setting)
    if source == "sentiment_synthetic":
        return fitting_sentiment_pairs(review_snippets(data.snippets), setting, config, data.seed + index, tokenizer)
    rows = load_pairs(
        list(source) if isinstance(source, list | tuple) else source, limit=data.num_pairs, seed=data.seed
    )
    return [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows]


def modpo_rewards(objectives: Sequence[Objective], rows: Sequence[Mapping[str, str]], response: str, pairs: PairBatch):
    """f32[N, K]: the K MODPO rewards (costs negated) of every pair's `response` (``"chosen"`` or ``"rejected"``).

    Args:
      objectives: the rewards (``mojax.rl.rewards.resolve`` of ``modpo.rewards``).
      rows: the pairs' texts.
      response: which response to score.
      pairs: the same pairs tokenised (token rewards and reward models read the ids).

    Returns:
      f32[N, K] finite scores.

    Raises:
      ValueError: a reward that gives no score (None or NaN) to a response.
    """
    ids, mask = (
        (pairs.chosen_ids, pairs.chosen_mask) if response == "chosen" else (pairs.rejected_ids, pairs.rejected_mask)
    )
    scores = signed(
        score(
            objectives,
            [row["prompt"] for row in rows],
            [row[response] for row in rows],
            completion_ids=ids,
            completion_mask=mask.astype(np.int32),
            prompt_ids=pairs.prompt_ids,
            prompt_mask=pairs.prompt_mask,
        ),
        objectives,
    )
    missing = np.argwhere(np.isnan(scores))
    if missing.size:
        pair, reward = missing[0]
        raise ValueError(
            checks.message(
                "DPOTrainer",
                "modpo.rewards",
                f"holds {objectives[reward].name!r}, which gave no score to the {response} response of pair {pair}",
                "a reward that scores every response",
            )
        )
    return np.asarray(scores, np.float32)


# ---------------------------------------------------------------------------------------------------- the step
class StepSpec(NamedTuple):
    """Static settings of the preference step (hashable: compiled into the program)."""

    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...] | None
    beta: float
    label_smoothing: float
    simpo_gamma: float
    cpo_alpha: float
    length_average: bool
    npo: bool
    entanglement_pairs: int
    num_objectives: int
    reads: tuple[str, ...]
    rdpo_alpha: float = 0.0
    modpo_weights: tuple[float, ...] | None = None  # (w_0, w_1, ..., w_K) with MODPO's K margin rewards
    learned_mask: bool = False
    mask_l1: float = 0.0
    mask_learning_rate: float = 0.0

    @property
    def bco(self) -> bool:
        """Whether a loss reads BCO's running shift."""
        return "bco_pair" in self.loss_types


class Responses(NamedTuple):
    """One response of each pair after its prompt, the pair axis first (a :class:`PairBatch`'s chosen or rejected
    side)."""

    prompt_ids: Any  # i32[R, P]
    prompt_mask: Any  # i32[R, P]
    ids: Any  # i32[R, T]
    mask: Any  # f32[R, T]
    weights: Any  # f32[R, T]


def chosen_responses(batch: PairBatch) -> Responses:
    """The batch's chosen responses after their prompts."""
    return Responses(batch.prompt_ids, batch.prompt_mask, batch.chosen_ids, batch.chosen_mask, batch.chosen_weights)


def rejected_responses(batch: PairBatch) -> Responses:
    """The batch's rejected responses after their prompts."""
    return Responses(
        batch.prompt_ids, batch.prompt_mask, batch.rejected_ids, batch.rejected_mask, batch.rejected_weights
    )


def response_logps(policy: Callable, params: Any, responses: Responses, *, average: bool) -> jax.Array:
    """f32[R] the sequence log-probs of the responses (summed or length-averaged over their weighted tokens)."""
    token_logps, _ = policy(params, responses.prompt_ids, responses.prompt_mask, responses.ids, responses.mask)
    return sequence_logps(token_logps, responses.weights, average=average)


def pair_logps(policy: Callable, params: Any, batch: PairBatch, *, average: bool) -> tuple[jax.Array, jax.Array]:
    """(chosen f32[B], rejected f32[B]) sequence log-probs from one forward pass of the 2B sequences."""
    pairs = batch.chosen_ids.shape[0]
    both = jax.tree.map(lambda *sides: jnp.concatenate(sides), chosen_responses(batch), rejected_responses(batch))
    logps = response_logps(policy, params, both, average=average)
    return logps[:pairs], logps[pairs:]


def per_pair_loss(
    spec: StepSpec,
    chosen: jax.Array,
    rejected: jax.Array,
    batch: PairBatch,
    norms: tuple[jax.Array, jax.Array] | None,
    bco_delta: jax.Array | None = None,
) -> jax.Array:
    """f32[B] the configured loss of each pair as a function of the log-probs it sees (NPO's when `norms` is given).

    The chosen response's per-token NLL (CPO, SFT) is -chosen / its length, so that every term's gradient is a
    multiple of g_w and autodiff with respect to (chosen, rejected) gives the exact margin coefficients. R-DPO's
    lengths are the responses' token counts (EOS included); `bco_delta` is BCO's shift for this batch; with
    ``spec.modpo_weights`` the loss is ``modpo_loss`` on the batch's reward margins.
    """
    length = 1.0 if spec.length_average else jnp.maximum(jnp.sum(batch.chosen_weights, axis=1), 1.0)
    options = dict(
        beta=spec.beta,
        label_smoothing=spec.label_smoothing,
        simpo_gamma=spec.simpo_gamma,
        cpo_alpha=spec.cpo_alpha,
        rdpo_alpha=spec.rdpo_alpha,
        chosen_lengths=jnp.sum(batch.chosen_mask, axis=1),
        rejected_lengths=jnp.sum(batch.rejected_mask, axis=1),
        bco_delta=bco_delta,
        chosen_nll=-chosen / length,
    )
    if norms is not None:
        chosen, rejected = normalised_gradient_logps(chosen, norms[0]), normalised_gradient_logps(rejected, norms[1])
    refs = (batch.ref_chosen, batch.ref_rejected)
    if spec.modpo_weights is None:
        return preference_loss(spec.loss_types, chosen, rejected, *refs, loss_weights=spec.loss_weights, **options)
    margins = (batch.margin_chosen.T, batch.margin_rejected.T)
    return modpo_loss(
        chosen, rejected, *refs, *margins, weights=spec.modpo_weights, loss_type=spec.loss_types[0], **options
    )


def modpo_margin(spec: StepSpec, batch: PairBatch) -> jax.Array:
    """f32[B] MODPO's margin w_1..K . (r(y_w) - r(y_l)) of each pair (0 without MODPO)."""
    if spec.modpo_weights is None:
        return jnp.zeros(batch.ref_chosen.shape, jnp.float32)
    return (batch.margin_chosen - batch.margin_rejected) @ jnp.asarray(spec.modpo_weights[1:], jnp.float32)


def masked_pairs(batch: PairBatch, mask_logits: Any) -> PairBatch:
    """The batch with its token weights multiplied by the learned masks sigmoid(logits) of its pairs (unchanged when
    `mask_logits` f32[N, 2, T] is None)."""
    if mask_logits is None:
        return batch
    logits = mask_logits[batch.pair_ids]
    return batch._replace(
        chosen_weights=learned_token_mask(logits[:, 0], batch.chosen_weights),
        rejected_weights=learned_token_mask(logits[:, 1], batch.rejected_weights),
    )


def mask_penalty(spec: StepSpec, batch: PairBatch, mask_logits: jax.Array) -> jax.Array:
    """f32[] the L1 penalty mask_l1 * mean(mu) over the response tokens of the batch's chosen and rejected responses."""
    masked = masked_pairs(batch, mask_logits)
    mu = jnp.concatenate([masked.chosen_weights, masked.rejected_weights])
    return token_mask_penalty(mu, jnp.concatenate([batch.chosen_weights, batch.rejected_weights]), l1=spec.mask_l1)


def margin_coefficients(
    spec: StepSpec, chosen: jax.Array, rejected: jax.Array, batch: PairBatch, norms: Any, bco_delta: Any = None
) -> tuple[jax.Array, jax.Array]:
    """(a_w, a_l) f32[B]: -dl/dlog pi_w and dl/dlog pi_l of each pair's loss, the coefficients of the first-order moves."""
    grad_chosen, grad_rejected = jax.grad(
        lambda c, r: jnp.sum(per_pair_loss(spec, c, r, batch, norms, bco_delta)), argnums=(0, 1)
    )(chosen, rejected)
    return -grad_chosen, grad_rejected


def predicted_moves(inner: jax.Array, square_chosen: jax.Array, square_rejected: jax.Array, a_w: Any, a_l: Any):
    """(d log pi_w, d log pi_l) per unit step, f32[B]: a_w |g_w|^2 - a_l <g_w,g_l> and a_w <g_w,g_l> - a_l |g_l|^2.

    References:
      Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
      ICLR 2025, arXiv 2410.13828.
    """
    return a_w * square_chosen - a_l * inner, a_w * inner - a_l * square_rejected


def make_dpo_step(
    policy: Callable,
    combiner: optax.GradientTransformationExtraArgs,
    optimizer: optax.GradientTransformation,
    spec: StepSpec,
    probe_mask: Any,
    reference_policy: Callable | None = None,
    trainable_mask: Any | None = None,
) -> Callable[[DPOState, PairBatch, Any], tuple[DPOState, dict[str, jax.Array]]]:
    """The (unjitted) step ``(state, batch, reference_params or None) -> (state, metrics)``.

    Args:
      policy: ``mojax.rl.trainer.response_fn`` of the model.
      combiner: a combiner for ``spec.num_objectives`` objectives.
      optimizer: applied to the combined gradient.
      spec: the static settings.
      probe_mask: a bool pytree like the parameters marking the probe set.
      reference_policy: a LoRA policy's base model (``response_fn(..., adapters=False)``): the reference log-probs
        are then its log-probs at the current parameters (adapters disabled) and ``reference_params`` is unused.
      trainable_mask: a bool pytree like the parameters marking the trained ones (LoRA's adapters,
        ``mojax.models.lora_mask``), or None (all): only they are differentiated, so the frozen weights cost no
        weight-gradient products, and the combiner sees their gradients alone.

    Returns:
      The step; jit it with ``donate_argnums=0``. With ``reference_params`` the batch's reference log-probs are
      computed from them; otherwise the batch carries them. BCO's shift is updated with the batch's mean implicit
      reward before the loss reads it (as TRL does); the learned mask logits take a gradient step on the sum of the
      objectives' losses plus the L1 penalty.
    """
    n = spec.num_objectives
    logps_of = functools.partial(pair_logps, policy, average=spec.length_average)
    response_logps_of = functools.partial(response_logps, policy, average=spec.length_average)
    reference_logps_of = functools.partial(pair_logps, reference_policy or policy, average=spec.length_average)
    measured = spec.entanglement_pairs

    def objective_losses(variables, batch, norms, bco_shift, reference_params):
        params, mask_logits = variables
        batch = masked_pairs(batch, mask_logits)
        if mask_logits is not None:  # the reference's log-probs read the same mask, so its gradient sees them too
            refs = reference_logps_of(jax.lax.stop_gradient(reference_params), batch)
            batch = batch._replace(ref_chosen=refs[0], ref_rejected=refs[1])
        chosen, rejected = logps_of(params, batch)
        if spec.bco:
            rewards = implicit_rewards(chosen, rejected, batch.ref_chosen, batch.ref_rejected, beta=spec.beta)
            bco_shift = update_bco_shift(bco_shift, rewards)
        losses = per_pair_loss(spec, chosen, rejected, batch, norms, bco_shift.mean if spec.bco else None)
        return stack_preference_losses(losses, batch.objective_ids, n), (chosen, rejected, bco_shift)

    def step(state: DPOState, batch: PairBatch, reference_params: Any):
        seen = masked_pairs(batch, state.mask_logits)  # the token weights the loss sees at this step
        if reference_policy is not None:
            reference_params = state.params
        if reference_params is not None:
            ref_chosen, ref_rejected = jax.lax.stop_gradient(reference_logps_of(reference_params, seen))
            batch = batch._replace(ref_chosen=ref_chosen, ref_rejected=ref_rejected)
            seen = seen._replace(ref_chosen=ref_chosen, ref_rejected=ref_rejected)
        geometry_pairs = batch.chosen_ids.shape[0] if spec.npo else measured
        measured_pairs = _take(seen, slice(0, geometry_pairs))
        geometry = (
            response_entanglement(
                response_logps_of,
                state.params,
                chosen_responses(measured_pairs),
                rejected_responses(measured_pairs),
                probe_mask=probe_mask,
            )
            if geometry_pairs
            else None
        )
        norms = (geometry.statistics.norm_chosen, geometry.statistics.norm_rejected) if spec.npo else None
        (losses, (chosen, rejected, bco_shift)), (grads, mask_grads) = per_objective_grads(
            objective_losses,
            (state.params, state.mask_logits),
            batch,
            norms,
            state.bco_shift,
            reference_params,
            has_aux=True,
            probe_mask=None if trainable_mask is None else (trainable_mask, True),
        )
        extras = {"losses": losses} if "losses" in spec.reads else {}
        combined, combiner_state = combiner.update(grads, state.combiner_state, state.params, **extras)
        mask_logits, mask_metrics = (
            learned_mask_step(spec, batch, state.mask_logits, mask_grads) if spec.learned_mask else (None, {})
        )
        finite = all_finite(losses, combined, combiner_state.weights, mask_logits)
        # the select, as the RL step's full mode with batched pullbacks: DPO's per-objective gradients are vmapped too
        step = zeros_where_masked(combined, state.params)  # the frozen leaves' zeros, which the optimizer ignores
        params, opt_state = step_if_finite(finite, optimizer, lambda: step, state.opt_state, state.params, branch=False)
        keep = functools.partial(keep_if, finite)
        new_state = DPOState(
            params=params,
            opt_state=opt_state,
            combiner_state=keep(combiner_state, state.combiner_state),
            consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
            skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32),
            bco_shift=keep(bco_shift, state.bco_shift),
            mask_logits=keep(mask_logits, state.mask_logits),
        )
        rewards = implicit_rewards(chosen, rejected, batch.ref_chosen, batch.ref_rejected, beta=spec.beta)
        metrics = {
            **preference_metrics(rewards, chosen, rejected),
            **mask_metrics,
            "loss": jnp.dot(combiner_state.weights, losses),
            "objective_losses": losses,
            "margins": rewards.margin,
            "logratios/chosen": jnp.mean(chosen - batch.ref_chosen),
            "logratios/rejected": jnp.mean(rejected - batch.ref_rejected),
            "grad_norm": optax.tree.norm(combined),
            "weights": combiner_state.weights,
            "cosines": objective_cosines(grads),
        }
        if spec.bco:
            metrics["bco/delta"] = bco_shift.mean
        if spec.modpo_weights is not None:
            metrics["modpo/margin"] = jnp.mean(modpo_margin(spec, batch))
        if measured:
            delta = bco_shift.mean if spec.bco else None
            metrics.update(entanglement_metrics(spec, geometry, seen, norms, new_state.params, logps_of, delta))
        return new_state, metrics

    return step


def learned_mask_step(
    spec: StepSpec, batch: PairBatch, mask_logits: jax.Array, mask_grads: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(new mask logits, ``mask/*`` metrics): one gradient step of size ``spec.mask_learning_rate`` on the summed
    objective losses (`mask_grads` f32[n, N, 2, T], each pair's logits moved by its own objective's loss) plus the
    L1 penalty of the batch's masks."""
    penalty, penalty_grad = jax.value_and_grad(functools.partial(mask_penalty, spec, batch))(mask_logits)
    new_logits = mask_logits - spec.mask_learning_rate * (jnp.sum(mask_grads, axis=0) + penalty_grad)
    masked = masked_pairs(batch, mask_logits)
    kept = jnp.sum(masked.chosen_weights) + jnp.sum(masked.rejected_weights)
    tokens = jnp.sum(batch.chosen_weights) + jnp.sum(batch.rejected_weights)
    return new_logits, {"mask/penalty": penalty, "mask/mean": kept / jnp.maximum(tokens, 1.0)}


def entanglement_metrics(
    spec: StepSpec,
    geometry: Any,
    batch: PairBatch,
    norms: Any,
    new_params: Any,
    logps_of: Callable,
    bco_delta: Any = None,
) -> dict[str, jax.Array]:
    """``entanglement/*`` means over the first ``spec.entanglement_pairs`` pairs: geometry, predictions, observed moves."""
    k = spec.entanglement_pairs
    sub = _take(batch, slice(0, k))
    stats = jax.tree.map(lambda x: x[:k], geometry.statistics)
    before = (geometry.chosen_logps[:k], geometry.rejected_logps[:k])
    sub_norms = None if norms is None else (norms[0][:k], norms[1][:k])
    a_w, a_l = margin_coefficients(spec, *before, sub, sub_norms, bco_delta)
    move_chosen, move_rejected = predicted_moves(stats.inner, stats.norm_chosen**2, stats.norm_rejected**2, a_w, a_l)
    predicted = jnp.sign(move_chosen), jnp.sign(move_rejected)
    after = logps_of(new_params, sub)
    observed = after[0] - before[0], after[1] - before[1]
    fraction = lambda flags: jnp.mean(flags.astype(jnp.float32))
    return {
        "entanglement/inner": jnp.mean(stats.inner),
        "entanglement/norm_chosen": jnp.mean(stats.norm_chosen),
        "entanglement/norm_rejected": jnp.mean(stats.norm_rejected),
        "entanglement/cosine": jnp.mean(stats.cosine),
        "entanglement/condition": jnp.mean(stats.condition),
        "entanglement/predicted_chosen_up_rejected_down": fraction((predicted[0] > 0) & (predicted[1] < 0)),
        "entanglement/observed_chosen_up_rejected_down": fraction((observed[0] > 0) & (observed[1] < 0)),
        "entanglement/observed_both_up": fraction((observed[0] > 0) & (observed[1] > 0)),
        "entanglement/observed_both_down": fraction((observed[0] < 0) & (observed[1] < 0)),
        "entanglement/move_chosen": jnp.mean(observed[0]),
        "entanglement/move_rejected": jnp.mean(observed[1]),
        "entanglement/agreement_chosen": fraction(observed_moves_agree(predicted[0], before[0], after[0])),
        "entanglement/agreement_rejected": fraction(observed_moves_agree(predicted[1], before[1], after[1])),
    }


# ------------------------------------------------------------------------------------------------- the trainer
class DPOTrainer(Run):
    """A (multi-objective) DPO-family run on preference pairs, resumable, with gradient entanglement measured.

    Args:
      config: the run's :class:`mojax.rl.dpo_config.DPOConfig`.
      callbacks: callables ``callback(step, metrics)`` run after every step.

    References:
      Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
      NeurIPS 2023, arXiv 2305.18290. Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment:
      Gradient Entanglement", ICLR 2025, arXiv 2410.13828. Zhou et al., "Beyond One-Preference-Fits-All Alignment:
      Multi-Objective Direct Preference Optimization", ACL Findings 2024, arXiv 2310.03708.

    Example:
      >>> import tempfile
      >>> config = load_dpo_config("dpo_tiny", [f"output_dir={tempfile.mkdtemp()}", "steps=1",
      ...     "logging.tensorboard=false", "logging.progress=false", "export=false"])
      >>> metrics = DPOTrainer(config).train()
      >>> sorted(key for key in metrics if key.startswith("rewards/") and key.count("/") == 1)
      ['rewards/accuracies', 'rewards/chosen', 'rewards/margins', 'rewards/rejected']
    """

    def __init__(self, config: DPOConfig, *, callbacks: Sequence[Callable[[int, Mapping[str, float]], None]] = ()):
        self.config = config
        self.callbacks = tuple(callbacks)
        self.output_dir = Path(config.output_dir)
        self.objectives = tuple(config.objectives) or (
            PairObjectiveSection(name=SINGLE_OBJECTIVE, pairs=config.data.pairs, setting=config.data.setting),
        )
        self.names = tuple(objective.name for objective in self.objectives)
        self.model, self.tokenizer = build_policy(config)
        self.weight_digests = policy_weight_digests(config.model.path)
        attach_lora(self.model, config.lora, config.model.init_seed + 2)
        self.graphdef, params, self.rest = nnx.split(self.model, nnx.Param, ...)
        self.mesh = self._build_mesh()
        if self.mesh is not None:
            params = jax.device_put(params, state_shardings(params, self.mesh, config.mesh.rules))
        self.policy = response_fn(self.graphdef, self.rest)
        flags = (
            jax.tree.leaves(lora_mask(params))
            if config.lora.rank and not config.preference.probe
            else probe_flags(
                params, config.preference.probe, self.model.config, where="DPOTrainer", key="preference.probe"
            )
        )
        self.probe_mask = jax.tree.unflatten(jax.tree.structure(params), flags)
        n = len(self.objectives)
        spec = REGISTRY[config.combiner.name]
        options = combiner_options(spec.name, self.objectives, [None] * n)
        self.combiner = make(spec.name, n, **{**options, **config.combiner.options})
        self.optimizer, self.schedule = build_optimizer(config.optimizer)
        if config.lora.rank:
            self.optimizer = adapters_only(self.optimizer, params)
        preference = config.preference
        self.spec = StepSpec(
            loss_types=config.loss_types,
            loss_weights=None if preference.loss_weights is None else tuple(preference.loss_weights),
            beta=preference.beta,
            label_smoothing=preference.label_smoothing,
            simpo_gamma=preference.simpo_gamma,
            cpo_alpha=preference.cpo_alpha,
            length_average=config.length_average,
            npo="npo" in config.mitigations,
            entanglement_pairs=min(preference.entanglement_pairs, config.data.pairs_per_step * n),
            num_objectives=n,
            reads=spec.reads,
            rdpo_alpha=preference.rdpo_alpha,
            modpo_weights=(
                (config.modpo.weight, *(reward.weight for reward in config.modpo.rewards))
                if config.modpo.rewards
                else None
            ),
            learned_mask="learned_mask" in config.mitigations,
            mask_l1=preference.mask_l1,
            mask_learning_rate=preference.mask_learning_rate,
        )
        on_the_fly = preference.reference == "on_the_fly"
        # LoRA: the on-the-fly reference is the base model (adapters off) of the current parameters, no copy.
        base = response_fn(self.graphdef, self.rest, adapters=False) if on_the_fly and config.lora.rank else None
        trainable = lora_mask(params) if config.lora.rank else None
        self.trainable_flags = None if trainable is None else jax.tree.leaves(trainable)

        def compiled(spec: StepSpec) -> Callable:
            step = make_dpo_step(self.policy, self.combiner, self.optimizer, spec, self.probe_mask, base, trainable)
            # its per-objective gradients and per-response entanglement vmap pullbacks (mojax.xla_cpu)
            return jax.jit(step, donate_argnums=0, compiler_options=batched_pullback_options())

        self._step_fn = compiled(self.spec)
        # the steps between two measurements of the entanglement statistics run the same step without them
        self._unmeasured_step_fn = (
            compiled(self.spec._replace(entanglement_pairs=0))
            if preference.entanglement_every > 1 and self.spec.entanglement_pairs
            else self._step_fn
        )
        self._logps = jax.jit(functools.partial(pair_logps, self.policy, average=config.length_average))
        self.margin_rewards = tuple(
            resolve(
                {key: rl_config.to_dict(getattr(reward, key)) for key in ("name", "fn", "weight", "kind", "options")}
            )
            for reward in config.modpo.rewards
        )
        self.pairs = []
        for index, objective in enumerate(self.objectives):
            self.pairs.append(self._encode(objective, index, sum(len(pairs.pair_ids) for pairs in self.pairs)))
        self.reference_params = jax.tree.map(jnp.copy, params) if on_the_fly and base is None else None
        if not on_the_fly:
            self.pairs = [self._with_reference(pairs, params) for pairs in self.pairs]
        # Every leaf its own buffer: the step donates the state, and an init may share one array twice.
        self.state = jax.tree.map(
            jnp.copy,
            DPOState(
                params=params,
                opt_state=self.optimizer.init(params),
                combiner_state=self.combiner.init(params),
                consecutive_skips=jnp.zeros((), jnp.int32),
                skipped_updates=jnp.zeros((), jnp.int32),
                bco_shift=init_bco_shift(),
                mask_logits=self._initial_mask_logits() if self.spec.learned_mask else None,
            ),
        )
        self.step = 0
        self._checkpoints: ocp.CheckpointManager | None = None

    # ---------------------------------------------------------------------------------------------- pieces
    def _build_mesh(self) -> Any:
        shape = self.config.mesh.shape
        if shape is None:
            return None
        mesh = make_mesh(**shape)
        splits = mesh.shape["data"] * mesh.shape["fsdp"]
        batch = self.config.data.pairs_per_step * len(self.objectives)
        if batch % splits:
            raise ValueError(
                checks.message(
                    "DPOTrainer",
                    "mesh.shape",
                    f"is {dict(shape)}: data * fsdp = {splits} does not divide the batch of {batch} pairs",
                    "a mesh whose data * fsdp divides data.pairs_per_step * (number of objectives)",
                )
            )
        return mesh

    def _place(self, batch: PairBatch) -> PairBatch:
        arrays = PairBatch(*(jnp.asarray(field) for field in batch))
        return arrays if self.mesh is None else jax.device_put(arrays, batch_sharding(self.mesh))

    def _encode(self, objective: PairObjectiveSection, index: int, first_pair_id: int) -> PairBatch:
        data = self.config.data
        rows = load_pair_rows(objective.pairs, objective.setting, self.config, index, self.tokenizer)
        if len(rows) < data.pairs_per_step:
            raise ValueError(
                checks.message(
                    "DPOTrainer",
                    f"objectives.{objective.name}.pairs" if self.config.objectives else "data.pairs",
                    f"holds {len(rows)} pairs",
                    f"at least data.pairs_per_step = {data.pairs_per_step}",
                )
            )
        pairs = encode_pairs(
            self.tokenizer,
            rows,
            max_prompt_length=data.max_prompt_length,
            max_completion_length=data.max_completion_length,
            eos_id=self.tokenizer.eos_token_id,
            mask_shared_prefix="shared_prefix" in self.config.mitigations,
            objective_id=index,
            first_pair_id=first_pair_id,
        )
        if not self.margin_rewards:
            return pairs
        margins = [modpo_rewards(self.margin_rewards, rows, response, pairs) for response in ("chosen", "rejected")]
        return pairs._replace(margin_chosen=margins[0], margin_rejected=margins[1])

    def _initial_mask_logits(self) -> jax.Array:
        """f32[N, 2, T]: ``preference.mask_init`` for every token of every pair."""
        count = sum(len(pairs.pair_ids) for pairs in self.pairs)
        shape = (count, 2, self.config.data.max_completion_length)
        return jnp.full(shape, self.config.preference.mask_init, jnp.float32)

    def _with_reference(self, pairs: PairBatch, params: Any) -> PairBatch:
        """The pairs with the reference (initial policy) log-probs filled in, in chunks of ``pairs_per_step``."""
        size, count = self.config.data.pairs_per_step, len(pairs.objective_ids)
        chosen, rejected = [], []
        for start in range(0, count, size):
            index = np.arange(start, start + size) % count  # the last chunk wraps: one compiled shape
            with self.on_mesh():
                logps = self._logps(params, self._place(_take(pairs, index)))
            take = min(size, count - start)
            chosen.append(np.asarray(logps[0])[:take])
            rejected.append(np.asarray(logps[1])[:take])
        return pairs._replace(ref_chosen=np.concatenate(chosen), ref_rejected=np.concatenate(rejected))

    def policy_model(self) -> Any:
        """The current policy as an NNX model."""
        return nnx.merge(self.graphdef, self.state.params, self.rest)

    def pairs_for_step(self, step: int) -> PairBatch:
        """The batch of (1-based) `step`: for each objective, the next slice of per-pass permutations of its pairs."""
        size = self.config.data.pairs_per_step
        parts = []
        for index, pairs in enumerate(self.pairs):
            count = len(pairs.objective_ids)
            positions = range((step - 1) * size, step * size)
            chosen = [
                np.random.default_rng([self.config.seed, index, epoch]).permutation(count)[offset]
                for epoch, offset in (divmod(position, count) for position in positions)
            ]
            parts.append(_take(pairs, np.asarray(chosen)))
        return PairBatch(*(np.concatenate(fields, axis=0) for fields in zip(*parts, strict=True)))

    # ------------------------------------------------------------------------------------------ checkpoints
    # -------------------------------------------------------------------------------------------- the loop
    def train_step(self) -> dict[str, float]:
        """Run one step and return its metrics."""
        step = self.step + 1
        started = time.perf_counter()
        batch = self.pairs_for_step(step)
        measured = (step - 1) % self.config.preference.entanglement_every == 0
        step_fn = self._step_fn if measured else self._unmeasured_step_fn
        with self.on_mesh():
            self.state, update = step_fn(self.state, self._place(batch), self.reference_params)
        update = jax.device_get(update)
        self.step = step
        metrics = self._metrics(update, batch.objective_ids)
        metrics["learning_rate"] = float(self.schedule(step - 1))
        metrics["timing/update"] = time.perf_counter() - started
        return metrics

    def _metrics(self, update: Mapping[str, Any], objective_ids: np.ndarray) -> dict[str, float]:
        vectors = ("objective_losses", "margins", "weights", "cosines")
        metrics = {key: float(value) for key, value in update.items() if key not in vectors}
        margins = np.asarray(update["margins"])
        for index, name in enumerate(self.names):
            mine = margins[objective_ids == index]
            metrics[f"rewards/{name}/mean"] = float(mine.mean())
            metrics[f"rewards/{name}/accuracies"] = float(np.mean(mine > 0))
            metrics[f"objectives/{name}/loss"] = float(update["objective_losses"][index])
            metrics[f"combiner/weight/{name}"] = float(update["weights"][index])
            for other in range(index + 1, len(self.names)):
                metrics[f"combiner/cos/{name}/{self.names[other]}"] = float(update["cosines"][index, other])
        metrics["skipped_updates"] = float(self.state.skipped_updates)
        return metrics


def run_dpo(source: str | os.PathLike | DPOConfig, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Train (or resume) the run of a DPO config with ``dotted.key=value`` overrides: what ``mojax dpo`` does.

    Args:
      source: a YAML file, a built-in config name (``"dpo_tiny"``) or a loaded :class:`DPOConfig`.
      overrides: ``dotted.key=value`` assignments (none with a loaded config).

    Returns:
      The last step's metrics.
    """
    if isinstance(source, DPOConfig) and overrides:
        raise ValueError(
            checks.message("run_dpo", "overrides", f"are {list(overrides)}", "none with a loaded DPOConfig")
        )
    trainer = DPOTrainer(source if isinstance(source, DPOConfig) else load_dpo_config(source, overrides))
    try:
        return trainer.train()
    finally:
        trainer.close()
