"""The combiner contract of ``mojax.combiners._base`` (stacked updates -> n weights -> one update), on every registry entry."""

from __future__ import annotations

import functools
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from combiner_cases import CASES, extra_args
from compile_log import compilations as log_compilations
from flax import nnx

from mojax.combiners import ObjectiveTrees
from mojax.testing import stacked_gradients

N = 3
TINY_SHAPES = {"b": (3,), "w": (4, 3)}


def case_param(name: str) -> Any:
    """A pytest parameter for one registry entry, named after it."""
    return pytest.param(name, id=name)


ALL = [case_param(name) for name in CASES]
WITH_REQUIRED = [pytest.param(name, key, id=f"{name}-{key}") for name, case in CASES.items() for key in case.required]
WITH_OPTIONAL = [case_param(name) for name, case in CASES.items() if case.optional]


class Outcome(NamedTuple):
    """One jitted update of a combiner on the tiny stacked gradients."""

    params: Any
    grads: Any
    init_state: Any
    update: Any
    state: Any


def tiny_params(dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Parameters of a 4 -> 3 linear layer, without the objective axis."""
    return {key: np.full(shape, 0.1, dtype) for key, shape in TINY_SHAPES.items()}


# name -> (n, dtype, adds unknown extra args): every single-update check of one combiner, compiled once.
VARIANTS = {
    "f32": (N, np.float32, False),
    "unknown_args": (N, np.float32, True),
    "bf16": (N, jnp.bfloat16, False),
    "single": (1, np.float32, False),
}
UNKNOWN_ARGS = {"unrelated_statistic": np.ones(7, np.float32), "objective_values": np.zeros(N, np.float32)}


@functools.cache
def outcomes(name: str) -> dict[str, Outcome]:
    """Init on unstacked params, then one update per variant, all inside a single jitted program."""
    case = CASES[name]
    inputs, combiners = {}, {}
    for variant, (n, dtype, unknown) in VARIANTS.items():
        combiners[variant] = case.make(n)
        params = tiny_params(dtype)
        extras = dict(extra_args(case, n), **(UNKNOWN_ARGS if unknown else {}))
        inputs[variant] = (
            stacked_gradients(TINY_SHAPES, n, seed=1, dtype=dtype),
            combiners[variant].init(params),
            params,
            extras,
        )
    combiners["trees"] = case.make(N)  # the f32 variant's gradients as n separate trees
    grads, state, params, extras = inputs["f32"]
    inputs["trees"] = (
        ObjectiveTrees(tuple(jax.tree.map(lambda g, i=i: g[i], grads) for i in range(N))),
        *inputs["f32"][1:],
    )

    @jax.jit
    def run_all(inputs):
        return {
            variant: combiners[variant].update(grads, state, params, **extras)
            for variant, (grads, state, params, extras) in inputs.items()
        }

    results = run_all(inputs)
    return {
        variant: Outcome(params, grads, state, *results[variant])
        for variant, (grads, state, params, _) in inputs.items()
    }


def weighted_sum(weights: jax.Array, grads: Any) -> Any:
    """sum_i w_i g_i per leaf, in fp32 numpy: the contract's combine, computed independently."""
    return jax.tree.map(
        lambda g: np.tensordot(np.asarray(weights, np.float32), np.asarray(g, np.float32), axes=1), grads
    )


def assert_f32_vector(weights: jax.Array, n: int) -> None:
    """weights is a finite f32[n]."""
    assert weights.dtype == jnp.float32 and weights.shape == (n,), (weights.dtype, weights.shape)
    assert np.all(np.isfinite(weights)), weights


@pytest.mark.parametrize("name", ALL)
def test_state_weights_are_f32_vectors_before_and_after_update(name):
    outcome = outcomes(name)["f32"]
    assert_f32_vector(outcome.init_state.weights, N)
    assert_f32_vector(outcome.state.weights, N)


@pytest.mark.parametrize("name", ALL)
def test_update_has_the_structure_shapes_and_dtypes_of_params(name):
    outcome = outcomes(name)["f32"]
    assert jax.tree.structure(outcome.update) == jax.tree.structure(outcome.params)
    shapes_dtypes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert shapes_dtypes(outcome.update) == shapes_dtypes(outcome.params)


@pytest.mark.parametrize("name", ALL)
def test_update_is_the_sum_weighted_by_the_logged_weights(name):
    outcome = outcomes(name)["f32"]
    expected = weighted_sum(outcome.state.weights, outcome.grads)
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5), outcome.update, expected
    )


