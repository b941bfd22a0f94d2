"""Preference losses against their formulas, MODPO, metrics, stacking, and gradient entanglement on a toy softmax model."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mojax import combiners
from mojax.diagnostics import npo_loss, shared_prefix_mask
from mojax.rl.preference import (
    PREFERENCE_LOSSES,
    check_combiner_for_preference,
    implicit_rewards,
    init_bco_shift,
    modpo_loss,
    preference_loss,
    preference_metrics,
    reward_accuracy,
    sequence_logps,
    stack_preference_losses,
    update_bco_shift,
)
from mojax.rl.preference_entanglement import (
    learned_token_mask,
    npo_preference_loss,
    observed_moves_agree,
    pair_entanglement,
    response_entanglement,
    token_mask_penalty,
)

# Two pairs, written out: s = logp - ref gives s_w = (1, -1), s_l = (-1, 0.5), D = (2, -1.5).
CHOSEN = np.array([-1.0, -4.0])
REJECTED = np.array([-3.0, -2.0])
REF_CHOSEN = np.array([-2.0, -3.0])
REF_REJECTED = np.array([-2.0, -2.5])
BETA = 0.5
NLL = np.array([0.7, 1.3])
LENGTHS_W, LENGTHS_L = np.array([10.0, 4.0]), np.array([6.0, 8.0])


def log_sigmoid(z):
    return -np.logaddexp(0.0, -np.asarray(z, np.float64))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def smoothed(z, eps):
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def expected_loss(name, eps=0.0, delta=0.3):
    """numpy transcription of each formula on the module-level pairs (beta = 0.5, gamma = 0.5, lambda = 50)."""
    s_w, s_l = CHOSEN - REF_CHOSEN, REJECTED - REF_REJECTED
    d, d_free = s_w - s_l, CHOSEN - REJECTED
    return {
        "sigmoid": smoothed(BETA * d, eps),
        "robust": ((1 - eps) * -log_sigmoid(BETA * d) + eps * log_sigmoid(-BETA * d)) / (1 - 2 * eps),
        "ipo": (d - 1 / (2 * BETA)) ** 2,
        "hinge": np.maximum(0.0, 1 - BETA * d),
        "simpo": smoothed(BETA * d_free - 0.5, eps),
        "rdpo": smoothed(BETA * d - 0.2 * (LENGTHS_W - LENGTHS_L), eps),
        "dpop": smoothed(BETA * (d - 50.0 * np.maximum(0.0, REF_CHOSEN - CHOSEN)), eps),
        "cpo": smoothed(BETA * d_free, eps) + 1.0 * NLL,
        "nca_pair": -log_sigmoid(BETA * s_w) - 0.5 * log_sigmoid(-BETA * s_w) - 0.5 * log_sigmoid(-BETA * s_l),
        "bco_pair": -log_sigmoid(BETA * s_w - delta) - log_sigmoid(-(BETA * s_l - delta)),
        "apo_zero": (1 - sigmoid(BETA * s_w)) + sigmoid(BETA * s_l),
        "sft": NLL,
    }[name]


OPTIONS = {"rdpo_alpha": 0.2, "chosen_lengths": LENGTHS_W, "rejected_lengths": LENGTHS_L, "bco_delta": 0.3}


def loss_of(name, **options):
    return preference_loss(
        name, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, chosen_nll=NLL, **{**OPTIONS, **options}
    )


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_every_registered_loss_matches_its_formula(name):
    np.testing.assert_allclose(loss_of(name), expected_loss(name), rtol=1e-5)


def test_hand_computed_values():
    """D = (2, -1.5), beta = 0.5: ipo (D - 1)^2 = (1, 6.25); hinge relu(1 - D/2) = (0, 1.75); sigmoid -log sigmoid(1)."""
    np.testing.assert_allclose(loss_of("ipo"), [1.0, 6.25], rtol=1e-6)
    np.testing.assert_allclose(loss_of("hinge"), [0.0, 1.75], rtol=1e-6)
    np.testing.assert_allclose(loss_of("sigmoid")[0], math.log1p(math.exp(-1.0)), rtol=1e-6)


def test_registry_flags_follow_the_loss_definitions():
    margin = {name for name, record in PREFERENCE_LOSSES.items() if record.margin_based}
    free = {name for name, record in PREFERENCE_LOSSES.items() if not record.needs_reference}
    assert margin == {"sigmoid", "robust", "ipo", "hinge", "simpo", "rdpo"}
    assert free == {"simpo", "cpo", "sft"}
    with pytest.raises(TypeError):
        PREFERENCE_LOSSES["mine"] = PREFERENCE_LOSSES["sigmoid"]


def test_margin_based_losses_depend_on_the_margin_only():
    """Shifting both log-ratios by the same amount leaves every margin loss unchanged."""
    for name, record in PREFERENCE_LOSSES.items():
        if record.margin_based:
            shifted = preference_loss(
                name, CHOSEN + 0.7, REJECTED + 0.7, REF_CHOSEN, REF_REJECTED, beta=BETA, **OPTIONS
            )
            np.testing.assert_allclose(shifted, loss_of(name), rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["sigmoid", "robust", "simpo", "cpo", "rdpo", "dpop"])
def test_label_smoothing(name):
    np.testing.assert_allclose(loss_of(name, label_smoothing=0.1), expected_loss(name, 0.1), rtol=1e-5)


def test_smoothed_dpo_is_minimised_at_the_smoothed_logit():
    """h_eps(z) has its minimum at z* = log((1 - eps)/eps) (conservative DPO): zero gradient there."""
    eps = 0.2
    d_star = math.log((1 - eps) / eps) / BETA
    grad = jax.grad(
        lambda c: preference_loss(
            "sigmoid", c, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=BETA, label_smoothing=eps
        )[0]
    )(jnp.array([d_star]))
    np.testing.assert_allclose(grad, [0.0], atol=1e-6)


def test_robust_with_no_noise_is_dpo_and_half_noise_is_refused():
    np.testing.assert_allclose(loss_of("robust"), loss_of("sigmoid"), rtol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        loss_of("robust", label_smoothing=0.5)


def test_list_loss_type_is_the_weighted_sum_and_rpo_adds_the_nll_once():
    combined = loss_of(["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.3, 0.05])
    expected = expected_loss("sigmoid") + 0.3 * NLL + 0.05 * expected_loss("ipo")
    np.testing.assert_allclose(combined, expected, rtol=1e-5)
    np.testing.assert_allclose(
        loss_of(["sigmoid", "hinge"]), expected_loss("sigmoid") + expected_loss("hinge"), rtol=1e-5
    )
    np.testing.assert_allclose(loss_of("sigmoid", rpo_alpha=0.5), expected_loss("sigmoid") + 0.5 * NLL, rtol=1e-5)


def test_reference_based_loss_without_reference_is_an_error_and_reference_free_ones_run():
    for name, record in PREFERENCE_LOSSES.items():
        call = lambda name=name: preference_loss(name, CHOSEN, REJECTED, beta=BETA, **OPTIONS)  # noqa: E731
        if record.needs_reference:
            with pytest.raises(ValueError, match="ref_chosen_logps"):
                call()
        else:
            assert call().shape == (2,)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss("sigmoid", CHOSEN, REJECTED, REF_CHOSEN, beta=BETA)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss_type": "dpo"}, ValueError, "loss_type"),
        ({"loss_type": []}, ValueError, "loss_type"),
        ({"loss_type": ["sigmoid", "sigmoid"]}, ValueError, "distinct"),
        ({"loss_type": "sigmoid", "gamma": 1.0}, TypeError, "unknown names"),
        ({"loss_type": "sigmoid", "beta": 0.0}, ValueError, "beta"),
        ({"loss_type": "sigmoid", "label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, ValueError, "loss_weights"),
        ({"loss_type": "rdpo", "rdpo_alpha": 0.1}, ValueError, "chosen_lengths"),
        ({"loss_type": "bco_pair"}, ValueError, "bco_delta"),
        ({"loss_type": "cpo", "cpo_alpha": -1.0}, ValueError, "cpo_alpha"),
    ],
)
def test_bad_arguments_are_refused_before_any_compile(kwargs, error, match):
    kwargs = {"beta": BETA, **kwargs}
    loss_type = kwargs.pop("loss_type")
    with pytest.raises(error, match=match):
        preference_loss(loss_type, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, **kwargs)
    with pytest.raises(ValueError, match="shapes"):
        preference_loss("sigmoid", CHOSEN, REJECTED[:1], REF_CHOSEN, REF_REJECTED)


TOKENS_W = np.array([[-0.5, -1.5, -1.0, 0.0], [-2.0, -0.2, 0.0, 0.0]])
MASK_W = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
TOKENS_L = np.array([[-1.0, -2.0, -0.5, -3.0], [-0.1, -0.4, -0.7, -1.0]])
MASK_L = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])


def test_sequence_logps_sums_or_averages_over_the_mask():
    np.testing.assert_allclose(sequence_logps(TOKENS_W, MASK_W), [-3.0, -2.2], rtol=1e-6)
    np.testing.assert_allclose(sequence_logps(TOKENS_W, MASK_W, average=True), [-1.0, -1.1], rtol=1e-6)
    np.testing.assert_allclose(sequence_logps(TOKENS_L, np.zeros((2, 4)), average=True), [0.0, 0.0])
    with pytest.raises(ValueError, match="f32"):
        sequence_logps(TOKENS_W, MASK_W[:, :2])


def test_simpo_and_cpo_on_length_averaged_log_probs():
    """Averages (-1, -1.1) and (-1.625, -0.1): simpo = -log sigmoid(2 (avg_w - avg_l) - 0.5); cpo's NLL is -avg_w."""
    avg_w, avg_l = sequence_logps(TOKENS_W, MASK_W, average=True), sequence_logps(TOKENS_L, MASK_L, average=True)
    np.testing.assert_allclose(avg_l, [-1.625, -0.1], rtol=1e-6)
    simpo = preference_loss("simpo", avg_w, avg_l, beta=2.0, simpo_gamma=0.5)
    np.testing.assert_allclose(simpo, -log_sigmoid(2.0 * np.array([0.625, -1.0]) - 0.5), rtol=1e-6)
    cpo = preference_loss("cpo", avg_w, avg_l, beta=2.0, cpo_alpha=0.4)
    per_token_nll = [
        -np.mean([t for t, m in zip(row, mask, strict=True) if m]) for row, mask in zip(TOKENS_W, MASK_W, strict=True)
    ]
    np.testing.assert_allclose(
        cpo, -log_sigmoid(2.0 * np.array([0.625, -1.0])) + 0.4 * np.array(per_token_nll), rtol=1e-6
    )


