"""mgda combiner: known answers through the optax transform, normalisers, zero-norm handling, jit/chain, errors, torchjd parity."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mojax.combiners.mgda import mgda


def split_updates(jac) -> dict:
    """Rows of J as a two-leaf pytree (first column, the rest), so the Gram is summed over leaves."""
    jac = jnp.asarray(jac, jnp.float32)
    return {"a": jac[:, :1], "b": {"c": jac[:, 1:]}}


def joined(update) -> np.ndarray:
    """The combined update of split_updates back as one vector."""
    return np.concatenate([np.asarray(update["a"], np.float64), np.asarray(update["b"]["c"], np.float64)])


@functools.cache
def jitted(**config):
    """(combiner, jitted update) for one mgda configuration, built once so each shape compiles once."""
    tx = mgda(**config)
    return tx, jax.jit(lambda updates, state, extra: tx.update(updates, state, None, **extra))


def run(jac, extra_args=None, **config):
    """One jitted update of mgda(num_objectives=len(J), **config) on the rows of J: (direction, state)."""
    tx, update_fn = jitted(num_objectives=len(jac), **config)
    update, state = update_fn(split_updates(jac), tx.init(None), extra_args or {})
    return joined(update), state


@pytest.mark.parametrize(
    ("jac", "alpha", "direction"),
    [
        pytest.param([[1, 0], [-1, 1]], [0.6, 0.4], [0.2, 0.4], id="interior"),
        pytest.param([[1, 0], [0, 2]], [0.8, 0.2], [0.8, 0.4], id="orthogonal"),
        pytest.param([[2, 0], [0, 1], [-1, 1]], [0.4, 0.0, 0.6], [0.2, 0.6], id="edge-optimum"),
        pytest.param([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [1 / 3] * 3, [1 / 3] * 3, id="basis"),
        pytest.param([[1, 2], [-3, -6]], [0.75, 0.25], [0.0, 0.0], id="anti-parallel"),
        pytest.param([[-4, 1, 1], [6, 1, 1]], [0.6, 0.4], [0.0, 1.0, 1.0], id="torchjd-J_base"),
    ],
)
def test_known_answers(jac, alpha, direction):
    direction_seen, state = run(jac)
    np.testing.assert_allclose(direction_seen, direction, atol=1e-5)
    np.testing.assert_allclose(state.weights, alpha, atol=1e-5)
    np.testing.assert_allclose(state.alpha, alpha, atol=1e-5)
    progress = np.asarray(jac, np.float64) @ direction_seen
    norm_sq = direction_seen @ direction_seen
    assert np.all(progress >= norm_sq - 1e-5)  # KKT: every objective improves at least ||d||^2


def test_quadratics_converge_to_the_pareto_segment():
    """l_i = ||theta - c_i||^2 / 2; theta <- theta - eta d ends on the segment [a, b]."""
    a, b = jnp.array([0.0, 0.0]), jnp.array([2.0, 1.0])
    tx = optax.chain(mgda(num_objectives=2), optax.sgd(0.2))

    @jax.jit
    def step(theta, state):
        jac = jnp.stack([theta - a, theta - b])
        update, state = tx.update(jac, state, theta)
        return optax.apply_updates(theta, update), state

    theta, state = jnp.array([3.0, -2.0]), tx.init(jnp.zeros(2))
    for _ in range(200):
        theta, state = step(theta, state)
    t = np.clip(np.dot(theta - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
    np.testing.assert_allclose(theta, a + t * (b - a), atol=1e-4)
    assert 0.0 < t < 1.0


@pytest.mark.parametrize(
    ("normalize", "losses", "weights", "direction"),
    [
        # g = (1, 0), (0, 2); g / c is orthogonal, so alpha_i is proportional to 1 / ||g_i / c_i||^2.
        pytest.param("l2", None, [0.5, 0.25], [0.5, 0.5], id="l2"),
        pytest.param("loss", [2.0, 4.0], [0.25, 0.125], [0.25, 0.25], id="loss"),
        pytest.param("loss+", [2.0, -4.0], [0.1, 0.1], [0.1, 0.2], id="loss+ (|loss|)"),
        pytest.param("none", [2.0, 4.0], [0.8, 0.2], [0.8, 0.4], id="none ignores losses"),
    ],
)
def test_gradient_normalizers(normalize, losses, weights, direction):
    extra = {} if losses is None else {"losses": jnp.asarray(losses)}
    direction_seen, state = run([[1, 0], [0, 2]], extra, normalize=normalize)
    np.testing.assert_allclose(direction_seen, direction, atol=1e-6)
    np.testing.assert_allclose(state.weights, weights, atol=1e-6)


def test_zero_gradient_stalls_unless_dropped():
    jac = [[1, 0], [0, 0], [0, 2]]
    direction, state = run(jac)
    np.testing.assert_allclose(direction, [0.0, 0.0])
    np.testing.assert_allclose(state.alpha, [0.0, 1.0, 0.0])
    direction, state = run(jac, drop_zero_norm=True)
    np.testing.assert_allclose(direction, [0.8, 0.4], atol=1e-6)
    np.testing.assert_allclose(state.alpha, [0.8, 0.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(state.grad_norms, [1.0, 0.0, 2.0])


@pytest.mark.parametrize("drop_zero_norm", [False, True])
@pytest.mark.parametrize("normalize", ["none", "l2"])
def test_all_zero_gradients_are_finite(normalize, drop_zero_norm):
    direction, state = run(np.zeros((2, 3)), normalize=normalize, drop_zero_norm=drop_zero_norm)
    np.testing.assert_array_equal(direction, np.zeros(3))
    assert np.all(np.isfinite(state.weights)) and np.all(np.isfinite(state.alpha))


@pytest.mark.parametrize(
    ("normalize", "scale", "factor"),
    [
        pytest.param("none", 1e-30, 1e-30, id="none-1e-30"),
        pytest.param("none", 1e30, 1e30, id="none-1e30"),
        pytest.param("l2", 1e30, None, id="l2-1e30"),
        pytest.param("l2", 1e-30, 1e-30 / 1e-8, id="l2-1e-30-below-eps"),
    ],
)
def test_extreme_gradient_norms(normalize, scale, factor):
    """d(kJ) = k d(J) without normalisation; l2 is scale-invariant above eps and divides by eps below it."""
    jac = np.array([[1.0, 0.0], [-1.0, 1.0]], np.float32)
    scaled, state = run(jac * np.float32(scale), normalize=normalize)
    assert np.all(np.isfinite(state.weights))
    if factor is None:
        # unit gradients (1, 0) and (-1, 1)/sqrt(2) have alpha = (1/2, 1/2)
        np.testing.assert_allclose(scaled, [(1 - 1 / np.sqrt(2)) / 2, 1 / (2 * np.sqrt(2))], rtol=1e-5)
    else:
        np.testing.assert_allclose(scaled, np.array([0.2, 0.4]) * factor, rtol=1e-5)


def test_bf16_updates():
    jac = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    tx, update_fn = jitted(num_objectives=2)
    update, state = update_fn(jac.astype(jnp.bfloat16), tx.init(None), {})
    assert update.dtype == jnp.bfloat16 and state.weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(update, np.float32), [0.0, 1.0, 1.0], atol=2e-2)
    np.testing.assert_allclose(state.weights, [0.6, 0.4], atol=1e-5)


def test_n_equals_one_passes_the_gradient_through():
    direction, state = run([[3.0, -4.0]])
    np.testing.assert_allclose(direction, [3.0, -4.0])
    np.testing.assert_allclose(state.weights, [1.0])


@pytest.mark.parametrize(
    ("build", "updates", "extra", "message"),
    [
        (lambda: mgda(num_objectives=2), jnp.ones((3, 4)), {}, "built for 2"),
        (lambda: mgda(num_objectives=2), {"a": jnp.ones((2, 4)), "b": jnp.ones((3,))}, {}, "disagree"),
        (lambda: mgda(num_objectives=2, normalize="loss"), jnp.ones((2, 4)), {}, "losses"),
        (
            lambda: mgda(num_objectives=2, normalize="loss"),
            jnp.ones((2, 4)),
            {"losses": jnp.ones(3)},
            r"losses.*shape \(3,\)",
        ),
    ],
)
def test_bad_updates_raise(build, updates, extra, message):
    tx = build()
    with pytest.raises(ValueError, match=message):
        tx.update(updates, tx.init(None), **extra)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_objectives": 0}, "num_objectives"),
        ({"num_objectives": None}, "num_objectives"),
        ({"num_objectives": 2, "normalize": "max"}, "normalize"),
        ({"num_objectives": 2, "solver": "cvx"}, "solver"),
        ({"num_objectives": 2, "eps": 0.0}, "eps"),
        ({"num_objectives": 2, "normalize": "loss+", "eps": 1e-20}, "overflow"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mgda(**kwargs)


@pytest.mark.parity
@pytest.mark.parametrize("shape", [(2, 5), (3, 7), (8, 20)])
def test_matches_torchjd_mgda(shape):
    """frank_wolfe reproduces torchjd's MGDA to ~1e-5; the accurate solver is at least as good and within its tolerance."""
    torch = pytest.importorskip("torch")
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    for seed in range(3):
        jac = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
        expected = torchjd_aggregation.MGDA()(torch.from_numpy(jac)).numpy()
        reproduced, _ = run(jac, solver="frank_wolfe")
        np.testing.assert_allclose(reproduced, expected, atol=1e-5)
        accurate, _ = run(jac)
        gap = expected @ expected - accurate @ accurate
        assert gap >= -1e-6  # no worse a min-norm point than torchjd's
        # For the min-norm point d* of a convex set, ||d - d*||^2 <= ||d||^2 - ||d*||^2: torchjd's own slack.
        assert np.sum((accurate - expected) ** 2) <= gap + 1e-6