@pytest.mark.parametrize("name", ALL)
def test_separate_trees_give_the_stacked_updates_weights_and_state(name):
    """The same n gradients as ObjectiveTrees (n separate pytrees) and stacked: the same update, weights and state."""
    trees, stacked = outcomes(name)["trees"], outcomes(name)["f32"]
    assert jax.tree.structure(trees.update) == jax.tree.structure(stacked.update)
    pairs = zip(
        jax.tree.leaves((trees.update, trees.state)), jax.tree.leaves((stacked.update, stacked.state)), strict=True
    )
    for got, want in pairs:
        if jnp.issubdtype(got.dtype, jax.dtypes.prng_key):  # a combiner's random stream (PCGrad's order)
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_unknown_extra_args_are_ignored(name):
    plain, noisy = outcomes(name)["f32"], outcomes(name)["unknown_args"]
    jax.tree.map(np.testing.assert_array_equal, noisy.update, plain.update)
    np.testing.assert_array_equal(noisy.state.weights, plain.state.weights)


def regression_problem(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs x f32[16, 4] and n nearby regression targets f32[n, 16, 3], far from the tiny params."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    true_w = 2.0 + 0.2 * rng.standard_normal((n, 4, 3)).astype(np.float32)
    return x, np.einsum("bi,nio->nbo", x, true_w)


def objective_losses(params: dict[str, jax.Array], x: jax.Array, targets: jax.Array) -> jax.Array:
    """f32[n]: mean squared error of the linear layer against each objective's targets."""
    prediction = x @ params["w"] + params["b"]
    return jnp.mean((prediction[None] - targets) ** 2, axis=(1, 2))


@pytest.mark.parametrize("name", ALL)
def test_trains_in_a_jitted_chain_without_recompiling(name):
    case, steps = CASES[name], 6
    tx = optax.chain(case.make(N), optax.adam(5e-2))
    x, targets = regression_problem(N)

    @jax.jit
    def step(params, state, extras):
        losses = objective_losses(params, x, targets)
        jac = jax.jacrev(objective_losses)(params, x, targets)
        updates, state = tx.update(jac, state, params, **extras)
        return optax.apply_updates(params, updates), state, losses

    params = tiny_params()
    state = tx.init(params)
    batches = [extra_args(case, N, seed=seed) for seed in range(steps)]
    with log_compilations() as first_compilations:
        params, state, first_losses = step(params, state, batches[0])
    assert first_compilations, "the compilation log saw nothing: it could not detect a recompilation either"
    with log_compilations() as compilations:
        for extras in batches[1:]:
            params, state, losses = step(params, state, extras)
    assert not compilations, [log.getMessage() for log in compilations]
    assert np.all(np.asarray(objective_losses(params, x, targets)) < np.asarray(first_losses)), (first_losses, losses)


class TinyLinear(nnx.Module):
    """A 4 -> 3 linear layer whose parameters match TINY_SHAPES."""

    def __init__(self):
        self.w = nnx.Param(jnp.full(TINY_SHAPES["w"], 0.1))
        self.b = nnx.Param(jnp.full(TINY_SHAPES["b"], 0.1))

    def __call__(self, x):
        return x @ self.w[...] + self.b[...]


def nnx_objective_losses(model: TinyLinear, x: jax.Array, targets: jax.Array) -> jax.Array:
    """f32[n]: per-objective mean squared error of the NNX layer."""
    return jnp.mean((model(x)[None] - targets) ** 2, axis=(1, 2))


@pytest.mark.parametrize("name", ALL)
def test_nnx_optimizer_applies_the_combined_update(name):
    case, learning_rate = CASES[name], 0.1
    x, targets = regression_problem(N)
    model = TinyLinear()
    optimizer = nnx.Optimizer(model, optax.chain(case.make(N), optax.sgd(learning_rate)), wrt=nnx.Param)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    jac = jax.jacrev(lambda p: nnx_objective_losses(nnx.merge(graphdef, p, rest), x, targets))(params)

    @nnx.jit
    def nnx_step(model, optimizer, jac, extras):
        optimizer.update(model, jac, **extras)

    nnx_step(model, optimizer, jac, extra_args(case, N))
    weights = optimizer.opt_state[0].weights[...]
    assert_f32_vector(weights, N)
    assert int(optimizer.step[...]) == 1
    combined = weighted_sum(weights, {"w": jac["w"][...], "b": jac["b"][...]})
    for key in TINY_SHAPES:
        assert np.any(combined[key] != 0), "degenerate check: the combined update is zero"
        np.testing.assert_allclose(getattr(model, key)[...], 0.1 - learning_rate * combined[key], rtol=1e-5, atol=1e-6)


def abstract_update(name: str, grads: Any, extras: dict[str, Any], n: int = N) -> Any:
    """Trace one update without compiling it: enough to reach every trace-time check."""
    tx = CASES[name].make(n)
    params = tiny_params()
    return jax.eval_shape(lambda g, e: tx.update(g, tx.init(params), params, **e), grads, extras)


@pytest.mark.parametrize("name", ALL)
def test_leaves_with_different_objective_counts_raise_naming_the_leaf(name):
    grads = stacked_gradients(TINY_SHAPES, N)
    grads["w"] = stacked_gradients({"w": TINY_SHAPES["w"]}, N + 1)["w"]
    with pytest.raises(ValueError, match=re.escape("['w']")):
        abstract_update(name, grads, extra_args(CASES[name], N))


@pytest.mark.parametrize("name", ALL)
def test_wrong_objective_count_raises(name):
    grads = stacked_gradients(TINY_SHAPES, N + 1)
    with pytest.raises(ValueError) as excinfo:
        abstract_update(name, grads, extra_args(CASES[name], N))
    message = str(excinfo.value)
    assert re.search(rf"\b{N + 1}\b", message) and re.search(rf"\b{N}\b", message), message


@pytest.mark.parametrize(("name", "key"), WITH_REQUIRED)
def test_missing_required_extra_arg_raises_naming_it(name, key):
    extras = extra_args(CASES[name], N)
    del extras[key]
    with pytest.raises(ValueError, match=re.escape(f"`{key}`")):
        abstract_update(name, stacked_gradients(TINY_SHAPES, N), extras)


@pytest.mark.parametrize("name", WITH_OPTIONAL)
def test_optional_extra_args_may_be_omitted(name):
    case = CASES[name]
    extras = {key: value for key, value in extra_args(case, N).items() if key in case.required}
    update, state = abstract_update(name, stacked_gradients(TINY_SHAPES, N), extras)
    assert state.weights.shape == (N,) and update["w"].shape == TINY_SHAPES["w"]


@pytest.mark.parametrize("name", ALL)
def test_bf16_leaves_give_finite_bf16_updates_and_fp32_weights(name):
    outcome = outcomes(name)["bf16"]
    assert_f32_vector(outcome.state.weights, N)
    for got, want in zip(
        jax.tree.leaves(outcome.update),
        jax.tree.leaves(weighted_sum(outcome.state.weights, outcome.grads)),
        strict=False,
    ):
        assert got.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ALL)
