"""PAMA: closed form (hand-computed cases, permutation and Noon invariance), Noon statistics, the combiner, and parity with the CTWA port's reading."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_ctwa import reference_pama_port  # noqa: E402

from mojax.combiners.pama import (
    noon,
    pama_closed_form,
    pama_combined_advantage,
    pama_solve,
    pama_statistics,
    pama_token_advantage,
)

closed_form = jax.jit(pama_closed_form)
finite = st.floats(-10.0, 10.0, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=1, max_size=7).map(lambda v: np.asarray(v, np.float32))


@pytest.mark.parametrize(
    ("a", "s_star", "c_star"),
    [
        ((0.3, 0.1, 0.5), 0.1, (0.0, 1.0, 0.0)),  # all positive: the smallest's vertex
        ((-0.2, 0.4), 0.0, (2 / 3, 1 / 3)),  # straddling 0: mixed so that c^T a = 0
        ((-0.3, -0.1), -0.1, (0.0, 1.0)),  # all negative: the largest's vertex
        ((0.7,), 0.7, (1.0,)),  # n = 1
        ((0.0, 0.0, 0.0), 0.0, (1 / 3, 1 / 3, 1 / 3)),  # all zero: uniform
        ((0.2, 0.0, 0.0), 0.0, (0.0, 0.5, 0.5)),  # tied minimum at 0: split evenly
        ((0.4, 0.1, 0.1), 0.1, (0.0, 0.5, 0.5)),  # tied positive minimum
    ],
)
def test_closed_form_known_answers(a, s_star, c_star):
    s, c = closed_form(jnp.asarray(a, jnp.float32))
    np.testing.assert_allclose(s, s_star, atol=1e-6)
    np.testing.assert_allclose(c, c_star, atol=1e-6)
    np.testing.assert_allclose(jnp.dot(c, jnp.asarray(a)), s_star, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(vectors, st.data())
def test_closed_form_is_the_projection_and_is_attained(a, data):
    """KKT of min_{s in [lo, hi]} s^2: s in [lo, hi] and s (x - s) >= 0 for x in {lo, hi}; c in the simplex attains s."""
    s, c = (np.asarray(x, np.float64) for x in closed_form(a))
    lo, hi = float(a.min()), float(a.max())
    assert lo - 1e-6 <= s <= hi + 1e-6
    assert s * (lo - s) >= -1e-6 and s * (hi - s) >= -1e-6
    assert np.all(c >= 0) and abs(c.sum() - 1) < 1e-5
    np.testing.assert_allclose(c @ a, s, atol=1e-4)
    other = np.asarray(data.draw(st.lists(st.floats(0.0, 1.0), min_size=a.size, max_size=a.size)))
    if other.sum() > 0:
        assert (other / other.sum() @ a) ** 2 >= s**2 - 1e-4


@settings(max_examples=40, deadline=None)
@given(vectors, st.randoms(use_true_random=False))
def test_closed_form_permutation_equivariant(a, rng):
    """Permuting a leaves s* unchanged and permutes c*."""
    order = list(range(a.size))
    rng.shuffle(order)
    s, c = closed_form(a)
    s_perm, c_perm = closed_form(a[order])
    np.testing.assert_allclose(s_perm, s, atol=1e-6)
    np.testing.assert_allclose(c_perm, np.asarray(c)[order], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.0, 10.0, width=32), min_size=1, max_size=5),
    st.lists(st.floats(0.0, 10.0, width=32), min_size=1, max_size=3),
)
def test_adding_objectives_above_the_minimum_keeps_the_optimum(base, extra):
    """Under Noon (a >= 0), objectives with a_i >= min a do not move s*."""
    base = np.asarray(base, np.float32)
    extended = np.concatenate([base, base.min() + np.asarray(extra, np.float32)])
    np.testing.assert_allclose(closed_form(extended)[0], closed_form(base)[0], atol=1e-6)


def test_statistics_masked_mean_of_unclipped_positive_advantages():
    advantages = jnp.asarray([[[1.0, -2.0, 3.0]], [[0.5, 4.0, -1.0]]])  # n=2, B=1, T=3
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    ratio = jnp.asarray([[1.0, 1.0, 1.0]])
    np.testing.assert_allclose(pama_statistics(advantages, mask, ratio), [0.5, 2.25])
    clipped = jnp.asarray([[1.3, 1.0, 1.0]])  # token 0 above 1 + eps: no gradient, dropped
    np.testing.assert_allclose(pama_statistics(advantages, mask, clipped, epsilon=0.2), [0.0, 2.0])
    np.testing.assert_allclose(pama_statistics(advantages), [4 / 3, 1.5])
    np.testing.assert_array_equal(pama_statistics(advantages, jnp.zeros((1, 3))), [0.0, 0.0])
    np.testing.assert_array_equal(noon(jnp.asarray([-1.0, 0.0, 2.0])), [0.0, 0.0, 2.0])


def test_parity_with_the_ctwa_port_reading():
    """a_i and s* agree with a numpy transcription of the CTWA repository's PAMA (u against pi_ref, padding)."""
    rng = np.random.default_rng(0)
    for batch, length, n in [(6, 5, 3), (9, 4, 1), (5, 8, 4)]:
        adv_btn = rng.normal(size=(batch, length, n)) * rng.choice([0.1, 1.0, 10.0], size=(1, 1, n))
        logp_old = rng.normal(size=(batch, length)) * 0.3
        logp_ref = logp_old + rng.normal(size=(batch, length)) * 0.3
        mask = (np.arange(length)[None] < rng.integers(0, length + 1, (batch, 1))).astype(np.float64)
        mask[0] = 1.0
        a_ref, s_ref = reference_pama_port(adv_btn, logp_old, logp_ref, mask, clip=0.2)
        ratio = jnp.exp(jnp.clip(jnp.asarray(logp_old - logp_ref, jnp.float32), -20.0, 20.0))
        a = pama_statistics(jnp.asarray(adv_btn.transpose(2, 0, 1), jnp.float32), jnp.asarray(mask, jnp.float32), ratio)
        np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(closed_form(a)[0], s_ref, rtol=1e-5, atol=1e-6)


