"""The preference trainer end to end on the tiny task: learns, resumes bit for bit, measures gradient entanglement,
separates the moves with NPO, combines two pair sets with MGDA, refuses bad configs."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mojax.plots import plot_runs
from mojax.rl.dpo import (
    DPOTrainer,
    PairBatch,
    StepSpec,
    _take,
    encode_pairs,
    margin_coefficients,
    pair_logps,
    predicted_moves,
    run_dpo,
    tiny_preference_pairs,
)
from mojax.rl.dpo_config import load_dpo_config
from mojax.rl.logging import read_metrics
from mojax.rl.tiny import EOS_ID, tiny_tokenizer

QUIET = ["logging.tensorboard=false", "logging.progress=false", "export=false"]
# The worked case of the entanglement paper through the trainer: plain gradient steps on one pair at a time, small
# enough for the first-order picture, with every parameter in the probe set.
TOY = [
    "steps=4",
    "optimizer.name=sgd",
    "optimizer.learning_rate=0.001",
    "optimizer.max_grad_norm=null",
    "preference.probe=[model, lm_head]",
    "data.pairs_per_step=1",
    "preference.entanglement_pairs=1",
]
ENTANGLEMENT_KEYS = (
    "inner",
    "norm_chosen",
    "norm_rejected",
    "cosine",
    "condition",
    "predicted_chosen_up_rejected_down",
    "observed_chosen_up_rejected_down",
    "observed_both_up",
    "observed_both_down",
    "move_chosen",
    "move_rejected",
    "agreement_chosen",
    "agreement_rejected",
)


def dpo_config(output_dir: Path, *overrides: str):
    return load_dpo_config("dpo_tiny", [f"output_dir={output_dir}", *QUIET, *overrides])


def params_of(trainer: DPOTrainer) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(trainer.state.params)]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if not k.startswith("timing/")} for record in records]


@functools.cache
def straight_run(root: str) -> tuple[DPOTrainer, list[np.ndarray], list[dict]]:
    """The packaged dpo_tiny run (12 steps), with the parameters after step 4."""
    after_four = []
    trainer = DPOTrainer(
        dpo_config(Path(root) / "straight"),
        callbacks=[lambda step, metrics: after_four.extend(params_of(trainer)) if step == 4 else None],
    )
    trainer.train()
    trainer.close()
    return trainer, after_four, read_metrics(Path(root) / "straight")


@functools.cache
def toy_run(root: str, mitigation: str) -> list[dict]:
    trainer = DPOTrainer(dpo_config(Path(root) / f"toy_{mitigation}", *TOY, f"preference.mitigation={mitigation}"))
    trainer.train()
    trainer.close()
    return read_metrics(Path(root) / f"toy_{mitigation}")


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dpo_runs"))


# ------------------------------------------------------------------------------------------------------ data
def test_tiny_pairs_differ_in_one_token_and_prefer_more_a():
    pairs = tiny_preference_pairs(50, seed=3)
    assert pairs == tiny_preference_pairs(50, seed=3)
    assert pairs != tiny_preference_pairs(50, seed=4)
    for pair in pairs:
        assert len(pair["chosen"]) == len(pair["rejected"])
        assert sum(a != b for a, b in zip(pair["chosen"], pair["rejected"], strict=True)) == 1
        assert pair["chosen"].count("a") == pair["rejected"].count("a") + 1


def test_shared_prefix_pairs_mask_exactly_their_common_prefix():
    rows = tiny_preference_pairs(6, seed=1, setting="shared_prefix", completion_length=8)
    plain = encode_pairs(tiny_tokenizer(), rows, max_prompt_length=8, max_completion_length=10, eos_id=EOS_ID)
    masked = encode_pairs(
        tiny_tokenizer(), rows, max_prompt_length=8, max_completion_length=10, eos_id=EOS_ID, mask_shared_prefix=True
    )
    for row, chosen, rejected, weights_w, weights_l in zip(
        rows, masked.chosen_ids, masked.rejected_ids, masked.chosen_weights, masked.rejected_weights, strict=True
    ):
        common = next(i for i, (a, b) in enumerate(zip(row["chosen"], row["rejected"], strict=True)) if a != b)
        assert common >= 4 and chosen[common] != rejected[common]
        expected = np.r_[np.zeros(common), np.ones(9 - common), 0.0]  # 8 characters + EOS, then one pad
        np.testing.assert_array_equal(weights_w, expected)
        np.testing.assert_array_equal(weights_l, expected)
    np.testing.assert_array_equal(masked.chosen_mask, plain.chosen_mask)  # every token is still attended to
    np.testing.assert_array_equal(plain.chosen_weights, plain.chosen_mask)


# ------------------------------------------------------------------------------------ first-order algebra
def fake_pairs(ref_chosen, ref_rejected, chosen_lengths) -> PairBatch:
    """Just what the loss reads: the reference log-probs and the responses' token masks and weights."""
    weights = np.asarray([[1.0] * length + [0.0] * (4 - length) for length in chosen_lengths], np.float32)
    return PairBatch(
        None,
        None,
        None,
        weights,
        weights,
        None,
        weights,
        None,
        np.asarray(ref_chosen),
        np.asarray(ref_rejected),
        None,
        None,
        None,
        None,
    )


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def spec_for(*loss_types: str, average: bool = False, npo: bool = False) -> StepSpec:
    return StepSpec(loss_types, None, 0.5, 0.0, 0.5, 2.0, average, npo, 0, 1, ())


