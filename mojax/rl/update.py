"""The RL update: per-objective PPO losses -> combiner -> one optimizer step, as one jitted function.

What the algorithm is, independent of who runs where. For one rollout (batch axis first on every field of
:class:`Batch`) the update runs ``num_iterations`` epochs, each over ``num_minibatches`` shuffled minibatches
(``lax.scan`` both), each minibatch in ``num_microbatches`` micro-batches whose loss terms are divided by the
*minibatch's* denominators, so accumulation gives exact token means.

The loss of a minibatch is a vector f32[n + 1]: the n per-objective PPO losses L_i and one *shared* term (beta KL
to the reference minus the entropy bonus), which is added after the combination so no combiner can trade it away.
The combiner mode is chosen from the registry:

* ``scalar`` (combiners without a Gram: linear, CTWA, PAMA, Lagrangian, Tchebycheff): the weights w come from
  per-sample statistics once per rollout (:func:`make_scalar_weights`, its own small program); one backward pass of
  sum_i w_i L_i + shared per micro-batch. The train step takes w as data and no combiner state, so every scalar-mode
  combiner runs the same compiled train step (shared through JAX's persistent compilation cache when it is on).
* ``probe``: the per-objective gradients of a probe subset of the parameters (the pullbacks of n unit cotangents,
  vmapped or in sequence, as full mode runs them; XLA prunes everything but the probe part) go through the
  combiner, whose weights w then weight one backward pass of sum_i sg(w_i) L_i + shared over every parameter, from
  the same forward pass (one ``jax.vjp``). With micro-batches this takes two forward passes. An untied LM head in
  the probe set can enter the probe Gram through its token kernel instead of its n gradients (:class:`HeadKernel`),
  in full mode too.
* ``full``: per-objective gradients of every parameter go through the combiner (n backward passes' memory; in
  sequence without a mesh as n separate trees, which no pass copies into a stacked array); the shared term's
  gradient is one more pullback, added after the combination, and left out of the traced step when the term is zero
  in every update (the KL not in the loss, as when beta starts at 0, and no entropy bonus: the
  default), so the update then costs one forward and n backward passes.

The combined gradient is clipped to ``max_grad_norm`` before the optimizer, by the update rather than the optimizer
chain: in full mode without a shared term its norm comes from the combiner's Gram (:func:`norm_from_gram`), so no
pass reads the combined gradient but the optimizer's, which up to ``MAX_OBJECTIVES_FUSED_INTO_THE_STEP`` objectives
computes it from the n gradients where it reads it (it is never written out; :func:`combination_for_the_step`). A
non-finite loss, gradient or combiner weight skips the optimizer step (parameters, optimizer and combiner state
unchanged, as ``optax.apply_if_finite`` does) and is counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mojax._numerics import token_rows
from mojax.combiners import ObjectiveTrees, combine, cosine_gram, ctwa_next_weights, tree_gram
from mojax.combiners.grads import separate_pullbacks, stacked_pullbacks
from mojax.diagnostics import ctwa_signal
from mojax.rl import losses as rl_losses
from mojax.xla_cpu import batched_pullback_options

PolicyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
"""(params, prompt_ids, prompt_mask, tokens, response_mask) -> (log-probs f32[B, T], entropies f32[B, T])."""
CriticFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
"""(critic params, prompt_ids, prompt_mask, tokens, response_mask) -> values f32[n, B, T] before each response token."""


class Batch(NamedTuple):
    """One rollout prepared for the update; every field has the batch axis first."""

    prompt_ids: jax.Array  # i32[B, P]
    prompt_mask: jax.Array  # i32[B, P]
    tokens: jax.Array  # i32[B, T]
    mask: jax.Array  # f32[B, T]
    old_logp: jax.Array  # f32[B, T]
    ref_logp: jax.Array  # f32[B, T]
    advantages: jax.Array  # f32[B, n, T]
    rewards: jax.Array  # f32[B, n], reward-oriented (costs negated); NaN = not applicable
    group_ids: jax.Array  # i32[B]
    values: jax.Array | None = None  # f32[B, n, T] the critic's values at sampling time (gae only)
    returns: jax.Array | None = None  # f32[B, n, T] GAE returns, the critic's targets (gae only)


class TrainState(NamedTuple):
    """Everything the update changes."""

    params: Any
    opt_state: Any
    combiner_state: Any
    consecutive_skips: jax.Array  # i32[]
    skipped_updates: jax.Array  # i32[]
    critic_params: Any = None  # the vector critic (gae only)
    critic_opt_state: Any = None


class UpdateSpec(NamedTuple):
    """Static settings of the update (hashable: they are compiled into the program)."""

    mode: str
    num_objectives: int
    combiner_name: str
    reads: tuple[str, ...]
    num_iterations: int = 1
    num_minibatches: int = 1
    num_microbatches: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    dual_clip: float | None = None
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: float | None = None
    importance_sampling_level: str = "token"
    kl_estimator: str = "k3"
    kl_clamp: float | None = 10.0
    kl_in_loss: bool = True
    """beta * KL is the loss's shared term (False: the KL is only logged, and full mode skips the shared pullback
    when there is no entropy bonus either)."""
    entropy_coef: float = 0.0
    vf_coef: float = 0.1
    value_clip: float = 0.2
    sequential_pullbacks: bool = True
    """Probe and full mode run the n pullbacks one after another, without a mesh as n separate gradient trees
    (False: one pullback vmapped over the n cotangents, which needs :func:`mojax.xla_cpu.batched_pullback_options` on
    XLA:CPU; :func:`stacked_pullbacks`)."""
    max_grad_norm: float | None = None
    """Clip the combined gradient to this global norm before the optimizer (as ``optax.clip_by_global_norm``, which the
    optimizer then leaves out; None: no clipping). In full mode without a shared term the norm comes from the
    combiner's Gram (:func:`norm_from_gram`), so neither it nor the non-finite check reads the combined gradient,
    which XLA then fuses into the optimizer's update instead of writing it out, up to
    ``MAX_OBJECTIVES_FUSED_INTO_THE_STEP`` objectives (:func:`combination_for_the_step`)."""
    on_policy: bool = False
    """One optimizer update per rollout, at the parameters that sampled it: the PPO ratio's denominator is the
    update's own log-probabilities with the gradient stopped, so the ratio is exactly 1 and ``Batch.old_logp`` is not
    read (the rollout then needs no forward pass to recompute it; TRL's GRPO does the same when
    ``num_iterations`` is 1)."""

    @property
    def batched_pullbacks(self) -> bool:
        """Whether the step vmaps the policy's pullback over the n objectives (probe or full mode, not in sequence)."""
        return self.mode != "scalar" and not self.sequential_pullbacks


