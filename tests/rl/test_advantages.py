"""Advantage estimators against plain-loop numpy transcriptions, on ragged masks, n = 3 and NaN rewards."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mojax.rl.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    combine_rewards,
    compute_advantages,
    dr_grpo,
    gae,
    gdpo,
    grpo,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
    token_rewards,
    whiten,
)

B, T, N = 12, 5, 3
GAMMA, LAM = 0.9, 0.8
seeds = st.integers(0, 2**31 - 1)


def _batch(seed):
    """Rewards f32[B, n] with NaNs (one all-NaN row, a group with one finite member), ragged masks, odd group ids."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(B, N)) * np.array([1.0, 3.0, 0.1])
    rewards[rng.random((B, N)) < 0.2] = np.nan
    rewards[5] = np.nan
    group_ids = rng.permutation(np.repeat(np.array([-7, 40, 3, 1000]), 3)).astype(np.int32)
    lonely = np.flatnonzero(group_ids == 40)
    rewards[lonely[1:], 2] = np.nan
    rewards[lonely[0], 2] = 1.5
    lengths = rng.integers(0, T + 1, size=B)
    lengths[:2] = (T, 0)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    values = rng.normal(size=(N, B, T)).astype(np.float32)
    kl = rng.normal(size=(B, T)).astype(np.float32) * 0.1
    return rewards.astype(np.float32), group_ids, mask, values, kl


# --------------------------------------------------------------------------- loop transcriptions (numpy)


def loop_token_rewards(scores, mask, kl=None, beta=0.0):
    out = np.zeros((scores.shape[1], *mask.shape))
    for k in range(scores.shape[1]):
        for b in range(mask.shape[0]):
            length = int(mask[b].sum())
            for t in range(length):
                if kl is not None:
                    out[k, b, t] -= beta * kl[b, t]
            if length > 0 and np.isfinite(scores[b, k]):
                out[k, b, length - 1] += scores[b, k]
    return out


def loop_gae(rewards, values, mask, gamma, lam):
    advantages = np.zeros(rewards.shape)
    returns = np.zeros(rewards.shape)
    for k in range(rewards.shape[0]):
        for b in range(rewards.shape[1]):
            length = int(mask[k, b].sum())
            following = 0.0
            for t in reversed(range(length)):
                next_value = values[k, b, t + 1] if t + 1 < length else 0.0
                delta = rewards[k, b, t] + gamma * next_value - values[k, b, t]
                following = delta + gamma * lam * following
                advantages[k, b, t] = following
                returns[k, b, t] = following + values[k, b, t]
    return advantages, returns


def loop_members(rewards, group_ids, b, k):
    return [rewards[j, k] for j in range(len(group_ids)) if group_ids[j] == group_ids[b] and np.isfinite(rewards[j, k])]


def loop_std(values):
    """Bessel-corrected std of a list with at least 2 entries."""
    mean = sum(values) / len(values)
    return np.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def loop_grpo(rewards, group_ids, scale_rewards="group", eps=1e-6):
    out = np.zeros(rewards.shape[::-1])
    for k in range(rewards.shape[1]):
        column = [r for r in rewards[:, k] if np.isfinite(r)]
        for b in range(rewards.shape[0]):
            members = loop_members(rewards, group_ids, b, k)
            if not np.isfinite(rewards[b, k]) or len(members) < 2:
                continue
            centred = rewards[b, k] - sum(members) / len(members)
            if scale_rewards == "group":
                centred /= loop_std(members) + eps
            elif scale_rewards == "batch":
                centred /= loop_std(column) + eps
            out[k, b] = centred
    return out


def loop_rloo(rewards, group_ids):
    out = np.zeros(rewards.shape[::-1])
    for k in range(rewards.shape[1]):
        for b in range(rewards.shape[0]):
            members = loop_members(rewards, group_ids, b, k)
            if np.isfinite(rewards[b, k]) and len(members) >= 2:
                out[k, b] = rewards[b, k] - (sum(members) - rewards[b, k]) / (len(members) - 1)
    return out


def loop_whiten(x, mask, eps=1e-8):
    out = np.zeros(x.shape)
    for k in range(x.shape[0]):
        tokens = [x[k, b, t] for b in range(x.shape[1]) for t in range(x.shape[2]) if mask[k, b, t]]
        mean = sum(tokens) / len(tokens)
        variance = sum((v - mean) ** 2 for v in tokens) / (len(tokens) - 1)
        for b in range(x.shape[1]):
            for t in range(x.shape[2]):
                if mask[k, b, t]:
                    out[k, b, t] = (x[k, b, t] - mean) / np.sqrt(variance + eps)
    return out


