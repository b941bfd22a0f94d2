"""CTWA: covariance law and closed loop on a bandit, controller arithmetic, the objective-target gate,
parity with the numpy transcription, the combiner under jit, properties and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_ctwa import reference_controller, reference_signal, reference_statistics  # noqa: E402

from mojax.combiners.ctwa import ctwa_controller_step, ctwa_next_weights, ctwa_reweight
from mojax.diagnostics import covariance_statistics

# A 4-armed bandit: objective 1 pays on arms 0-1, objective 2 on arms 2-3.
ARM_REWARDS = np.asarray([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
START_POLICY = np.asarray([0.4, 0.3, 0.2, 0.1])


def _policy_samples(policy: np.ndarray, size: int) -> np.ndarray:
    """Arms repeated in proportion to the policy (largest remainders), so sample moments equal policy moments."""
    exact = policy * size
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[: size - counts.sum()]] += 1
    return np.repeat(np.arange(policy.size), counts)


def test_covariance_law_on_the_bandit():
    """d E[r_j] / d eta of an exponential-tilting step equals Cov_pi(r_j, L); the statistic and II agree."""
    weights = np.asarray([0.7, 0.3])
    signal = weights @ ARM_REWARDS
    slopes = []
    for eta in (0.1, 0.01, 1e-3):
        tilted = START_POLICY * np.exp(eta * signal)
        tilted /= tilted.sum()
        slopes.append((ARM_REWARDS @ tilted - ARM_REWARDS @ START_POLICY) / eta)
    np.testing.assert_allclose(slopes, [[0.08332, -0.08332], [0.083933, -0.083933], [0.0839933, -0.0839933]], atol=5e-6)
    errors = np.abs(np.asarray(slopes) - [0.084, -0.084]).max(axis=1)
    assert np.all(np.diff(errors) < 0) and errors[-1] < 1e-5  # converging to Cov_pi(r_j, L) = +-0.084 as eta -> 0
    logits = np.log(START_POLICY) + 1e-5 * START_POLICY * (signal - START_POLICY @ signal)  # vanilla logit PG
    vanilla = (ARM_REWARDS @ (np.exp(logits) / np.exp(logits).sum()) - ARM_REWARDS @ START_POLICY) / 1e-5
    np.testing.assert_allclose(vanilla, [0.0188, -0.0188], atol=1e-6)  # the pi^2-weighted covariance instead

    arms = _policy_samples(START_POLICY, 10)
    stats = jax.jit(covariance_statistics)(
        jnp.asarray(ARM_REWARDS.T[arms], jnp.float32), jnp.asarray(signal[arms], jnp.float32)
    )
    np.testing.assert_allclose(stats.cov, [0.084, -0.084], atol=1e-6)
    np.testing.assert_allclose(stats.interference, [0.0, 0.084], atol=1e-6)
    np.testing.assert_allclose(stats.interference_index, 0.042, atol=1e-6)
    np.testing.assert_allclose(stats.frac_neg, [0.0, 1.0])


def _bandit_run(tx, next_weights, steps=40, eta=1.0, batch=200):
    """Closed loop: scalarise with the combiner's next weights, tilt the policy by eta sum_j lambda_j r_j, repeat."""
    state = tx.init(jnp.zeros(4))

    @jax.jit
    def step(state, rewards, signal):
        return tx.update(jnp.asarray(ARM_REWARDS, jnp.float32), state, rewards=rewards, signal=signal)

    logits = np.log(START_POLICY)
    expected_rewards, weight_ratios = [], []
    for _ in range(steps):
        policy = np.exp(logits - logits.max())
        policy /= policy.sum()
        expected_rewards.append(ARM_REWARDS @ policy)
        arms = _policy_samples(policy, batch)
        weights = np.asarray(next_weights(state))
        rewards = ARM_REWARDS.T[arms]
        update, state = step(state, jnp.asarray(rewards, jnp.float32), jnp.asarray(rewards @ weights, jnp.float32))
        weight_ratios.append(float(state.weights[1] / state.weights[0]))
        logits = logits + eta * np.asarray(update)
    return np.asarray(expected_rewards), np.asarray(weight_ratios), state


