"""The preference trainer's loss variants against their formulas on the same batch: R-DPO's length term, BCO's running
shift (kept in the checkpoint), learned token masks, MODPO's reward margins, and the movie-review sentiment settings.

Every run here measures no entanglement (``preference.entanglement_pairs=0``) unless the test is about it, so that
each compiles the small step only once; the persistent XLA cache of conftest.py serves the resumed runs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mojax.rl.dpo import DPOTrainer, encode_pairs, load_pair_rows, run_dpo, tiny_preference_pairs
from mojax.rl.dpo_config import load_dpo_config
from mojax.rl.logging import read_metrics
from mojax.rl.preference import implicit_rewards, init_bco_shift, preference_loss, update_bco_shift
from mojax.rl.tiny import EOS_ID, tiny_tokenizer

QUIET = ["logging.tensorboard=false", "logging.progress=false", "export=false", "preference.entanglement_pairs=0"]
SGD = ["optimizer.name=sgd", "optimizer.learning_rate=1.0", "optimizer.max_grad_norm=null"]  # steps >> rounding


def as_numpy(tree):
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), tree)


def tracked_run(output_dir: Path, *overrides: str) -> tuple[DPOTrainer, dict[int, object], list[dict]]:
    """A run with its parameters (and BCO shift, mask logits) recorded before the first step and after each step."""
    trainer = DPOTrainer(load_dpo_config("dpo_tiny", [f"output_dir={output_dir}", *QUIET, *overrides]))
    states = {0: as_numpy(trainer.state)}
    trainer.callbacks = (lambda step, metrics: states.__setitem__(step, as_numpy(trainer.state)),)
    trainer.train()
    trainer.close()
    return trainer, states, read_metrics(output_dir)


def batch_logps(trainer: DPOTrainer, params, step: int):
    """(batch of `step`, chosen f32[B], rejected f32[B]) with the given parameters."""
    batch = trainer.pairs_for_step(step)
    chosen, rejected = trainer._logps(jax.tree.map(jnp.asarray, params), trainer._place(batch))
    return batch, chosen, rejected


# ------------------------------------------------------------------------------------------------------ R-DPO
@pytest.fixture(scope="module")
def rdpo_run(tmp_path_factory):
    """R-DPO on pairs whose rejected responses are 0 to 3 characters longer than the chosen ones."""
    root = tmp_path_factory.mktemp("rdpo")
    rng = random.Random(0)
    rows = [
        {**row, "rejected": row["rejected"] + "xyz"[: rng.randint(0, 3)]} for row in tiny_preference_pairs(16, seed=5)
    ]
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = [
        f"data.pairs={path}",
        "data.num_pairs=16",
        "data.max_completion_length=14",
        "preference.loss_type=rdpo",
        "preference.rdpo_alpha=0.2",
        "steps=6",
    ]
    return tracked_run(root / "run", *overrides)


def test_rdpo_in_the_trainer_is_the_length_regularised_loss_on_the_same_batch(rdpo_run):
    trainer, states, records = rdpo_run
    for step in (1, 2):
        batch, chosen, rejected = batch_logps(trainer, states[step - 1].params, step)
        lengths = batch.chosen_mask.sum(axis=1), batch.rejected_mask.sum(axis=1)
        assert len(set((lengths[0] - lengths[1]).tolist())) > 1  # the length term differs between pairs
        want = preference_loss(
            "rdpo",
            chosen,
            rejected,
            batch.ref_chosen,
            batch.ref_rejected,
            beta=0.1,
            rdpo_alpha=0.2,
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
        )
        np.testing.assert_allclose(records[step - 1]["loss"], float(jnp.mean(want)), rtol=1e-5)
    # At the reference (step 1) the loss is -log sigmoid(-alpha (|y_w| - |y_l|)) per pair, by hand.
    batch = trainer.pairs_for_step(1)
    by_hand = np.log1p(np.exp(0.2 * (batch.chosen_mask.sum(1) - batch.rejected_mask.sum(1))))
    np.testing.assert_allclose(records[0]["loss"], by_hand.mean(), rtol=1e-4)


def test_a_short_rdpo_run_lowers_its_loss(rdpo_run):
    _, _, records = rdpo_run
    assert records[-1]["loss"] < records[0]["loss"] - 0.05
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]


# -------------------------------------------------------------------------------------------------------- BCO
BCO = ["preference.loss_type=bco_pair", "checkpoint.save_steps=2"]


@pytest.fixture(scope="module")
def bco_run(tmp_path_factory):
    return tracked_run(tmp_path_factory.mktemp("bco") / "straight", *BCO, "steps=4")


def test_bco_in_the_trainer_uses_the_running_mean_of_the_batch_rewards(bco_run):
    trainer, states, records = bco_run
    shift = init_bco_shift()
    for step in (1, 2, 3):
        batch, chosen, rejected = batch_logps(trainer, states[step - 1].params, step)
        rewards = implicit_rewards(chosen, rejected, batch.ref_chosen, batch.ref_rejected, beta=0.1)
        shift = update_bco_shift(shift, rewards)  # updated with this batch first, then read (as TRL does)
        want = preference_loss(
            "bco_pair", chosen, rejected, batch.ref_chosen, batch.ref_rejected, beta=0.1, bco_delta=shift.mean
        )
        np.testing.assert_allclose(records[step - 1]["loss"], float(jnp.mean(want)), rtol=1e-5)
        np.testing.assert_allclose(records[step - 1]["bco/delta"], float(shift.mean), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(states[step].bco_shift.mean, shift.mean, rtol=1e-5, atol=1e-7)
        assert float(states[step].bco_shift.count) == step
    assert records[2]["bco/delta"] != 0.0


def test_a_short_bco_run_lowers_its_loss(bco_run):
    _, _, records = bco_run
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]


def test_bco_shift_survives_resume_bit_for_bit(bco_run, tmp_path):
    _, states, records = bco_run
    run_dpo("dpo_tiny", [f"output_dir={tmp_path}", *QUIET, *BCO, "steps=2"])
    resumed = DPOTrainer(load_dpo_config("dpo_tiny", [f"output_dir={tmp_path}", *QUIET, *BCO, "steps=4"]))
    resumed.train()
    resumed.close()
    for got, want in zip(jax.tree.leaves(as_numpy(resumed.state)), jax.tree.leaves(states[4]), strict=True):
        np.testing.assert_array_equal(got, want)
    strip = lambda rows: [{k: v for k, v in row.items() if not k.startswith("timing/")} for row in rows]
    assert strip(read_metrics(tmp_path)) == strip(records)


# --------------------------------------------------------------------------------------------- learned masks
MASK = [
    "preference.mitigation=learned_mask",
    "preference.reference=on_the_fly",
    "preference.mask_l1=1.0",
    "preference.mask_learning_rate=10.0",
    "preference.mask_init=0.0",
    "data.num_pairs=16",
    "steps=3",
]


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    return tracked_run(tmp_path_factory.mktemp("mask") / "run", *MASK)


def test_learned_masks_take_the_l1_step_on_the_tokens_of_the_batch(mask_run):
    """Step 1 starts at the reference, where the DPO loss has no gradient in the masks: only the penalty
    l1 * mean(sigmoid(logits)) moves them, by -lr * l1 * sigmoid'(0) / (tokens in the batch) on every real token."""
    trainer, states, _ = mask_run
    batch = trainer.pairs_for_step(1)
    tokens = batch.chosen_mask.sum() + batch.rejected_mask.sum()
    want = np.zeros_like(states[0].mask_logits)
    want[batch.pair_ids, 0] = -10.0 * 1.0 * 0.25 / tokens * batch.chosen_mask
    want[batch.pair_ids, 1] = -10.0 * 1.0 * 0.25 / tokens * batch.rejected_mask
    np.testing.assert_array_equal(states[0].mask_logits, 0.0)
    assert len(set(batch.pair_ids.tolist())) == 8  # half the pairs: the other half keep their logits at 0
    np.testing.assert_allclose(states[1].mask_logits, want, rtol=1e-4, atol=1e-7)