def loop_returns_to_go(rewards, mask, gamma):
    out = np.zeros(rewards.shape)
    for k in range(rewards.shape[0]):
        for b in range(rewards.shape[1]):
            following = 0.0
            for t in reversed(range(int(mask[k, b].sum()))):
                following = rewards[k, b, t] + gamma * following
                out[k, b, t] = following
    return out


def applicable_mask(rewards, mask):
    """f32[n, B, T]: the response mask of each objective, without the samples whose reward is NaN."""
    return np.isfinite(rewards).T[:, :, None] * mask[None]


def trl_normalize_then_sum(rewards, group_ids, weights, eps):
    """TRL's GDPO advantage: group-normalise each reward (NaN -> 0), weighted nansum, then batch-normalise."""
    batch, n = rewards.shape
    combined = np.zeros(batch)
    for b in range(batch):
        for k in range(n):
            members = loop_members(rewards, group_ids, b, k)
            if np.isfinite(rewards[b, k]) and len(members) >= 2:
                mean = sum(members) / len(members)
                combined[b] += weights[k] * (rewards[b, k] - mean) / (loop_std(members) + eps)
    return (combined - combined.mean()) / (loop_std(list(combined)) + eps)


# ----------------------------------------------------------------------------------- compiled functions

token_rewards_fn = jax.jit(token_rewards)
gae_fn = jax.jit(functools.partial(gae, gamma=GAMMA, lam=LAM))
grpo_fn = jax.jit(grpo, static_argnames=("scale_rewards", "eps"))
dr_grpo_fn = jax.jit(dr_grpo)
rloo_fn = jax.jit(rloo)
reinforce_pp_fn = jax.jit(functools.partial(reinforce_pp, gamma=GAMMA))
reinforce_pp_baseline_fn = jax.jit(reinforce_pp_baseline)
gdpo_fn = jax.jit(gdpo, static_argnames="eps")
whiten_fn = jax.jit(whiten, static_argnames=("shift_mean", "eps"))


@functools.cache
def _compiled(name, **options):
    return jax.jit(lambda inputs: compute_advantages(name, inputs, **options))


def compute_fn(name, inputs, **options):
    return _compiled(name, **options)(inputs)


def close(got, expected, tol=2e-5):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ tests


def test_token_rewards_put_the_score_on_the_last_response_token_and_subtract_kl():
    rewards, _, mask, _, kl = _batch(0)
    close(token_rewards_fn(rewards, mask), loop_token_rewards(rewards, mask))
    close(token_rewards_fn(rewards, mask, kl=kl, beta=0.3), loop_token_rewards(rewards, mask, kl, 0.3))
    assert np.all(np.asarray(token_rewards_fn(rewards, mask, kl=kl, beta=0.3))[:, 1] == 0)  # the row without tokens


def test_gae_by_hand():
    """r = (0, 0, 1), V = (0.5, 0.6, 0.7), gamma = 0.9, lam = 0.8, then one padding token."""
    rewards = jnp.asarray([[[0.0, 0.0, 1.0, 5.0]]])
    values = jnp.asarray([[[0.5, 0.6, 0.7, 9.0]]])
    mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
    delta = [0.9 * 0.6 - 0.5, 0.9 * 0.7 - 0.6, 1.0 - 0.7]
    a2 = delta[2]
    a1 = delta[1] + 0.72 * a2
    a0 = delta[0] + 0.72 * a1
    advantages, returns = gae_fn(rewards, values, mask)
    close(advantages[0, 0], [a0, a1, a2, 0.0])
    close(returns[0, 0], [a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0])


@settings(max_examples=4)
@given(seeds)
def test_gae_matches_loop(seed):
    rewards, _, mask, values, kl = _batch(seed)
    placed = loop_token_rewards(rewards, mask, kl, 0.1).astype(np.float32)
    masks = applicable_mask(rewards, mask)
    advantages, returns = gae_fn(placed, values, masks)
    expected_advantages, expected_returns = loop_gae(placed, values, masks, GAMMA, LAM)
    close(advantages, expected_advantages)
    close(returns, expected_returns)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@settings(max_examples=4)
@given(seed=seeds)
def test_grpo_matches_loop(scale_rewards, seed):
    rewards, group_ids, *_ = _batch(seed)
    close(grpo_fn(rewards, group_ids, scale_rewards=scale_rewards), loop_grpo(rewards, group_ids, scale_rewards), 1e-4)


@settings(max_examples=4)
@given(seeds)
def test_dr_grpo_and_rloo_match_loops(seed):
    rewards, group_ids, *_ = _batch(seed)
    close(dr_grpo_fn(rewards, group_ids), loop_grpo(rewards, group_ids, "none"))
    close(rloo_fn(rewards, group_ids), loop_rloo(rewards, group_ids))