def test_single_objective_gives_a_positive_multiple_of_its_gradient(name):
    outcome = outcomes(name)["single"]
    assert_f32_vector(outcome.state.weights, 1)
    assert outcome.state.weights[0] > 0, outcome.state.weights
    jax.tree.map(
        lambda got, g: np.testing.assert_allclose(got, outcome.state.weights[0] * g[0], rtol=1e-5, atol=1e-6),
        outcome.update,
        outcome.grads,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flattened_and_multi_dim_grams_agree(dtype):
    """The single-device Gram (each leaf reshaped to [n, -1]) equals the one contracting every dim at once."""
    from mojax.combiners import raw_tree_gram

    updates = stacked_gradients({"w": (4, 3, 2), "b": (5,), "m": (6, 7)}, 3, dtype=np.float32)
    updates = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), updates)
    flat, multi = raw_tree_gram(updates, 1.0, flatten=True), raw_tree_gram(updates, 1.0, flatten=False)
    np.testing.assert_allclose(flat, multi, rtol=1e-5)
    rows = np.concatenate([np.asarray(leaf, np.float64).reshape(3, -1) for leaf in jax.tree.leaves(updates)], axis=1)
    np.testing.assert_allclose(flat, rows @ rows.T, rtol=1e-5)


@pytest.mark.parametrize("size", ["one chunk", "chunks and a remainder", "whole chunks"])
def test_chunked_gram_equals_the_float64_gram(size, monkeypatch):
    """Above GRAM_FUSED_MAX_OBJECTIVES objectives, leaves longer than two GRAM_CHUNK columns go through the chunk loop
    (here from any length, the production threshold GRAM_LOOP_FROM lowered); the remainder gets its own matmul."""
    from mojax.combiners import _base
    from mojax.combiners._base import GRAM_CHUNK, GRAM_FUSED_MAX_OBJECTIVES, raw_tree_gram

    monkeypatch.setattr(_base, "GRAM_LOOP_FROM", 0)

    columns = {
        "one chunk": GRAM_CHUNK - 3,
        "chunks and a remainder": 2 * GRAM_CHUNK + 5,
        "whole chunks": 3 * GRAM_CHUNK,
    }
    n = GRAM_FUSED_MAX_OBJECTIVES + 1
    rows = np.random.default_rng(7).normal(size=(n, columns[size]))
    updates = {"w": jnp.asarray(rows.reshape(n, -1, 1), jnp.float32), "b": jnp.asarray(rows[:, :5], jnp.float32)}
    want = rows @ rows.T + rows[:, :5] @ rows[:, :5].T
    np.testing.assert_allclose(raw_tree_gram(updates, 1.0, flatten=True), want, rtol=2e-5, atol=1e-6 * rows.shape[1])