def test_learned_masks_shrink_under_a_strong_l1_penalty_and_report_it(mask_run):
    """Steps 1 and 2 draw the two halves of the 16 pairs for the first time; step 3 draws pairs seen once."""
    _, _, records = mask_run
    means = [record["mask/mean"] for record in records]  # the masks of the batch as the step found them
    np.testing.assert_allclose(means[:2], [0.5, 0.5], rtol=1e-6)  # sigmoid(0)
    np.testing.assert_allclose(records[0]["mask/penalty"], 0.5, rtol=1e-6)  # l1 * mean(mu)
    assert means[2] < 0.5
    assert all(math.isfinite(record["loss"]) for record in records)


def test_learned_masks_survive_resume_bit_for_bit(mask_run, tmp_path):
    _, states, _ = mask_run
    overrides = [f"output_dir={tmp_path}", *QUIET, *MASK]
    run_dpo("dpo_tiny", [*overrides, "steps=2"])
    resumed = DPOTrainer(load_dpo_config("dpo_tiny", overrides))
    resumed.train()
    resumed.close()
    np.testing.assert_array_equal(np.asarray(resumed.state.mask_logits), states[3].mask_logits)
    for got, want in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(states[3].params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


# ------------------------------------------------------------------------------------------------------ MODPO
def modpo(reward: str) -> list[str]:
    """w_0 = 0.5 on the pairs and 0.5 on one margin reward, beta = 0.1, one plain SGD step."""
    rewards = f"modpo.rewards=[{{name: other, fn: {reward}, weight: 0.5}}]"
    return [*SGD, "modpo.weight=0.5", rewards, "steps=1"]


@pytest.fixture(scope="module")
def modpo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("modpo")
    return {
        "dpo": tracked_run(root / "dpo", *SGD, "preference.beta=0.2", "steps=1"),
        "zero": tracked_run(root / "zero", *modpo('char_count, options: {chars: "?", target: 1}')),
        "a": tracked_run(root / "a", *modpo("char_fraction, options: {chars: a}")),
    }


def parameter_change(run) -> list[np.ndarray]:
    _, states, _ = run
    return [after - before for after, before in zip(*(jax.tree.leaves(states[k].params) for k in (1, 0)), strict=True)]


def test_modpo_with_zero_margins_is_dpo_at_beta_over_w0_through_the_trainer(modpo_runs):
    """-log sigmoid((beta D - 0) / w_0) is DPO with beta / w_0 = 0.2: same loss, same update."""
    (_, _, dpo_records), (_, _, zero_records) = modpo_runs["dpo"], modpo_runs["zero"]
    assert zero_records[0]["modpo/margin"] == 0.0
    np.testing.assert_allclose(zero_records[0]["loss"], dpo_records[0]["loss"], rtol=1e-6)
    for got, want in zip(parameter_change(modpo_runs["zero"]), parameter_change(modpo_runs["dpo"]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


def test_modpo_margins_scale_the_first_step_as_the_formula_says(modpo_runs):
    """The chosen tiny responses hold one more "a" in 8 characters: r_w - r_l = 1/8, margin m = 0.5 / 8 = 1/16.

    At the reference D = 0, so the loss is -log sigmoid(-m / w_0) = softplus(1/8), and its gradient
    -(beta / w_0) sigmoid(m / w_0) grad D is 2 sigmoid(1/8) = 1.0624 times that of the zero-margin run: the pairs
    the other reward already prefers push harder, along the same direction.
    """
    _, _, records = modpo_runs["a"]
    np.testing.assert_allclose(records[0]["modpo/margin"], 1 / 16, rtol=1e-6)
    np.testing.assert_allclose(records[0]["loss"], math.log1p(math.exp(1 / 8)), rtol=1e-5)
    ratio = 2.0 / (1.0 + math.exp(-1 / 8))
    got, zero = (np.concatenate([leaf.ravel() for leaf in parameter_change(modpo_runs[k])]) for k in ("a", "zero"))
    np.testing.assert_allclose(got @ zero / (zero @ zero), ratio, rtol=1e-4)  # the least-squares ratio
    np.testing.assert_allclose(got, ratio * zero, rtol=1e-3, atol=1e-3 * np.abs(zero).max())


# --------------------------------------------------------------------------------------- sentiment settings
SNIPPETS = [
    "a quiet film about two sisters who run a small bakery by the sea",
    "the plot wanders but the cast keeps it moving with warmth and wit",
    "an old detective story told again with new faces and a fine score",
    "this road movie has a bright heart and a few too many detours",
    "a noisy action picture that forgets its characters halfway through",
    "the animation is lovely and the songs stay with you after the end",
    "a slow drama about a farmer and his son in a dry summer",
    "the jokes land often enough and the leads share an easy charm",
    "a tense thriller set on a night train crossing the mountains",
    "the director returns to his home town for a gentle comedy",
    "a war film with big battles and a small story at its centre",
    "the remake keeps the old songs and adds a clever new ending",
]


@pytest.mark.parametrize("setting", ["one_token", "short_suffix", "long_suffix"])
def test_sentiment_pairs_share_the_review_and_fit_the_completion_length(tmp_path, setting):
    (tmp_path / "snippets.txt").write_text("\n".join(SNIPPETS))
    config = load_dpo_config(
        "dpo_sentiment",
        [
            f"output_dir={tmp_path}",
            f"data.setting={setting}",
            "data.num_pairs=6",
            "data.max_completion_length=256",
            f"data.snippets={tmp_path / 'snippets.txt'}",
        ],
    )
    rows = load_pair_rows("sentiment_synthetic", setting, config, tokenizer=tiny_tokenizer())
    assert len(rows) == 6
    for row in rows:
        (review,) = [snippet for snippet in SNIPPETS if row["prompt"].endswith(" ".join(snippet.split()[:6]))]
        shared = " ".join(review.split()[6:]) + " "  # the rest of the review starts both responses
        assert row["chosen"].startswith(shared) and row["rejected"].startswith(shared)
        assert row["chosen"] != row["rejected"]
        assert len(row["chosen"]) < 255 and len(row["rejected"]) < 255


def sentiment_run(output_dir: Path, snippets: Path, mitigation: str) -> list[dict]:
    run_dpo(
        "dpo_sentiment",
        [
            f"output_dir={output_dir}",
            "logging.tensorboard=false",
            "logging.progress=false",
            "export=false",
            "steps=2",
            f"data.snippets={snippets}",
            "data.num_pairs=8",
            "data.pairs_per_step=4",
            "data.max_completion_length=96",
            f"preference.mitigation={mitigation}",
        ],
    )
    return read_metrics(output_dir)


def test_the_shipped_sentiment_config_records_the_entanglement_statistics(tmp_path):
    snippets = tmp_path / "snippets.txt"
    snippets.write_text("\n".join(SNIPPETS))
    plain = sentiment_run(tmp_path / "plain", snippets, "none")
    masked = sentiment_run(tmp_path / "masked", snippets, "shared_prefix")
    for records in (plain, masked):
        assert [record["step"] for record in records] == [1, 2]
        for record in records:
            for key in ("inner", "cosine", "condition", "observed_both_down", "agreement_chosen"):
                assert math.isfinite(record[f"entanglement/{key}"]), key
    # The review the two responses share dominates both gradients; leaving it out of the log-probs decorrelates them.
    assert plain[0]["entanglement/cosine"] > 0.5
    assert masked[0]["entanglement/cosine"] < plain[0]["entanglement/cosine"]


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["preference.mitigation=learned_mask"],
            r"`preference.reference` is 'precompute' with mitigation 'learned_mask'",
        ),
        (["preference.mitigation=[npo, npo]"], r"`preference.mitigation` repeats a name"),
        (["preference.mitigation=[npo, mask]"], r"`preference.mitigation` is 'mask'"),
        (["preference.mask_learning_rate=0"], r"`preference.mask_learning_rate` is 0"),
        (
            ["modpo.weight=0.5", "modpo.rewards=[{name: x, fn: conciseness, weight: 0.25}]"],
            r"`modpo.weight` and the rewards' weights sum to 0.75",
        ),
        (
            ["modpo.rewards=[{name: x, fn: conciseness}]", "preference.loss_type=[sigmoid, ipo]"],
            r"`preference.loss_type` is \['sigmoid', 'ipo'\] with modpo.rewards",
        ),
        (["modpo.rewards=[{name: x, fn: conciseness}]", "preference.loss_type=cpo"], r"with modpo.rewards"),
        (["data.pairs=sentiment_synthetic", "data.setting=shared_prefix"], r"`data.setting` is 'shared_prefix'"),
    ],
)
def test_bad_variant_configs_raise_before_anything_compiles(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        load_dpo_config("dpo_tiny", [f"output_dir={tmp_path}", *overrides])


def test_a_cut_that_removes_the_difference_is_refused():
    rows = [{"prompt": "ab", "chosen": "same start then a", "rejected": "same start then b"}]
    with pytest.raises(ValueError, match=r"`max_completion_length` is 8: pair 0 has the same chosen and rejected"):
        encode_pairs(tiny_tokenizer(), rows, max_prompt_length=8, max_completion_length=8, eos_id=EOS_ID)


def test_a_modpo_reward_that_gives_no_score_is_refused(tmp_path):
    config = load_dpo_config(
        "dpo_tiny",
        [
            f"output_dir={tmp_path}",
            "data.num_pairs=8",
            "modpo.weight=0.5",
            "modpo.rewards=[{name: answer, fn: exact_match, weight: 0.5}]",
        ],
    )
    with pytest.raises(ValueError, match=r"`modpo.rewards` holds 'answer', which gave no score to the chosen"):
        DPOTrainer(config)
