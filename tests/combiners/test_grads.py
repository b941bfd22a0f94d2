"""per_objective_grads and probe_combined_grads: agreement with jax.grad, probe masks, one forward, the probe gradient as rescaled min-norm point, jit, errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mojax.combiners.gapo import gapo_rescale
from mojax.combiners.grads import per_objective_grads, probe_combined_grads
from mojax.combiners.mgda import mgda

N = 3
TARGETS = jnp.array([[1.0, -1.0], [-2.0, 0.5], [0.5, 2.0]])  # one regression target per objective


def make_params(dtype=jnp.float32) -> dict:
    """A 2-layer linear model: body W1 f32[4, 3], head W2 f32[3, 2] and bias b f32[2]."""
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "body": {"W1": jax.random.normal(k1, (4, 3), dtype)},
        "head": {"W2": jax.random.normal(k2, (3, 2), dtype), "b": jnp.zeros((2,), dtype)},
    }


HEAD_ONLY = {"body": False, "head": True}
INPUTS = jax.random.normal(jax.random.key(1), (5, 4))
P_GAPO = gapo_rescale(preference=(0.2, 0.3, 0.5))  # no min-norm solve: cheap to run eagerly


def losses_fn(params, x, calls=None):
    """L_i = mean ||x W1 W2 + b - t_i||^2 for the N targets; appends to `calls` each time it is traced or run."""
    if calls is not None:
        calls.append(1)
    y = (x.astype(params["head"]["W2"].dtype) @ params["body"]["W1"]) @ params["head"]["W2"] + params["head"]["b"]
    return jnp.stack([jnp.mean(jnp.sum((y - t) ** 2, axis=-1)) for t in TARGETS.astype(y.dtype)])


@jax.jit
def separate_grads(params, x):
    """The oracle: n separate jax.grad calls, stacked."""
    rows = [jax.grad(lambda p, i=i: losses_fn(p, x)[i])(params) for i in range(N)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *rows)


@pytest.mark.parametrize("sequential", [False, True], ids=["vmapped", "sequential"])
def test_agrees_with_separate_grads(sequential):
    params = make_params()
    losses, grads = per_objective_grads(losses_fn, params, INPUTS, sequential=sequential)
    np.testing.assert_allclose(losses, losses_fn(params, INPUTS), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, separate_grads(params, INPUTS)
    )
    assert all(leaf.shape[0] == N for leaf in jax.tree.leaves(grads))


def test_has_aux_returns_value_like_value_and_grad():
    params = make_params()

    def with_aux(p, x):
        losses = losses_fn(p, x)
        return losses, {"total": jnp.sum(losses)}

    (losses, aux), grads = per_objective_grads(with_aux, params, INPUTS, has_aux=True)
    np.testing.assert_allclose(aux["total"], jnp.sum(losses))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, separate_grads(params, INPUTS)
    )


@pytest.mark.parametrize(
    "probe_mask",
    [
        pytest.param(HEAD_ONLY, id="prefix"),
        pytest.param({"body": {"W1": False}, "head": {"W2": True, "b": True}}, id="full-structure"),
        pytest.param(
            lambda p: jax.tree.map(lambda leaf: leaf.ndim == 2 and leaf.shape[0] == 3, p), id="callable-W2-only"
        ),
    ],
)
@pytest.mark.parametrize("sequential", [False, True], ids=["vmapped", "sequential"])
def test_probe_mask_restricts_leaves(probe_mask, sequential):
    params = make_params()
    losses, grads = per_objective_grads(losses_fn, params, INPUTS, probe_mask=probe_mask, sequential=sequential)
    full = separate_grads(params, INPUTS)
    assert isinstance(grads["body"]["W1"], optax.MaskedNode)
    np.testing.assert_allclose(grads["head"]["W2"], full["head"]["W2"], rtol=1e-5, atol=1e-6)
    if callable(probe_mask):
        assert isinstance(grads["head"]["b"], optax.MaskedNode)
        assert len(jax.tree.leaves(grads)) == 1
    else:
        np.testing.assert_allclose(grads["head"]["b"], full["head"]["b"], rtol=1e-5, atol=1e-6)
        assert len(jax.tree.leaves(grads)) == 2
    np.testing.assert_allclose(losses, losses_fn(params, INPUTS), rtol=1e-6)


def test_one_forward_pass_per_call():
    """loss_fn is traced exactly once: one jax.vjp, whose pullback is vmapped over eye(n) or mapped in sequence."""
    params = make_params()
    for run in (
        lambda calls: per_objective_grads(losses_fn, params, INPUTS, calls),
        lambda calls: per_objective_grads(losses_fn, params, INPUTS, calls, sequential=True),
        lambda calls: per_objective_grads(losses_fn, params, INPUTS, calls, probe_mask=HEAD_ONLY),
        lambda calls: jax.jit(lambda p: per_objective_grads(losses_fn, p, INPUTS, calls))(params),
        lambda calls: probe_combined_grads(
            losses_fn, params, P_GAPO, P_GAPO.init(params), INPUTS, calls, probe_mask=HEAD_ONLY
        ),
    ):
        calls = []
        run(calls)
        assert len(calls) == 1


def flops(fn, *args) -> float:
    """XLA's flop count of the compiled fn."""
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_probe_spends_no_backward_work_on_the_rest():
    """On a body-heavy model the probe costs ~ one forward + backward, far below n full backward passes."""
    keys = jax.random.split(jax.random.key(2), 3)
    params = {
        "body": [jax.random.normal(k, (96, 96)) / 10 for k in keys[:2]],
        "head": jax.random.normal(keys[2], (96, 2)),
    }
    x = jax.random.normal(jax.random.key(3), (64, 96))

    def deep_losses(p, x):
        h = jnp.tanh(jnp.tanh(x @ p["body"][0]) @ p["body"][1])
        y = h @ p["head"]
        return jnp.stack([jnp.mean((y - t) ** 2) for t in (-1.0, 0.0, 1.0)])

    mask = {"body": False, "head": True}
    tx = gapo_rescale(1.0, num_objectives=3)
    every = flops(lambda p: per_objective_grads(deep_losses, p, x), params)
    probe = flops(lambda p: per_objective_grads(deep_losses, p, x, probe_mask=mask), params)
    combined = flops(lambda p: probe_combined_grads(deep_losses, p, tx, tx.init(p), x, probe_mask=mask)[0], params)
    single = flops(lambda p: jax.grad(lambda q: jnp.sum(deep_losses(q, x)))(p), params)
    assert probe < 0.5 * every
    assert combined < 1.15 * single  # a second forward pass would add ~40%