def test_implicit_rewards_margins_accuracy_and_metrics():
    rewards = implicit_rewards(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA)
    np.testing.assert_allclose(rewards.chosen, [0.5, -0.5])
    np.testing.assert_allclose(rewards.rejected, [-0.5, 0.25])
    np.testing.assert_allclose(rewards.margin, [1.0, -0.75])
    np.testing.assert_allclose(reward_accuracy(rewards.margin), 0.5)
    np.testing.assert_allclose(reward_accuracy(jnp.array([0.0, 1.0, 2.0])), 2 / 3, rtol=1e-6)  # a tie is not a win
    assert float(reward_accuracy(jnp.zeros((0,)))) == 0.0
    free = implicit_rewards(CHOSEN, REJECTED, beta=BETA)
    np.testing.assert_allclose(free.margin, BETA * (CHOSEN - REJECTED))
    metrics = preference_metrics(rewards, CHOSEN, REJECTED)
    np.testing.assert_allclose(
        [metrics[k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")],
        [0.0, -0.125, 0.125, 0.5],
    )
    np.testing.assert_allclose([metrics["logps/chosen"], metrics["logps/rejected"]], [-2.5, -2.5])
    with pytest.raises(ValueError, match="both or neither"):
        implicit_rewards(CHOSEN, REJECTED, REF_CHOSEN, beta=BETA)


def test_bco_shift_is_the_running_mean_of_batch_mean_rewards_and_drives_bco_pair():
    rng = np.random.default_rng(0)
    shift, batch_means = init_bco_shift(), []
    for _ in range(3):
        chosen, rejected = rng.normal(size=4), rng.normal(size=4)
        rewards = implicit_rewards(chosen, rejected, np.zeros(4), np.zeros(4), beta=BETA)
        shift = update_bco_shift(shift, rewards)
        batch_means.append(np.mean(np.concatenate([BETA * chosen, BETA * rejected])))
        np.testing.assert_allclose(shift.mean, np.mean(batch_means), rtol=1e-5)
    assert float(shift.count) == 3.0
    np.testing.assert_allclose(
        loss_of("bco_pair", bco_delta=shift.mean), expected_loss("bco_pair", delta=float(shift.mean)), rtol=1e-5
    )


def test_preference_loss_compiles_with_traced_logps_and_bco_shift():
    loss = jax.jit(
        lambda c, r, rc, rr, delta: preference_loss(["sigmoid", "bco_pair"], c, r, rc, rr, beta=BETA, bco_delta=delta)
    )
    np.testing.assert_allclose(
        loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.3),
        expected_loss("sigmoid") + expected_loss("bco_pair"),
        rtol=1e-5,
    )


def test_modpo_with_zero_margins_is_dpo():
    zeros = np.zeros((2, 2))
    loss = modpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, zeros, zeros, weights=[1.0, 0.0, 0.0], beta=BETA)
    np.testing.assert_allclose(loss, loss_of("sigmoid"), rtol=1e-6)