def test_group_estimators_by_hand_with_nan_and_a_lonely_member():
    """Group 9: rewards 1, 3, NaN, 5; group 2: one finite reward; other rows and objectives NaN (same shapes as _batch)."""
    rewards = np.full((B, N), np.nan, np.float32)
    rewards[:6, 0] = [1.0, 3.0, np.nan, 5.0, 4.0, np.nan]
    group_ids = np.array([9, 9, 9, 9, 2, 2, 0, 0, 0, 0, 0, 0], np.int32)
    expected = np.zeros((N, B))
    expected[0, :4] = [-2.0, 0.0, 0.0, 2.0]
    close(dr_grpo_fn(rewards, group_ids), expected)
    close(grpo_fn(rewards, group_ids), expected / (2.0 + 1e-6))
    close(rloo_fn(rewards, group_ids), expected * 1.5)


def test_group_estimators_ignore_how_groups_are_labelled_and_ordered():
    rewards, group_ids, *_ = _batch(3)
    order = np.random.default_rng(0).permutation(B)
    relabelled = {g: i for i, g in enumerate(np.unique(group_ids))}
    dense = np.array([relabelled[g] for g in group_ids], np.int32)
    for fn in (grpo_fn, dr_grpo_fn, rloo_fn):
        close(fn(rewards, dense), np.asarray(fn(rewards, group_ids)))
        close(fn(rewards[order], group_ids[order]), np.asarray(fn(rewards, group_ids))[:, order])


@settings(max_examples=4)
@given(seeds)
def test_whiten_matches_loop(seed):
    rewards, _, mask, values, _ = _batch(seed)
    masks = applicable_mask(rewards, mask)
    close(whiten_fn(values, masks), loop_whiten(values, masks), 1e-4)
    shifted = np.asarray(whiten_fn(values, masks, shift_mean=False))
    expected = loop_whiten(values, masks)
    for k in range(N):
        tokens = masks[k] > 0
        expected[k][tokens] += values[k][tokens].mean()
    close(shifted, expected, 1e-4)


def test_whiten_of_one_token_or_none_is_zero():
    x = jnp.asarray([[[3.0, 4.0]], [[5.0, 6.0]]])
    mask = jnp.asarray([[[1.0, 0.0]], [[0.0, 0.0]]])
    close(whiten_fn(x, mask), np.zeros((2, 1, 2)))


@settings(max_examples=4)
@given(seeds)
def test_reinforce_pp_matches_loop(seed):
    rewards, _, mask, _, kl = _batch(seed)
    placed = loop_token_rewards(rewards, mask, kl, 0.1).astype(np.float32)
    masks = applicable_mask(rewards, mask)
    expected = loop_whiten(loop_returns_to_go(placed, masks, GAMMA), masks)
    close(reinforce_pp_fn(placed, masks), expected, 1e-4)


@settings(max_examples=4)
@given(seeds)
def test_reinforce_pp_baseline_matches_loop(seed):
    rewards, group_ids, mask, *_ = _batch(seed)
    masks = applicable_mask(rewards, mask)
    centred = loop_grpo(rewards, group_ids, "none")[:, :, None] * masks
    close(reinforce_pp_baseline_fn(rewards, group_ids, mask), loop_whiten(centred, masks), 1e-4)


@pytest.mark.parametrize("eps", [1e-4, 1e-6])
@settings(max_examples=4)
@given(seed=seeds)
def test_gdpo_weighted_sum_is_trl_normalize_then_sum(eps, seed):
    rewards, group_ids, *_ = _batch(seed)
    weights = np.array([0.5, 2.0, 1.0], np.float32)
    advantages = np.asarray(gdpo_fn(rewards, group_ids, weights, eps=eps))
    close(weights @ advantages, trl_normalize_then_sum(rewards, group_ids, weights, eps), 1e-4)
    normalised = loop_grpo(rewards, group_ids, "group", eps)
    scale = loop_std(list(weights @ normalised)) + eps
    close(advantages, normalised / scale, 1e-4)
    assert np.all(advantages[~np.isfinite(rewards).T] == 0)


def test_combine_rewards_is_a_weighted_nansum():
    rewards = jnp.asarray([[1.0, 2.0], [jnp.nan, 3.0], [jnp.nan, jnp.nan]])
    combined = np.asarray(combine_rewards(rewards, jnp.asarray([0.5, 2.0])))
    assert combined.shape == (3, 1)
    close(combined[:2, 0], [4.5, 6.0])
    assert np.isnan(combined[2, 0])


