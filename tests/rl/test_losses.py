"""Policy, KL, entropy and value losses: hand-computed values, loop transcriptions, GSPO, and exact micro-batching."""

import functools
import math
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from mojax.rl.losses import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    LossTerms,
    aggregate,
    clip_fraction,
    kl_estimate,
    masked_mean,
    ppo_policy_loss,
    ppo_policy_terms,
    token_entropy,
    token_logprobs,
    value_loss,
)

B, T, N = 6, 4, 3
LN2 = float(np.log(2.0))


def _batch(seed=0):
    """Log-probs, old log-probs, f32[n, B, T] advantages and a ragged mask with one empty row."""
    rng = np.random.default_rng(seed)
    old_logp = rng.normal(size=(B, T)).astype(np.float32) - 2.0
    logp = old_logp + 0.4 * rng.normal(size=(B, T)).astype(np.float32)
    advantages = rng.normal(size=(N, B, T)).astype(np.float32)
    lengths = np.array([4, 1, 0, 3, 2, 4])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return logp, old_logp, advantages, mask


def close(got, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- loop transcriptions


def loop_ppo_loss(logp, old_logp, advantages, mask, epsilon, epsilon_high, mode, scale=None, dual_clip=None):
    """Per-objective PPO-clip loss with plain loops over objectives, rows and tokens."""
    losses = np.zeros(advantages.shape[0])
    for k in range(advantages.shape[0]):
        row_sums, row_counts = [], []
        for b in range(mask.shape[0]):
            total, count = 0.0, 0
            for t in range(mask.shape[1]):
                if not mask[b, t]:
                    continue
                ratio = np.exp(np.float64(logp[b, t]) - old_logp[b, t])
                a = advantages[k, b, t]
                loss = max(-a * ratio, -a * min(max(ratio, 1 - epsilon), 1 + epsilon_high))
                if dual_clip is not None and a < 0:
                    loss = min(loss, -dual_clip * a)
                total, count = total + loss, count + 1
            row_sums.append(total)
            row_counts.append(count)
        rows = [b for b in range(mask.shape[0]) if row_counts[b] > 0]
        if mode == "token-mean":
            losses[k] = sum(row_sums) / sum(row_counts)
        elif mode == "seq-mean-token-mean":
            losses[k] = sum(row_sums[b] / row_counts[b] for b in rows) / len(rows)
        elif mode == "seq-mean-token-sum":
            losses[k] = sum(row_sums[b] for b in rows) / len(rows)
        else:
            losses[k] = sum(row_sums) / scale
    return losses


# ------------------------------------------------------------------------------------------- tests


def test_kl_estimators_by_hand():
    """x = logp - ref_logp = (ln 2, -ln 2, 0): k1 = x, k2 = x^2/2, k3 = exp(-x) + x - 1."""
    logp = jnp.asarray([[LN2, -LN2, 0.0]])
    ref_logp = jnp.zeros((1, 3))
    close(kl_estimate(logp, ref_logp, "k1"), [[LN2, -LN2, 0.0]])
    close(kl_estimate(logp, ref_logp, "k2"), [[LN2**2 / 2, LN2**2 / 2, 0.0]])
    close(kl_estimate(logp, ref_logp, "k3"), [[0.5 + LN2 - 1.0, 2.0 - LN2 - 1.0, 0.0]])
    for alias, kind in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        assert KL_ESTIMATORS[alias] == kind
        close(kl_estimate(logp, ref_logp, alias), np.asarray(kl_estimate(logp, ref_logp, kind)))


def test_kl_clamp_bounds_the_estimate_and_k3_never_overflows():
    logp = jnp.asarray([[-200.0, 0.0, 200.0]])
    close(kl_estimate(logp, jnp.zeros((1, 3)), "k1", clamp=10.0), [[-10.0, 0.0, 10.0]])
    close(kl_estimate(logp, jnp.zeros((1, 3)), "k3", clamp=10.0), [[10.0, 0.0, 10.0]])
    unclamped = np.asarray(kl_estimate(logp, jnp.zeros((1, 3)), "k3"))
    close(unclamped, [[np.exp(20.0) - 21.0, 0.0, np.exp(-20.0) + 19.0]], tol=1e-4)


def test_ppo_loss_by_hand():
    """Ratios (1.5, 0.5, 1.1), eps = 0.2, eps_high = 0.28, A = +2 then -1, token-mean."""
    logp = jnp.log(jnp.asarray([[1.5, 0.5, 1.1]]))
    advantages = jnp.asarray([[[2.0, 2.0, 2.0]], [[-1.0, -1.0, -1.0]]])
    mask = jnp.ones((1, 3))
    positive = [-2.0 * 1.28, -2.0 * 0.5, -2.0 * 1.1]  # clipped above at 1.28; unclipped below for A > 0
    negative = [1.5, 0.8, 1.1]  # max(-A rho, -A clip(rho)): 0.5 -> clipped to 0.8
    losses = ppo_policy_loss(logp, jnp.zeros((1, 3)), advantages, mask, epsilon=0.2, epsilon_high=0.28)
    close(losses, [np.mean(positive), np.mean(negative)])


def test_dual_clip_caps_the_loss_of_negative_advantages():
    """A = -1 with ratio 5 costs max(5, 1.2) = 5, capped at c = 3; ratio 2 stays 2; A > 0 is untouched."""
    logp = jnp.log(jnp.asarray([[5.0, 2.0]]))
    advantages = jnp.asarray([[[-1.0, -1.0]], [[1.0, 1.0]]])
    mask = jnp.asarray([[1.0, 1.0]])
    losses = ppo_policy_loss(
        logp, jnp.zeros((1, 2)), advantages, mask, dual_clip=3.0, loss_agg_mode="seq-mean-token-sum"
    )
    close(losses, [3.0 + 2.0, -1.2 - 1.2])
    plain = ppo_policy_loss(logp, jnp.zeros((1, 2)), advantages, mask, loss_agg_mode="seq-mean-token-sum")
    close(plain, [5.0 + 2.0, -1.2 - 1.2])


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_ppo_loss_matches_loop_for_every_aggregation(mode):
    logp, old_logp, advantages, mask = _batch(1)
    got = ppo_policy_loss(logp, old_logp, advantages, mask, epsilon_high=0.28, dual_clip=3.0, loss_agg_mode=mode)
    expected = loop_ppo_loss(logp, old_logp, advantages, mask, 0.2, 0.28, mode, scale=T, dual_clip=3.0)
    close(got, expected)
    scaled = ppo_policy_loss(logp, old_logp, advantages, mask, loss_agg_mode=mode, loss_scale_factor=7.0)
    close(scaled, loop_ppo_loss(logp, old_logp, advantages, mask, 0.2, 0.2, mode, scale=7.0))


def test_sequence_advantages_broadcast_over_tokens():
    logp, old_logp, advantages, mask = _batch(2)
    per_sequence = advantages[:, :, 0]
    close(
        ppo_policy_loss(logp, old_logp, per_sequence, mask),
        np.asarray(ppo_policy_loss(logp, old_logp, np.repeat(per_sequence[:, :, None], T, axis=2), mask)),
    )


def _loss_and_grad(mode, level):
    return jax.jit(
        jax.value_and_grad(
            lambda logp, old_logp, adv, mask: jnp.sum(
                ppo_policy_loss(logp, old_logp, adv, mask, loss_agg_mode=mode, importance_sampling_level=level)
            )
        )
    )


def test_gspo_equals_token_ppo_when_every_token_of_a_sequence_has_the_same_ratio():
    logp, old_logp, advantages, mask = _batch(3)
    shift = np.random.default_rng(0).normal(size=(B, 1)).astype(np.float32) * 0.3
    logp = old_logp + shift
    token, token_grad = _loss_and_grad("seq-mean-token-mean", "token")(logp, old_logp, advantages, mask)
    sequence, sequence_grad = _loss_and_grad("seq-mean-token-mean", "sequence")(logp, old_logp, advantages, mask)
    close(sequence, token)
    close(sequence_grad, token_grad)


def test_gspo_uses_the_geometric_mean_ratio_of_the_sequence():
    """Log-ratios (ln 2, 0) give s = sqrt(2) on both tokens; A = 1 and eps = 0.5 leave it unclipped."""
    logp = jnp.asarray([[LN2, 0.0]])
    losses = ppo_policy_loss(
        logp,
        jnp.zeros((1, 2)),
        jnp.ones((1, 1, 2)),
        jnp.ones((1, 2)),
        epsilon=0.5,
        importance_sampling_level="sequence",
    )
    close(losses, [-np.sqrt(2.0)])


@functools.cache
def _accumulated(mode):
    """Loss and gradient w.r.t. logp from the terms of two micro-batches of 3 rows, added then aggregated."""

    def loss(logp, old_logp, advantages, mask):
        halves = [slice(0, 3), slice(3, 6)]
        parts = [
            ppo_policy_terms(logp[s], old_logp[s], advantages[:, s], mask[s], loss_agg_mode=mode, dual_clip=3.0)
            for s in halves
        ]
        return jnp.sum(aggregate(parts[0] + parts[1], mode, T))

    return jax.jit(jax.value_and_grad(loss))


@functools.cache
def _full(mode):
    return jax.jit(
        jax.value_and_grad(
            lambda logp, old_logp, advantages, mask: jnp.sum(
                ppo_policy_loss(logp, old_logp, advantages, mask, loss_agg_mode=mode, dual_clip=3.0)
            )
        )
    )


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batch_terms_add_up_to_the_full_batch(mode):
    logp, old_logp, advantages, mask = _batch(4)
    value, grad = _full(mode)(logp, old_logp, advantages, mask)
    accumulated_value, accumulated_grad = _accumulated(mode)(logp, old_logp, advantages, mask)
    close(accumulated_value, value)
    close(accumulated_grad, grad)
    assert np.any(np.asarray(grad) != 0)


def test_loss_terms_add_elementwise():
    terms = LossTerms(jnp.asarray([1.0, 2.0]), jnp.asarray(3.0)) + LossTerms(jnp.asarray([4.0, 6.0]), jnp.asarray(1.0))
    close(terms.sums, [5.0, 8.0])
    close(aggregate(terms), [1.25, 2.0])
    close(aggregate(terms, "seq-mean-token-sum-norm", 2.0), [2.5, 4.0])


def test_value_loss_by_hand():
    """V = (1.0, 2.0), V_old = (0.5, 2.0), R = (0.0, 3.0), c = 0.2; the third token is padding."""
    values = jnp.asarray([[[1.0, 2.0, 9.0]], [[0.0, 0.0, 9.0]]])
    old_values = jnp.asarray([[[0.5, 2.0, 0.0]], [[0.5, -1.0, 0.0]]])
    returns = jnp.asarray([[[0.0, 3.0, 0.0]], [[1.0, 1.0, 0.0]]])
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    # objective 0: token 0 max(1, 0.7^2) = 1; token 1 max(1, 1) = 1  -> 0.5 * mean = 0.5
    # objective 1: token 0 max(1, (0.3 - 1)^2 = 0.49) = 1; token 1 max(1, (-0.8 - 1)^2 = 3.24) = 3.24 -> 1.06
    close(value_loss(values, old_values, returns, mask), [0.5, 0.5 * (1.0 + 3.24) / 2])
    per_objective = jnp.stack([mask, mask.at[0, 0].set(0.0)])  # objective 1 has no reward on its first token
    close(value_loss(values, old_values, returns, per_objective), [0.5, 0.5 * 3.24])


def test_token_logprobs_and_entropy_match_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 3.0
    targets = rng.integers(0, 7, size=(2, 3))
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_softmax, targets[..., None], axis=-1)[..., 0]
    outputs = jax.jit(
        lambda z: (
            token_logprobs(z, targets),
            token_entropy(z),
            jax.grad(lambda z: jnp.sum(token_logprobs(z, targets)))(z),
        )
    )(logits)
    close(outputs[0], expected)
    close(outputs[1], -(np.exp(log_softmax) * log_softmax).sum(-1))
    close(outputs[2], np.eye(7)[targets] - np.exp(log_softmax))