def test_probe_gradient_is_the_rescaled_min_norm_point():
    """Restricted to the head, grad sum_i w_i L_i = sum_i alpha_i g_i / ||g_i|| with alpha the min-norm point."""
    params = make_params()
    tx = gapo_rescale(1.0, num_objectives=N)
    grads, state, losses = probe_combined_grads(losses_fn, params, tx, tx.init(params), INPUTS, probe_mask=HEAD_ONLY)
    head = separate_grads(params, INPUTS)["head"]
    rows = np.concatenate([np.asarray(head["W2"]).reshape(N, -1), np.asarray(head["b"]).reshape(N, -1)], axis=1).astype(
        np.float64
    )
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    alpha = np.asarray(state.alpha, np.float64)
    expected = alpha @ unit
    seen = np.concatenate([np.asarray(grads["head"]["W2"]).ravel(), np.asarray(grads["head"]["b"]).ravel()])
    np.testing.assert_allclose(seen, expected, rtol=1e-5, atol=1e-6)
    progress, norm_sq = unit @ expected, expected @ expected  # alpha is the min-norm point of the unit gradients
    assert np.all(progress >= norm_sq - 1e-5)
    np.testing.assert_allclose(progress[alpha > 0], norm_sq, atol=1e-5)
    # The body gets the natural extension: grad of the same weighted loss.
    body = jax.grad(lambda p: jnp.dot(state.weights, losses_fn(p, INPUTS)))(params)["body"]["W1"]
    np.testing.assert_allclose(grads["body"]["W1"], body, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, losses_fn(params, INPUTS), rtol=1e-6)