def test_modpo_margin_and_weight_on_the_first_objective():
    """-log sigmoid((beta D - w_rest . (r_w - r_l)) / w_0), loop over pairs and objectives."""
    weights = [0.5, 0.3, 0.2]
    r_w, r_l = np.array([[1.0, -2.0], [0.5, 0.0]]), np.array([[0.0, 1.0], [2.0, -1.0]])
    loss = modpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, r_w, r_l, weights=weights, beta=BETA)
    d = (CHOSEN - REF_CHOSEN) - (REJECTED - REF_REJECTED)
    expected = []
    for p in range(2):
        margin = sum(weights[k + 1] * (r_w[k, p] - r_l[k, p]) for k in range(2))
        expected.append(-log_sigmoid((BETA * d[p] - margin) / weights[0]))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    hinge = modpo_loss(
        CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, r_w, r_l, weights=weights, beta=BETA, loss_type="hinge"
    )
    margins = np.array([sum(weights[k + 1] * (r_w[k, p] - r_l[k, p]) for k in range(2)) for p in range(2)])
    np.testing.assert_allclose(hinge, np.maximum(0.0, 1 - (BETA * d - margins) / weights[0]), rtol=1e-5)


def test_modpo_margins_are_constants():
    margin = jnp.array([[0.4, -0.2]])
    grad = jax.grad(
        lambda m: jnp.sum(
            modpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, m, 0 * m, weights=[0.6, 0.4], beta=BETA)
        )
    )(margin)
    np.testing.assert_array_equal(grad, np.zeros((1, 2)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "nca_pair"}, "margin_based"),
        ({"weights": [0.0, 1.0]}, "w_0"),
        ({"weights": [0.5, 0.6]}, "summing to 1"),
        ({"weights": [0.5, 0.3, 0.2]}, "shapes"),
    ],
)
def test_modpo_refuses_bad_arguments(kwargs, match):
    kwargs = {"weights": [0.5, 0.5], "beta": BETA, **kwargs}
    with pytest.raises(ValueError, match=match):
        modpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, np.zeros((1, 2)), np.zeros((1, 2)), **kwargs)