def test_closed_loop_bandit_stops_the_interference():
    """Fixed weights drive E[r_2] -> 0; CTWA raises lambda_2 / lambda_1 until E[r_2] stops falling."""
    from mojax.combiners.linear import linear_scalarize

    fixed, _, _ = _bandit_run(linear_scalarize([0.7, 0.3]), lambda state: state.weights)
    assert np.all(np.diff(fixed[:, 1]) < 0) and fixed[-1, 1] < 1e-3

    adaptive, ratios, state = _bandit_run(
        ctwa_reweight([0.7, 0.3], [0.02, 0.02], lr=2.0, ema_rate=0.5), ctwa_next_weights
    )
    assert ratios[-1] > 2.0 * ratios[0] and ratios[-1] > 0.9  # lambda_2 caught up with lambda_1
    assert np.all(np.diff(adaptive[-10:, 1]) > -1e-3)  # E[r_2] no longer decreasing
    assert adaptive[-1, 1] > 0.1 and adaptive[-1, 1] > 100 * fixed[-1, 1]
    assert float(jnp.min(state.log_weights - jnp.log(jnp.asarray([0.7, 0.3])))) >= 0


def _fresh_state(init_weights, cov_targets, **kwargs):
    return ctwa_reweight(init_weights, cov_targets, **kwargs).init(None)


def test_controller_arithmetic():
    """Two controller steps with gate off."""
    state = _fresh_state([0.333, 0.333, 0.334], [0.15, 0.08, 0.08], lr=0.05, ema_rate=0.1)
    config = dict(cov_targets=jnp.asarray([0.15, 0.08, 0.08]), lr=0.05, ema_rate=0.1)
    state = ctwa_controller_step(state, jnp.asarray([0.2, -0.05, 0.01]), **config)
    np.testing.assert_allclose(state.ema, [0.2, -0.05, 0.01], atol=1e-7)
    np.testing.assert_allclose(state.deficit, [0.0, 0.13, 0.07], atol=1e-7)
    np.testing.assert_allclose(ctwa_next_weights(state), [0.333, 0.335172, 0.335171], atol=1e-6)
    state = ctwa_controller_step(state, jnp.asarray([0.1, 0.0, 0.1]), **config)
    np.testing.assert_allclose(state.ema, [0.19, -0.045, 0.019], atol=1e-7)
    np.testing.assert_allclose(state.deficit, [0.0, 0.125, 0.061], atol=1e-7)
    np.testing.assert_allclose(ctwa_next_weights(state), [0.333, 0.337273, 0.336195], atol=1e-6)