@pytest.mark.parametrize("n", [1, 2, 3, 6])
@pytest.mark.parametrize("size", ["below one row", "whole rows", "rows and a remainder"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_gram_equals_the_float64_gram(n, size, dtype):
    """Up to GRAM_FUSED_MAX_OBJECTIVES objectives a flattened leaf's Gram is one fused pass of pair sums over rows of
    GRAM_ROW columns (plus the remainder's); bf16 leaves are summed in fp32."""
    from mojax.combiners._base import GRAM_ROW, _fused_gram

    columns = {"below one row": GRAM_ROW - 3, "whole rows": 4 * GRAM_ROW, "rows and a remainder": 3 * GRAM_ROW + 7}
    rows = jnp.asarray(np.random.default_rng(n).normal(size=(n, columns[size])), dtype)
    exact = np.asarray(rows, np.float64)
    got = _fused_gram(list(rows))
    assert got.dtype == jnp.float32 and got.shape == (n, n)
    np.testing.assert_allclose(got, exact @ exact.T, rtol=1e-5, atol=1e-6 * columns[size])
    np.testing.assert_array_equal(got, got.T)


def test_fused_gram_keeps_its_digits_over_millions_of_columns():
    """fp32 sums of GRAM_ROW products, then of the row sums: over 2^22 columns of values near 1 the Gram stays within
    1e-6 of the float64 one (one running fp32 sum over every column drifts by orders of magnitude more)."""
    from mojax.combiners._base import _fused_gram

    rows = np.random.default_rng(0).uniform(0.5, 1.5, size=(2, 1 << 22)).astype(np.float32)
    exact = rows.astype(np.float64) @ rows.astype(np.float64).T
    np.testing.assert_allclose(_fused_gram(list(jnp.asarray(rows))), exact, rtol=1e-6)


@pytest.mark.parametrize(
    ("dims", "width"),
    [
        ((30, 1536, 576), 576),  # a layer-stacked MLP weight: rows of its last dimension
        ((30, 576, 3, 64), 192),  # two trailing dimensions, the third would pass GRAM_ROW_MAX
        ((100, 7), 700),
        ((7,), 7),  # the whole row, however short
        ((3000, 7), None),  # 7 columns are too few, 21000 too many: the flat GRAM_ROW cut
        ((5, 3000), None),  # the last dimension alone passes GRAM_ROW_MAX
    ],
)
def test_blocks_are_cut_at_the_leafs_trailing_dimensions(dims, width):
    """A leaf's n arrays are read in blocks of n [k, c] with c their trailing dimensions' product (at least
    GRAM_ROW_MIN, at most GRAM_ROW_MAX, or the whole row), else in GRAM_ROW columns of their flat rows plus the
    remainder; either way the blocks hold each flat row in order."""
    from mojax.combiners._base import GRAM_ROW, _block_width, _row_blocks

    assert _block_width(dims) == width
    leaf = jnp.arange(2 * math.prod(dims), dtype=jnp.float32).reshape((2, *dims))
    blocks = _row_blocks([leaf[0], leaf[1]])
    assert all(len(block) == 2 and block[0].shape == block[1].shape for block in blocks)
    widths = [block[0].shape[1] for block in blocks]
    assert widths == ([width] if width else [GRAM_ROW, math.prod(dims) % GRAM_ROW])
    for i in range(2):
        np.testing.assert_array_equal(jnp.concatenate([b[i].reshape(-1) for b in blocks]), leaf[i].reshape(-1))


@pytest.mark.parametrize("dims", [(6, 40, 48), (5, 48, 3, 16), (2, 50, 1500), (700, 3)])
def test_gram_and_peak_of_leaves_cut_at_their_dimensions(dims):
    """The fused Gram and the flattened peak of multi-dimensional leaves (cut at their trailing dimensions, or flat)
    equal the float64 Gram and the plain maximum."""
    from mojax.combiners._base import _fused_gram, _max_abs

    leaf = np.random.default_rng(len(dims)).normal(size=(3, *dims))
    leaf.reshape(-1)[-5] = -60.0
    rows = leaf.reshape(3, -1)
    got = _fused_gram(list(jnp.asarray(leaf, jnp.float32)))
    np.testing.assert_allclose(got, rows @ rows.T, rtol=1e-5, atol=1e-6 * rows.shape[1])
    assert float(_max_abs({"w": jnp.asarray(leaf, jnp.float32)}, flatten=True)) == 60.0


def test_gram_and_combination_read_layer_stacked_leaves_in_place(monkeypatch):
    """The batched pullbacks leave a layer-stacked leaf [L, n, ...] in memory and hand the combiner its transpose
    [n, L, ...]: the Gram of a large leaf with its scale (here from any size, the production threshold GRAM_LOOP_FROM
    lowered) and the weighted sum compile to fusions that read it as it lies, with no copy of the leaf into
    objective-major order (the matmul Gram, a tensordot and the peak as one library reduction made one each)."""
    from mojax.combiners import _base, combine, tree_gram

    monkeypatch.setattr(_base, "GRAM_LOOP_FROM", 0)

    stacked = jnp.ones((4, N, 32, 48), jnp.float32)  # [L, n, ...] in memory

    def gram_and_combination(leaves):
        objective_major = {"w": jnp.swapaxes(leaves, 0, 1)}
        return tree_gram(objective_major, flatten=True), combine(jnp.ones((N,)) / N, objective_major)

    program = jax.jit(gram_and_combination).lower(stacked).compile().as_text()
    entry = program[program.index("\nENTRY") :].splitlines()  # fusion bodies index through a transpose; never copy
    assert not [line for line in entry if re.search(r"%[\w.\-]*(copy|transpose)[\w.\-]* = ", line)]
    (gram, scale), combined = jax.jit(gram_and_combination)(stacked)
    assert float(scale) == 1.0
    np.testing.assert_allclose(gram, np.full((N, N), 4 * 32 * 48.0))
    np.testing.assert_allclose(combined["w"], np.ones((4, 32, 48)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flattened_max_abs_equals_the_whole_leaf_maximum(dtype):
    """The single-device peak (maxima of GRAM_ROW-column blocks of each [n, -1] leaf, then of the remainder) equals
    the plain maximum, for leaves below one block, of whole blocks and of blocks plus a remainder."""
    from mojax.combiners._base import GRAM_ROW, _max_abs

    rng = np.random.default_rng(3)
    shapes = {"small": (N, GRAM_ROW - 3), "whole": (N, 2, GRAM_ROW), "remainder": (N, 3 * GRAM_ROW + 7)}
    for planted in shapes:
        updates = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
        updates[planted].reshape(-1)[-2] = -40.0  # in the last block or the remainder
        updates = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), updates)
        assert float(_max_abs(updates, flatten=True)) == float(_max_abs(updates, flatten=False)) == 40.0


@pytest.mark.parametrize(
    ("peak", "size", "want"),
    [
        pytest.param(1.0, 10**6, 1.0, id="ordinary"),
        pytest.param(0.0, 10**6, 1.0, id="zero"),
        pytest.param(np.inf, 10**6, 1.0, id="inf"),
        pytest.param(np.nan, 10**6, 1.0, id="nan"),
        pytest.param(2e-15, 10**6, 1.0, id="trace-above-1e-30"),
        pytest.param(5e-16, 10**6, 5e-16, id="trace-may-underflow"),
        pytest.param(1.2e16, 10**6, 1.0, id="below-the-overflow-bound"),
        pytest.param(1.4e16, 10**6, 1.4e16, id="above-the-overflow-bound"),
        pytest.param(1.4e16, 10**4, 1.0, id="fewer-entries-more-room"),
    ],
)
def test_gram_scale_is_one_unless_the_raw_gram_could_leave_the_fp32_range(peak, size, want):
    """s = 1 while size * peak^2 stays below half the fp32 maximum (~1.3e16 at 1e6 entries) and peak^2 above 1e-30;
    otherwise the peak itself."""
    from mojax.combiners._base import gram_scale

    assert float(gram_scale(jnp.float32(peak), size)) == pytest.approx(want, rel=1e-6)


def _separate(updates: Any, n: int) -> ObjectiveTrees:
    """Stacked updates as n separate trees."""
    return ObjectiveTrees(tuple(jax.tree.map(lambda leaf, i=i: leaf[i], updates) for i in range(n)))


@pytest.mark.parametrize(("n", "dtype"), [(2, jnp.float32), (3, jnp.bfloat16), (8, jnp.float32)])
def test_separate_trees_give_the_float64_gram_peak_and_combination(n, dtype, monkeypatch):
    """Leaves cut at their dimensions, flat with a remainder, and below the fused threshold (lowered here, so that
    small leaves take the fused pass): the Gram, peak and combination of n separate trees are the float64 ones, read
    in one fused pass per leaf at every n (the stacked form's chunked matmuls would need a stacked copy)."""
    from mojax.combiners import _base, combine, tree_gram
    from mojax.combiners._base import GRAM_ROW, _max_abs

    monkeypatch.setattr(_base, "GRAM_LOOP_FROM", 4 * GRAM_ROW)
    rng = np.random.default_rng(n)
    shapes = {"cut": (6, 40, 48), "flat": (3 * GRAM_ROW + 7,), "small": (5, 7)}
    stacked = {key: rng.normal(size=(n, *shape)).astype(np.float32) for key, shape in shapes.items()}
    stacked["flat"][n - 1, -2] = -50.0
    stacked = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), stacked)
    trees = _separate(stacked, n)
    rows = np.concatenate([np.asarray(leaf, np.float64).reshape(n, -1) for leaf in jax.tree.leaves(stacked)], axis=1)
    gram, scale = jax.jit(tree_gram)(trees)
    assert float(scale) == 1.0
    np.testing.assert_allclose(gram, rows @ rows.T, rtol=1e-5, atol=1e-6 * rows.shape[1])
    assert float(_max_abs(trees, flatten=True)) == float(_max_abs(trees, flatten=False)) == 50.0
    weights = jnp.linspace(0.5, 1.5, n)
    for got, want in zip(
        jax.tree.leaves(combine(weights, trees)), jax.tree.leaves(combine(weights, stacked)), strict=True
    ):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(tree_gram, static_argnums=1)(trees, False)[0], gram, rtol=1e-5)