def test_clip_fraction_and_masked_mean_by_hand():
    """Ratios (1.5, 0.5, 1.1, 3.0), A = +1: only 1.5 and 3.0 are clipped; the last token is padding."""
    logp = jnp.log(jnp.asarray([[1.5, 0.5, 1.1, 3.0]]))
    mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
    advantages = jnp.ones((2, 1, 4)).at[1].set(-1.0)
    # A = +1: clipped where rho > 1.2 (1.5); A = -1: clipped where rho < 0.8 (0.5)
    close(clip_fraction(logp, jnp.zeros((1, 4)), advantages, mask, epsilon=0.2), 2.0 / 6.0)
    close(masked_mean(jnp.asarray([[1.0, 2.0, 6.0, 100.0]]), mask), 3.0)
    close(masked_mean(advantages, jnp.zeros((1, 4))), [0.0, 0.0])


def test_huge_log_ratios_stay_finite():
    logp, old_logp, advantages, mask = _batch(5)
    losses = ppo_policy_loss(logp + 500.0, old_logp, advantages, mask, dual_clip=3.0)
    assert np.all(np.isfinite(np.asarray(losses)))


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda b: ppo_policy_loss(*b, loss_agg_mode="seq-mean"), ValueError, "`loss_agg_mode` is 'seq-mean'"),
        (lambda b: ppo_policy_loss(*b, importance_sampling_level="seq"), ValueError, "`importance_sampling_level`"),
        (lambda b: ppo_policy_loss(*b, dual_clip=1.0), ValueError, "`dual_clip` is 1"),
        (lambda b: ppo_policy_loss(*b, epsilon=-0.1), ValueError, "`epsilon` is -0.1"),
        (lambda b: ppo_policy_loss(*b, epsilon="0.2"), TypeError, "`epsilon` is a str"),
        (lambda b: ppo_policy_loss(b[0], b[1][:, :2], *b[2:]), ValueError, "`old_logp` has shape"),
        (lambda b: ppo_policy_loss(b[0], b[1], b[2][:, :2], b[3]), ValueError, "`advantages` has shape"),
        (lambda b: kl_estimate(b[0], b[1], "k4"), ValueError, "`kind` is 'k4'"),
        (lambda b: aggregate(LossTerms(b[0], b[1]), "seq-mean-token-sum-norm"), ValueError, "`loss_scale_factor`"),
        (lambda b: value_loss(b[2], b[2], b[2], b[3][:, :2]), ValueError, "`mask` has shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, words):
    with pytest.raises(error, match=words):
        call(_batch())


def test_chunked_logprobs_and_entropy_equal_the_full_vocabulary_computation():
    from mojax.rl.losses import chunked_logprobs_and_entropy

    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (2, 3, 8))
    head = jax.random.normal(keys[1], (8, 12))
    targets = jax.random.randint(keys[2], (2, 3), 0, 12)

    def full(head):
        logits = hidden @ head
        return token_logprobs(logits, targets), token_entropy(logits)

    def chunked(head):
        return chunked_logprobs_and_entropy(hidden, head, targets, 4)

    for got, want in zip(chunked(head), full(head), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    total = lambda fn: lambda head: sum(jnp.sum(x) for x in fn(head))  # noqa: E731
    np.testing.assert_allclose(jax.grad(total(chunked))(head), jax.grad(total(full))(head), atol=1e-5)
    with pytest.raises(ValueError, match="a divisor of the vocabulary size 12"):
        chunked_logprobs_and_entropy(hidden, head, targets, 5)


def _head_case(seed=0, vocab=12):
    keys = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(keys[0], (2, 5, 8))
    head = jax.random.normal(keys[1], (8, vocab))
    targets = jax.random.randint(keys[2], (2, 5), 0, vocab)
    cotangents = jax.random.normal(keys[3], (2, 2, 5))
    return hidden, head, targets, cotangents


def _autodiff_head(hidden, head, targets):
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    return token_logprobs(logits, targets), token_entropy(logits)


def _head_functions():
    from mojax.rl.losses import chunked_logprobs_and_entropy, head_logprobs_and_entropy

    return {
        "full vocabulary": head_logprobs_and_entropy,
        "chunks of 4": lambda hidden, head, targets: chunked_logprobs_and_entropy(hidden, head, targets, 4),
    }


HEAD_FUNCTIONS = ["full vocabulary", "chunks of 4"]


@pytest.mark.parametrize("function", HEAD_FUNCTIONS)
@pytest.mark.parametrize("entropy_cotangent", ["random", "zero", "absent"])
def test_head_logprobs_vjp_equals_autodiff_of_the_logits(function, entropy_cotangent):
    head_fn = _head_functions()[function]
    hidden, head, targets, cotangents = _head_case()
    weights = {"random": 1.0, "zero": 0.0, "absent": None}[entropy_cotangent]

    def loss(fn):
        def of(hidden, head):
            logp, entropy = fn(hidden, head, targets)
            total = jnp.sum(cotangents[0] * logp)  # "absent": the entropies do not reach the loss at all
            return total if weights is None else total + weights * jnp.sum(cotangents[1] * entropy)

        return of

    for got, want in zip(head_fn(hidden, head, targets), _autodiff_head(hidden, head, targets), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    got = jax.jit(jax.grad(loss(head_fn), argnums=(0, 1)))(hidden, head)
    want = jax.grad(loss(_autodiff_head), argnums=(0, 1))(hidden, head)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)
    only_entropy = lambda fn: lambda h, w: jnp.sum(cotangents[1] * fn(h, w, targets)[1])  # noqa: E731
    for g, w in zip(
        jax.grad(only_entropy(head_fn), (0, 1))(hidden, head),
        jax.grad(only_entropy(_autodiff_head), (0, 1))(hidden, head),
        strict=True,
    ):
        np.testing.assert_allclose(g, w, atol=2e-5)


def _dot_output_shapes(fn, *args):
    """Output shapes of every dot_general in fn's jaxpr, nested jaxprs included."""
    shapes = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.outvars[0].aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


@pytest.mark.parametrize("function", HEAD_FUNCTIONS)
def test_vmapped_pullbacks_share_one_head_product_for_the_hidden_states(function):
    """n per-objective pullbacks (vmapped, as probe and full mode run them) equal autodiff's, and the hidden-state
    cotangent comes from unbatched [B, T, V] x [V, D] products instead of [n, B, T, V] x [V, D] ones."""
    head_fn = _head_functions()[function]
    hidden, head, targets, _ = _head_case(1)
    advantages = jax.random.normal(jax.random.key(2), (N, 2, 5))

    def pullbacks(fn):
        def of(hidden, head):
            def losses(hidden, head):
                logp, entropy = fn(hidden, head, targets)
                return jnp.sum(advantages * logp, axis=(1, 2)), jnp.mean(entropy)  # entropy: a metric only

            _, pullback, _ = jax.vjp(losses, hidden, head, has_aux=True)
            return jax.vmap(pullback)(jnp.eye(N))

        return of

    for got, want in zip(
        jax.jit(pullbacks(head_fn))(hidden, head), pullbacks(_autodiff_head)(hidden, head), strict=True
    ):
        np.testing.assert_allclose(got, want, atol=2e-5)
    hidden_cotangents = (2 * 5, 8)  # the B x T tokens as rows, D = 8
    hidden_only = lambda fn: lambda hidden, head: pullbacks(fn)(hidden, head)[0]  # noqa: E731
    shared = _dot_output_shapes(hidden_only(head_fn), hidden, head)
    plain = _dot_output_shapes(hidden_only(_autodiff_head), hidden, head)
    assert hidden_cotangents in shared and (N, *hidden_cotangents) not in shared, shared
    assert any(len(shape) == 4 and shape[-1] == 8 for shape in plain), plain  # autodiff batches that product


def _entry_arrays_of_size(compiled_text: str, size: int) -> list[str]:
    """Names of the arrays the compiled program's entry computation writes with ``size`` f32 elements (bitcasts
    and parameters, which write nothing, left out)."""
    entry = compiled_text[compiled_text.index("\nENTRY") :]
    names = []
    for line in entry.splitlines()[1:]:
        match = re.match(r"\s*(?:ROOT )?%(\S+) = f32\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(", line)
        if match and match.group(3) not in ("bitcast", "parameter"):
            if math.prod(int(d) for d in match.group(2).split(",")) == size:
                names.append(match.group(1))
    return names


def test_head_logprobs_write_the_logits_and_their_cotangent_only():
    """The forward and backward of the full-vocabulary head write two [B, T, V] arrays: the logits and their
    cotangent. A one-hot contraction for the targets' logits writes a third (the one-hot product)."""
    from mojax.rl.losses import head_logprobs_and_entropy

    batch, length, width, vocab = 4, 32, 64, 8192  # B T != D, so no weight-sized array has the logits' size
    keys = jax.random.split(jax.random.key(3), 3)
    hidden = jax.random.normal(keys[0], (batch, length, width))
    head = jax.random.normal(keys[1], (width, vocab))
    targets = jax.random.randint(keys[2], (batch, length), 0, vocab)

    def loss(hidden, head):
        return -jnp.mean(head_logprobs_and_entropy(hidden, head, targets)[0])

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, head).compile().as_text()
    assert len(_entry_arrays_of_size(compiled, batch * length * vocab)) == 2, compiled