def test_gate_stops_objectives_at_their_target():
    """An objective whose batch mean reward reached obj_target gets no deficit even below c*."""
    state = _fresh_state([0.25, 0.25, 0.5], 0.1)
    state = ctwa_controller_step(
        state,
        jnp.asarray([-0.2, -0.2, 0.0]),
        jnp.asarray([0.3, 0.96, 0.5]),
        cov_targets=jnp.full(3, 0.1),
        obj_targets=jnp.asarray([1.0, 0.95, 0.5]),
    )
    np.testing.assert_allclose(state.deficit, [0.3, 0.0, 0.0], atol=1e-7)  # reaching the target exactly also gates
    tx = ctwa_reweight([0.5, 0.5], 0.1, obj_targets=[1.0, 0.95])
    rewards = jnp.asarray([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    _, state = jax.jit(tx.update)(
        jnp.ones((2, 3)), tx.init(None), rewards=rewards, signal=jnp.asarray([1.0, -1.0, 2.0, 0.0])
    )
    assert float(state.deficit[1]) == 0.0 and float(state.deficit[0]) > 0.0


@pytest.mark.parametrize(("use_corr_target", "global_metrics"), [(False, False), (True, True)])
def test_combiner_matches_the_reference_loop(use_corr_target, global_metrics):
    """Three steps on random batches (groups, padding rows, outliers) against the numpy transcription."""
    rng = np.random.default_rng(4)
    batch, length, n = 24, 5, 3
    init, targets, caps = np.asarray([0.2, 0.3, 0.5]), np.asarray([0.3, 0.05, 0.1]), np.asarray([0.5, 9.0, 9.0])
    tx = ctwa_reweight(
        init,
        targets,
        lr=0.5,
        ema_rate=0.3,
        obj_targets=caps,
        use_corr_target=use_corr_target,
        global_metrics=global_metrics,
    )
    step = jax.jit(tx.update)
    state = tx.init(None)
    log_w, ema, initialized = np.log(init), np.zeros(n), False
    for _ in range(3):
        adv, logp_old = rng.normal(size=(batch, length)), rng.normal(size=(batch, length))
        logp_new = logp_old + 0.3 * rng.normal(size=(batch, length))
        mask = (np.arange(length)[None] < rng.integers(0, length + 1, (batch, 1))).astype(np.float64)
        mask[:3] = 1.0
        rewards, ids = rng.normal(size=(batch, n)), rng.integers(0, 5, batch) * 13
        w = reference_signal(adv, mask, logp_new, logp_old)
        w[rng.integers(0, batch)] *= 1e5
        expected = reference_statistics(rewards, w, ids, global_metrics=global_metrics)
        value = expected["corr" if use_corr_target else "cov"]
        applied = np.exp(log_w)
        log_w, ema = reference_controller(log_w, ema, initialized, value, rewards.mean(0), targets, 0.5, 0.3, caps)
        initialized = True
        update, state = step(
            jnp.eye(n, dtype=jnp.float32),
            state,
            rewards=jnp.asarray(rewards, jnp.float32),
            signal=jnp.asarray(np.nan_to_num(w), jnp.float32),
            group_ids=jnp.asarray(ids, jnp.int32),
            mask=jnp.asarray(mask, jnp.float32),
        )
        np.testing.assert_allclose(update, applied, rtol=1e-5)
        np.testing.assert_allclose(state.weights, applied, rtol=1e-5)
        np.testing.assert_allclose(state.ema, ema, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ctwa_next_weights(state), np.exp(log_w), rtol=1e-5)


def test_combiner_under_jit_in_a_chain_without_recompiling():
    n, traces = 2, []
    tx = optax.chain(ctwa_reweight([0.5, 0.5], [0.1, 0.2]), optax.sgd(0.1))
    params = {"w": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}

    @jax.jit
    def step(params, state, rewards, signal, group_ids):
        traces.append(1)
        stacked = jax.tree.map(lambda p: jnp.ones((n, *p.shape)), params)
        updates, state = tx.update(
            stacked, state, params, rewards=rewards, signal=signal, group_ids=group_ids, advantages=None
        )
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    structure = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    rng = np.random.default_rng(5)
    for _ in range(4):
        rewards = jnp.asarray(rng.normal(size=(8, n)), jnp.float32)
        params, state = step(
            params, state, rewards, jnp.asarray(rng.normal(size=8), jnp.float32), jnp.arange(8, dtype=jnp.int32) // 2
        )
    assert len(traces) == 1
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == structure
    assert bool(state[0].initialized)


def test_applies_current_weights_then_adapts():
    tx = ctwa_reweight([0.25, 0.75], [0.5, 0.5], lr=1.0)
    grads = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    no_groups = dict(rewards=jnp.ones((3, 2)), signal=jnp.ones(3), group_ids=jnp.arange(3, dtype=jnp.int32))
    step = jax.jit(tx.update)
    update, state = step(grads, tx.init(None), **no_groups)
    np.testing.assert_allclose(update, [0.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(
        ctwa_next_weights(state), np.asarray([0.25, 0.75]) * np.exp(0.5), rtol=1e-6
    )  # cov = 0: all grow
    update, state = step(grads, state, **no_groups)
    np.testing.assert_allclose(update, np.asarray([0.25, 0.75]) * np.exp(0.5), rtol=1e-6)
    assert int(state.statistics.num_valid_groups) == 0 and np.all(np.isfinite(state.log_weights))


def test_renormalize_keeps_the_simplex_and_the_ratios():
    stats = [jnp.asarray([0.3, -0.1, 0.0]), jnp.asarray([-0.2, 0.1, 0.05])]
    config = dict(cov_targets=jnp.asarray([0.1, 0.1, 0.2]), lr=0.7)
    plain = _fresh_state([0.2, 0.3, 0.5], 0.1)
    normalised = plain
    for value in stats:
        plain = ctwa_controller_step(plain, value, **config)
        normalised = ctwa_controller_step(normalised, value, **config, renormalize=True)
    np.testing.assert_allclose(jnp.sum(ctwa_next_weights(normalised)), 1.0, rtol=1e-6)
    raw = ctwa_next_weights(plain)
    np.testing.assert_allclose(ctwa_next_weights(normalised), raw / jnp.sum(raw), rtol=1e-6)
    assert float(jnp.sum(raw)) > 1.0


controller = jax.jit(ctwa_controller_step, static_argnames=("lr", "ema_rate", "renormalize"))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.lists(st.floats(-5, 5, width=32), min_size=3, max_size=3), min_size=1, max_size=6),
    st.floats(0.0, 2.0),
    st.sampled_from([0.1, 0.5, 1.0]),
)
def test_weights_only_grow(values, lr, ema):
    state = _fresh_state([0.2, 0.3, 0.5], 0.0)
    targets = jnp.asarray([0.1, 0.0, 0.3])
    for value in values:
        previous = state.log_weights
        state = controller(state, jnp.asarray(value), cov_targets=targets, lr=lr, ema_rate=ema)
        assert np.all(np.asarray(state.log_weights) >= np.asarray(previous))
        assert np.all(np.asarray(state.deficit) >= 0) and np.all(np.isfinite(state.log_weights))


def test_unreachable_targets_never_overflow_and_keep_the_ratios():
    state = _fresh_state([0.2, 0.3, 0.5], 0.1)
    deficit_gap = jnp.asarray([0.0, 1.0, 2.0])  # the targets exceed the statistic by these amounts, every step
    for _ in range(200):
        state = ctwa_controller_step(state, -deficit_gap, cov_targets=jnp.zeros(3), lr=1.0)
    weights = np.asarray(ctwa_next_weights(state))
    assert np.all(np.isfinite(weights)) and float(np.max(state.log_weights)) == pytest.approx(60.0)
    expected_log_ratios = np.log([0.3 / 0.2, 0.5 / 0.2]) + 200 * np.asarray([1.0, 2.0])
    np.testing.assert_allclose(np.asarray(state.log_weights[1:] - state.log_weights[0]), expected_log_ratios, rtol=1e-5)


def test_single_objective():
    tx = ctwa_reweight([1.0], [0.1])
    update, state = jax.jit(tx.update)(
        jnp.ones((1, 2)), tx.init(None), rewards=jnp.asarray([[1.0], [0.0]]), signal=jnp.asarray([1.0, 0.0])
    )
    np.testing.assert_allclose(update, [1.0, 1.0])
    np.testing.assert_allclose(state.statistics.cov, [0.25])
    np.testing.assert_allclose(state.deficit, [0.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(init_weights=[0.5, 0.6], cov_targets=0.1),
            r"`init_weights` is \[0.5, 0.6\]; expected a point of the simplex",
        ),
        (dict(init_weights=[1.5, -0.5], cov_targets=0.1), "expected a point of the simplex"),
        (dict(init_weights=[[0.5, 0.5]], cov_targets=0.1), "expected a non-empty vector"),
        (
            dict(init_weights=[0.5, 0.5], cov_targets=[0.1, 0.1, 0.1]),
            "`cov_targets` has 3 entries; expected 2, one per objective",
        ),
        (dict(init_weights=[0.5, 0.5], cov_targets=0.1, obj_targets=[1.0]), "`obj_targets` has 1 entries; expected 2"),
        (dict(init_weights=[0.5, 0.5], cov_targets=0.1, lr=-1.0), "`lr` is -1; expected a number in"),
        (dict(init_weights=[0.5, 0.5], cov_targets=0.1, ema_rate=0.0), r"expected a number in \(0, 1\]"),
    ],
)
def test_bad_construction_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ctwa_reweight(**kwargs)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (dict(signal=jnp.ones(4)), "needs the extra argument `rewards`"),
        (dict(rewards=jnp.ones((4, 2))), "needs the extra argument `signal`"),
        (
            dict(rewards=jnp.ones((4, 3)), signal=jnp.ones(4)),
            r"`rewards` has shape \(4, 3\); expected \(B, n\) with n = 2",
        ),
        (dict(rewards=jnp.ones((4, 2)), signal=jnp.ones(5)), r"`signal` has shape \(5,\)"),
        (
            dict(rewards=jnp.ones((4, 2)), signal=jnp.ones(4), mask=jnp.ones(4)),
            r"`mask` has shape \(4,\); expected \(B, T\)",
        ),
        (dict(rewards=jnp.ones((4, 2)), signal=jnp.ones(4), mask=jnp.ones((3, 5))), r"expected \(B, T\) with B = 4"),
        (dict(rewards=jnp.ones((4, 2)), signal=jnp.ones(4), group_ids=jnp.ones(4)), "expected integer prompt ids"),
    ],
)
def test_bad_extra_args_raise(extra, message):
    tx = ctwa_reweight([0.5, 0.5], 0.1)
    with pytest.raises(ValueError, match=message):
        tx.update(jnp.ones((2, 3)), tx.init(None), **extra)


def test_controller_gate_needs_mean_reward():
    with pytest.raises(ValueError, match="needs `mean_reward`"):
        ctwa_controller_step(_fresh_state([1.0], 0.1), jnp.zeros(1), cov_targets=jnp.ones(1), obj_targets=jnp.ones(1))


def test_combiner_with_a_batch_sharded_over_an_explicit_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(7)
    batch = (
        jnp.asarray(rng.normal(size=(16, 2)), jnp.float32),
        jnp.asarray(rng.normal(size=16), jnp.float32),
        jnp.asarray(rng.integers(0, 4, 16), jnp.int32),
        jnp.asarray(rng.random((16, 3)) < 0.8, jnp.float32),
    )
    tx = ctwa_reweight([0.4, 0.6], [0.3, 0.3])
    step = jax.jit(lambda g, s, r, w, i, m: tx.update(g, s, rewards=r, signal=w, group_ids=i, mask=m))
    grads = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    expected = step(grads, tx.init(None), *batch)
    got = step(grads, tx.init(None), *jax.device_put(batch, jax.NamedSharding(mesh, jax.P("data"))))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