def test_sum_then_normalize_runs_any_estimator_on_the_combined_reward():
    inputs = _inputs()
    weights = np.array([0.5, 2.0, 1.0], np.float32)
    combined = np.asarray(combine_rewards(inputs.scores, weights))
    advantages = compute_fn("grpo", inputs._replace(scores=combined, values=None, weights=None)).advantages
    assert advantages.shape == (1, B, T)
    close(advantages, loop_grpo(combined, inputs.group_ids)[:, :, None] * applicable_mask(combined, inputs.mask), 1e-4)


def _inputs(seed=1, **overrides):
    rewards, group_ids, mask, values, _ = _batch(seed)
    fields = dict(scores=rewards, mask=mask, group_ids=group_ids, values=values, weights=np.ones(N, np.float32))
    return AdvantageInputs(**{**fields, **overrides})


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_gives_masked_token_advantages(name):
    inputs = _inputs()
    result = compute_fn(name, inputs)
    advantages = np.asarray(result.advantages)
    assert advantages.shape == (N, B, T) and advantages.dtype == np.float32
    assert np.all(np.isfinite(advantages))
    assert np.all(advantages[applicable_mask(inputs.scores, inputs.mask) == 0] == 0)
    assert np.any(advantages != 0)
    assert (result.returns is not None) == ESTIMATORS[name].needs_values
    record = ESTIMATORS[name]
    assert callable(record.fn) and record.summary and isinstance(record.group_based, bool)


def test_compute_advantages_matches_the_estimators():
    inputs = _inputs()
    masks = applicable_mask(inputs.scores, inputs.mask)
    close(compute_fn("rloo", inputs).advantages, loop_rloo(inputs.scores, inputs.group_ids)[:, :, None] * masks)
    batch_scaled = compute_fn("grpo", inputs, scale_rewards="batch", eps=1e-4).advantages
    close(batch_scaled, loop_grpo(inputs.scores, inputs.group_ids, "batch", 1e-4)[:, :, None] * masks, 1e-4)
    placed = loop_token_rewards(inputs.scores, inputs.mask)
    result = compute_fn("gae", inputs)
    advantages, returns = loop_gae(placed, inputs.values, masks, gamma=1.0, lam=0.95)
    close(result.advantages, loop_whiten(advantages, masks), 1e-4)
    close(result.returns, returns)


def test_compute_advantages_uses_the_given_token_rewards():
    inputs = _inputs()
    _, _, _, _, kl = _batch(1)
    placed = loop_token_rewards(inputs.scores, inputs.mask, kl, 0.2).astype(np.float32)
    masks = applicable_mask(inputs.scores, inputs.mask)
    got = compute_fn("reinforce_pp", inputs._replace(token_rewards=placed)).advantages
    close(got, loop_whiten(loop_returns_to_go(placed, masks, 1.0), masks), 1e-4)


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        ESTIMATORS["mine"] = ESTIMATORS["grpo"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda i: compute_advantages("ppo", i), ValueError, "`name` is 'ppo'"),
        (lambda i: compute_advantages(3, i), TypeError, "`name` is a int"),
        (lambda i: compute_advantages("rloo", i, eps=1e-6), ValueError, "no options"),
        (lambda i: compute_advantages("grpo", i, scale="group"), ValueError, "scale_rewards, eps"),
        (lambda i: compute_advantages("grpo", i, scale_rewards="std"), ValueError, "`scale_rewards` is 'std'"),
        (lambda i: compute_advantages("gae", i, lam=1.5), ValueError, "`lam` is 1.5"),
        (lambda i: compute_advantages("gae", i, whiten_advantages=1), TypeError, "True or False"),
        (lambda i: compute_advantages("gae", i._replace(values=None)), ValueError, "`inputs.values` is None"),
        (lambda i: compute_advantages("grpo", i._replace(group_ids=None)), ValueError, "`inputs.group_ids` is None"),
        (lambda i: compute_advantages("gdpo", i._replace(weights=np.ones(2))), ValueError, "`inputs.weights`"),
        (lambda i: compute_advantages("grpo", i._replace(scores=i.scores[:5])), ValueError, "`inputs.scores`"),
        (lambda i: compute_advantages("grpo", tuple(i)), TypeError, "AdvantageInputs"),
        (lambda i: grpo(i.scores, i.group_ids.astype(np.float32)), ValueError, "`group_ids`"),
        (lambda i: gae(i.values, i.values[:, :, :2], i.mask, gamma=1.0, lam=1.0), ValueError, "`values`"),
    ],
)
def test_bad_names_options_and_inputs_raise_clear_errors(call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")):
        call(_inputs())
