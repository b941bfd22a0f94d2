"""Gradient entanglement: softmax and linear toy models under autodiff, NPO signs, shared-prefix masking, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mojax.diagnostics import entanglement_statistics, npo_loss, shared_prefix_mask

statistics = jax.jit(entanglement_statistics)
BETA, STEP = 0.5, 1e-3


def _pair_grads(logp, params, chosen, rejected):
    """grad log pi for each side, with a leading pair axis of size 1 on every leaf."""
    add_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
    return add_axis(jax.grad(logp)(params, chosen)), add_axis(jax.grad(logp)(params, rejected))


def _moves(loss, logp, params, chosen, rejected, step=STEP):
    """Actual (d log pi_w, d log pi_l) / step after one gradient-descent step on `loss`."""
    new = jax.tree.map(lambda p, g: p - step * g, params, jax.grad(loss)(params))
    return tuple(float(logp(new, y) - logp(params, y)) / step for y in (chosen, rejected))


def test_softmax_toy_is_disentangled():
    """pi = softmax(z) over 3 tokens at the uniform point: |g|^2 = 2/3, <g_w, g_l> = -1/3; DPO raises w, lowers l."""
    logp = lambda z, y: jax.nn.log_softmax(z)[y]  # noqa: E731
    z = jnp.zeros(3)
    g_w, g_l = _pair_grads(logp, z, 0, 1)
    out = statistics(g_w, g_l)
    np.testing.assert_allclose(out.inner, [-1 / 3], rtol=1e-6)
    np.testing.assert_allclose(out.norm_chosen**2, [2 / 3], rtol=1e-6)
    np.testing.assert_allclose(out.norm_rejected**2, [2 / 3], rtol=1e-6)
    np.testing.assert_allclose(out.condition, [-0.5], rtol=1e-6)
    dpo = lambda z: -jax.nn.log_sigmoid(BETA * (logp(z, 0) - logp(z, 1)))  # noqa: E731
    chosen, rejected = _moves(dpo, logp, z, 0, 1)
    assert out.delta_chosen[0] > 0 and chosen > 0
    assert out.delta_rejected[0] < 0 and rejected < 0


def _linear_logp(theta, phi):
    """log pi(y) = theta^T phi(y), normalisation ignored."""
    return jnp.dot(theta, phi)


@pytest.mark.parametrize(
    ("phi_w", "phi_l", "both"),
    [
        ((1.0, 1.0), (1.0, 0.9), "increase"),
        ((1.0, 0.9), (1.0, 1.0), "decrease"),
    ],  # both raised, or the rejected one more
)
def test_shared_features_entangle_dpo_and_npo_untangles(phi_w, phi_l, both):
    phi_w, phi_l, theta = jnp.asarray(phi_w), jnp.asarray(phi_l), jnp.zeros(2)
    g_w, g_l = _pair_grads(_linear_logp, theta, phi_w, phi_l)
    coeff = BETA * jax.nn.sigmoid(-BETA * 0.0)  # |f'(m)| of DPO at margin 0
    out = statistics(g_w, g_l, coeff, coeff)
    np.testing.assert_allclose(out.inner, [1.9], rtol=1e-6)
    dpo = lambda t: -jax.nn.log_sigmoid(BETA * (_linear_logp(t, phi_w) - _linear_logp(t, phi_l)))  # noqa: E731
    chosen, rejected = _moves(dpo, _linear_logp, theta, phi_w, phi_l)
    np.testing.assert_allclose([chosen, rejected], [out.delta_chosen[0], out.delta_rejected[0]], rtol=1e-4)
    sign = 1.0 if both == "increase" else -1.0
    assert sign * chosen > 0 and sign * rejected > 0
    assert out.condition[0] > 1.0  # <g_w, g_l> exceeds the smaller squared norm: the entangled regime

    norms = out.norm_chosen, out.norm_rejected
    npo = lambda t: npo_loss(_linear_logp(t, phi_w)[None], _linear_logp(t, phi_l)[None], *norms, coeff)  # noqa: E731
    chosen, rejected = _moves(npo, _linear_logp, theta, phi_w, phi_l)
    assert chosen > 0 and rejected < 0
    gap = 1.0 - float(out.cosine[0])
    np.testing.assert_allclose(chosen, coeff * float(norms[0][0]) * gap, rtol=1e-4)
    np.testing.assert_allclose(rejected, -coeff * float(norms[1][0]) * gap, rtol=1e-4)


def test_condition_uses_the_smaller_norm():
    """The ratio divides by min(|g_w|^2, |g_l|^2), not |g_w|^2 twice: 1.9 / 1.81 > 1 flags the first case as entangled."""
    out = statistics(jnp.asarray([[1.0, 1.0], [1.0, 0.9]]), jnp.asarray([[1.0, 0.9], [1.0, 1.0]]))
    np.testing.assert_allclose(out.condition, [1.9 / 1.81, 1.9 / 1.81], rtol=1e-6)
    np.testing.assert_allclose(out.cosine, 1.9 / np.sqrt(2 * 1.81), rtol=1e-6)


def _token_logp(theta, tokens):
    """Token-level linear model: log pi(y) = sum_t theta^T phi(y_t), with phi a fixed feature table."""
    table = jnp.asarray([[1.0, 0.0, 0.3], [0.2, 1.0, 0.0], [0.5, 0.5, 1.0], [0.0, 0.4, 0.8], [0.9, 0.1, 0.1]])
    return jnp.sum(table[tokens] @ theta)


@pytest.mark.parametrize("loss_kind", ["dpo", "ipo", "simpo", "cpo"])
def test_predicted_moves_match_autodiff_for_margin_losses(loss_kind):
    """The weighted condition with each loss's (a_w, a_l) predicts autodiff's first-order moves exactly."""
    chosen_ids, rejected_ids = jnp.asarray([0, 2, 2, 4, 1]), jnp.asarray([0, 2, 3])
    theta = jnp.asarray([0.1, -0.2, 0.05])
    lengths = (float(chosen_ids.size), float(rejected_ids.size))
    logp_w, logp_l = _token_logp(theta, chosen_ids), _token_logp(theta, rejected_ids)
    if loss_kind == "simpo":
        gamma = 0.3
        margin = BETA * (logp_w / lengths[0] - logp_l / lengths[1]) - gamma
        f_prime = jax.nn.sigmoid(-margin)
        coeffs = (BETA * f_prime / lengths[0], BETA * f_prime / lengths[1])

        def loss(t):
            return -jax.nn.log_sigmoid(
                BETA * (_token_logp(t, chosen_ids) / lengths[0] - _token_logp(t, rejected_ids) / lengths[1]) - gamma
            )

    elif loss_kind == "ipo":
        tau = 0.1
        f_prime = -2.0 * (logp_w - logp_l - 1 / (2 * tau))
        coeffs = (f_prime, f_prime)

        def loss(t):
            return (_token_logp(t, chosen_ids) - _token_logp(t, rejected_ids) - 1 / (2 * tau)) ** 2

    else:
        f_prime = BETA * jax.nn.sigmoid(-BETA * (logp_w - logp_l))
        nll_weight = 1.0 if loss_kind == "cpo" else 0.0
        coeffs = (f_prime + nll_weight, f_prime)

        def loss(t):
            margin = BETA * (_token_logp(t, chosen_ids) - _token_logp(t, rejected_ids))
            return -jax.nn.log_sigmoid(margin) - nll_weight * _token_logp(t, chosen_ids)

    g_w, g_l = _pair_grads(_token_logp, theta, chosen_ids, rejected_ids)
    out = statistics(g_w, g_l, *coeffs)
    chosen, rejected = _moves(loss, _token_logp, theta, chosen_ids, rejected_ids)
    np.testing.assert_allclose([chosen, rejected], [out.delta_chosen[0], out.delta_rejected[0]], rtol=2e-3)
    if loss_kind == "simpo":  # length weights change the verdict: DPO weights would predict the opposite sign here
        dpo_like = statistics(g_w, g_l, 1.0, 1.0)
        assert dpo_like.delta_rejected[0] > 0 and out.delta_rejected[0] < 0 and rejected < 0


def test_statistics_over_pytrees_and_pairs():
    rng = np.random.default_rng(0)
    chosen = {
        "a": jnp.asarray(rng.normal(size=(3, 2, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    rejected = {
        "a": jnp.asarray(rng.normal(size=(3, 2, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    flat = lambda tree: np.concatenate([np.asarray(tree["a"]).reshape(3, -1), np.asarray(tree["b"])[:, None]], axis=1)  # noqa: E731
    w, lo = flat(chosen), flat(rejected)
    out = statistics(chosen, rejected, jnp.asarray([1.0, 2.0, 0.5]), 0.7)
    inner = np.sum(w * lo, axis=1)
    np.testing.assert_allclose(out.inner, inner, rtol=1e-5)
    np.testing.assert_allclose(out.norm_chosen, np.linalg.norm(w, axis=1), rtol=1e-5)
    np.testing.assert_allclose(out.cosine, inner / np.linalg.norm(w, axis=1) / np.linalg.norm(lo, axis=1), rtol=1e-5)
    np.testing.assert_allclose(
        out.delta_chosen, np.asarray([1.0, 2.0, 0.5]) * np.sum(w * w, 1) - 0.7 * inner, rtol=1e-5
    )
    np.testing.assert_allclose(
        out.delta_rejected, np.asarray([1.0, 2.0, 0.5]) * inner - 0.7 * np.sum(lo * lo, 1), rtol=1e-5
    )


def test_zero_gradients_are_finite():
    out = statistics(jnp.zeros((2, 3)), jnp.asarray([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    for leaf in out:
        assert np.all(np.isfinite(leaf))
    grad = jax.grad(lambda x: npo_loss(x[:1], x[1:], jnp.zeros(1), jnp.zeros(1), 1.0))(jnp.ones(2))
    assert np.all(np.isfinite(grad))


def test_shared_prefix_mask_drops_the_common_prefix():
    chosen = jnp.asarray([[5, 6, 7, 8], [1, 2, 3, 0], [4, 4, 4, 4]])
    rejected = jnp.asarray([[5, 6, 9], [4, 2, 3], [4, 4, 4]])
    chosen_mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    mu_w, mu_l = shared_prefix_mask(chosen, rejected, chosen_mask)
    np.testing.assert_array_equal(mu_w, [[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(mu_l, [[0, 0, 1], [1, 1, 1], [0, 0, 0]])


def test_masking_the_shared_prefix_reduces_entanglement_not_the_margin_gradient():
    """Shared-prefix tokens add identical gradients to g_w and g_l: masking them shrinks <g_w, g_l>, keeps g_w - g_l."""
    chosen, rejected = jnp.asarray([[0, 2, 1, 4]]), jnp.asarray([[0, 2, 3, 3]])
    mu_w, mu_l = shared_prefix_mask(chosen, rejected)
    theta = jnp.asarray([0.1, 0.2, -0.1])
    table_logp = lambda t, ids, mu: jnp.sum(mu * jax.vmap(lambda i: _token_logp(t, i[None]))(ids))  # noqa: E731
    full_w, full_l = (jax.grad(table_logp)(theta, ids[0], jnp.ones(4))[None] for ids in (chosen, rejected))
    sparse_w, sparse_l = (
        jax.grad(table_logp)(theta, chosen[0], mu_w[0])[None],
        jax.grad(table_logp)(theta, rejected[0], mu_l[0])[None],
    )
    np.testing.assert_allclose(full_w - full_l, sparse_w - sparse_l, atol=1e-6)
    assert statistics(sparse_w, sparse_l).inner[0] < statistics(full_w, full_l).inner[0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: entanglement_statistics({"a": jnp.ones((2, 3))}, {"b": jnp.ones((2, 3))}), "same structure"),
        (lambda: entanglement_statistics(jnp.ones((2, 3)), jnp.ones((3, 3))), "disagree on the number of pairs"),
        (
            lambda: entanglement_statistics(
                {"a": jnp.ones((2, 3)), "b": jnp.ones(())}, {"a": jnp.ones((2, 3)), "b": jnp.ones(())}
            ),
            "leading pair axis",
        ),
        (lambda: shared_prefix_mask(jnp.ones((2, 3)), jnp.ones((3, 3))), r"expected \(P, T_w\) and \(P, T_l\)"),
        (
            lambda: shared_prefix_mask(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 2))),
            "each mask must have the shape",
        ),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