class Denominators(NamedTuple):
    """What a minibatch's loss sums are divided by: the policy loss's denominator and the response-token count."""

    policy: jax.Array
    tokens: jax.Array


def denominators(mask: jax.Array, spec: UpdateSpec) -> Denominators:
    """The minibatch's denominators for ``spec.loss_agg_mode`` (the "-norm" mode divides by loss_scale_factor)."""
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    if spec.loss_agg_mode == "seq-mean-token-sum-norm":
        return Denominators(jnp.asarray(spec.loss_scale_factor, jnp.float32), tokens)
    counts = rl_losses.loss_terms(jnp.zeros_like(mask), mask, spec.loss_agg_mode).counts
    return Denominators(jnp.maximum(counts, 1.0), tokens)


def minibatch_losses(
    policy: PolicyFn, params: Any, batch: Batch, divide: Denominators, beta: jax.Array, spec: UpdateSpec
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(f32[n + 1] = [L_1 .. L_n, shared], metric sums) of one (micro-)batch, normalised by the minibatch's
    denominators."""
    logp, entropy = policy(params, batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.mask)
    return losses_of_outputs(logp, entropy, batch, divide, beta, spec)


def losses_of_outputs(
    logp: jax.Array, entropy: jax.Array, batch: Batch, divide: Denominators, beta: jax.Array, spec: UpdateSpec
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`minibatch_losses` from the policy's log-probs and entropies f32[B, T]."""
    old_logp = jax.lax.stop_gradient(logp) if spec.on_policy else batch.old_logp
    advantages = jnp.moveaxis(batch.advantages, 1, 0)
    terms = rl_losses.ppo_policy_terms(
        logp,
        old_logp,
        advantages,
        batch.mask,
        epsilon=spec.epsilon,
        epsilon_high=spec.epsilon_high,
        loss_agg_mode=spec.loss_agg_mode,
        dual_clip=spec.dual_clip,
        importance_sampling_level=spec.importance_sampling_level,
    )
    objective_losses = terms.sums / divide.policy
    kl = jnp.sum(rl_losses.kl_estimate(logp, batch.ref_logp, spec.kl_estimator, clamp=spec.kl_clamp) * batch.mask)
    mean_entropy = jnp.sum(entropy * batch.mask) / divide.tokens
    mean_kl = kl / divide.tokens
    shared = beta * mean_kl if spec.kl_in_loss else jnp.zeros((), jnp.float32)
    if spec.entropy_coef:  # else the entropies are not differentiated at all (a symbolic zero cotangent)
        shared = shared - spec.entropy_coef * mean_entropy
    clipped = rl_losses.clip_fraction(
        logp,
        old_logp,
        advantages,
        batch.mask,
        epsilon=spec.epsilon,
        epsilon_high=spec.epsilon_high,
    )
    metrics = {
        "kl": mean_kl,
        "entropy": mean_entropy,
        "clip_ratio": clipped * jnp.sum(batch.mask) / divide.tokens,
    }
    return jnp.concatenate([objective_losses, jnp.reshape(shared, (1,))]), metrics


def combiner_extras(batch: Batch, losses: jax.Array, weights_for_signal: jax.Array, spec: UpdateSpec) -> dict[str, Any]:
    """The extra arguments the combiner reads (DESIGN's names), built only for those in ``spec.reads``.

    ``signal`` is CTWA's per-sample training signal of the combined advantage sum_i w_i A_i at the sampling-time
    ratio (1: the rollout is on-policy), so it costs no extra forward; the CTWA authors' code recomputes the ratio
    after the update instead (one more forward pass per step).
    """
    available = {
        "rewards": lambda: batch.rewards,
        "group_ids": lambda: batch.group_ids,
        "mask": lambda: batch.mask,
        "advantages": lambda: jnp.moveaxis(batch.advantages, 1, 0),
        "losses": lambda: losses,
        "signal": lambda: ctwa_signal(
            jnp.einsum("n,bnt->bt", weights_for_signal, batch.advantages), batch.mask, batch.old_logp, batch.old_logp
        ),
    }
    return {key: available[key]() for key in spec.reads if key in available}


def scalar_weights(combiner: optax.GradientTransformationExtraArgs, state: Any, extras: dict[str, Any], n: int):
    """(weights f32[n], new combiner state) of a scalar-mode combiner from per-sample statistics alone.

    The combiner is an optax transform over stacked updates; scalar-mode weightings never look at the updates, so a
    zero stand-in f32[n, 1] carries the objective axis and the combined update is discarded.
    """
    _, state = combiner.update({"objective_axis": jnp.zeros((n, 1), jnp.float32)}, state, None, **extras)
    return state.weights, state


def signal_weights(combiner_name: str, state: Any) -> jax.Array:
    """The weights the combiner will apply to this rollout (CTWA applies exp(log_weights), adapted last step)."""
    return ctwa_next_weights(state) if combiner_name == "ctwa" else state.weights


def make_scalar_weights(
    combiner: optax.GradientTransformationExtraArgs, spec: UpdateSpec
) -> Callable[[Any, Batch], tuple[jax.Array, Any]]:
    """The (unjitted) weight step of scalar mode: ``(combiner_state, batch) -> (weights f32[n], combiner_state)``.

    Run once per rollout before the train step, which takes the weights as data (see the module docstring).
    """
    n = spec.num_objectives

    def weights_step(combiner_state: Any, batch: Batch) -> tuple[jax.Array, Any]:
        extras = combiner_extras(
            batch, jnp.zeros((n,), jnp.float32), signal_weights(spec.combiner_name, combiner_state), spec
        )
        return scalar_weights(combiner, combiner_state, extras, n)

    return weights_step


def _split(tree: Any, parts: int) -> Any:
    """Every leaf [B, ...] -> [parts, B / parts, ...]."""
    return jax.tree.map(lambda x: x.reshape((parts, x.shape[0] // parts) + x.shape[1:]), tree)


def _accumulate(step: Callable, micro_batches: Any) -> Any:
    """Sum of step(m) over the leading axis of micro_batches: step itself for one, else a scan from zeros.

    The scan holds the only traced copy of step, so the compiler plans one micro-batch's buffers. Seeding the carry
    with the first micro-batch's result, computed outside the loop, kept a second copy of step's temporaries live
    beside the loop's: LLaMA-70B's probe-mode update in 4 micro-batches on 64 devices (FSDP) planned 98.7 GiB per
    device that way, 78.8 GiB from zeros.
    """
    first = first_of(micro_batches)
    if jax.tree.leaves(micro_batches)[0].shape[0] == 1:
        return step(first)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(step, first))

    def body(total, micro):
        return jax.tree.map(jnp.add, total, step(micro)), None

    total, _ = jax.lax.scan(body, zeros, micro_batches)
    return total


def masked_nodes(tree: Any, flags: list[bool]) -> Any:
    """tree with optax.MaskedNode() in place of every leaf whose flag is False."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
        treedef, [leaf if flag else optax.MaskedNode() for leaf, flag in zip(leaves, flags, strict=True)]
    )


MAX_OBJECTIVES_FUSED_INTO_THE_STEP = 3


def combination_for_the_step(weights: jax.Array, objectives: Any, finish: Callable[[Any], Any]) -> Callable[[], Any]:
    """``finish`` of sum_i w_i g_i (:func:`mojax.combiners.combine`) as the function that the optimizer step calls
    inside its conditional (:func:`step_if_finite`).

    AdamW's two moment updates are separate XLA:CPU fusions, and each reads what the combination reads: computed
    inside the conditional, the combination fuses into both and costs 2n reads of the n gradients; computed before
    it, the combination is an operand of the conditional, written out once: n reads, a write and two reads. So up to
    :data:`MAX_OBJECTIVES_FUSED_INTO_THE_STEP` objectives the step computes it, and beyond, it is computed before.
    Measured in full mode on SmolLM2-135M and a 56M configuration, written out it took as long at n = 3 and 5, and
    3-6% less at n = 8 (benchmarks/RESULTS.md, the combination written out beyond three objectives). An optimization
    barrier inside the conditional does not write it out: XLA:CPU removes barriers before it fuses.
    """
    if weights.shape[0] <= MAX_OBJECTIVES_FUSED_INTO_THE_STEP:
        return lambda: finish(combine(weights, objectives))
    combination = finish(combine(weights, objectives))
    return lambda: combination


def is_masked(node: Any) -> bool:
    """Whether ``node`` is an ``optax.MaskedNode()`` (a frozen or left-out leaf's place)."""
    return isinstance(node, optax.MaskedNode)


def zeros_where_masked(tree: Any, like: Any) -> Any:
    """``tree`` with zeros shaped like ``like``'s leaf in place of every ``optax.MaskedNode()``."""
    return jax.tree.map(
        lambda leaf, full: jnp.zeros_like(full) if is_masked(leaf) else leaf, tree, like, is_leaf=is_masked
    )


def objective_cosines(stacked: Any) -> jax.Array:
    """The n x n cosine matrix of the objectives' gradients (rows of a stacked pytree)."""
    gram, _ = tree_gram(stacked)
    cosines, _ = cosine_gram(gram)
    return cosines


def shared_term_is_zero(spec: UpdateSpec) -> bool:
    """Whether the shared term beta KL - entropy_coef H is zero in every update, known when the step is traced.

    It is when there is no entropy bonus and the KL is not in the loss (the trainer leaves it out when beta starts
    at 0, where both KL controllers keep it). Its gradient is then exactly zero, so full mode skips its pullback,
    the (n + 1)-th backward pass, and adds nothing. Otherwise the pullback runs, even in an update whose traced
    beta is 0: the shared term cannot be folded into the per-objective cotangents without changing the Gram the
    combiner sees, and so its weights.
    """
    return spec.entropy_coef == 0.0 and not spec.kl_in_loss


def norm_from_gram(gram: jax.Array, scale: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(||sum_i w_i g_i||, whether that combination is finite) from the Gram G of the g_i / s, without reading the g_i.

    ||sum_i w_i g_i||^2 = s^2 w^T G w. G is finite iff every g_i is (:func:`mojax.combiners.tree_gram` rescales so
    that a finite G cannot overflow); then every entry of the combination is at most
    sum_i |w_i| ||g_i|| <= sum_i |w_i| s sqrt(max_i G_ii), so where that bound is finite so is the combination.
    """
    norm = scale * jnp.sqrt(jnp.maximum(weights @ gram @ weights, 0.0))
    bound = jnp.sum(jnp.abs(weights)) * scale * jnp.sqrt(jnp.max(jnp.diagonal(gram)))
    return norm, jnp.all(jnp.isfinite(gram)) & jnp.isfinite(bound) & jnp.isfinite(norm)


def clip_to_norm(grads: Any, norm: jax.Array, max_norm: float | None) -> Any:
    """``optax.clip_by_global_norm(max_norm)`` given the global norm: g * f with f = 1 where norm < max_norm (g to the
    bit), else f = max_norm / norm in fp32 (optax's (g / norm) * max_norm up to its rounding: within 2 ulp).

    One multiply by a scalar, which XLA fuses into every consumer of the clipped gradient: inside the optimizer step
    AdamW's two moment updates each compute the clip (and full mode's combination sum_i w_i g_i) where they read the
    gradient. A divide by the traced norm, as optax's, XLA computes once and writes out first, so the clipped
    gradient was written and read once more (benchmarks/RESULTS.md, "The combination and the clip inside the
    optimizer step").
    """
    if max_norm is None:
        return grads
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm).astype(jnp.float32)
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads)


def all_finite(*trees: Any) -> jax.Array:
    """Whether every array leaf of every tree is finite (bool scalar, traced).

    Read as the sum of x * 0 over each leaf, which is NaN exactly when some entry is infinite or NaN: one reduction
    per leaf, fused with the product. ``all(isfinite(x))`` had XLA:CPU write a boolean copy of every gradient leaf
    first and reduce it in a second pass.
    """
    sums = [jnp.sum(x * jnp.zeros((), x.dtype)) for tree in trees for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(total, jnp.float32) for total in sums])))


def critic_gradients(critic: CriticFn, state: TrainState, minibatch: Batch, spec: UpdateSpec) -> tuple[jax.Array, Any]:
    """(value loss, gradients) of vf_coef * clipped value loss, summed over the micro-batches and divided by the
    minibatch's token count (exact token mean)."""
    tokens = jnp.maximum(jnp.sum(minibatch.mask), 1.0)

    def loss(params, micro):
        values = critic(params, micro.prompt_ids, micro.prompt_mask, micro.tokens, micro.mask)
        terms = rl_losses.value_loss_terms(
            values,
            jnp.moveaxis(micro.values, 1, 0),
            jnp.moveaxis(micro.returns, 1, 0),
            micro.mask,
            clip=spec.value_clip,
        )
        return spec.vf_coef * jnp.sum(terms.sums) / tokens

    value, grads = _accumulate(
        lambda micro: jax.value_and_grad(loss)(state.critic_params, micro), _split(minibatch, spec.num_microbatches)
    )
    return value / spec.vf_coef, grads


def keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``finite`` (bool[]), else ``old``: a select of every leaf."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def train_step_compiler_options(spec: UpdateSpec) -> dict[str, str] | None:
    """``jax.jit``'s ``compiler_options`` for the train step: :func:`mojax.xla_cpu.batched_pullback_options` when it
    vmaps the policy's pullback (``spec.batched_pullbacks``: XLA:CPU's default fusions get those wrong), else None
    (XLA's defaults, which the other steps run faster with)."""
    return batched_pullback_options() if spec.batched_pullbacks else None


def skips_by_conditional(spec: UpdateSpec) -> bool:
    """Whether the train step skips a non-finite update under a ``lax.cond`` (:func:`step_if_finite`): in every
    mode but full mode with batched pullbacks, where the select measured faster."""
    return not (spec.mode == "full" and spec.batched_pullbacks)


def step_if_finite(
    finite: jax.Array,
    optimizer: optax.GradientTransformation,
    gradient: Callable[[], Any],
    opt_state: Any,
    params: Any,
    *,
    branch: bool = True,
) -> tuple[Any, Any]:
    """(params, optimizer state) after one optimizer step on ``gradient()`` if ``finite``, else the old ones: a
    ``lax.cond``, or with ``branch=False`` a select of every stepped leaf against its old value.

    ``gradient`` is called inside the step, so under the conditional what it computes (full mode's combination of the
    n gradients, the clip) fuses into the optimizer's reads of it instead of being written out before the branch.

    The select made XLA:CPU copy the optimizer's moments at every call, since the step and the select both read them
    and the step writes their new values in place (an isolated AdamW step on 55M donated parameters: 178 ms with the
    select, 70 ms with the conditional, 41 ms with no skip); the conditional steps them where they lie. The RL step
    branches in every mode but one: full mode with batched pullbacks, whose combined gradient is read from the
    layer-stacked [L, n, ...] leaves, measured slower with the conditional than with the select (cause not
    established); in sequence, where the leaves are objective-major, the conditional measured faster
    (benchmarks/RESULTS.md).
    """

    def step(_):
        updates, new_state = optimizer.update(gradient(), opt_state, params)
        return optax.apply_updates(params, updates), new_state

    if branch:
        return jax.lax.cond(finite, step, lambda _: (params, opt_state), None)
    return keep_if(finite, step(None), (params, opt_state))


class HeadKernel(NamedTuple):
    """The LM head through its token kernel instead of its n gradients, in probe and full mode
    (``combiner.head_gram``).

    The head's gradient for objective i is H^T diag(c_i) E (:func:`mojax.rl.losses.head_token_kernel`), so its share
    of the combiner's Gram is C K C^T with C f32[n, N] the objectives' log-prob cotangents and K f32[N, N] the token
    kernel: the per-objective pullbacks skip the head, and the combiner sees n coordinates per objective in its
    place (:func:`gram_rows`). The head's gradient is then formed once, weighted: by probe mode's weighted pass, and
    in full mode by one more pullback, which XLA reduces to the head's weight-gradient product.

    A head tied to the embedding (full mode) is also the table the layers' input is looked up in: the forward then
    takes that input as an argument of its own (``input_embeddings``), so the pullbacks give the table's head part
    and the input's cotangents X_i [M, D] apart. The table's share of the Gram comes from both
    (:func:`mojax.rl.losses.tied_head_gram`), and its combined gradient is the weighted head part plus the scatter of
    sum_i w_i X_i onto the rows of the input ids: the n pullbacks form neither the head's weight-gradient product nor
    a table-sized scatter.
    """

    policy: Callable
    """(params, prompt_ids, prompt_mask, tokens, response_mask[, input_embeddings]) -> ((log-probs, entropies)
    f32[B, T], K): the policy, which also returns its head's token kernel K f32[N, N], or for a tied head
    :class:`mojax.rl.losses.TiedHeadKernel` (and then takes the layers' input)."""
    flags: list[bool]
    """One bool per parameter leaf, True for the head's (a leaf differentiated per objective)."""
    always: bool = False
    """Take the kernel whatever it costs (False: only where it takes fewer multiply-adds, :func:`kernel_pays_off`)."""
    input_embeddings: Callable | None = None
    """A tied head's: (params, prompt_ids, tokens) -> the layers' input [B, P + T, D], the table's rows at the ids
    (None: an untied head)."""


class TiedInputs(NamedTuple):
    """The input part of a tied head's gradients in full mode (:class:`HeadKernel`)."""

    cotangents: jax.Array
    """[n, M, D] each objective's cotangent of the layers' input."""
    input_ids: jax.Array
    """i32[M] the ids they were looked up at."""

    def combined(self, weights: jax.Array, table: jax.Array, shared: jax.Array | None) -> jax.Array:
        """The table's input part of sum_i w_i g_i (plus the shared term's, whose input cotangent is ``shared``):
        one scatter of the weighted cotangents, shaped like ``table``."""
        weighted = jnp.tensordot(weights.astype(jnp.float32), self.cotangents.astype(jnp.float32), axes=1)
        return rl_losses.scatter_onto_rows(self.input_ids, weighted if shared is None else weighted + shared, table)


def kernel_pays_off(tokens: int, num_objectives: int, head_shape: tuple[int, int], input_tokens: int = 0) -> bool:
    """Whether the token kernel, N^2 (D + V) multiply-adds, costs fewer than the n head gradients, n N D V (their
    Gram's n^2 D V / 2 left out: a pass over memory rather than a matmul), for N tokens and a [D, V] head.

    A tied head's input part over M ``input_tokens`` adds n M D (N + M) (:func:`mojax.rl.losses.tied_head_gram`)."""
    hidden, vocab = head_shape
    n = num_objectives
    kernel = tokens * tokens * (hidden + vocab) + n * input_tokens * hidden * (tokens + input_tokens)
    return kernel < n * tokens * hidden * vocab


def gram_rows(gram: jax.Array) -> jax.Array:
    """Rows R f32[n, n] with R R^T = G for a PSD Gram G: R = U sqrt(max(lambda, 0)) from G's eigendecomposition, so
    n coordinates per objective stand in for a gradient in any Gram (its rounding's negative eigenvalues clipped)."""
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram.astype(jnp.float32))
    return eigenvectors * jnp.sqrt(jnp.maximum(eigenvalues, 0.0))[None, :]


def first_of(micro_batches: Any) -> Any:
    """The first micro-batch of ``micro_batches`` (every leaf [parts, ...])."""
    return jax.tree.map(lambda x: x[0], micro_batches)


def fill_masked(tree: Any, filler: Any) -> Any:
    """``tree`` with ``filler``'s leaf in place of every ``optax.MaskedNode()`` (two trees of one structure whose
    leaves are masked in complementary places; a node masked in both stays masked)."""
    return jax.tree.map(lambda a, b: b if is_masked(a) else a, tree, filler, is_leaf=is_masked)


def add_unmasked(tree: Any, other: Any) -> Any:
    """``tree`` + ``other`` leaf by leaf, where ``other``'s ``optax.MaskedNode()`` leaves add nothing."""
    return jax.tree.map(lambda a, b: a if is_masked(b) else a + b, tree, other, is_leaf=is_masked)


def split_input_cotangents(pullbacks: Any) -> tuple[Any, jax.Array | None]:
    """(the parameters' gradients, the layers' input cotangents [n, ...] or None) of n pullbacks that each returned
    ``(gradients, *input cotangent)`` (:class:`HeadKernel`), as separate trees or stacked."""
    if isinstance(pullbacks, ObjectiveTrees):
        grads = ObjectiveTrees(tuple(both[0] for both in pullbacks.trees))
        inputs = [both[1] for both in pullbacks.trees if len(both) > 1]
        return grads, jnp.stack(inputs) if inputs else None
    return pullbacks[0], pullbacks[1] if len(pullbacks) > 1 else None


def with_rows(grads: Any, rows: jax.Array) -> Any:
    """The per-objective gradients with each objective's rows[i] as one more leaf: ``(stacked, rows)`` for stacked
    gradients, each tree paired with its row for :class:`mojax.combiners.ObjectiveTrees`."""
    if isinstance(grads, ObjectiveTrees):
        return ObjectiveTrees(tuple((tree, rows[i]) for i, tree in enumerate(grads.trees)))
    return grads, rows


def make_train_step(
    policy: PolicyFn,
    combiner: optax.GradientTransformationExtraArgs,
    optimizer: optax.GradientTransformation,
    spec: UpdateSpec,
    probe_flags: list[bool] | None = None,
    critic: CriticFn | None = None,
    critic_optimizer: optax.GradientTransformation | None = None,
    param_shardings: Any | None = None,
    trainable_flags: list[bool] | None = None,
    skip_by_conditional: bool | None = None,
    head_kernel: HeadKernel | None = None,
) -> Callable[[TrainState, Batch, jax.Array, jax.Array, jax.Array | None], tuple[TrainState, dict[str, jax.Array]]]:
    """The (unjitted) train step ``(state, batch, key, beta, weights) -> (state, metrics)`` for one rollout.

    In scalar mode ``weights`` are the combination weights f32[n] from :func:`make_scalar_weights` and
    ``state.combiner_state`` is None (the step never reads it, so it does not depend on the combiner); in probe and
    full modes ``weights`` is None and the combiner runs inside the step on ``state.combiner_state``.

    Args:
      policy: the policy's response log-probs and entropies, see :data:`PolicyFn`.
      combiner: a mojax combiner for n objectives.
      optimizer: the optax optimizer (schedule, AdamW) applied to the combined gradient after the clip to
        ``spec.max_grad_norm``.
      spec: the static settings.
      probe_flags: one bool per parameter leaf (probe mode only): True for the probe set.
      critic: the vector critic's values (gae), trained in the same step with ``critic_optimizer`` on the clipped
        value loss (PPO's; Schulman et al. 2017, arXiv 1707.06347).
      critic_optimizer: the critic's optimizer.
      param_shardings: the NamedSharding of every leaf of ``state.params`` when they live on a mesh (None
        otherwise): sequential pullbacks keep the per-objective gradients sharded like them
        (:func:`stacked_pullbacks`).
      trainable_flags: one bool per parameter leaf, False for frozen weights (LoRA's base model). Their gradients
        are dropped right after each pullback (``optax.MaskedNode``), so no norm, check or combiner reads them and
        XLA never computes them (no weight-gradient products of the frozen projections, head and embedding); the
        optimizer, which freezes them, gets zeros.
      skip_by_conditional: how a non-finite update is skipped (:func:`step_if_finite`): under a ``lax.cond`` (True)
        or by a select of the stepped state against the old one (False). None: :func:`skips_by_conditional`.
      head_kernel: probe and full mode with one micro-batch: the untied head's share of the combiner's Gram from its
        token kernel (:class:`HeadKernel`), where it pays off or always as it says; None: the head's n gradients, as
        every other leaf's.

    Returns:
      The step; jit it with ``donate_argnums=0``. Metrics are means over the optimizer updates of the step
      (weights and cosines: of the last update).
    """
    n = spec.num_objectives
    eye = jnp.eye(n + 1, dtype=jnp.float32)
    if skip_by_conditional is None:
        skip_by_conditional = skips_by_conditional(spec)

    def trained(tree):
        """``tree`` without the frozen leaves (MaskedNode in their place)."""
        return tree if trainable_flags is None else masked_nodes(tree, trainable_flags)

    def vector_loss(params, micro, divide, beta):
        return minibatch_losses(policy, params, micro, divide, beta, spec)

    def weighted(weights):
        """The cotangent of the loss vector for sum_i w_i L_i + shared."""
        return jnp.concatenate([weights, jnp.ones((1,), jnp.float32)])

    def scalar_grads(params, micro_batches, divide, beta, weights):
        def grads_of(micro):
            vector, pullback, metrics = jax.vjp(lambda p: vector_loss(p, micro, divide, beta), params, has_aux=True)
            (grads,) = pullback(weighted(weights))
            return trained(grads), vector, metrics

        return _accumulate(grads_of, micro_batches)

    def objective_grads(pullback, keep):
        """The n objectives' gradients from one forward's ``pullback``, ``keep`` dropping leaves from each: in
        sequence without a mesh n separate trees (:func:`mojax.combiners.grads.separate_pullbacks`), else stacked
        f[n, ...] (:func:`stacked_pullbacks`)."""
        if spec.sequential_pullbacks and param_shardings is None:
            return separate_pullbacks(pullback, eye[:n], keep)
        return keep(stacked_pullbacks(pullback, eye[:n], spec.sequential_pullbacks, param_shardings))

    def per_objective(params, micro_batches, divide, beta):
        """(gradients of L_1..L_n (:func:`objective_grads`), gradient of the shared term or None), summed over
        micro-batches.

        The shared term's pullback is the (n + 1)-th backward pass; it is left out (None) when the term is zero in
        every update (:func:`shared_term_is_zero`).
        """
        skip_shared = shared_term_is_zero(spec)

        def grads_of(micro):
            vector, pullback, metrics = jax.vjp(lambda p: vector_loss(p, micro, divide, beta), params, has_aux=True)
            shared = None if skip_shared else trained(pullback(eye[n])[0])
            return (objective_grads(pullback, trained), shared), vector, metrics

        return _accumulate(grads_of, micro_batches)

    def combine_full(params, micro_batches, divide, beta, combiner_state, batch):
        """The combined gradient and, without a shared term, its norm and finiteness from the Gram (XLA merges this
        Gram with the combiner's: every combiner returns sum_i w_i g_i with w its state's ``weights``)."""
        if takes_kernel(params, micro_batches):
            return combine_full_with_kernel(params, micro_batches, divide, beta, combiner_state, batch)
        (objectives, shared), vector, metrics = per_objective(params, micro_batches, divide, beta)
        extras = combiner_extras(batch, vector[:n], combiner_state.weights, spec)
        _, combiner_state = combiner.update(objectives, combiner_state, trained(params), **extras)
        return full_mode_result(objectives, shared, vector, metrics, combiner_state)

    def full_mode_result(objectives, shared, vector, metrics, combiner_state, finish=lambda tree: tree):
        """combine_full's outputs from the per-objective gradients and the shared term's gradient (None: zero, so
        the norm and finiteness come from the Gram); ``finish`` maps the combination to the step's gradient.

        The combination sum_i w_i g_i (:func:`mojax.combiners.combine`, as the combiner computes it; the combiner's
        own is left unused, and XLA drops it) is returned as a function, which the optimizer step calls inside its
        conditional (:func:`step_if_finite`): without a shared term nothing reads it before, and up to
        :data:`MAX_OBJECTIVES_FUSED_INTO_THE_STEP` objectives AdamW's moment updates read the n gradients in its
        place, so the combined gradient is never written out (:func:`combination_for_the_step`).
        """
        gram, scale = tree_gram(objectives)
        cosines, _ = cosine_gram(gram)
        combined = combination_for_the_step(combiner_state.weights, objectives, finish)
        if shared is not None:
            summed = add_unmasked(combined(), shared)
            return lambda: summed, vector, metrics, combiner_state, cosines, None
        checked = norm_from_gram(gram, scale, combiner_state.weights)
        return combined, vector, metrics, combiner_state, cosines, checked

    def combine_full_with_kernel(params, micro_batches, divide, beta, combiner_state, batch):
        """:func:`combine_full` with the head's share of the Gram from its token kernel (:class:`HeadKernel`): the n
        pullbacks leave the head out, and one pullback of the weighted cotangent gives the head's combined gradient
        (with the shared term's), which only the head's weight-gradient product computes; a tied head adds the
        scatter of the weighted input cotangents (:class:`TiedInputs`)."""
        flags = trainable_flags or [True] * len(head_kernel.flags)
        (objectives, vector, metrics), pullback, tied = with_head_kernel(
            params, first_of(micro_batches), divide, beta, flags
        )
        extras = combiner_extras(batch, vector[:n], combiner_state.weights, spec)
        _, combiner_state = combiner.update(objectives, combiner_state, None, **extras)
        head = masked_nodes(pullback(weighted(combiner_state.weights))[0], head_kernel.flags)
        shared_pullback = None if shared_term_is_zero(spec) else pullback(eye[n])
        shared = None if shared_pullback is None else masked_nodes(shared_pullback[0], without_head(flags))
        if tied is not None:
            shared_input = None if shared_pullback is None else token_rows(shared_pullback[1])
            head = jax.tree.map(lambda leaf: leaf + tied.combined(combiner_state.weights, leaf, shared_input), head)
        finish = lambda pair: fill_masked(pair[0], head)  # noqa: E731
        return full_mode_result(objectives, shared, vector, metrics, combiner_state, finish)

    def without_head(flags):
        """``flags`` with the head's leaf False."""
        return [flag and not head for flag, head in zip(flags, head_kernel.flags, strict=True)]

    def takes_kernel(params, micro_batches):
        """Whether the update takes the head's share of the Gram from its token kernel: one micro-batch, and the
        kernel always or where it takes fewer multiply-adds (:func:`kernel_pays_off`)."""
        if head_kernel is None or spec.num_microbatches > 1:
            return False
        if head_kernel.always:
            return True
        (head,) = [leaf for leaf, flag in zip(jax.tree.leaves(params), head_kernel.flags, strict=True) if flag]
        tokens = micro_batches.tokens[0]
        if head_kernel.input_embeddings is None:
            return kernel_pays_off(tokens.size, n, head.shape)
        inputs = tokens.size + micro_batches.prompt_ids[0].size  # the tied table [V, D]: the layers' input tokens
        return kernel_pays_off(tokens.size, n, head.shape[::-1], inputs)

    def with_head_kernel(params, micro, divide, beta, flags):
        """((per-objective gradients of the leaves ``flags`` selects, the head left out, with the head's share of
        the Gram as n rows (:func:`gram_rows` of C K C^T, see :class:`HeadKernel`), the loss vector, metrics), the
        forward's pullback, :class:`TiedInputs` for a tied head or None).

        A tied head's forward takes the layers' input as a second argument, so the pullbacks return its cotangent
        after the parameters' gradients; its Gram share is :func:`mojax.rl.losses.tied_head_gram`."""
        embed = head_kernel.input_embeddings
        inputs = () if embed is None else (jax.lax.stop_gradient(embed(params, micro.prompt_ids, micro.tokens)),)

        def loss_and_kernel(p, *layer_input):
            (logp, entropy), kernel = head_kernel.policy(
                p, micro.prompt_ids, micro.prompt_mask, micro.tokens, micro.mask, *layer_input
            )
            vector, metrics = losses_of_outputs(logp, entropy, micro, divide, beta, spec)
            return vector, (metrics, logp, entropy, kernel)

        vector, pullback, (metrics, logp, entropy, kernel) = jax.vjp(loss_and_kernel, params, *inputs, has_aux=True)
        keep = lambda both: (masked_nodes(both[0], without_head(flags)), *both[1:])  # noqa: E731
        objectives, input_cotangents = split_input_cotangents(objective_grads(lambda c: (pullback(c),), keep))
        _, logp_pullback = jax.vjp(lambda lp: losses_of_outputs(lp, entropy, micro, divide, beta, spec)[0], logp)
        cotangents = jnp.stack([logp_pullback(row)[0].reshape(-1) for row in eye[:n]])
        if embed is None:
            head_gram, tied = rl_losses.kernel_gram(kernel, cotangents), None
        else:
            tied = TiedInputs(input_cotangents.reshape(n, -1, input_cotangents.shape[-1]), kernel.input_ids)
            head_gram = rl_losses.tied_head_gram(kernel, cotangents, tied.cotangents)
        return (with_rows(objectives, gram_rows(head_gram)), vector, metrics), pullback, tied

    def combine_probe(params, micro_batches, divide, beta, combiner_state, batch):
        """Probe gradients -> combiner weights -> one weighted backward pass over every parameter.

        With one micro-batch the probe pullbacks and the weighted one share a single forward pass (one ``jax.vjp``);
        with several, the weights need every micro-batch's probe gradients first, so the weighted pass runs the
        forward again (:func:`scalar_grads`) rather than keeping every micro-batch's activations.
        """

        def probe_of(micro):
            vector, pullback, metrics = jax.vjp(lambda p: vector_loss(p, micro, divide, beta), params, has_aux=True)
            probe = objective_grads(pullback, lambda grads: masked_nodes(grads, probe_flags))
            return (probe, vector, metrics), pullback

        def weights_of(probe, vector):
            extras = combiner_extras(batch, vector[:n], combiner_state.weights, spec)
            _, new_state = combiner.update(probe, combiner_state, None, **extras)
            return jax.lax.stop_gradient(new_state.weights), new_state

        if spec.num_microbatches == 1:
            first = first_of(micro_batches)
            kernel = takes_kernel(params, micro_batches)
            probe_and_forward = (
                with_head_kernel(params, first, divide, beta, probe_flags) if kernel else probe_of(first)
            )
            (probe, vector, metrics), pullback, *_ = probe_and_forward
            weights, new_state = weights_of(probe, vector)
            grads = trained(pullback(weighted(weights))[0])
        else:
            probe, vector, metrics = _accumulate(lambda micro: probe_of(micro)[0], micro_batches)
            weights, new_state = weights_of(probe, vector)
            grads, _, _ = scalar_grads(params, micro_batches, divide, beta, weights)
        return lambda: grads, vector, metrics, new_state, objective_cosines(probe), None

    def minibatch_update(carry, minibatch, beta, scalar_w):
        state: TrainState = carry
        divide = denominators(minibatch.mask, spec)
        micro_batches = _split(minibatch, spec.num_microbatches)
        if spec.mode == "scalar":
            grads, vector, metrics = scalar_grads(state.params, micro_batches, divide, beta, scalar_w)
            gradient = lambda: grads  # noqa: E731
            combiner_state, weights, checked = state.combiner_state, scalar_w, None
            cosines = jnp.full((n, n), jnp.nan, jnp.float32)
        else:
            combine_mode = combine_full if spec.mode == "full" else combine_probe
            gradient, vector, metrics, combiner_state, cosines, checked = combine_mode(
                state.params, micro_batches, divide, beta, state.combiner_state, minibatch
            )
            weights = combiner_state.weights
        if checked is None:
            grads = gradient()
            checked = (optax.tree.norm(grads), all_finite(grads))
        grad_norm, grads_finite = checked
        value_loss, critic_grads = (0.0, ()) if critic is None else critic_gradients(critic, state, minibatch, spec)
        finite = all_finite(vector, weights, critic_grads) & grads_finite
        params, opt_state = step_if_finite(
            finite,
            optimizer,
            lambda: zeros_where_masked(clip_to_norm(gradient(), grad_norm, spec.max_grad_norm), state.params),
            state.opt_state,
            state.params,
            branch=skip_by_conditional,
        )
        critic_params, critic_opt_state = state.critic_params, state.critic_opt_state
        if critic is not None:
            critic_params, critic_opt_state = step_if_finite(
                finite, critic_optimizer, lambda: critic_grads, critic_opt_state, critic_params
            )
        skipped = (~finite).astype(jnp.int32)
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            combiner_state=keep_if(finite, combiner_state, state.combiner_state),
            consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
            skipped_updates=state.skipped_updates + skipped,
            critic_params=critic_params,
            critic_opt_state=critic_opt_state,
        )
        metrics = {
            **metrics,
            "loss": jnp.dot(weights, vector[:n]) + vector[n],
            "objective_losses": vector[:n],
            "grad_norm": grad_norm,
            "weights": weights,
            "cosines": cosines,
            "value_loss": jnp.asarray(value_loss, jnp.float32),
        }
        return new_state, metrics

    def train_step(state: TrainState, batch: Batch, key: jax.Array, beta: jax.Array, weights: jax.Array | None):
        scalar_w = jnp.zeros((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        size = batch.tokens.shape[0]
        skipped_before = state.skipped_updates

        def epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, size) if spec.num_minibatches > 1 else jnp.arange(size)
            minibatches = _split(jax.tree.map(lambda x: x[order], batch), spec.num_minibatches)
            return jax.lax.scan(lambda c, mb: minibatch_update(c, mb, beta, scalar_w), carry, minibatches)

        state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, spec.num_iterations))
        last = lambda x: x.reshape((-1,) + x.shape[2:])[-1]
        mean = lambda x: jnp.mean(x.reshape((-1,) + x.shape[2:]), axis=0)
        summary = {
            key: (last(value) if key in ("weights", "cosines") else mean(value)) for key, value in metrics.items()
        }
        summary["skipped"] = state.skipped_updates - skipped_before
        return state, summary

    return train_step