def test_separate_trees_skip_masked_leaves_and_rescale_an_overflowing_gram():
    """optax.MaskedNode leaves (LoRA's frozen weights) hold no gradient: the Gram and the combination read the others.
    Entries near 3e17 overflow the raw fp32 Gram: the separate trees' Gram is rescaled as the stacked one is."""
    from mojax.combiners import combine, tree_gram

    rows = np.random.default_rng(5).uniform(3e17, 3.2e17, size=(2, 4096)).astype(np.float32)
    trees = ObjectiveTrees(tuple({"w": jnp.asarray(row), "frozen": optax.MaskedNode()} for row in rows))
    gram, scale = tree_gram(trees)
    exact = rows.astype(np.float64) @ rows.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(gram, np.float64) * float(scale) ** 2, exact, rtol=1e-5)
    combined = combine(jnp.asarray([1.0, -1.0]), trees)
    assert isinstance(combined["frozen"], optax.MaskedNode)
    np.testing.assert_allclose(combined["w"], rows[0] - rows[1], rtol=1e-6, atol=1e11)


@pytest.mark.parametrize(
    ("trees", "match"),
    [
        ((), "holds no trees"),
        (({"w": jnp.ones(3)}, {"v": jnp.ones(3)}), "the per-objective trees of `updates` differ in structure: tree 1"),
        (({"w": optax.MaskedNode()},) * 2, "have no array leaves"),
        (({"w": jnp.ones(3)},) * 2, "holds 2 objectives' trees, but the combiner was built for 3"),
    ],
)
def test_malformed_separate_trees_raise_saying_what_is_wrong(trees, match):
    from mojax.combiners import mgda

    with pytest.raises(ValueError, match=match):
        mgda(num_objectives=3).update(ObjectiveTrees(trees), mgda(num_objectives=3).init({"w": jnp.ones(3)}))