@pytest.mark.parametrize("function", HEAD_FUNCTIONS)
def test_head_gradients_multiply_plain_operands(function):
    """No dot of the compiled forward and backward contracts its left operand's leading axis: the head's gradient
    (g h)^T (e_y - p), a contraction over the token rows, runs on the hidden rows' written-out transpose
    (``rows_contraction``), not as the Eigen dot with a transposed operand that XLA:CPU makes of the plain einsum."""
    head_fn = _head_functions()[function]
    hidden, head, targets, cotangents = _head_case()

    def loss(hidden, head):
        return jnp.sum(cotangents[0] * head_fn(hidden, head, targets)[0])

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head).compile().as_text()
    contracting = re.findall(r"lhs_contracting_dims=\{([\d,]*)\}", compiled)
    assert contracting and "0" not in contracting, compiled


@pytest.mark.parametrize("function", HEAD_FUNCTIONS)
def test_head_logprobs_keep_the_input_dtypes_of_their_gradients(function):
    head_fn = _head_functions()[function]
    hidden, head, targets, cotangents = _head_case()
    hidden, head = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    logp, entropy = head_fn(hidden, head, targets)
    assert logp.dtype == entropy.dtype == jnp.float32
    grads = jax.grad(lambda h, w: jnp.sum(cotangents[0] * head_fn(h, w, targets)[0]), argnums=(0, 1))(hidden, head)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    as_f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = jax.grad(
        lambda h, w: jnp.sum(cotangents[0] * _autodiff_head(as_f32(h), as_f32(w), targets)[0]), argnums=(0, 1)
    )(hidden, head)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=0.1, rtol=0.05)


