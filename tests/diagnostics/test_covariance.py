"""Covariance-law statistics: a hand-computed group, parity with the numpy transcription, invariances, edge cases, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_ctwa import reference_signal, reference_statistics  # noqa: E402

from mojax.diagnostics import covariance_statistics, ctwa_signal

statistics = jax.jit(covariance_statistics, static_argnames=("num_groups", "outlier_factor", "global_metrics", "eps"))
signal_fn = jax.jit(ctwa_signal, static_argnames=("epsilon", "epsilon_high", "w_agg"))


def _random_batch(rng, batch=24, length=6, n=3):
    """Token advantages, masks with padding and empty rows, log-probs, rewards and arbitrary prompt ids."""
    adv = rng.normal(size=(batch, length))
    mask = (np.arange(length)[None] < rng.integers(0, length + 1, (batch, 1))).astype(np.float64)
    mask[:2] = 1.0
    logp_old = rng.normal(size=(batch, length))
    logp_new = logp_old + rng.normal(size=(batch, length)) * 0.3
    rewards = rng.normal(size=(batch, n)) * rng.choice([0.1, 1.0, 5.0], size=(1, n))
    prompt_ids = rng.choice(np.array([-7, 3, 11, 1000, 42, 5, 8, 9]), size=batch)
    return adv, mask, logp_new, logp_old, rewards, prompt_ids


def test_within_group_statistic_known_answer():
    """One group of 4 with ratio 1 and no clipping, so w = A_hat."""
    seq_adv = jnp.asarray([1.0, -1.0, 0.5, -0.5])
    mask = jnp.ones((4, 3))
    w = ctwa_signal(jnp.tile(seq_adv[:, None], (1, 3)), mask, jnp.zeros((4, 3)), jnp.zeros((4, 3)))
    np.testing.assert_allclose(w, seq_adv)
    rewards = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    out = statistics(rewards, w)
    np.testing.assert_allclose(out.cov, [0.375, -0.125], atol=1e-6)
    np.testing.assert_allclose(out.corr, [0.94868, -0.31623], atol=1e-5)
    np.testing.assert_allclose(out.frac_neg, [0.0, 1.0])
    np.testing.assert_allclose(out.interference, [0.0, 0.125], atol=1e-6)
    np.testing.assert_allclose(out.interference_index, 0.0625, atol=1e-6)
    np.testing.assert_allclose(out.mean_reward, [0.5, 0.5])
    assert int(out.num_valid_groups) == 1


@pytest.mark.parametrize("w_agg", ["mean", "mean_unclipped", "sum"])
def test_signal_matches_reference(w_agg):
    rng = np.random.default_rng(1)
    adv, mask, logp_new, logp_old, *_ = _random_batch(rng)
    mask[5] = 0.0
    expected = reference_signal(adv, mask, logp_new, logp_old, 0.2, 0.28, w_agg)
    got = np.asarray(
        signal_fn(*(jnp.asarray(x, jnp.float32) for x in (adv, mask, logp_new, logp_old)), 0.2, 0.28, w_agg)
    )
    has_tokens = mask.sum(-1) > 0
    np.testing.assert_allclose(got[has_tokens], expected[has_tokens], rtol=2e-5, atol=1e-6)
    assert np.all(np.isfinite(got))
    if w_agg == "mean":
        assert got[5] == 0.0  # a row without tokens gives 0 where the reference divides 0 by 0


def test_signal_accepts_sequence_advantages_and_clips_both_sides():
    mask = jnp.ones((2, 2))
    logp_old = jnp.zeros((2, 2))
    logp_new = jnp.log(jnp.asarray([[1.5, 1.1], [0.5, 0.9]]))
    w = ctwa_signal(jnp.asarray([2.0, -1.0]), mask, logp_new, logp_old)
    # A >= 0 drops ratio 1.5 > 1.2; A < 0 drops ratio 0.5 < 0.8.
    np.testing.assert_allclose(w, [2.0 * 1.1 / 2, -1.0 * 0.9 / 2], rtol=1e-6)


@pytest.mark.parametrize("global_metrics", [False, True])
def test_statistics_match_reference_with_groups_padding_and_outliers(global_metrics):
    rng = np.random.default_rng(2)
    for batch, n in ((20, 1), (28, 3)):
        adv, mask, logp_new, logp_old, rewards, ids = _random_batch(rng, batch=batch, n=n)
        mask[3] = 0.0  # padding row: NaN in the reference, dropped there; invalid here
        w_ref = reference_signal(adv, mask, logp_new, logp_old)
        w_ref[[4, 7]] *= 1e4  # outliers beyond 100 x median |w|
        ids[9] = 123456  # a singleton group
        expected = reference_statistics(rewards, w_ref, ids, global_metrics=global_metrics)
        got = statistics(
            jnp.asarray(rewards, jnp.float32),
            jnp.asarray(np.nan_to_num(w_ref), jnp.float32),
            jnp.asarray(ids, jnp.int32),
            valid=jnp.asarray(mask.sum(-1) > 0),
            global_metrics=global_metrics,
        )
        for field in ("cov", "corr", "frac_neg", "interference"):
            np.testing.assert_allclose(getattr(got, field), expected[field], rtol=1e-4, atol=1e-6, err_msg=field)
        assert int(got.num_valid_groups) == expected["num_groups"]
        np.testing.assert_allclose(got.interference_index, np.mean(expected["interference"]), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got.mean_reward, rewards[mask.sum(-1) > 0].mean(0), rtol=1e-5, atol=1e-6)


def test_static_num_groups_equals_sorted_relabelling():
    rng = np.random.default_rng(3)
    rewards = jnp.asarray(rng.normal(size=(12, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=12), jnp.float32)
    ids = jnp.asarray([0, 1, 2, 3] * 3, jnp.int32)
    dense = statistics(rewards, w, ids, num_groups=4)
    relabelled = statistics(rewards, w, ids * 97 - 5)
    for a, b in zip(dense, relabelled, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    out_of_range = statistics(rewards, w, ids, num_groups=3)  # group 3 ignored
    inside = np.asarray(ids) < 3
    expected = reference_statistics(np.asarray(rewards)[inside], np.asarray(w)[inside], np.asarray(ids)[inside])
    for field in ("cov", "corr", "frac_neg", "interference"):
        np.testing.assert_allclose(getattr(out_of_range, field), expected[field], rtol=1e-5, atol=1e-6)
    assert int(out_of_range.num_valid_groups) == 3


def test_outlier_filter_drops_huge_signals():
    rewards = jnp.asarray([[0.0], [1.0], [0.0], [1.0], [5.0]])
    w = jnp.asarray([1.0, 2.0, 1.0, 2.0, 1e6])
    filtered = statistics(rewards, w)
    np.testing.assert_allclose(filtered.cov, statistics(rewards[:4], w[:4]).cov)
    unfiltered = statistics(rewards, w, outlier_factor=1e9)
    assert float(unfiltered.cov[0]) > 1e5


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-50, 50), st.booleans())
def test_statistics_invariant_to_sample_order_and_reward_shifts(seed, shift, global_metrics):
    """Permuting samples within and across groups, or adding a constant per objective (and per group), changes nothing."""
    rng = np.random.default_rng(seed)
    batch, n = 16, 2
    rewards = rng.normal(size=(batch, n))
    w = rng.normal(size=batch)
    ids = rng.integers(0, 4, batch)
    order = rng.permutation(batch)
    group_shift = rng.normal(size=(4, 1)) * 3
    run = functools.partial(statistics, global_metrics=global_metrics)
    base = run(jnp.asarray(rewards, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(ids, jnp.int32))
    permuted = run(
        jnp.asarray(rewards[order], jnp.float32), jnp.asarray(w[order], jnp.float32), jnp.asarray(ids[order], jnp.int32)
    )
    shifted = run(
        jnp.asarray(rewards + shift + group_shift[ids], jnp.float32),
        jnp.asarray(w, jnp.float32),
        jnp.asarray(ids, jnp.int32),
    )
    for field in ("cov", "corr", "frac_neg", "interference", "interference_index", "num_valid_groups"):
        np.testing.assert_allclose(getattr(permuted, field), getattr(base, field), rtol=1e-4, atol=1e-5, err_msg=field)
        if field != "frac_neg":  # a covariance of exactly 0 may change sign under rounding
            np.testing.assert_allclose(
                getattr(shifted, field), getattr(base, field), rtol=1e-3, atol=2e-4, err_msg=field
            )
    np.testing.assert_allclose(permuted.mean_reward, base.mean_reward, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("rewards", "w", "ids", "valid"),
    [
        (np.ones((4, 2)), [1.0, 2.0, 3.0, 4.0], [0, 1, 2, 3], None),  # only singleton groups
        (np.ones((4, 2)), [1.0, 2.0, 3.0, 4.0], None, None),  # all-equal rewards
        (np.arange(8.0).reshape(4, 2), [0.0, 0.0, 0.0, 0.0], None, None),  # median |w| = 0
        (np.arange(4.0).reshape(4, 1), [1.0, -1.0, 2.0, 0.5], [5, 5, 6, 6], None),  # n = 1
        (np.arange(8.0).reshape(4, 2), [1.0, 2.0, 3.0, 4.0], None, [False] * 4),  # no valid row
        (np.ones((1, 3)), [2.0], None, None),  # B = 1
    ],
)
def test_degenerate_batches_are_finite(rewards, w, ids, valid):
    out = statistics(
        jnp.asarray(rewards, jnp.float32),
        jnp.asarray(w, jnp.float32),
        None if ids is None else jnp.asarray(ids, jnp.int32),
        valid=None if valid is None else jnp.asarray(valid),
    )
    for leaf in out:
        assert np.all(np.isfinite(leaf))
    if int(out.num_valid_groups) == 0 or np.ptp(rewards) == 0 or np.ptp(w) == 0:
        for field in ("cov", "corr", "frac_neg", "interference"):
            np.testing.assert_array_equal(getattr(out, field), 0.0)


def test_even_count_median_averages_the_middle_pair():
    """|w| = (1, 1, 2, 4, 300, 300): median 3, so 300 <= 100 x 3 is kept (the lower middle, 2, would drop it)."""
    w = np.asarray([1.0, -1.0, 2.0, 4.0, 300.0, -300.0])
    rewards = np.asarray([[0.0], [1.0], [0.0], [1.0], [1.0], [0.0]])
    out = statistics(jnp.asarray(rewards, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(out.cov, reference_statistics(rewards, w, np.zeros(6))["cov"], rtol=1e-6)
    np.testing.assert_allclose(out.cov, [50.0], rtol=1e-6)  # both 300s kept


def test_no_outlier_filter_when_the_median_is_zero():
    rewards = jnp.asarray([[0.0], [0.0], [0.0], [1.0], [2.0]])
    out = statistics(rewards, jnp.asarray([0.0, 0.0, 0.0, 1.0, 2.0]))
    np.testing.assert_allclose(out.cov, [np.cov([0, 0, 0, 1, 2], [0, 0, 0, 1, 2], bias=True)[0, 1]], rtol=1e-6)


def test_signal_empty_rows_and_nonfinite_signals_are_dropped():
    w = ctwa_signal(jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), w_agg="mean_unclipped")
    np.testing.assert_array_equal(w, [0.0, 0.0])
    rewards = jnp.asarray([[0.0], [1.0], [2.0], [7.0]])
    out = statistics(rewards, jnp.asarray([1.0, 2.0, 3.0, jnp.nan]))
    np.testing.assert_allclose(out.cov, statistics(rewards[:3], jnp.asarray([1.0, 2.0, 3.0])).cov)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: covariance_statistics(jnp.ones(4), jnp.ones(4)), r"`rewards` has shape \(4,\); expected \(B, n\)"),
        (
            lambda: covariance_statistics(jnp.ones((4, 2)), jnp.ones(3)),
            r"`signal` has shape \(3,\); expected \(B,\) = \(4,\)",
        ),
        (
            lambda: covariance_statistics(jnp.ones((4, 2)), jnp.ones(4), jnp.zeros(3, jnp.int32)),
            "`group_ids` has shape",
        ),
        (lambda: covariance_statistics(jnp.ones((4, 2)), jnp.ones(4), jnp.zeros(4)), "expected integer prompt ids"),
        (
            lambda: covariance_statistics(jnp.ones((4, 2)), jnp.ones(4), jnp.zeros(4, jnp.int32), num_groups=0),
            "num_groups must be >= 1",
        ),
        (lambda: covariance_statistics(jnp.ones((4, 2)), jnp.ones(4), valid=jnp.ones(3)), "`valid` has shape"),
        (
            lambda: ctwa_signal(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3)), w_agg="max"),
            "w_agg='max'",
        ),
        (
            lambda: ctwa_signal(jnp.ones((2, 4)), jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3))),
            r"`advantages` has shape \(2, 4\)",
        ),
        (
            lambda: ctwa_signal(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 2)), jnp.ones((2, 3))),
            "`logp_new` has shape",
        ),
        (
            lambda: ctwa_signal(jnp.ones(2), jnp.ones(2), jnp.ones(2), jnp.ones(2)),
            r"`mask` has shape \(2,\); expected \(B, T\)",
        ),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_batch_sharded_over_devices_gives_the_same_statistics(axis_type):
    """Signal, segment sums and the sort-based median/relabelling run on a batch sharded along a `data` axis."""
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
    rng = np.random.default_rng(6)
    adv, mask, logp_new, logp_old, rewards, ids = (jnp.asarray(x) for x in _random_batch(rng, batch=16, n=2))
    inputs = (adv, mask, logp_new, logp_old, rewards, ids.astype(jnp.int32))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = jax.device_put(inputs, jax.NamedSharding(mesh, jax.P("data")))

    @jax.jit
    def run(adv, mask, logp_new, logp_old, rewards, ids):
        return statistics(rewards, ctwa_signal(adv, mask, logp_new, logp_old), ids, valid=jnp.sum(mask, axis=1) > 0)

    for a, b in zip(run(*sharded), run(*inputs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