def test_token_and_combined_advantages():
    advantages = jnp.asarray([[[2.0, -1.0, 0.5]], [[1.0, 3.0, -0.2]]])  # n=2, B=1, T=3
    np.testing.assert_allclose(pama_token_advantage(advantages), [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(pama_token_advantage(advantages[:1]), noon(advantages[0]))
    np.testing.assert_allclose(pama_token_advantage(advantages, jnp.asarray([[1.5, 1.0, 1.0]])), [[0.0, 0.0, 0.0]])
    np.testing.assert_allclose(pama_combined_advantage(advantages, jnp.asarray([0.25, 0.75])), [[1.25, 2.25, 0.125]])


def _noon_ppo_objectives(theta, phi, advantages, clip_eps=0.2):
    """L_i(theta) = mean_t min(u_t A_t, clip(u_t) A_t), u_t = exp(theta phi_t), A = max(A^(i), 0): f32[n]."""
    ratio = jnp.exp(theta * phi)
    positive = noon(advantages)
    return jnp.mean(jnp.minimum(ratio * positive, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * positive), axis=-1)


def test_bound_tightness_toy():
    """a = (1, 0.5) so c* = e_2, the update is objective 2's alone, and the bound is attained."""
    phi = jnp.asarray([1.0, -1.0])
    advantages = jnp.asarray([[2.0, 0.0], [0.0, 1.0]])
    theta = jnp.zeros(())
    grads = jax.jacrev(lambda t: -_noon_ppo_objectives(t, phi, advantages))(theta)  # descent on -L_i, (n,)
    np.testing.assert_allclose(grads, [-1.0, 0.5])
    tx = pama_solve(num_objectives=2)
    update, state = tx.update(
        grads, tx.init(theta), advantages=advantages[:, None, :], ratio=jnp.exp(theta * phi)[None]
    )
    np.testing.assert_allclose(state.statistics, [1.0, 0.5])
    np.testing.assert_allclose(state.weights, [0.0, 1.0])
    np.testing.assert_allclose(update, grads[1])
    for c in np.random.default_rng(1).dirichlet(np.ones(2), 20):  # |sum c_i grad L_i| <= G_max c^T a, G_max = 1
        assert abs(c @ np.asarray(grads)) <= c @ np.asarray(state.statistics) + 1e-6


def test_combiner_under_jit_in_a_chain_without_recompiling():
    n, traces = 3, []
    tx = optax.chain(pama_solve(num_objectives=n), optax.sgd(0.5))
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(())}

    @jax.jit
    def step(params, state, advantages, mask, ratio):
        traces.append(1)
        stacked = jax.tree.map(
            lambda p: jnp.ones((n, *p.shape)) * jnp.arange(1.0, n + 1).reshape((n,) + (1,) * p.ndim), params
        )
        updates, state = tx.update(
            stacked, state, params, advantages=advantages, mask=mask, ratio=ratio, rewards=None, unused=1.0
        )
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        advantages = jnp.asarray(rng.normal(size=(n, 4, 5)), jnp.float32)
        params, state = step(params, state, advantages, jnp.ones((4, 5)), jnp.ones((4, 5)))
    combiner_state = state[0]
    assert len(traces) == 1
    _, expected = pama_closed_form(pama_statistics(advantages, jnp.ones((4, 5))))
    np.testing.assert_allclose(combiner_state.weights, expected)
    assert int(combiner_state.num_steps) == 3
    for leaf in jax.tree.leaves(combiner_state):
        assert leaf.dtype in (jnp.float32, jnp.int32, jnp.bool_)


def test_stationary_steps_and_edge_cases_never_nan():
    tx = pama_solve(num_objectives=2)
    grads = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    state = tx.init(jnp.zeros(2))
    advantages = jnp.stack([jnp.ones((2, 3)), -jnp.ones((2, 3))])  # objective 2 has no positive advantage
    update, state = tx.update(grads, state, advantages=advantages)
    np.testing.assert_allclose(state.weights, [0.0, 1.0])
    assert bool(state.stationary) and int(state.num_stationary) == 1
    update, state = tx.update(grads, state, advantages=jnp.zeros((2, 2, 3)), mask=jnp.zeros((2, 3)))
    np.testing.assert_allclose(state.weights, [0.5, 0.5])
    assert int(state.num_stationary) == 2 and int(state.num_steps) == 2
    assert np.all(np.isfinite(update))
    single = pama_solve(num_objectives=1)
    update, state = single.update(jnp.ones((1, 2)), single.init(None), advantages=jnp.full((1, 2, 3), 0.7))
    np.testing.assert_allclose(state.weights, [1.0])
    np.testing.assert_allclose(state.optimum, 0.7)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "needs the extra argument `advantages`"),
        ({"advantages": jnp.ones((3, 2, 4))}, r"expected \(n, B, T\) with n = 2"),
        ({"advantages": jnp.ones((2, 8))}, r"expected \(n, B, T\)"),
        (
            {"advantages": jnp.ones((2, 2, 4)), "mask": jnp.ones((2, 3))},
            r"`mask` has shape \(2, 3\); expected \(B, T\) = \(2, 4\)",
        ),
        ({"advantages": jnp.ones((2, 2, 4)), "ratio": jnp.ones((4,))}, r"`ratio` has shape"),
    ],
)
def test_bad_extra_args_raise(extra, message):
    tx = pama_solve(num_objectives=2)
    with pytest.raises(ValueError, match=message):
        tx.update(jnp.ones((2, 3)), tx.init(None), **extra)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="`num_objectives` is 0; expected an integer >= 1"):
        pama_solve(num_objectives=0)
    with pytest.raises(ValueError, match="`epsilon` is -0.1"):
        pama_solve(num_objectives=2, epsilon=-0.1)
    tx = pama_solve(num_objectives=2)
    with pytest.raises(ValueError, match="built for 2"):
        tx.update(jnp.ones((3, 4)), tx.init(None), advantages=jnp.ones((2, 1, 1)))


def test_combiner_with_a_batch_sharded_over_an_explicit_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(2)
    advantages = jnp.asarray(rng.normal(size=(3, 16, 4)), jnp.float32)
    mask = jnp.asarray(rng.random((16, 4)) < 0.7, jnp.float32)
    ratio = jnp.asarray(rng.uniform(0.7, 1.4, (16, 4)), jnp.float32)
    tx = pama_solve(num_objectives=3)
    step = jax.jit(lambda g, s, a, m, u: tx.update(g, s, advantages=a, mask=m, ratio=u))
    grads = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    expected = step(grads, tx.init(None), advantages, mask, ratio)
    sharded = (
        jax.device_put(advantages, jax.NamedSharding(mesh, jax.P(None, "data"))),
        *jax.device_put((mask, ratio), jax.NamedSharding(mesh, jax.P("data"))),
    )
    got = step(grads, tx.init(None), *sharded)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