def test_margin_coefficients_are_the_hand_derivatives_of_the_loss():
    chosen, rejected = np.asarray([-3.0, -5.0], np.float32), np.asarray([-4.0, -2.0], np.float32)
    pairs = fake_pairs([-3.5, -4.0], [-3.0, -2.5], [2, 4])
    margin = (chosen - np.asarray([-3.5, -4.0])) - (rejected - np.asarray([-3.0, -2.5]))
    dpo = 0.5 * sigmoid(-0.5 * margin)  # -d/dD of -log sigmoid(beta D), beta = 0.5
    a_w, a_l = margin_coefficients(spec_for("sigmoid"), chosen, rejected, pairs, None)
    np.testing.assert_allclose(a_w, dpo, rtol=1e-6)
    np.testing.assert_allclose(a_l, dpo, rtol=1e-6)
    cpo = 0.5 * sigmoid(-0.5 * (chosen - rejected))  # reference-free, plus cpo_alpha * (per-token NLL)
    a_w, a_l = margin_coefficients(spec_for("cpo"), chosen, rejected, pairs, None)
    np.testing.assert_allclose(a_w, cpo + 2.0 / np.asarray([2.0, 4.0]), rtol=1e-6)
    np.testing.assert_allclose(a_l, cpo, rtol=1e-6)
    norms = (np.asarray([2.0, 4.0], np.float32), np.asarray([0.5, 8.0], np.float32))
    a_w, a_l = margin_coefficients(spec_for("sigmoid", npo=True), chosen, rejected, pairs, norms)
    np.testing.assert_allclose(a_w, dpo / norms[0], rtol=1e-6)
    np.testing.assert_allclose(a_l, dpo / norms[1], rtol=1e-6)


def test_predicted_moves_on_shared_features_raise_both_logps():
    """log pi(y) = theta . phi(y), phi_w = (1, 1), phi_l = (1, 0.9): <g_w, g_l> = 1.9 between |g_l|^2 and |g_w|^2."""
    move_w, move_l = predicted_moves(jnp.asarray(1.9), jnp.asarray(2.0), jnp.asarray(1.81), 1.0, 1.0)
    np.testing.assert_allclose([move_w, move_l], [0.1, 0.09], rtol=1e-5)
    move_w, move_l = predicted_moves(jnp.asarray(1.9), jnp.asarray(1.81), jnp.asarray(2.0), 1.0, 1.0)  # swapped
    assert move_w < 0 and move_l < 0


# --------------------------------------------------------------------------------------------- the tiny run
def test_dpo_raises_reward_accuracy_above_0_9(run_root):
    _, _, records = straight_run(run_root)
    assert [record["step"] for record in records] == list(range(1, 13))
    assert records[0]["rewards/accuracies"] <= 0.5  # the policy starts as the reference: margins ~ 0
    assert abs(records[0]["rewards/margins"]) < 1e-3
    assert np.mean([record["rewards/accuracies"] for record in records[-4:]]) > 0.9
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"] + 0.5
    assert records[-1]["loss"] < records[0]["loss"] - 0.2


