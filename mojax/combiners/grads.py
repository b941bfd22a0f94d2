"""Per-objective gradients from one shared forward pass, and the probe mode of the trainer.

``per_objective_grads``: for ``loss_fn(params, *args) -> f32[n]`` run ``jax.vjp`` once (one
forward) and pull back the n unit cotangents ``eye(n)``, vmapped or in sequence: row i is grad L_i. With a
``probe_mask`` only the probe parameters are differentiated; the others are closed over as
constants, so no backward work or residual memory is spent on them.

``probe_combined_grads`` (the trainer's probe mode: GAPO's last-layer trick generalised, arXiv
2507.01915): the per-objective gradients of the probe parameters go through a combiner, whose
state gives the loss weights w; then grad sum_i stop_gradient(w_i) L_i over all parameters is
one backward pass that reuses the same forward. Under ``jax.jit`` XLA prunes the non-probe part
of the n per-objective pullbacks, so they cost n backward passes through the probe only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mojax.combiners._base import ObjectiveTrees

ProbeMask = Any  # a bool pytree shaped like (a prefix of) params, or a callable params -> such a pytree


def _probe_flags(probe_mask: ProbeMask, params: Any) -> list[bool]:
    """One static bool per leaf of params from an optax-style mask (pytree prefix or callable)."""
    mask = probe_mask(params) if callable(probe_mask) else probe_mask
    try:
        full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), mask, params)
    except ValueError as err:
        raise ValueError(f"probe_mask: its structure must match params (or a prefix of it): {err}") from err
    flags = jax.tree.leaves(full)
    if not all(isinstance(flag, (bool, np.bool_)) for flag in flags):
        raise ValueError(
            "probe_mask: every leaf must be a static Python bool (True = probe parameter), as in optax.masked."
        )
    if not any(flags):
        raise ValueError("probe_mask: it selects no parameter; expected at least one True leaf.")
    return [bool(flag) for flag in flags]


def _check_losses(losses: jax.Array) -> int:
    """n for a loss vector f32[n]; ValueError otherwise."""
    if jnp.ndim(losses) != 1:
        raise ValueError(
            "loss_fn must return a vector of n per-objective losses (or (losses, aux) with has_aux=True); "
            f"got shape {jnp.shape(losses)}."
        )
    return jnp.shape(losses)[0]


def _masked_like(treedef: Any, values: list, flags: list[bool]) -> Any:
    """The params structure holding values[k] at probe leaves and optax.MaskedNode() elsewhere."""
    return jax.tree.unflatten(
        treedef, [value if flag else optax.MaskedNode() for value, flag in zip(values, flags, strict=False)]
    )


def _vjp(fn: Callable, primal: Any, has_aux: bool) -> tuple[jax.Array, Callable, Any]:
    """(losses, pullback, aux or None) from one forward pass of fn at primal."""
    out = jax.vjp(fn, primal, has_aux=has_aux)
    return out[0], out[1], (out[2] if has_aux else None)


def _reported(losses: jax.Array, aux: Any, has_aux: bool) -> Any:
    """losses, or (losses, aux) with has_aux, as jax.value_and_grad reports its value."""
    return (losses, aux) if has_aux else losses


def stacked_pullbacks(
    pullback: Callable, cotangents: jax.Array, sequential: bool, param_shardings: Any | None = None
) -> Any:
    """The pullbacks of the rows of ``cotangents`` [n, m], stacked on a leading axis of every leaf.

    Batched (vmap) runs one backward pass on n-times wider operands; sequential (lax.map) runs n passes in a loop,
    holding one pass's activation gradients at a time and writing each result straight into its objective-major
    slot (vmap through the layer scan leaves the objective axis second, so later whole-leaf consumers transpose).
    On XLA:CPU, jit a program with batched pullbacks with :func:`mojax.xla_cpu.batched_pullback_options`: with the
    default fusions they can come out wrong.

    On a mesh (``param_shardings``: the parameters' NamedShardings) each sequential pass's gradient is constrained
    to its parameters' sharding. The per-objective gradients feed only reductions (the Gram, the cosines), so
    nothing else tells the partitioner their layout, and under FSDP it all-reduces every leaf whole onto each
    device: n full copies of the probed LM head and final block. Constrained, each is cut to its shard as the
    parameters' own gradient is (LLaMA-70B probe mode on 256 devices: 87 -> 43 GiB per device). The batched
    passes are left unconstrained: there the same constraint makes XLA gather the cotangents of every token
    instead (87 -> 217 GiB).

    One row (n = 1) runs one plain pullback either way: a vmap of size one made XLA:CPU lay the weight gradients'
    operands out with transposing copies (benchmarks/RESULTS.md, "The DPO step: each pair's entanglement pullbacks
    over that pair alone").
    """
    if cotangents.shape[0] == 1:
        return jax.tree.map(lambda g: g[None], _sharded_like(pullback(cotangents[0])[0], param_shardings))
    if sequential:
        return jax.lax.map(lambda cotangent: _sharded_like(pullback(cotangent)[0], param_shardings), cotangents)
    return jax.vmap(pullback)(cotangents)[0]


def separate_pullbacks(pullback: Callable, cotangents: jax.Array, each: Callable[[Any], Any] = lambda g: g) -> Any:
    """The pullbacks of the rows of ``cotangents`` [n, m] as n separate gradient trees (:class:`ObjectiveTrees`),
    ``each`` applied to every tree (e.g. dropping frozen leaves).

    n backward passes one after another in the program, each leaving its own tree, which the combiners read as it
    lies. :func:`stacked_pullbacks`' loop (``lax.map``) instead zero-fills every [n, ...] stacked leaf and copies
    each pass's gradients into its slot: separate trees took full mode's update 12-14% less time on the 56M
    configuration at n = 3 and 27-28% less at n = 8, with a quarter to a half less memory for its temporaries
    (benchmarks/RESULTS.md, "Full mode without stacked gradients"). For one device: on a mesh the stacked loop
    constrains each pass to the parameters' sharding, and the Gram of separate trees with sharded leaves would stack
    them into a copy.
    """
    return ObjectiveTrees(tuple(each(pullback(cotangent)[0]) for cotangent in cotangents))


def _sharded_like(grads: Any, param_shardings: Any | None) -> Any:
    """``grads`` constrained to ``param_shardings`` leaf by leaf (unchanged when that is None)."""
    if param_shardings is None:
        return grads
    return jax.tree.map(jax.lax.with_sharding_constraint, grads, param_shardings)


def _stacked_pullback(pullback: Callable, losses: jax.Array, sequential: bool) -> Any:
    """(grad L_1, ..., grad L_n) stacked on a leading axis: the pullbacks of the rows of eye(n)
    (:func:`stacked_pullbacks`)."""
    n = _check_losses(losses)
    return stacked_pullbacks(pullback, jnp.eye(n, dtype=losses.dtype), sequential)


def per_objective_grads(
    loss_fn: Callable,
    params: Any,
    *args: Any,
    probe_mask: ProbeMask | None = None,
    has_aux: bool = False,
    sequential: bool = False,
) -> tuple[Any, Any]:
    """(losses, stacked grads) with grads[i] = d L_i / d params from one forward (jax.vjp) and n pullbacks.

    Args:
      loss_fn: ``loss_fn(params, *args) -> f32[n]`` (or ``(f32[n], aux)`` with ``has_aux``): the n objective losses.
      params: the parameter pytree.
      *args: passed to ``loss_fn`` after ``params``.
      probe_mask: optional optax-style mask (a pytree prefix of bools, or a callable on ``params``): only the probe
        leaves are differentiated; the others are closed over as constants.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      sequential: run the n pullbacks one after another (``lax.map``: one pass's activation gradients at a time)
        instead of one pullback vmapped over the n unit cotangents (one pass on n-times wider operands).

    Returns:
      ``(losses, grads)``, or ``((losses, aux), grads)`` with ``has_aux``, like ``jax.value_and_grad``. ``grads`` has
      the structure of ``params`` and every leaf a leading objective axis of size n. With ``probe_mask`` the non-probe
      leaves are ``optax.MaskedNode()`` (as ``optax.masked`` does), so a combiner sees the probe gradients only.

    On XLA:CPU, jit a caller of the vmapped pullback with ``compiler_options=mojax.xla_cpu.batched_pullback_options()``
    as mojax's trainers do, or pass ``sequential=True``: with jaxlib 0.10's default YNNPACK reduction fusions a
    vmapped pullback can come out wrong, one pullback at a time does not (:mod:`mojax.xla_cpu`).

    References:
      C. Li, H. Zhang, Y. Xu, H. Xue, X. Ao, Q. He. Gradient-Adaptive Policy Optimization: Towards Multi-Objective
      Alignment of Large Language Models. ACL 2025, arXiv 2507.01915 (per-objective gradients of a layer subset).

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import per_objective_grads
      >>> loss_fn = lambda p: jnp.stack([p["w"][0] ** 2, 3.0 * p["w"][1]])  # L_1 = w_1^2, L_2 = 3 w_2
      >>> losses, grads = per_objective_grads(loss_fn, {"w": jnp.asarray([1.0, 2.0])})
      >>> [round(float(x), 3) for x in losses], grads["w"].tolist()
      ([1.0, 6.0], [[2.0, 0.0], [0.0, 3.0]])
    """
    if probe_mask is None:
        losses, pullback, aux = _vjp(lambda p: loss_fn(p, *args), params, has_aux)
        return _reported(losses, aux, has_aux), _stacked_pullback(pullback, losses, sequential)
    leaves, treedef = jax.tree.flatten(params)
    flags = _probe_flags(probe_mask, params)

    def loss_of_probe(probe_leaves):
        supply = iter(probe_leaves)
        merged = [next(supply) if flag else leaf for leaf, flag in zip(leaves, flags, strict=False)]
        return loss_fn(jax.tree.unflatten(treedef, merged), *args)

    probe_leaves = [leaf for leaf, flag in zip(leaves, flags, strict=False) if flag]
    losses, pullback, aux = _vjp(loss_of_probe, probe_leaves, has_aux)
    supply = iter(_stacked_pullback(pullback, losses, sequential))
    grads = _masked_like(treedef, [next(supply) if flag else None for flag in flags], flags)
    return _reported(losses, aux, has_aux), grads


def probe_combined_grads(
    loss_fn: Callable,
    params: Any,
    combiner: optax.GradientTransformationExtraArgs,
    combiner_state: Any,
    *args: Any,
    probe_mask: ProbeMask,
    has_aux: bool = False,
    sequential: bool = False,
    **extra_args: Any,
) -> tuple[Any, Any, Any]:
    """(grad_params sum_i sg(w_i) L_i, new combiner state, losses), w = combiner weights of the probe gradients.

    One forward (``jax.vjp`` over all parameters); the n per-objective gradients of the probe parameters (structure as
    in :func:`per_objective_grads`) go through
    ``combiner.update(probe_grads, combiner_state, probe_params, losses=losses, **extra_args)``; its new state's
    ``weights`` f32[n], held constant, are the cotangent of one full backward pass. Under ``jax.jit`` the non-probe
    part of the n per-objective pullbacks is pruned, so they cost n backward passes through the probe only.

    Args:
      loss_fn: ``loss_fn(params, *args) -> f32[n]`` (or ``(f32[n], aux)`` with ``has_aux``).
      params: the parameter pytree.
      combiner: a mojax combiner (its state has ``weights``), not an optax chain.
      combiner_state: the combiner's state.
      *args: passed to ``loss_fn`` after ``params``.
      probe_mask: which leaves the combiner sees (an optax-style mask), e.g. the LM head.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      sequential: the probe's n pullbacks one after another, as in :func:`per_objective_grads`.
      **extra_args: passed to ``combiner.update`` (``losses`` is always passed).

    Returns:
      ``(grads, new_state, losses)``: the gradient of sum_i w_i L_i for every parameter (apply the optimizer to it),
      the combiner's new state, and ``losses`` (``(losses, aux)`` with ``has_aux``).

    References:
      C. Li, H. Zhang, Y. Xu, H. Xue, X. Ao, Q. He. Gradient-Adaptive Policy Optimization: Towards Multi-Objective
      Alignment of Large Language Models. ACL 2025, arXiv 2507.01915 (the last-layer variant, generalised here to any
      Gram combiner and probe subset).

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import mgda, probe_combined_grads
      >>> loss_fn = lambda p: jnp.stack([p["w"][0], 2.0 * p["w"][1]])  # g_1 = (1, 0), g_2 = (0, 2)
      >>> params, tx = {"w": jnp.asarray([1.0, 1.0])}, mgda(num_objectives=2)
      >>> grads, state, losses = probe_combined_grads(loss_fn, params, tx, tx.init(params), probe_mask={"w": True})
      >>> [round(float(x), 3) for x in state.weights], [round(float(x), 3) for x in grads["w"]]
      ([0.8, 0.2], [0.8, 0.4])
    """
    leaves, treedef = jax.tree.flatten(params)
    flags = _probe_flags(probe_mask, params)
    losses, pullback, aux = _vjp(lambda p: loss_fn(p, *args), params, has_aux)
    probe_grads = _masked_like(treedef, jax.tree.leaves(_stacked_pullback(pullback, losses, sequential)), flags)
    probe_params = _masked_like(treedef, leaves, flags)
    _, new_state = combiner.update(probe_grads, combiner_state, probe_params, **{"losses": losses, **extra_args})
    weights = getattr(new_state, "weights", None)
    if weights is None or jnp.shape(weights) != jnp.shape(losses):
        raise ValueError(
            f"probe_combined_grads: the combiner's state must have a field `weights` of shape {jnp.shape(losses)} "
            f"(a mojax combiner, not an optax chain); got {type(new_state).__name__}."
        )
    (grads,) = pullback(jax.lax.stop_gradient(weights).astype(losses.dtype))
    return grads, new_state, _reported(losses, aux, has_aux)