def test_stack_preference_losses_means_each_objectives_pairs():
    losses, ids = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0]), jnp.array([0, 2, 0, -1, 2])
    stacked = stack_preference_losses(losses, ids, 4)
    np.testing.assert_allclose(stacked, [2.0, 0.0, 3.5, 0.0])  # objective 1 and 3 have no pair; -1 is padding
    grad = jax.grad(lambda x: jnp.sum(stack_preference_losses(x, ids, 4)))(losses)
    np.testing.assert_allclose(grad, [0.5, 0.5, 0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="num_objectives"):
        stack_preference_losses(losses, ids, 0)
    with pytest.raises(ValueError, match="shapes"):
        stack_preference_losses(losses, ids[:3], 2)


def test_combiners_that_read_rollout_statistics_are_refused(monkeypatch):
    assert check_combiner_for_preference(("gram",)) == ("gram",)
    for reads in [("rewards", "group_ids"), ("signal",), ("advantages", "mask")]:
        with pytest.raises(ValueError, match="preference pairs have no"):
            check_combiner_for_preference(reads)
    registry = {
        "mgda": types.SimpleNamespace(reads=("gram",)),
        "ctwa": types.SimpleNamespace(reads=("rewards", "signal")),
    }
    monkeypatch.setattr(combiners, "REGISTRY", registry, raising=False)
    assert check_combiner_for_preference("mgda") == ("gram",)
    with pytest.raises(ValueError, match="'ctwa'"):
        check_combiner_for_preference("ctwa")
    with pytest.raises(ValueError, match="a combiner in"):
        check_combiner_for_preference("nope")
    with pytest.raises(TypeError, match="names of combiner inputs"):
        check_combiner_for_preference((3,))


# --- toy linear-softmax "LM": log pi(y_t | context_t) = log_softmax(x_t W + b)[y_t], x_t the context's features ---


def toy_token_logps(params, features, tokens):
    logits = features @ params["W"] + params["b"]
    return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]


def toy_logps(params, batch):
    return tuple(
        sequence_logps(toy_token_logps(params, batch[f"x_{side}"], batch[f"y_{side}"]), batch[f"m_{side}"])
        for side in ("w", "l")
    )


PROBE = {"W": True, "b": False}
toy_entanglement = jax.jit(lambda params, batch: pair_entanglement(toy_logps, params, batch, probe_mask=PROBE))


TOY_PAIRS, TOY_LENGTH, TOY_DIM, TOY_VOCAB = 3, 3, 3, 4
TOY_OPTIONS = {
    "rdpo_alpha": 0.2,
    "chosen_lengths": np.array([3.0, 3.0, 3.0]),
    "rejected_lengths": np.array([3.0, 2.0, 1.0]),
}


def toy_params(rng):
    """Random toy parameters W f32[dim, vocab] and b f32[vocab]."""
    return {
        "W": jnp.asarray(rng.normal(size=(TOY_DIM, TOY_VOCAB)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=TOY_VOCAB), jnp.float32),
    }


def toy_batch(rng, pairs, length, rejected_mask=None):
    """`pairs` pairs of `length`-token responses with random features and tokens; full masks unless given."""
    shape = (pairs, length)
    batch = {"m_w": jnp.ones(shape), "m_l": jnp.ones(shape) if rejected_mask is None else rejected_mask}
    for side in ("w", "l"):
        batch[f"x_{side}"] = jnp.asarray(rng.normal(size=(*shape, TOY_DIM)), jnp.float32)
        batch[f"y_{side}"] = jnp.asarray(rng.integers(0, TOY_VOCAB, size=shape))
    return batch


def random_toy(seed):
    """Random parameters and a batch of 3 pairs of 3-token responses; rejected responses of lengths 3, 2, 1."""
    rng = np.random.default_rng(seed)
    params = toy_params(rng)
    upper = jnp.asarray(np.triu(np.ones((TOY_PAIRS, TOY_LENGTH)))[::-1].copy())
    return params, toy_batch(rng, TOY_PAIRS, TOY_LENGTH, rejected_mask=upper)


@jax.jit
def pair_logp_grads(params, batch, pair):
    """grad_W of log pi(y_w) and log pi(y_l) of one pair, by jax.grad of that pair's log-probability alone."""
    return tuple(
        jax.grad(lambda W, side=side: toy_logps({**params, "W": W}, batch)[side][pair])(params["W"]) for side in (0, 1)
    )


def explicit_pair_grads(params, batch):
    """(g_w, g_l), f32[P, dim * vocab] each: pair by pair, on W alone."""
    grads = [pair_logp_grads(params, batch, p) for p in range(batch["x_w"].shape[0])]
    return tuple(np.stack([np.ravel(g[side]) for g in grads]) for side in (0, 1))