@pytest.mark.parametrize("sequential", [False, True], ids=["vmapped", "sequential"])
def test_probe_combined_grads_under_jit_and_losses_reach_the_combiner(sequential):
    """Jitted equals eager; MGDA's `loss` normaliser reads the losses probe_combined_grads passes on."""
    params = make_params()
    tx = mgda(num_objectives=N, normalize="loss")
    state = tx.init(params)

    def step(p, s):
        return probe_combined_grads(losses_fn, p, tx, s, INPUTS, probe_mask=HEAD_ONLY, sequential=sequential)

    grads, new_state, losses = jax.jit(step)(params, state)
    eager_grads, eager_state, _ = step(params, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, eager_grads)
    np.testing.assert_allclose(new_state.weights, eager_state.weights, rtol=1e-5)
    np.testing.assert_allclose(new_state.weights, new_state.alpha / np.asarray(losses), rtol=1e-5)
    full = jax.grad(lambda p: jnp.dot(new_state.weights, losses_fn(p, INPUTS)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, full)


def test_bf16_parameters():
    params = make_params(jnp.bfloat16)
    losses, grads = per_objective_grads(losses_fn, params, INPUTS, probe_mask=HEAD_ONLY)
    assert losses.dtype == jnp.bfloat16 and grads["head"]["W2"].dtype == jnp.bfloat16
    tx = gapo_rescale(1.0, num_objectives=N)
    step = jax.jit(lambda p, s: probe_combined_grads(losses_fn, p, tx, s, INPUTS, probe_mask=HEAD_ONLY))
    full, state, _ = step(params, tx.init(params))
    assert all(np.all(np.isfinite(np.asarray(leaf, np.float32))) for leaf in jax.tree.leaves((full, state)))
    assert full["body"]["W1"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("probe_mask", "message"),
    [
        ({"body": False, "head": False}, "selects no parameter"),
        ({"body": False, "head": jnp.array(True)}, "static Python bool"),
        ({"body": False}, "structure"),
    ],
)
def test_bad_probe_mask_raises(probe_mask, message):
    with pytest.raises(ValueError, match=message):
        per_objective_grads(losses_fn, make_params(), INPUTS, probe_mask=probe_mask)


def test_scalar_loss_raises():
    with pytest.raises(ValueError, match="vector of n per-objective losses"):
        per_objective_grads(lambda p, x: jnp.sum(losses_fn(p, x)), make_params(), INPUTS)


def test_chain_instead_of_combiner_raises():
    params = make_params()
    chain = optax.chain(mgda(num_objectives=N), optax.identity())
    with pytest.raises(ValueError, match="field `weights`"):
        probe_combined_grads(losses_fn, params, chain, chain.init(params), INPUTS, probe_mask=HEAD_ONLY)


def test_sequential_pullbacks_run_as_a_loop_of_unbatched_passes():
    """In sequence the compiled program loops over the objectives (a while loop) instead of batching the pullback."""
    params = make_params()
    for sequential, looped in ((True, True), (False, False)):
        program = jax.jit(lambda p, s=sequential: per_objective_grads(losses_fn, p, INPUTS, sequential=s)[1])
        assert ("while(" in program.lower(params).compile().as_text()) is looped


@pytest.mark.parametrize("sequential", [False, True], ids=["vmapped", "sequential"])
def test_one_objective_is_one_plain_pullback(sequential):
    """n = 1: jax.grad's gradient with a leading axis of one, from a single pass (no loop, and the same compiled cost
    as jax.grad: a vmap of size one made XLA:CPU lay the weight gradients' operands out with transposing copies)."""
    params = make_params()
    single_loss = lambda p, x: losses_fn(p, x)[:1]  # noqa: E731
    losses, grads = per_objective_grads(single_loss, params, INPUTS, sequential=sequential)
    expected = jax.grad(lambda p: single_loss(p, INPUTS)[0])(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[None], rtol=1e-6), grads, expected)
    np.testing.assert_allclose(losses, single_loss(params, INPUTS), rtol=1e-6)
    text = jax.jit(lambda p: per_objective_grads(single_loss, p, INPUTS, sequential=sequential)[1]).lower(params)
    text = text.compile().as_text()
    plain = jax.jit(lambda p: jax.grad(lambda q: single_loss(q, INPUTS)[0])(p)).lower(params).compile().as_text()
    layout_ops = lambda hlo: len(re.findall(r"= \S+ (?:copy|transpose)\(", hlo))  # noqa: E731
    assert "while(" not in text and layout_ops(text) == layout_ops(plain)
