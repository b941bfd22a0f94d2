"""The combiner contract: per-objective updates -> n weights -> one update.

The n updates come stacked (every leaf with a leading objective axis of size n) or as :class:`ObjectiveTrees`, n
separate pytrees of one structure, the form n separate pullbacks leave them in; both give the same weights and update.

Every combiner in mojax is built by :func:`weighted_combiner` from a *weighting*

    weighting(gram, gram_scale, state, **extra_args) -> (weights f32[n], new_state)

where ``gram`` is the n x n Gram matrix of the per-objective updates (or ``None`` for
weightings that only read per-sample statistics) expressed in units of ``gram_scale**2``:
the true Gram is ``gram_scale**2 * gram``. ``gram_scale`` (f32[]) is passed explicitly, never
through the user's extra arguments; it is 1.0 except when the raw fp32 Gram would overflow or
underflow (gradient norms near 1e30 or 1e-30), and scale-invariant weightings ignore it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mojax import _checks as checks

# Below this trace (in fp32 units) the raw Gram would have lost its digits to underflow.
_TINY_TRACE = 1e-30


class Weighting(Protocol):
    """(gram f32[n, n] | None, gram_scale f32[], state, **extra_args) -> (weights f32[n], state)."""

    def __call__(
        self, gram: jax.Array | None, gram_scale: jax.Array, state: Any, **extra_args: Any
    ) -> tuple[jax.Array, Any]: ...


class WeightsState(NamedTuple):
    """State of a stateless combiner: the weights of its latest update."""

    weights: jax.Array


class ObjectiveTrees(NamedTuple):
    """n per-objective updates as n separate pytrees of one structure (objective i's update is ``trees[i]``).

    The form in which n separate backward passes leave their gradients: every combiner takes it where it takes
    stacked updates and returns the same update, computed from the n trees as they lie, so no [n, ...] copy of the
    gradients is ever written. A pytree itself (its leaves are the n trees' leaves), so ``jax.tree.map`` adds two of
    them objective by objective.
    """

    trees: tuple[Any, ...]


def _tree_objective_count(updates: ObjectiveTrees, name: str) -> int:
    """n of :class:`ObjectiveTrees`; ValueError unless its n >= 1 trees share one structure with array leaves."""
    trees = tuple(updates.trees)
    if not trees:
        raise ValueError(f"{name}: `updates` holds no trees; expected ObjectiveTrees of n >= 1 per-objective pytrees.")
    structure = jax.tree.structure(trees[0])
    for i, tree in enumerate(trees[1:], start=1):
        if jax.tree.structure(tree) != structure:
            raise ValueError(
                f"{name}: the per-objective trees of `updates` differ in structure: tree {i} is "
                f"{jax.tree.structure(tree)}, tree 0 is {structure}; all n must match."
            )
    if not jax.tree.leaves(trees[0]):
        raise ValueError(f"{name}: the per-objective trees of `updates` have no array leaves.")
    return len(trees)


def objective_count(updates: Any, name: str, expected: int | None = None) -> int:
    """n: the length of :class:`ObjectiveTrees`, or the size of the leading objective axis shared by every leaf of
    stacked updates; ValueError naming the leaf (or tree) otherwise."""
    if isinstance(updates, ObjectiveTrees):
        n = _tree_objective_count(updates, name)
        if expected is not None and n != expected:
            raise ValueError(
                f"{name}: `updates` holds {n} objectives' trees, but the combiner was built for {expected}."
            )
        return n
    leaves = jax.tree_util.tree_leaves_with_path(updates)
    if not leaves:
        raise ValueError(
            f"{name}: `updates` has no array leaves; expected a pytree whose leaves carry a leading objective axis."
        )
    sizes: dict[int, str] = {}
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path) or "<root>"
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"{name}: leaf {where} is a scalar; every leaf of `updates` needs a leading objective axis of size n."
            )
        sizes.setdefault(jnp.shape(leaf)[0], where)
    if len(sizes) > 1:
        seen = ", ".join(f"{size} (e.g. leaf {where})" for size, where in sizes.items())
        raise ValueError(
            f"{name}: leaves of `updates` disagree on the leading objective axis: sizes {seen}; all must be equal."
        )
    (n,) = sizes
    if expected is not None and n != expected:
        raise ValueError(
            f"{name}: `updates` has {n} objectives on its leading axis, but the combiner was built for {expected}."
        )
    return n


def require_num_objectives(
    name: str, num_objectives: int | None, *implied_by: tuple[str, Sequence[float] | jax.Array | None]
) -> int:
    """n from `num_objectives` or from the length of a vector argument; ValueError if absent or inconsistent."""
    candidates = {label: len(np.atleast_1d(np.asarray(v))) for label, v in implied_by if v is not None}
    if num_objectives is not None:
        candidates["num_objectives"] = checks.integer(name, "num_objectives", num_objectives, minimum=1)
    if not candidates:
        raise ValueError(
            checks.message(
                name, "num_objectives", "is missing", "num_objectives=n, the size of the leading objective axis"
            )
        )
    if len(set(candidates.values())) > 1:
        raise ValueError(checks.message(name, "num_objectives", f"is inconsistent: {candidates}", "one value of n"))
    return next(iter(candidates.values()))


def as_vector(name: str, label: str, value: Sequence[float] | jax.Array | float, n: int) -> jax.Array:
    """f32[n] from a finite scalar (broadcast) or a finite length-n vector; TypeError or ValueError otherwise."""
    return jnp.asarray(checks.finite_vector(name, label, value, length=n), jnp.float32)


def require_extra_arg(name: str, extra_args: dict[str, Any], key: str, shape_doc: str) -> jax.Array:
    """The extra argument `key`; ValueError saying what the combiner needs if it is missing."""
    value = extra_args.get(key)
    if value is None:
        raise ValueError(
            f"{name}: update() needs the extra argument `{key}` ({shape_doc}); pass it as tx.update(grads, state, params, {key}=...)."
        )
    return jnp.asarray(value)


GRAM_CHUNK = 1 << 14
"""Columns per matmul of a flattened leaf's Gram: n rows of 2^14 fp32, 64 KiB each (512 KiB at n = 8)."""

GRAM_LOOP_FROM = 1 << 20
"""Columns from which a flattened leaf's Gram is a fused pass (:func:`_fused_gram`, up to GRAM_FUSED_MAX_OBJECTIVES
objectives) or a loop of GRAM_CHUNK matmuls (above). Below, one matmul is faster and compiles in a fraction of the
time: chunking every leaf made the Gram of `benchmarks/combiners.py`'s LLaMA-like pytree (1e7 parameters in ~200
leaves) several times slower, and a fused pass per leaf made a Gram combiner's first call on it (compilation)
about 25 s against 5-6 s with one matmul per leaf."""


def _pair_dot(block: jax.Array) -> jax.Array:
    """block @ block.T for block [n, k], accumulated in fp32."""
    return jax.lax.dot_general(block, block, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _chunked_gram(rows: jax.Array) -> jax.Array:
    """rows @ rows.T for rows [n, P], as a loop of [n, GRAM_CHUNK] matmuls plus one for the remainder.

    On XLA:CPU one [n, P] x [P, n] matmul over a 3 x 26.5M leaf (an MLP weight's stacked gradients) took 366 ms in
    isolation against the loop's 67 ms (705 ms against 164 ms at n = 8; benchmarks/RESULTS.md, full mode on
    SmolLM2), and inside the train step the single matmul was slower still.
    """
    n, size = rows.shape
    count = size // GRAM_CHUNK
    if count <= 1:
        return _pair_dot(rows)
    head = rows[:, : count * GRAM_CHUNK].reshape(n, count, GRAM_CHUNK)

    def add_chunk(index, total):
        return total + _pair_dot(jax.lax.dynamic_index_in_dim(head, index, axis=1, keepdims=False))

    total = jax.lax.fori_loop(0, count, add_chunk, jnp.zeros((n, n), jnp.float32))
    return total + _pair_dot(rows[:, count * GRAM_CHUNK :])


GRAM_FUSED_MAX_OBJECTIVES = 6
"""Up to this many objectives a flattened leaf's Gram is one fused pass (:func:`_fused_gram`). Above it the pass's
n (n + 1) / 2 running sums no longer fit the registers: at n = 8 it ran 1.2x the chunked matmuls' time (at n = 3 a
seventh of it, at n = 6 two thirds; [n, 10 x 576 x 1536] fp32, isolated measurements)."""

GRAM_ROW = 1 << 10
"""Columns summed per partial sum by :func:`_fused_gram` where a leaf's own trailing dimensions do not set them
(:func:`_row_blocks`): fp32 sums of at most GRAM_ROW products, then of P / GRAM_ROW partial sums, instead of one
running sum over all P (which lost 6% of a 26.5M-column Gram's diagonal)."""

GRAM_ROW_MAX = 2 * GRAM_ROW
"""The widest block :func:`_row_blocks` cuts at a leaf's own trailing dimensions (fp32 partial sums of at most this
many products)."""

GRAM_ROW_MIN = GRAM_ROW // 16
"""The narrowest block :func:`_row_blocks` cuts at a leaf's own trailing dimensions, unless it is the whole row."""


def _block_width(dims: tuple[int, ...]) -> int | None:
    """The product of the most trailing ``dims`` that stays within GRAM_ROW_MAX, when it is at least GRAM_ROW_MIN or
    all of ``dims``; else None."""
    width, used = 1, 0
    for size in reversed(dims):
        if width * size > GRAM_ROW_MAX:
            break
        width, used = width * size, used + 1
    return width if width >= GRAM_ROW_MIN or used == len(dims) else None


class _Leaf(NamedTuple):
    """One leaf's n per-objective arrays (``rows``), and the stacked [n, ...] array they are slices of, if any."""

    rows: list[jax.Array]
    stacked: jax.Array | None

    def whole(self) -> jax.Array:
        """The leaf as one [n, ...] array: the stacked one, or the rows stacked (a copy)."""
        return jnp.stack(self.rows) if self.stacked is None else self.stacked


def _objective_leaves(updates: Any) -> list[_Leaf]:
    """Every leaf of stacked updates or of :class:`ObjectiveTrees` as its n per-objective arrays."""
    if isinstance(updates, ObjectiveTrees):
        per_tree = [jax.tree.leaves(tree) for tree in updates.trees]
        return [_Leaf(list(rows), None) for rows in zip(*per_tree, strict=True)]
    return [_Leaf([leaf[i] for i in range(leaf.shape[0])], leaf) for leaf in jax.tree.leaves(updates)]


def _row_blocks(rows: Sequence[jax.Array]) -> list[list[jax.Array]]:
    """One leaf's n per-objective arrays as blocks of n arrays [k, c] for one reduction over c: c the product of the
    arrays' trailing dimensions (:func:`_block_width`), else their flat rows as whole rows of GRAM_ROW columns, then
    the remainder as one [1, P % GRAM_ROW] block (each only when not empty).

    Cutting at the leaf's own dimensions keeps every element's place a per-row offset plus its column. The flat cut
    of a layer-stacked leaf of the batched pullbacks (f32[3, 30, 1536, 576], in memory [30, 3, 1536, 576]) had
    XLA:CPU find each element by dividing its index by the trailing dimensions: the peak's pass over it took 25 ms
    against 7 ms cut at the 576 columns (isolated measurements; the Gram's pass 17 ms against 15 ms).
    """
    width = _block_width(rows[0].shape)
    if width is not None:
        return [[row.reshape(-1, width) for row in rows]]
    flat = [row.reshape(-1) for row in rows]
    size = flat[0].shape[0]
    whole = size - size % GRAM_ROW
    blocks = [[row[:whole].reshape(-1, GRAM_ROW) for row in flat]] if whole else []
    return blocks + ([[row[whole:].reshape(1, -1) for row in flat]] if whole < size else [])


def _pair_sums(block: Sequence[jax.Array]) -> jax.Array:
    """f32[n (n + 1) / 2]: sum over the block's rows and columns of g_i g_j for i <= j, the block n arrays [k, c].

    One variadic reduction over the columns computes every pair's products from one read of the block (XLA fuses
    the products, a dtype cast and any transpose of the input into it), then each pair's k partial sums are added.
    """
    n = len(block)
    rows = [part.astype(jnp.float32) for part in block]
    products = [rows[i] * rows[j] for i in range(n) for j in range(i, n)]
    partials = jax.lax.reduce(
        products,
        [jnp.float32(0)] * len(products),
        lambda left, right: [a + b for a, b in zip(left, right, strict=True)],
        (1,),
    )
    return jnp.stack([jnp.sum(partial) for partial in partials])


def _fused_gram(rows: Sequence[jax.Array]) -> jax.Array:
    """The Gram of one leaf's n per-objective arrays in one pass over the data: the pair sums of its blocks
    (:func:`_row_blocks`).

    XLA:CPU reads a 3 x 26.5M leaf this way in 20 ms against the chunked matmuls' 146 ms, and reads the batched
    pullbacks' layer-stacked leaves ([L, n, ...] in memory) in place, where the matmuls needed an objective-major
    copy first (isolated measurements; benchmarks/RESULTS.md, full mode on SmolLM2).
    """
    n = len(rows)
    sums = sum((_pair_sums(block) for block in _row_blocks(rows)), jnp.zeros((n * (n + 1) // 2,), jnp.float32))
    upper = np.zeros((n, n), np.int32)
    upper[np.triu_indices(n)] = np.arange(n * (n + 1) // 2)
    return sums[np.maximum(upper, upper.T)]


def _leaf_gram(leaf: _Leaf, inv_scale: jax.Array | float, flatten: bool) -> jax.Array:
    """<g_i, g_j> over one leaf in fp32. If `flatten`, on the leaf as [n, -1]: one matmul below GRAM_LOOP_FROM
    columns, else one fused pass over its n arrays (up to GRAM_FUSED_MAX_OBJECTIVES objectives, and always for
    separate trees, which would have to be stacked into a copy for the matmuls) or chunked matmuls. Otherwise one dot
    contracting every non-leading dim."""
    n, size = len(leaf.rows), leaf.rows[0].size
    if flatten and size >= GRAM_LOOP_FROM and (n <= GRAM_FUSED_MAX_OBJECTIVES or leaf.stacked is None):
        return _fused_gram([row * jnp.asarray(inv_scale, row.dtype) for row in leaf.rows])
    scaled = leaf.whole() * jnp.asarray(inv_scale, leaf.rows[0].dtype)
    if flatten:
        rows = scaled.reshape(n, -1)
        return _pair_dot(rows) if size < GRAM_LOOP_FROM else _chunked_gram(rows)
    rest = tuple(range(1, scaled.ndim))
    return jax.lax.dot_general(scaled, scaled, ((rest, rest), ((), ())), preferred_element_type=jnp.float32)


def raw_tree_gram(updates: Any, inv_scale: jax.Array | float, flatten: bool | None = None) -> jax.Array:
    """sum over leaves of <g_i, g_j> (fp32 accumulation), of stacked updates or :class:`ObjectiveTrees`.

    Flattening each leaf to [n, -1] runs 2-5x faster on XLA:CPU, but a leaf sharded along a minor
    dimension would be all-gathered to reshape it. So the default flattens only on a single-device
    process, where nothing can be sharded; with several devices every non-leading dimension is
    contracted in one dot, which stays a local partial dot plus an n x n all-reduce for any sharding.
    """
    return _leaves_gram(_objective_leaves(updates), inv_scale, _flatten_default(flatten))


def _flatten_default(flatten: bool | None) -> bool:
    """``flatten`` as given, or by default whether this process has a single device (:func:`raw_tree_gram`)."""
    return jax.device_count() == 1 if flatten is None else flatten


def _leaves_gram(leaves: Sequence[_Leaf], inv_scale: jax.Array | float, flatten: bool) -> jax.Array:
    """:func:`raw_tree_gram` of the updates' leaves as :func:`_objective_leaves` lists them."""
    return sum(_leaf_gram(leaf, inv_scale, flatten) for leaf in leaves)


def _block_peak(block: Sequence[jax.Array]) -> jax.Array:
    """max |g| over a block of n arrays [k, c] in fp32: one variadic reduction over the columns (every row's block
    maxima from one read of the block, as :func:`_pair_sums`), then the largest of those."""
    magnitudes = [jnp.abs(part).astype(jnp.float32) for part in block]
    partials = jax.lax.reduce(
        magnitudes,
        [jnp.float32(0)] * len(magnitudes),
        lambda left, right: [jnp.maximum(a, b) for a, b in zip(left, right, strict=True)],
        (1,),
    )
    return jnp.max(jnp.stack([jnp.max(partial) for partial in partials]))


def _leaf_max_abs(leaf: _Leaf, flatten: bool) -> jax.Array:
    """max |g| over one leaf in fp32.

    If `flatten`, over the blocks :func:`_fused_gram` reads (:func:`_row_blocks`, :func:`_block_peak`), which reads
    the leaf in whatever layout it has. A plain ``max(abs(leaf))`` had XLA:CPU copy each layer-stacked leaf of
    the batched pullbacks to objective-major order first (a windowed-reduction tree or a library reduction, neither
    reading through a transpose). Otherwise one reduction over each of the leaf's arrays (a local one plus a scalar
    all-reduce when sharded).
    """
    if not flatten:
        parts = [leaf.stacked] if leaf.stacked is not None else leaf.rows
        return jnp.max(jnp.stack([jnp.max(jnp.abs(part)).astype(jnp.float32) for part in parts]))
    return jnp.max(jnp.stack([_block_peak(block) for block in _row_blocks(leaf.rows)]))


def _max_abs(updates: Any, flatten: bool | None = None) -> jax.Array:
    """max |g| over every leaf and objective, in fp32 (``flatten`` as :func:`raw_tree_gram`)."""
    return _leaves_max_abs(_objective_leaves(updates), _flatten_default(flatten))


def _leaves_max_abs(leaves: Sequence[_Leaf], flatten: bool) -> jax.Array:
    """:func:`_max_abs` of the updates' leaves as :func:`_objective_leaves` lists them."""
    return jnp.max(jnp.stack([_leaf_max_abs(leaf, flatten) for leaf in leaves]))


def gram_scale(peak: jax.Array, size: int) -> jax.Array:
    """The Gram's scale s (f32[]) for gradients of largest magnitude ``peak`` and ``size`` entries per objective.

    s = 1 while the raw fp32 Gram can neither overflow (every entry is at most size * peak^2, kept below half the
    fp32 maximum) nor lose its digits to underflow (its trace is at least peak^2, kept above 1e-30); otherwise
    s = peak, so the scaled gradients g / s peak at 1. A zero or non-finite peak keeps s = 1 (a zero Gram, or a
    non-finite one, whose weights skip the update).
    """
    highest = np.sqrt(np.finfo(np.float32).max / 2 / max(size, 1))
    needs_scaling = jnp.isfinite(peak) & (peak > 0) & ((peak * peak < _TINY_TRACE) | (peak > highest))
    return jnp.where(needs_scaling, peak, jnp.ones((), jnp.float32))


GRAM_RESCALING_SCOPE = "gram_rescaling"
"""The name scope of :func:`tree_gram`'s conditional, in its compiled program's operation names."""


def tree_gram(updates: Any, flatten: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(G / s^2, s) with G_ij = <g_i, g_j> over the pytree and s = 1 where the raw fp32 Gram is usable
    (:func:`raw_gram_is_usable`), else s from :func:`gram_scale`; ``flatten`` as :func:`raw_tree_gram`.

    Of :class:`ObjectiveTrees`, one read of the updates where the raw Gram is usable, as it is for gradients of
    ordinary size: the raw Gram first, then a ``lax.cond`` that only where it is not takes the updates' peak and the
    Gram of g / s: full mode's elementwise work on SmolLM2-135M fell by a fifth (benchmarks/RESULTS.md, the Gram of
    separate trees in one read). Stacked updates always take both passes, with no conditional: to hand a stacked leaf's
    rows to a branch XLA:CPU copies them out, and the batched pullbacks' layer-stacked leaves to objective-major
    order (1.3 GB written per full-mode update on SmolLM2-135M, whichever branch ran).
    """
    leaves, flatten = _objective_leaves(updates), _flatten_default(flatten)
    if any(leaf.stacked is not None for leaf in leaves):
        return _leaves_gram_both_passes(leaves, flatten)
    raw = _leaves_gram(leaves, 1.0, flatten)
    with jax.named_scope(GRAM_RESCALING_SCOPE):
        return jax.lax.cond(
            raw_gram_is_usable(raw),
            lambda _: (raw, jnp.ones((), jnp.float32)),
            lambda parts: _leaves_gram_both_passes(parts, flatten),
            leaves,
        )


def _leaves_gram_both_passes(leaves: Sequence[_Leaf], flatten: bool) -> tuple[jax.Array, jax.Array]:
    """(G / s^2, s) with s from :func:`gram_scale` of the leaves' peak: two reads of them (the peak, then the Gram
    of g / s)."""
    scale = gram_scale(_leaves_max_abs(leaves, flatten), sum(leaf.rows[0].size for leaf in leaves))
    return _leaves_gram(leaves, 1.0 / scale, flatten), scale


def raw_gram_is_usable(gram: jax.Array) -> jax.Array:
    """Whether a raw fp32 Gram can stand as it is (bool[]): every entry finite, its diagonal at most half the fp32
    maximum (every entry then is too, |G_ij| <= sqrt(G_ii G_jj)), and its trace at least 1e-30 (no digits lost to
    underflow). :func:`gram_scale` guarantees the same of a Gram it leaves unscaled, from the peak."""
    diagonal = jnp.diag(gram)
    return (
        jnp.all(jnp.isfinite(gram))
        & (jnp.max(diagonal) <= np.finfo(np.float32).max / 2)
        & (jnp.sum(diagonal) >= _TINY_TRACE)
    )


def cosine_gram(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(C, 1/|g|) with C = D G D, D = diag(1/|g_i|): the Gram of the unit gradients; a zero row gets 1/|g| = 0."""
    diag = jnp.diag(gram).astype(jnp.float32)
    inverse_norms = jnp.where(diag > 0, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1.0)), 0.0)
    return (gram.astype(jnp.float32) * inverse_norms[:, None]) * inverse_norms[None, :], inverse_norms


def combine(weights: jax.Array, updates: Any) -> Any:
    """sum_i w_i g_i on every leaf: the n rows weighted and added one by one in fp32, cast back to the leaf's dtype;
    of stacked updates or of :class:`ObjectiveTrees` (then a tree of the trees' structure).

    That is ``tensordot(weights, leaf, axes=1)`` written as one elementwise fusion, which XLA:CPU runs at the speed
    of a read of the leaf in whatever layout it has: a tensordot first copied the batched pullbacks' layer-stacked
    leaves ([L, n, ...] in memory) to objective-major (53 ms against 20 ms for a 3 x 26.5M leaf; isolated
    measurement). Never ``(w[:, None] * leaf).sum(0)``: XLA:CPU reduces a small leading axis 15-20x slower.
    """

    def weighted_sum(*rows: jax.Array) -> jax.Array:
        scaled = [weights[i].astype(jnp.float32) * row.astype(jnp.float32) for i, row in enumerate(rows)]
        return sum(scaled[1:], scaled[0]).astype(rows[0].dtype)

    if isinstance(updates, ObjectiveTrees):
        return jax.tree.map(weighted_sum, *updates.trees)
    return jax.tree.map(lambda leaf: weighted_sum(*(leaf[i] for i in range(leaf.shape[0]))), updates)


def weighted_combiner(
    name: str,
    weighting: Weighting,
    init_state: Callable[[], Any],
    *,
    num_objectives: int,
    uses_gram: bool,
) -> optax.GradientTransformationExtraArgs:
    """An optax transform: check the objective axis, (Gram ->) weighting -> tensordot, state.weights = applied weights."""

    def init_fn(params: Any) -> Any:
        del params
        return init_state()

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        del params
        objective_count(updates, name, num_objectives)
        if uses_gram:
            gram, scale = tree_gram(updates)
        else:
            gram, scale = None, jnp.ones((), jnp.float32)
        weights, state = weighting(gram, scale, state, **extra_args)
        weights = weights.astype(jnp.float32)
        return combine(weights, updates), state._replace(weights=weights)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def initial_weights(n: int) -> jax.Array:
    """Uniform f32[n], the logged weights before the first update."""
    return jnp.full((n,), 1.0 / n, jnp.float32)