def test_pair_entanglement_equals_explicit_per_pair_gradients():
    params, batch = random_toy(0)
    out = toy_entanglement(params, batch)
    g_w, g_l = explicit_pair_grads(params, batch)
    inner, sq_w, sq_l = np.sum(g_w * g_l, 1), np.sum(g_w**2, 1), np.sum(g_l**2, 1)
    stats = out.statistics
    np.testing.assert_allclose(stats.inner, inner, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.norm_chosen, np.sqrt(sq_w), rtol=1e-5)
    np.testing.assert_allclose(stats.norm_rejected, np.sqrt(sq_l), rtol=1e-5)
    np.testing.assert_allclose(stats.cosine, inner / np.sqrt(sq_w * sq_l), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.condition, inner / np.minimum(sq_w, sq_l), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(out.predicted_chosen, np.sign(sq_w - inner))
    np.testing.assert_array_equal(out.predicted_rejected, np.sign(inner - sq_l))
    chosen, rejected = toy_logps(params, batch)
    np.testing.assert_allclose(out.chosen_logps, chosen, rtol=1e-6)
    np.testing.assert_allclose(out.rejected_logps, rejected, rtol=1e-6)
    weighted = pair_entanglement(toy_logps, params, batch, probe_mask=lambda p: PROBE, coeff_chosen=2.0)
    np.testing.assert_array_equal(weighted.predicted_chosen, np.sign(2.0 * sq_w - inner))
    in_sequence = pair_entanglement(toy_logps, params, batch, probe_mask=PROBE, sequential=True).statistics
    np.testing.assert_allclose(in_sequence.inner, inner, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(in_sequence.norm_rejected, np.sqrt(sq_l), rtol=1e-5)


def toy_mean_logps(params, batch):
    return tuple(
        sequence_logps(
            toy_token_logps(params, batch[f"x_{side}"], batch[f"y_{side}"]), batch[f"m_{side}"], average=True
        )
        for side in ("w", "l")
    )


def test_length_averaged_log_probs_are_the_summed_ones_with_coefficients_one_over_length():
    """SimPO's margin on averages is a margin on sums with a = 1/|y|: the predicted moves agree in sign."""
    params, batch = random_toy(4)
    averaged = pair_entanglement(toy_mean_logps, params, batch, probe_mask=PROBE)
    lengths_w, lengths_l = batch["m_w"].sum(1), batch["m_l"].sum(1)
    summed = pair_entanglement(
        toy_logps, params, batch, probe_mask=PROBE, coeff_chosen=1 / lengths_w, coeff_rejected=1 / lengths_l
    )
    np.testing.assert_array_equal(averaged.predicted_chosen, summed.predicted_chosen)
    np.testing.assert_array_equal(averaged.predicted_rejected, summed.predicted_rejected)
    np.testing.assert_allclose(
        averaged.statistics.delta_chosen, summed.statistics.delta_chosen / lengths_w, rtol=1e-4, atol=1e-6
    )


def test_pair_entanglement_work_grows_linearly_with_the_pairs():
    """Each pair's two pullbacks run through that pair's responses alone: 4x the pairs, about 4x the compiled flops
    (2B pullbacks through the whole batch's forward grow as the square of the pairs: about 16x)."""
    params = toy_params(np.random.default_rng(0))

    def compiled_flops(pairs):
        batch = toy_batch(np.random.default_rng(1), pairs, length=64)
        program = jax.jit(lambda p, b: pair_entanglement(toy_logps, p, b, probe_mask=PROBE).statistics.inner)
        return program.lower(params, batch).compile().cost_analysis()["flops"]

    assert compiled_flops(16) / compiled_flops(4) < 5.0


def toy_response_logps(params, responses):
    return sequence_logps(toy_token_logps(params, responses["x"], responses["y"]), responses["m"])


def toy_sides(batch):
    """The toy batch's chosen and rejected responses, each a dict of x, y, m."""
    return tuple({key: batch[f"{key}_{side}"] for key in ("x", "y", "m")} for side in ("w", "l"))


def test_response_entanglement_equals_explicit_per_pair_gradients_and_pair_entanglement():
    params, batch = random_toy(2)
    g_w, g_l = explicit_pair_grads(params, batch)
    inner, sq_w, sq_l = np.sum(g_w * g_l, 1), np.sum(g_w**2, 1), np.sum(g_l**2, 1)
    chosen, rejected = toy_logps(params, batch)
    coefficients = {"coeff_chosen": 2.0, "coeff_rejected": jnp.asarray([1.0, 0.5, 3.0])}
    by_pairs = pair_entanglement(toy_logps, params, batch, probe_mask=PROBE, **coefficients)
    for sequential in (False, True):
        out = jax.jit(
            lambda p, chosen, rejected, sequential=sequential: response_entanglement(
                toy_response_logps, p, chosen, rejected, probe_mask=PROBE, sequential=sequential, **coefficients
            )
        )(params, *toy_sides(batch))
        np.testing.assert_allclose(out.statistics.inner, inner, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out.statistics.norm_chosen, np.sqrt(sq_w), rtol=1e-5)
        np.testing.assert_allclose(out.statistics.norm_rejected, np.sqrt(sq_l), rtol=1e-5)
        np.testing.assert_array_equal(
            out.predicted_chosen, np.sign(2.0 * sq_w - coefficients["coeff_rejected"] * inner)
        )
        np.testing.assert_allclose(out.chosen_logps, chosen, rtol=1e-6)
        np.testing.assert_allclose(out.rejected_logps, rejected, rtol=1e-6)
        for mine, theirs in zip(jax.tree.leaves(out), jax.tree.leaves(by_pairs), strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-6)


def test_response_entanglement_pulls_back_through_one_response_where_pair_entanglement_runs_both():
    """Each response's pullback runs through its own sequence only; each of ``pair_entanglement``'s two pullbacks per
    pair runs through both of the pair's sequences: beyond the forward pass, the toy model's flops fall below 0.6x."""
    params = toy_params(np.random.default_rng(0))
    batch = toy_batch(np.random.default_rng(1), 8, length=64)

    def compiled_flops(program, *args):
        return jax.jit(program).lower(params, *args).compile().cost_analysis()["flops"]

    by_pairs = compiled_flops(lambda p, b: pair_entanglement(toy_logps, p, b, probe_mask=PROBE).statistics.inner, batch)
    by_responses = compiled_flops(
        lambda p, chosen, rejected: (
            response_entanglement(toy_response_logps, p, chosen, rejected, probe_mask=PROBE).statistics.inner
        ),
        *toy_sides(batch),
    )
    forward = compiled_flops(lambda p, b: jnp.stack(toy_logps(p, b)), batch)
    assert by_responses - forward < 0.6 * (by_pairs - forward)


def test_response_entanglement_refuses_sides_that_do_not_match():
    params, batch = random_toy(0)
    chosen, rejected = toy_sides(batch)
    with pytest.raises(ValueError, match="the chosen responses'"):
        response_entanglement(
            toy_response_logps, params, chosen, {**rejected, "x": rejected["x"][:, :2]}, probe_mask=PROBE
        )
    with pytest.raises(ValueError, match="the chosen responses'"):
        response_entanglement(toy_response_logps, params, chosen, {"x": rejected["x"]}, probe_mask=PROBE)
    with pytest.raises(ValueError, match="rejected.*pairs on their leading axis"):
        response_entanglement(
            toy_response_logps, params, chosen, {**rejected, "m": rejected["m"][:2]}, probe_mask=PROBE
        )


def test_pair_entanglement_refuses_a_batch_without_a_pair_axis():
    params, batch = random_toy(0)
    with pytest.raises(ValueError, match="pairs on their leading axis"):
        pair_entanglement(toy_logps, params, {**batch, "m_w": batch["m_w"][:2]}, probe_mask=PROBE)
    with pytest.raises(ValueError, match="pairs on their leading axis"):
        pair_entanglement(toy_logps, params, {**batch, "m_w": jnp.float32(1.0)}, probe_mask=PROBE)


def test_pair_entanglement_refuses_a_bad_probe_mask():
    params, batch = random_toy(0)
    with pytest.raises(ValueError, match="selects no parameter"):
        pair_entanglement(toy_logps, params, batch, probe_mask={"W": False, "b": False})
    with pytest.raises(ValueError, match="structure must match params"):
        pair_entanglement(toy_logps, params, batch, probe_mask={"W": True})


def test_npo_loss_level_gradient_is_the_pairwise_normalised_gradient():
    """grad sum_p l(D_p) through npo_preference_loss = sum_p l'(D_p) (g_w/|g_w| - g_l/|g_l|), for any margin loss."""
    params, batch = random_toy(1)
    out = toy_entanglement(params, batch)
    g_w, g_l = explicit_pair_grads(params, batch)
    unit_difference = g_w / np.linalg.norm(g_w, axis=1, keepdims=True) - g_l / np.linalg.norm(
        g_l, axis=1, keepdims=True
    )
    ref_w, ref_l = np.array([-3.0, -4.0, -2.5]), np.array([-3.5, -3.0, -4.0])
    norms = {"norm_chosen": out.statistics.norm_chosen, "norm_rejected": out.statistics.norm_rejected}

    def total(W, loss_type, npo):
        chosen, rejected = toy_logps({**params, "W": W}, batch)
        if npo:
            return jnp.sum(
                npo_preference_loss(loss_type, chosen, rejected, ref_w, ref_l, beta=BETA, **norms, **TOY_OPTIONS)
            )
        return jnp.sum(preference_loss(loss_type, chosen, rejected, ref_w, ref_l, beta=BETA, **TOY_OPTIONS))

    chosen, rejected = toy_logps(params, batch)
    d = jnp.asarray(chosen - ref_w - (rejected - ref_l))
    zeros = jnp.zeros_like(d)
    for loss_type in ("sigmoid", "ipo", "rdpo"):
        # A margin loss is l(D): its per-pair slope l'(D_p) is the gradient of sum_p l(D_p) at chosen = D, rest 0.
        slope = jax.grad(
            lambda x, t=loss_type: jnp.sum(preference_loss(t, x, zeros, zeros, zeros, beta=BETA, **TOY_OPTIONS))
        )(d)
        expected = np.tensordot(np.asarray(slope), unit_difference, axes=1)
        grad = jax.grad(total)(params["W"], loss_type, True)
        np.testing.assert_allclose(np.ravel(grad), expected, rtol=1e-4, atol=1e-6, err_msg=loss_type)
        np.testing.assert_allclose(total(params["W"], loss_type, True), total(params["W"], loss_type, False), rtol=1e-6)
    coeff = BETA * sigmoid(-BETA * d)  # |l'(D)| of DPO: the diagnostics' static form agrees
    static = jax.grad(lambda W: 3 * npo_loss(*toy_logps({**params, "W": W}, batch), *norms.values(), coeff))(
        params["W"]
    )
    np.testing.assert_allclose(jax.grad(total)(params["W"], "sigmoid", True), static, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="anchored"):
        npo_preference_loss("apo_zero", chosen, rejected, ref_w, ref_l, **norms)


# Worked cases at W = 0 (uniform pi over 3 tokens). Both responses start with a different token (0 vs 1) after
# the prompt, features q = (0, 0, 0.2), then share token 2 after contexts with features x_w, x_l. Per token,
# grad_W log pi = x (e_y - 1/3)^T, so <g_w, g_l> = -|q|^2/3 + (2/3) x_w.x_l and |g|^2 = (2/3)(|q|^2 + |x|^2).
PROMPT = (0.0, 0.0, 0.2)
WORKED = {
    "both_rise": ((1.0, 1.0, 0.0), (1.0, 0.9, 0.0), (1.0, 1.0)),
    "both_fall": ((1.0, 0.9, 0.0), (1.0, 1.0, 0.0), (-1.0, -1.0)),
    "disentangled": ((1.0, 1.0, 0.0), (-1.0, 1.0, 0.0), (1.0, -1.0)),
}
STEP = 1e-2


def worked_pair(context_w, context_l):
    batch = {"y_w": jnp.array([[0, 2]]), "y_l": jnp.array([[1, 2]]), "m_w": jnp.ones((1, 2)), "m_l": jnp.ones((1, 2))}
    batch["x_w"] = jnp.array([[PROMPT, context_w]])
    batch["x_l"] = jnp.array([[PROMPT, context_l]])
    return {"W": jnp.zeros((3, 3)), "b": jnp.zeros(3)}, batch


def sgd_moves(loss_fn, params, batch):
    """(before, after) log-probs of both responses after one SGD step of the probe W on loss_fn(chosen, rejected)."""
    grad = jax.grad(lambda W: jnp.sum(loss_fn(*toy_logps({**params, "W": W}, batch))))(params["W"])
    return toy_logps(params, batch), toy_logps({**params, "W": params["W"] - STEP * grad}, batch)


@pytest.mark.parametrize("case", sorted(WORKED))
def test_worked_entanglement_cases_predict_the_observed_moves_and_npo_fixes_the_signs(case):
    context_w, context_l, signs = WORKED[case]
    params, batch = worked_pair(context_w, context_l)
    out = toy_entanglement(params, batch)
    q2 = float(np.dot(PROMPT, PROMPT))
    inner = -q2 / 3 + 2 / 3 * float(np.dot(context_w, context_l))
    np.testing.assert_allclose(out.statistics.inner, [inner], rtol=1e-5)
    np.testing.assert_allclose(out.statistics.norm_chosen**2, [2 / 3 * (q2 + np.dot(context_w, context_w))], rtol=1e-5)
    np.testing.assert_allclose(
        out.statistics.norm_rejected**2, [2 / 3 * (q2 + np.dot(context_l, context_l))], rtol=1e-5
    )
    np.testing.assert_array_equal([out.predicted_chosen[0], out.predicted_rejected[0]], signs)
    if case != "disentangled":
        assert out.statistics.condition[0] > 1.0

    ref_w, ref_l = out.chosen_logps, out.rejected_logps  # reference = the current policy, so D = 0
    dpo = lambda c, r: preference_loss("sigmoid", c, r, ref_w, ref_l, beta=1.0)  # noqa: E731
    (before_w, before_l), (after_w, after_l) = sgd_moves(dpo, params, batch)
    assert bool(observed_moves_agree(out.predicted_chosen, before_w, after_w)[0])
    assert bool(observed_moves_agree(out.predicted_rejected, before_l, after_l)[0])
    c = 0.5  # |l'(0)| = beta sigmoid(0)
    np.testing.assert_allclose((after_w - before_w) / STEP, c * out.statistics.delta_chosen, rtol=2e-2)
    np.testing.assert_allclose((after_l - before_l) / STEP, c * out.statistics.delta_rejected, rtol=2e-2)

    norms = {"norm_chosen": out.statistics.norm_chosen, "norm_rejected": out.statistics.norm_rejected}
    npo = lambda c, r: npo_preference_loss("sigmoid", c, r, ref_w, ref_l, beta=1.0, **norms)  # noqa: E731
    (before_w, before_l), (after_w, after_l) = sgd_moves(npo, params, batch)
    assert bool(observed_moves_agree(jnp.ones(1), before_w, after_w)[0])
    assert bool(observed_moves_agree(-jnp.ones(1), before_l, after_l)[0])


def test_observed_moves_agree_compares_signs():
    agree = observed_moves_agree(jnp.array([1.0, -1.0, 1.0, 0.0]), jnp.zeros(4), jnp.array([0.1, -0.2, -0.3, 0.0]))
    np.testing.assert_array_equal(agree, [True, True, False, True])


def prefix_pair():
    """Responses (3, 3, 0, 2) and (3, 3, 1, 2, 0): same prompt, a two-token shared prefix, then different contexts."""
    rng = np.random.default_rng(2)
    shared = rng.normal(size=(3, TOY_DIM))  # contexts of the two prefix tokens and of the first differing token
    batch = {
        "y_w": jnp.array([[3, 3, 0, 2]]),
        "y_l": jnp.array([[3, 3, 1, 2, 0]]),
        "x_w": jnp.asarray(np.concatenate([shared, rng.normal(size=(1, TOY_DIM))])[None], jnp.float32),
        "x_l": jnp.asarray(np.concatenate([shared, rng.normal(size=(2, TOY_DIM))])[None], jnp.float32),
    }
    params, _ = random_toy(3)
    return params, batch


def test_shared_prefix_mask_removes_the_common_tokens_and_keeps_the_margin_gradient():
    params, batch = prefix_pair()
    mu_w, mu_l = shared_prefix_mask(batch["y_w"], batch["y_l"])
    np.testing.assert_array_equal(mu_w, [[0, 0, 1, 1]])
    np.testing.assert_array_equal(mu_l, [[0, 0, 1, 1, 1]])
    full = {**batch, "m_w": jnp.ones((1, 4)), "m_l": jnp.ones((1, 5))}
    masked = {**batch, "m_w": mu_w, "m_l": mu_l}
    tokens_w = toy_token_logps(params, batch["x_w"], batch["y_w"])
    np.testing.assert_allclose(toy_logps(params, masked)[0], tokens_w[:, 2:].sum(1), rtol=1e-6)

    margin_grad = jax.jit(
        lambda b: jax.grad(lambda W: jnp.sum(jnp.subtract(*toy_logps({**params, "W": W}, b))))(params["W"])
    )

    np.testing.assert_allclose(margin_grad(masked), margin_grad(full), rtol=1e-5, atol=1e-6)
    entangled, untangled = toy_entanglement(params, full), toy_entanglement(params, masked)
    prefix = jax.grad(lambda W: jnp.sum(toy_token_logps({**params, "W": W}, batch["x_w"], batch["y_w"])[:, :2]))(
        params["W"]
    )
    g_w, g_l = pair_logp_grads(params, masked, 0)
    # <s + g_w, s + g_l> - <g_w, g_l> = |s|^2 + <s, g_w + g_l>: what the shared prefix s added to the inner product
    np.testing.assert_allclose(
        entangled.statistics.inner - untangled.statistics.inner, jnp.vdot(prefix, prefix + g_w + g_l), rtol=1e-4
    )


def test_learned_token_mask_and_its_l1_penalty():
    logits, mask = jnp.array([[0.0, math.log(3.0), 5.0]]), jnp.array([[1.0, 1.0, 0.0]])
    mu = learned_token_mask(logits, mask)
    np.testing.assert_allclose(mu, [[0.5, 0.75, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(token_mask_penalty(mu, mask, l1=0.2), 0.2 * 0.625, rtol=1e-6)
    grad = jax.grad(lambda z: token_mask_penalty(learned_token_mask(z, mask), mask, l1=0.2))(logits)
    np.testing.assert_allclose(grad, [[0.2 * 0.25 / 2, 0.2 * 0.1875 / 2, 0.0]], rtol=1e-6)
    assert float(token_mask_penalty(mu, jnp.zeros_like(mask), l1=1.0)) == 0.0
    with pytest.raises(ValueError, match="l1"):
        token_mask_penalty(mu, mask, l1=-1.0)
    with pytest.raises(ValueError, match="shape"):
        learned_token_mask(logits, mask[:, :2])


def test_learned_mask_in_the_margin_loss_gets_the_dpo_gradient_and_saturates_to_the_prefix_mask():
    """d/dz_t of -log sigmoid(beta D) with D = sum_t mu_t lp_t - rejected: -beta sigmoid(-beta D) mu_t (1 - mu_t) lp_t."""
    tokens, rejected, zeros = jnp.array([[-0.5, -2.0, -1.0]]), jnp.array([-1.5]), jnp.zeros(1)
    logits = jnp.array([[0.3, -1.0, 2.0]])

    def loss(z):
        chosen = sequence_logps(tokens, learned_token_mask(z))
        return preference_loss("sigmoid", chosen, rejected, zeros, zeros, beta=BETA)[0]

    mu = jax.nn.sigmoid(logits)
    d = float(jnp.sum(mu * tokens) - rejected[0])
    expected = -BETA * sigmoid(-BETA * d) * mu * (1 - mu) * tokens
    np.testing.assert_allclose(jax.grad(loss)(logits), expected, rtol=1e-5)

    params, batch = prefix_pair()
    mu_w, mu_l = shared_prefix_mask(batch["y_w"], batch["y_l"])
    saturated = {
        **batch,
        "m_w": learned_token_mask(jnp.where(mu_w > 0, 30.0, -30.0)),
        "m_l": learned_token_mask(jnp.where(mu_l > 0, 30.0, -30.0)),
    }
    np.testing.assert_allclose(
        toy_logps(params, saturated), toy_logps(params, {**batch, "m_w": mu_w, "m_l": mu_l}), rtol=1e-6
    )