def test_head_token_kernel_gives_the_gram_of_the_heads_gradients():
    """c_i^T K c_j = <g_i, g_j> for the head gradients g_i of sum_t c_{i,t} log p_t, by autodiff of the logits."""
    from mojax.rl.losses import head_token_kernel

    hidden, head, targets, _ = _head_case(seed=3)
    cotangents = jax.random.normal(jax.random.key(4), (3, *targets.shape))

    def head_grad(c):
        return jax.grad(lambda w: jnp.sum(c * _autodiff_head(hidden, w, targets)[0]))(head).reshape(-1)

    grads = np.stack([np.asarray(head_grad(c), np.float64) for c in cotangents])
    kernel = np.asarray(head_token_kernel(hidden, head, targets), np.float64)
    rows = np.asarray(cotangents, np.float64).reshape(3, -1)
    assert kernel.shape == (10, 10)
    np.testing.assert_allclose(rows @ kernel @ rows.T, grads @ grads.T, rtol=1e-5)
    assert np.linalg.eigvalsh(kernel).min() > -1e-4 * np.abs(kernel).max()  # PSD up to round-off


def test_tied_head_gram_gives_the_gram_of_the_tables_gradients_head_and_input_parts():
    """tied_head_gram's closed form equals the Gram of the tied table's gradients g_i = A_i + S_i, formed by autodiff:
    the head part of sum_t c_{i,t} log p_t and the lookup's part of sum_p X_i[p] . table[id_p], with repeated ids (so
    the scatter adds rows) and ids that are also targets (so head and input parts meet on a row)."""
    from mojax.rl.losses import scatter_onto_rows, tied_head_gram, tied_head_token_kernel

    hidden, head, targets, _ = _head_case(seed=5)
    table = head.T  # [V, D]
    input_ids = jnp.concatenate([targets, jnp.asarray([[3, 3, 7], [0, 3, 11]])], axis=1)  # [2, 8]: M = 16
    keys = jax.random.split(jax.random.key(6), 2)
    cotangents = jax.random.normal(keys[0], (3, *targets.shape))
    inputs = jax.random.normal(keys[1], (3, input_ids.size, table.shape[1]))

    def table_grad(c, x):
        def loss(w):
            lookup = jnp.take(w, input_ids.reshape(-1), axis=0)
            return jnp.sum(c * _autodiff_head(hidden, w.T, targets)[0]) + jnp.sum(x * lookup)

        return jax.grad(loss)(table)

    grads = np.stack(
        [np.asarray(table_grad(c, x), np.float64).reshape(-1) for c, x in zip(cotangents, inputs, strict=True)]
    )
    parts = tied_head_token_kernel(hidden, head, targets, input_ids)
    gram = tied_head_gram(parts, cotangents.reshape(3, -1), inputs)
    np.testing.assert_allclose(np.asarray(gram, np.float64), grads @ grads.T, rtol=1e-5, atol=1e-4)
    input_part = np.asarray(jax.grad(lambda w: jnp.sum(inputs[1] * jnp.take(w, input_ids.reshape(-1), axis=0)))(table))
    np.testing.assert_allclose(scatter_onto_rows(parts.input_ids, inputs[1], table), input_part, atol=1e-6)