def test_metrics_use_trl_keys_and_the_entanglement_statistics_are_finite(run_root):
    _, _, records = straight_run(run_root)
    for record in records:
        for key in (
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "logratios/chosen",
            "logratios/rejected",
            "grad_norm",
            "learning_rate",
            "rewards/preference/mean",
            "combiner/weight/preference",
            *(f"entanglement/{key}" for key in ENTANGLEMENT_KEYS),
        ):
            assert math.isfinite(record[key]), key
        assert -1.0 <= record["entanglement/cosine"] <= 1.0
        assert record["skipped_updates"] == 0
        np.testing.assert_allclose(
            record["rewards/margins"], record["rewards/chosen"] - record["rewards/rejected"], atol=1e-5
        )
        np.testing.assert_allclose(
            record["rewards/chosen"], 0.1 * record["logratios/chosen"], rtol=1e-4, atol=1e-6
        )  # beta (log pi - log pi_ref)


def test_plain_dpo_on_one_token_pairs_moves_both_logps_together(run_root):
    """The entanglement paper's observation on the tiny model: the margin grows while both log-probs fall."""
    _, _, records = straight_run(run_root)
    together = [
        record["entanglement/observed_both_up"] + record["entanglement/observed_both_down"] for record in records
    ]
    separated = [record["entanglement/observed_chosen_up_rejected_down"] for record in records]
    assert np.mean(together) > 0.7 and np.mean(separated) < 0.2
    assert records[-1]["logps/chosen"] < records[0]["logps/chosen"]  # the chosen response got less likely
    # The first-order prediction on the probe set (final norm + LM head) matches the observed AdamW moves.
    assert np.mean([record["entanglement/agreement_chosen"] for record in records]) > 0.85
    assert np.mean([record["entanglement/agreement_rejected"] for record in records]) > 0.85