def test_tree_gram_rescales_gradients_whose_raw_gram_overflows():
    """Entries of 3-3.2e17 over 4096 columns: the raw fp32 Gram (~4e38) overflows; the rescaled one times s^2 is the
    float64 Gram."""
    from mojax.combiners import raw_tree_gram, tree_gram

    rows = np.random.default_rng(5).uniform(3e17, 3.2e17, size=(2, 4096)).astype(np.float32)
    assert not np.all(np.isfinite(raw_tree_gram({"w": jnp.asarray(rows)}, 1.0)))
    gram, scale = tree_gram({"w": jnp.asarray(rows)})
    exact = rows.astype(np.float64) @ rows.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(gram, np.float64) * float(scale) ** 2, exact, rtol=1e-5)


@pytest.mark.parametrize(
    ("diagonal", "off_diagonal", "usable"),
    [
        pytest.param((2.0, 3.0), 1.0, True, id="ordinary"),
        pytest.param((2.0, np.inf), 1.0, False, id="infinite-diagonal"),
        pytest.param((2.0, 3.0), np.nan, False, id="nan-entry"),
        pytest.param((2e38, 1.0), 0.0, False, id="above-half-the-fp32-maximum"),
        pytest.param((1.6e38, 1.0), 0.0, True, id="below-half-the-fp32-maximum"),
        pytest.param((4e-31, 5e-31), 0.0, False, id="trace-below-1e-30"),
        pytest.param((6e-31, 5e-31), 0.0, True, id="trace-above-1e-30"),
    ],
)
def test_raw_gram_is_usable_only_finite_below_half_the_fp32_maximum_and_with_a_trace_above_1e_30(
    diagonal, off_diagonal, usable
):
    from mojax.combiners._base import raw_gram_is_usable

    gram = np.diag(np.asarray(diagonal, np.float32))
    gram[0, 1] = gram[1, 0] = off_diagonal
    assert bool(raw_gram_is_usable(jnp.asarray(gram))) is usable


