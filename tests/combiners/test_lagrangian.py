"""The PPO-Lagrangian combiner's multiplier rule and its bound."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mojax.combiners.lagrangian import LOG_LAMBDA_LIMIT, lagrangian


def _run(tx, rewards: np.ndarray, steps: int):
    """The combiner's states after `steps` updates on the same rewards (one dummy gradient per objective)."""
    n = rewards.shape[1]
    grads = {"w": jnp.ones((n, 2), jnp.float32)}
    state = tx.init(None)
    update = jax.jit(lambda s: tx.update(grads, s, None, rewards=jnp.asarray(rewards, jnp.float32))[1])
    states = []
    for _ in range(steps):
        state = update(state)
        states.append(state)
    return states


def test_log_lambda_follows_the_safe_rlhf_rule():
    """log lambda += lr (d - J) lambda, J the window mean of the constrained objective's scores: a numpy loop."""
    rewards = np.array([[1.0, 0.1], [0.5, 0.3]])
    lr, threshold = 0.3, 0.5
    states = _run(lagrangian(num_objectives=2, thresholds=threshold, lambda_lr=lr, cost_window_size=4), rewards, 3)
    log_lambda, window = 0.0, []
    for state in states:
        window = (window + list(rewards[:, 1]))[-4:]
        log_lambda += lr * (threshold - np.mean(window)) * np.exp(log_lambda)
        assert float(state.log_lambda[1]) == pytest.approx(log_lambda, rel=1e-6)
        multiplier = np.exp(log_lambda)
        np.testing.assert_allclose(state.weights, [1 / (1 + multiplier), multiplier / (1 + multiplier)], rtol=1e-6)


@pytest.mark.parametrize("lambda_max", [None, 1e300])
def test_a_violated_constraint_stops_the_multiplier_at_the_limit_with_finite_weights(lambda_max):
    """Under a constraint that stays violated the rule reaches infinity in finite time; the multiplier stops at
    e^LOG_LAMBDA_LIMIT (also below a larger lambda_max), where the constraint's weight is 1 and every weight finite."""
    rewards = np.array([[1.0, -1.0]] * 4)
    tx = lagrangian(num_objectives=2, thresholds=0.5, lambda_lr=0.5, lambda_max=lambda_max)
    last = _run(tx, rewards, 40)[-1]
    assert float(last.log_lambda[1]) == LOG_LAMBDA_LIMIT
    assert np.all(np.isfinite(last.weights))
    np.testing.assert_allclose(last.weights, [0.0, 1.0], atol=1e-30)


def test_a_smaller_lambda_max_caps_the_multiplier():
    rewards = np.array([[1.0, -1.0]] * 4)
    last = _run(lagrangian(num_objectives=2, thresholds=0.5, lambda_lr=0.5, lambda_max=10.0), rewards, 40)[-1]
    assert float(last.log_lambda[1]) == pytest.approx(np.log(10.0), rel=1e-6)
    np.testing.assert_allclose(last.weights, [1 / 11, 10 / 11], rtol=1e-6)