def test_run_dpo_refuses_overrides_with_a_loaded_config(tmp_path):
    """A loaded DPOConfig is run as it is (``mojax dpo`` loads it first); overrides beside it are an error."""
    config = load_dpo_config("dpo_tiny", [f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="none with a loaded DPOConfig"):
        run_dpo(config, ["steps=2"])


def test_rerun_with_more_steps_equals_a_straight_run(run_root, tmp_path):
    _, want_params, want_records = straight_run(run_root)
    run_dpo("dpo_tiny", [f"output_dir={tmp_path}", *QUIET, "steps=2"])
    second = DPOTrainer(dpo_config(tmp_path, "steps=4"))
    second.train()
    second.close()
    assert second.step == 4
    for got, want in zip(params_of(second), want_params, strict=True):
        np.testing.assert_array_equal(got, want)
    assert without_timing(read_metrics(tmp_path)) == without_timing(want_records[:4])


def test_entanglement_measured_every_third_step_trains_the_same(run_root, tmp_path):
    """``preference.entanglement_every=3``: the statistics at steps 1 and 4 only; the steps between run the program
    without them, and the run's parameters and other metrics are the straight run's (to float rounding: the two
    programs are compiled apart)."""
    _, want_params, want_records = straight_run(run_root)
    trainer = DPOTrainer(dpo_config(tmp_path, "steps=4", "preference.entanglement_every=3"))
    trainer.train()
    trainer.close()
    records = without_timing(read_metrics(tmp_path))
    assert [record["step"] for record in records if "entanglement/cosine" in record] == [1, 4]
    for got, want in zip(params_of(trainer), want_params, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(records, without_timing(want_records[:4]), strict=True):
        expected = {key: value for key, value in want.items() if key in got}
        assert set(got) == set(expected) and set(want) - set(got) <= {f"entanglement/{k}" for k in ENTANGLEMENT_KEYS}
        np.testing.assert_allclose([got[key] for key in expected], list(expected.values()), rtol=1e-4, atol=1e-6)


def test_the_steps_entanglement_statistics_are_the_per_response_gradients_of_its_log_probs(tmp_path):
    """The step's ``entanglement/{inner,norm_chosen,norm_rejected}`` are the means over the measured pairs of the
    products of jax.grad of each response's log-prob alone (``pair_logps`` on that pair) on the probe leaves."""
    trainer = DPOTrainer(dpo_config(tmp_path, "steps=1", "preference.entanglement_pairs=3"))
    params, batch = jax.tree.map(jnp.copy, trainer.state.params), trainer.pairs_for_step(1)
    flags = jax.tree.leaves(trainer.probe_mask)

    def probe_gradient(pair: int, side: int) -> np.ndarray:
        logp = lambda p: pair_logps(trainer.policy, p, _take(batch, slice(pair, pair + 1)), average=False)[side][0]
        grads = jax.tree.leaves(jax.grad(logp)(params))
        return np.concatenate([np.ravel(grad) for grad, flag in zip(grads, flags, strict=True) if flag])

    grads = np.asarray([[probe_gradient(pair, side) for side in (0, 1)] for pair in range(3)])
    metrics = trainer.train()
    trainer.close()
    np.testing.assert_allclose(metrics["entanglement/inner"], np.mean(np.sum(grads[:, 0] * grads[:, 1], 1)), rtol=1e-4)
    for side, key in enumerate(("norm_chosen", "norm_rejected")):
        want = np.mean(np.linalg.norm(grads[:, side], axis=1))
        np.testing.assert_allclose(metrics[f"entanglement/{key}"], want, rtol=1e-4, err_msg=key)


def test_npo_reads_its_norms_on_the_steps_between_measurements(run_root, tmp_path):
    """NPO's update needs the per-pair norms at every step: the steps without the statistics still compute them, so
    the log-probs move as in the every-step run."""
    want = without_timing(toy_run(run_root, "npo"))
    trainer = DPOTrainer(dpo_config(tmp_path, *TOY, "preference.mitigation=npo", "preference.entanglement_every=2"))
    trainer.train()
    trainer.close()
    got = without_timing(read_metrics(tmp_path))
    assert [record["step"] for record in got if "entanglement/cosine" in record] == [1, 3]
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5, atol=1e-6, err_msg=key)


def test_mojax_plot_draws_the_rewards_and_weights_of_a_dpo_run(run_root, tmp_path):
    straight_run(run_root)
    written = plot_runs([Path(run_root) / "straight"], tmp_path)
    assert [path.name for path in written] == ["rewards.png", "combiner_weights.png"]


def test_a_changed_config_refuses_to_resume(run_root):
    with pytest.raises(ValueError, match=r"preference.beta"):
        DPOTrainer(dpo_config(Path(run_root) / "straight", "preference.beta=0.2")).train()


def test_each_pass_visits_every_pair_once(run_root):
    trainer, _, _ = straight_run(run_root)
    per_pass = 32 // 8
    for epoch in range(2):
        seen = np.concatenate(
            [
                trainer.pairs_for_step(step).chosen_ids
                for step in range(1 + epoch * per_pass, 1 + (epoch + 1) * per_pass)
            ]
        )
        np.testing.assert_array_equal(
            np.unique(seen, axis=0), np.unique(np.asarray(trainer.pairs[0].chosen_ids), axis=0)
        )


# ---------------------------------------------------------------------------------- the worked case, and NPO
def test_plain_gradient_steps_move_both_logps_as_the_theory_predicts(run_root):
    records = toy_run(run_root, "none")
    for record in records:
        assert record["entanglement/agreement_chosen"] == 1.0
        assert record["entanglement/agreement_rejected"] == 1.0
    both = [record["entanglement/observed_both_up"] + record["entanglement/observed_both_down"] for record in records]
    predicted_separated = [record["entanglement/predicted_chosen_up_rejected_down"] for record in records]
    assert max(both) == 1.0  # on some one-token pair the chosen and rejected log-probs move the same way
    assert [1.0 - b for b in both] == predicted_separated


def test_npo_raises_the_chosen_and_lowers_the_rejected_logp_on_every_pair(run_root):
    records = toy_run(run_root, "npo")
    for record in records:
        assert record["entanglement/predicted_chosen_up_rejected_down"] == 1.0
        assert record["entanglement/observed_chosen_up_rejected_down"] == 1.0
        assert record["entanglement/move_chosen"] > 0 > record["entanglement/move_rejected"]
    plain = toy_run(run_root, "none")
    assert min(record["entanglement/observed_chosen_up_rejected_down"] for record in plain) == 0.0


def test_masking_the_shared_prefix_lowers_the_entanglement_of_shared_prefix_pairs(tmp_path):
    """Same pairs, same initial policy: leaving the common prefix out of both log-probs shrinks <g_w, g_l>."""
    first_step = {}
    for mitigation in ("none", "shared_prefix"):
        output = tmp_path / mitigation
        run_dpo(
            "dpo_tiny",
            [
                f"output_dir={output}",
                *QUIET,
                "steps=1",
                "data.setting=shared_prefix",
                f"preference.mitigation={mitigation}",
            ],
        )
        (first_step[mitigation],) = read_metrics(output)
    plain, masked = first_step["none"], first_step["shared_prefix"]
    assert masked["entanglement/inner"] < plain["entanglement/inner"]
    assert masked["entanglement/cosine"] < plain["entanglement/cosine"]
    assert masked["logps/chosen"] > plain["logps/chosen"]  # fewer tokens in the sum


# ------------------------------------------------------------------------------------------ multi-objective
def test_two_pair_sets_combined_by_mgda(tmp_path):
    path = tmp_path / "prefix_pairs.jsonl"
    rows = tiny_preference_pairs(16, seed=7, setting="shared_prefix")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    objectives = f"objectives=[{{name: one_token, pairs: tiny_synthetic}}, {{name: prefix, pairs: {path}}}]"
    config = dpo_config(
        tmp_path / "run",
        objectives,
        "combiner.name=mgda",
        "steps=4",
        "data.pairs_per_step=4",
        "data.num_pairs=16",
        "preference.entanglement_pairs=0",
        "preference.reference=on_the_fly",
        "optimizer.learning_rate=0.02",
        "export=true",
    )
    trainer = DPOTrainer(config)
    trainer.train()
    trainer.close()
    records = read_metrics(tmp_path / "run")
    first, last = records[0], records[-1]
    assert abs(first["rewards/margins"]) < 1e-5  # on the fly, the reference is the initial policy itself
    for record in records:
        weights = [record["combiner/weight/one_token"], record["combiner/weight/prefix"]]
        assert min(weights) >= 0 and abs(sum(weights) - 1) < 1e-5
        assert -1 <= record["combiner/cos/one_token/prefix"] <= 1
        assert "entanglement/cosine" not in record
    exported = json.loads((tmp_path / "run" / "policy" / "mojax_run.json").read_text())
    assert exported == {"step": 4, "objectives": ["one_token", "prefix"]}
    assert (tmp_path / "run" / "policy" / "config.json").exists()
    for name in ("one_token", "prefix"):
        assert last[f"rewards/{name}/mean"] > first[f"rewards/{name}/mean"]
        assert last[f"objectives/{name}/loss"] < first[f"objectives/{name}/loss"]


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("combiner", ["ctwa", "pama", "lagrangian"])
def test_combiners_that_read_rollout_statistics_are_rejected(tmp_path, combiner):
    with pytest.raises(ValueError, match="preference pairs have no rewards, signal or advantages"):
        dpo_config(tmp_path, f"combiner.name={combiner}")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("preference.gamma=1", "`preference.gamma` is not a known key"),
        ("preference.loss_type=dpo", "`preference.loss_type` is 'dpo'"),
        ("preference.loss_type=[]", "`preference.loss_type` is empty"),
        ("preference.mitigation=mask", "`preference.mitigation` is 'mask'"),
        ("preference.reference=later", "`preference.reference` is 'later'"),
        ("preference.beta=0", "`preference.beta` is 0"),
        ("preference.loss_weights=[1, 2]", "`preference.loss_weights` has 2 entries"),
        ("preference.label_smoothing=0.6", "`preference.label_smoothing` is 0.6"),
        ("data.pairs_per_step=0", "`data.pairs_per_step` is 0"),
        ("preference.entanglement_every=0", "`preference.entanglement_every` is 0"),
        ("data.setting=two_token", "`data.setting` is 'two_token'"),
        ("combiner.name=nope", "`combiner.name` is 'nope'"),
        ("model.remat=dot", "`model.remat` is 'dot'; expected one of"),
        ("model.attention_kernel=flash", "`model.attention_kernel` is 'flash'; expected one of"),
        ("checkpoint.save_seconds=-5", "`checkpoint.save_seconds` is -5"),
    ],
)
def test_bad_configs_raise_before_anything_compiles(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        dpo_config(tmp_path, override)


def test_a_mesh_that_does_not_divide_the_batch_is_refused_before_compiling(tmp_path):
    config = dpo_config(tmp_path, "mesh.shape={fsdp: 8}", "data.pairs_per_step=4")
    with pytest.raises(ValueError, match=r"data \* fsdp = 8 does not divide the batch of 4 pairs"):
        DPOTrainer(config)


def test_a_probe_that_selects_no_parameter_is_refused_naming_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"DPOTrainer: `preference.probe` is \['nothing'\] and selects no parameter"):
        DPOTrainer(dpo_config(tmp_path, "preference.probe=[nothing]"))


def test_npo_refuses_anchored_losses(tmp_path):
    with pytest.raises(ValueError, match=r"holds \['nca_pair'\] with mitigation 'npo'"):
        dpo_config(tmp_path, "preference.loss_type=[sigmoid, nca_pair]", "preference.mitigation=npo")


def test_wrong_types_raise_type_errors(tmp_path):
    with pytest.raises(TypeError, match="`preference.beta` is 'high'"):
        dpo_config(tmp_path, "preference.beta=high")