def _top_level_primitives(function, *args) -> set[str]:
    """The primitives of ``function``'s jaxpr outside any sub-jaxpr (a conditional's branches, a jitted call)."""
    return {eqn.primitive.name for eqn in jax.make_jaxpr(function)(*args).jaxpr.eqns}


@pytest.mark.parametrize(
    ("magnitude", "rescaled"),
    [
        pytest.param(1.0, False, id="ordinary"),
        pytest.param(1e-17, True, id="underflowing"),
        pytest.param(3e17, True, id="overflowing"),
    ],
)
def test_separate_trees_read_once_for_their_gram_and_rescale_it_only_where_it_is_unusable(magnitude, rescaled):
    """Of ObjectiveTrees the raw Gram comes first and the peak (the only |g| taken) lies in a conditional's branch,
    which runs only where the raw Gram is unusable: ordinary gradients keep s = 1; gradients of 1e-17 over 4096
    columns (trace ~4e-31) and of 3e17 (entries ~4e38) get s = their peak. Each time s^2 G is the float64 Gram, as
    the stacked form's, which takes its peak unconditionally."""
    from mojax.combiners import tree_gram

    rows = np.random.default_rng(7).uniform(1.0, 1.1, size=(2, 4096)).astype(np.float32) * np.float32(magnitude)
    stacked = {"w": jnp.asarray(rows)}
    trees = _separate(stacked, 2)
    assert "cond" in _top_level_primitives(tree_gram, trees) and "abs" not in _top_level_primitives(tree_gram, trees)
    assert "cond" not in _top_level_primitives(tree_gram, stacked) and "abs" in _top_level_primitives(
        tree_gram, stacked
    )
    exact = rows.astype(np.float64) @ rows.astype(np.float64).T
    gram, scale = jax.jit(tree_gram)(trees)
    assert float(scale) == (pytest.approx(float(rows.max()), rel=1e-6) if rescaled else 1.0)
    np.testing.assert_allclose(np.asarray(gram, np.float64) * float(scale) ** 2, exact, rtol=1e-5)
    stacked_gram, stacked_scale = jax.jit(tree_gram)(stacked)
    np.testing.assert_allclose(np.asarray(stacked_gram, np.float64) * float(stacked_scale) ** 2, exact, rtol=1e-5)
