"""Smoke test of benchmarks/rl_step.py: a --quick run at n = 2 with two combiners writes a consistent report."""

import json
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from script_module import load_script

from mojax.testing import conditionals

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rl_step.py"


@pytest.fixture(scope="module")
def rl_step():
    return load_script(SCRIPT, "rl_step_benchmark")


def test_quick_run_reports_every_contender_against_linear(rl_step, tmp_path):
    report = rl_step.main(["--quick", "--n", "2", "--combiners", "linear,pama", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "rl_step.json").read_text())
    assert written["rows"] == json.loads(json.dumps(report["rows"]))
    labels = [row["contender"] for row in written["rows"]]
    assert labels == [rl_step.BASELINE, "pama/scalar", rl_step.BOUND, rl_step.PEERS, rl_step.PEERS_STEP]
    assert all(row["n"] == 2 for row in written["rows"])
    baseline = written["rows"][0]
    assert baseline["ratio_to_linear"] == 1.0
    assert all(math.isfinite(row["ratio_to_linear"]) and row["ratio_to_linear"] > 0 for row in written["rows"])
    bound = written["rows"][2]
    assert bound["ratio_to_bound"] == 1.0
    assert all(0 <= row["xla_compile_s"] < row["first_call_s"] for row in written["rows"])  # none if the cache holds it
    text = (tmp_path / "rl_step.md").read_text()
    assert "| 2 | pama/scalar |" in text and "scalar mode <= 1.02x linear" in text
    assert "probe mode <= 1.15x linear at n = 3: not measured" in text
    assert "against the peers' MGDA step: not measured" in text
    weights = {row["contender"]: row for row in written["rows"] if "weights_ms" in row}
    assert set(weights) == {rl_step.BASELINE, "pama/scalar"}  # the scalar-mode trainers' weight programs only
    assert all(row["weights_ms"] > 0 and 0 < row["weights_to_linear_update"] < 1 for row in weights.values())
    assert "| 2 | pama/scalar | " in text.split("## Scalar mode's weight programs")[1]


def test_modes_option_times_only_those_modes_and_the_baseline(rl_step, tmp_path):
    report = rl_step.main(
        ["--quick", "--n", "2", "--combiners", "linear,mgda,pama", "--modes", "full", "--out", str(tmp_path)]
    )
    labels = [row["contender"] for row in report["rows"]]
    assert labels == [rl_step.BASELINE, "mgda/full", rl_step.BOUND, rl_step.PEERS, rl_step.PEERS_STEP]
    assert report["modes"] == ["full"]
    (line,) = [v for v in report["verdict"] if "peers' MGDA step" in v]
    rows = {row["contender"]: row for row in report["rows"]}
    faster = rows[rl_step.PEERS_STEP]["ratio_to_linear"] / rows["mgda/full"]["ratio_to_linear"]
    assert f"n = 2: {faster:.2f}x" in line


def test_a_probe_contender_that_the_trainer_runs_as_full_mode_says_so_and_is_judged_as_full_mode(rl_step, tmp_path):
    args = ["--quick", "--n", "2", "--combiners", "mgda", "--modes", "probe", "--references", ""]
    every_parameter = ["--set", "combiner.probe=[model, lm_head]"]  # no KL in the loss: the trainer runs full mode
    report = rl_step.main([*args, *every_parameter, "--out", str(tmp_path)])
    rows = {row["contender"]: row for row in report["rows"]}
    assert set(rows) == {rl_step.BASELINE, "mgda/probe, run as full", rl_step.BOUND}
    assert rows["mgda/probe, run as full"]["mode"] == "full"
    assert any(line.startswith("- probe mode") and "not measured" in line for line in report["verdict"])


def test_references_option_leaves_the_others_out(rl_step, tmp_path):
    report = rl_step.main(
        ["--quick", "--n", "2", "--combiners", "linear", "--references", "peers-step", "--out", str(tmp_path)]
    )
    assert [row["contender"] for row in report["rows"]] == [rl_step.BASELINE, rl_step.BOUND, rl_step.PEERS_STEP]
    report = rl_step.main(["--quick", "--n", "2", "--combiners", "linear", "--references", "", "--out", str(tmp_path)])
    assert [row["contender"] for row in report["rows"]] == [rl_step.BASELINE, rl_step.BOUND]


@pytest.mark.parametrize("extra", [[], ["lora.rank=4"]], ids=["full fine-tuning", "lora"])
def test_peers_step_is_mgdas_full_mode_update_from_separate_passes(rl_step, tmp_path, extra):
    linear = rl_step.trainer_for(2, "linear", "scalar", str(tmp_path), extra)
    batch = linear.prepare(1).batch
    mgda = rl_step.trainer_for(2, "mgda", "full", str(tmp_path), extra)
    before = jax.tree.map(np.asarray, mgda.state.params)
    params, _, mgda_state = rl_step.reference_passes(linear, batch)[rl_step.PEERS_STEP]()
    mgda.update(batch, 1)
    np.testing.assert_allclose(mgda_state.weights, mgda.state.combiner_state.weights, rtol=1e-5)
    moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), before, mgda.state.params)))
    assert moved > 1e-3  # the step moved the weights by about the learning rate
    chex.assert_trees_all_close(params, mgda.state.params, atol=1e-5, rtol=0)


def test_the_head_gradients_reference_follows_each_full_mode_with_the_heads_gradients(rl_step, tmp_path):
    """``--references head-gradients`` times each probe- and full-mode update again with ``combiner.head_gram``
    set to ``gradients``, after it (full mode here; probe mode's loop is the same)."""
    report = rl_step.main(
        ["--quick", "--n", "2", "--combiners", "linear,mgda", "--modes", "full", "--references", "head-gradients"]
        + ["--out", str(tmp_path), "--set", "combiner.head_gram=kernel"]
    )
    assert [row["contender"] for row in report["rows"]] == [
        rl_step.BASELINE,
        "mgda/full",
        "mgda/full, head's n gradients",
        rl_step.BOUND,
    ]
    assert "head-gradients" in report["command"]


@pytest.mark.parametrize("pullbacks, other", [("auto", "batched"), ("batched", "sequential")])
def test_the_other_pullbacks_reference_follows_each_probe_and_full_mode_with_the_other_pullbacks(
    rl_step, tmp_path, pullbacks, other
):
    """``--references other-pullbacks`` times each probe- and full-mode update again with its n pullbacks the other
    way: batched where the trainer's default runs them in sequence, in sequence where they are batched."""
    report = rl_step.main(
        ["--quick", "--n", "2", "--combiners", "linear,mgda", "--modes", "probe,full", "--references"]
        + ["other-pullbacks", "--out", str(tmp_path), "--set", f"combiner.pullbacks={pullbacks}"]
    )
    assert [row["contender"] for row in report["rows"]] == [
        rl_step.BASELINE,
        "mgda/probe",
        f"mgda/probe, {other} pullbacks",
        "mgda/full",
        f"mgda/full, {other} pullbacks",
        rl_step.BOUND,
    ]


@pytest.mark.parametrize("pullbacks", ["sequential", "batched"])
def test_other_skip_updates_as_the_trainer_with_the_other_skip(rl_step, tmp_path, pullbacks):
    """The other-skip reference follows each full-mode contender and updates the parameters as the trainer does,
    from a step that skips a non-finite update the other way round (a select where the trainer branches)."""
    extra = [f"combiner.pullbacks={pullbacks}"]
    linear = rl_step.trainer_for(2, "linear", "scalar", str(tmp_path), extra)
    batch = linear.prepare(1).batch
    own, other = (rl_step.trainer_for(2, "mgda", "full", str(tmp_path), extra) for _ in range(2))
    contender = rl_step.other_skip_contender(other, batch)  # compiled and called twice (warm-up): two updates
    assert contender.label == f"mgda/full, {'conditional' if pullbacks == 'batched' else 'select'} skip"
    for step in (1, 2):
        own.update(batch, step)
    chex.assert_trees_all_close(other.state.params, own.state.params, atol=1e-6, rtol=0)
    args = (other.state, batch, jax.random.key(0), np.float32(0), None)
    text = other._train_step.lower(*args).compile().as_text()
    assert bool(conditionals(text)) is (pullbacks == "batched")  # besides the Gram's rescaling (sequential pullbacks)
    report = rl_step.main(
        ["--quick", "--n", "2", "--combiners", "linear,mgda", "--modes", "full", "--references", "other-skip"]
        + ["--out", str(tmp_path)]
    )
    assert [row["contender"] for row in report["rows"]] == [
        rl_step.BASELINE,
        "mgda/full",
        "mgda/full, select skip",
        rl_step.BOUND,
    ]


def test_modes_follow_the_registry(rl_step):
    assert rl_step.modes("mgda") == ("probe", "full")
    assert rl_step.modes("ctwa") == ("scalar",)


def test_objectives_override_has_one_letter_and_digit_per_objective(rl_step):
    override = rl_step.objectives_override(3)
    assert override.count("fn: char_fraction") == 3
    assert all(f"chars: '{c}{i}'" in override for i, c in enumerate("abc")) and "chars: 'd" not in override
    config = rl_step.load_config("tiny", [override])
    assert [o.options["chars"] for o in config.objectives] == ["a0", "b1", "c2"]


def test_the_fixed_batch_has_nonzero_advantages_and_the_report_says_how_many(rl_step, tmp_path):
    report = rl_step.main(["--quick", "--n", "2", "--combiners", "linear", "--references", "", "--out", str(tmp_path)])
    assert 0.1 < report["nonzero_advantages"]["2"] <= 1.0
    assert f"{report['nonzero_advantages']['2']:.2f} (n = 2)" in (tmp_path / "rl_step.md").read_text()


def test_bad_arguments_are_refused(rl_step):
    with pytest.raises(SystemExit):
        rl_step.parse_args(["--combiners", "no_such_combiner"])
    with pytest.raises(SystemExit):
        rl_step.parse_args(["--n", "1"])
    with pytest.raises(SystemExit):
        rl_step.parse_args(["--modes", "fast"])
    with pytest.raises(SystemExit):
        rl_step.parse_args(["--modes", ","])
    with pytest.raises(SystemExit):
        rl_step.parse_args(["--references", "peers,theirs"])


def test_profile_reports_every_contenders_operation_time_by_kind(rl_step, tmp_path):
    report = rl_step.main(["--quick", "--n", "2", "--combiners", "linear", "--profile", "1", "--out", str(tmp_path)])
    profiles = report["profiles"]
    assert [p["contender"] for p in profiles] == [row["contender"] for row in report["rows"]]
    for p in profiles:
        matmul_ms = sum(ms for kind, ms in p["ms_by_kind"].items() if kind.startswith("matmul"))
        assert p["wall_ms"] > 0 and matmul_ms > 0
        assert all(ms >= 0 for ms in p["ms_by_kind"].values())
        assert 0 < len(p["largest_operations"]) <= 8
        times = [ms for _, ms, _ in p["largest_operations"]]
        assert times == sorted(times, reverse=True)
    text = (tmp_path / "rl_step.md").read_text()
    assert "## XLA operation time per call (jax.profiler)" in text
    assert f"| 2 | {rl_step.BOUND} |" in text.split("## XLA operation time")[1]


def test_memory_reports_the_compiled_temporaries_of_the_updates_and_of_the_bound(rl_step, tmp_path):
    """The linear update's and the bound's compiled temporaries, as their programs plan them; the optimizer step
    alone is a plain closure, with no program to lower."""
    argv = ["--quick", "--n", "2", "--combiners", "linear", "--references", "optimizer", "--memory"]
    report = rl_step.main([*argv, "--out", str(tmp_path)])
    planned = {row["contender"]: row.get("temporaries_gb") for row in report["rows"]}
    assert planned[rl_step.OPTIMIZER] is None
    assert planned["linear/scalar"] > 0 and planned[rl_step.BOUND] > 0
    text = (tmp_path / "rl_step.md").read_text()
    assert "## Compiled temporaries" in text and f"| 2 | linear/scalar | {planned['linear/scalar']:.3f} |" in text


def test_a_negative_profile_count_is_refused(rl_step):
    with pytest.raises(SystemExit):
        rl_step.parse_args(["--profile", "-1"])


def test_optimizer_alone_steps_as_the_trainers_clip_and_optimizer(rl_step, tmp_path):
    """The optimizer reference is the trainer's clip and optimizer step alone: one call on a gradient equals
    clip_by_global_norm + the trainer's optimizer applied by hand; the report gives full mode against bound + it."""
    trainer = rl_step.trainer_for(2, "linear", "scalar", str(tmp_path))
    before = jax.tree.map(np.asarray, trainer.state.params)
    gradient = jax.tree.map(lambda leaf: jnp.full_like(leaf, 10.0), trainer.state.params)  # norm far above the clip
    params, _ = rl_step.optimizer_alone(trainer, gradient)()
    clipped, _ = optax.clip_by_global_norm(trainer.update_spec.max_grad_norm).update(gradient, None)
    updates, _ = trainer.optimizer.update(clipped, trainer.optimizer.init(before), before)
    chex.assert_trees_all_close(params, optax.apply_updates(before, updates), atol=1e-7, rtol=0)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), params, before))) > 1e-4
    report = rl_step.main(
        ["--quick", "--n", "2", "--combiners", "linear,mgda", "--modes", "full", "--references", "optimizer"]
        + ["--out", str(tmp_path)]
    )
    labels = [row["contender"] for row in report["rows"]]
    assert labels == [rl_step.BASELINE, "mgda/full", rl_step.BOUND, rl_step.OPTIMIZER]
    (full,) = [row for row in report["rows"] if row["contender"] == "mgda/full"]
    ms = {row["contender"]: row["median_ms_per_round"][0] for row in report["rows"]}
    assert full["ratio_to_bound_and_optimizer"] == pytest.approx(
        ms["mgda/full"] / (ms[rl_step.BOUND] + ms[rl_step.OPTIMIZER])
    )
    assert f"mgda/full at n=2 {full['ratio_to_bound_and_optimizer']:.2f}x" in report["verdict"][-1]


def test_gradient_read_reads_the_bounds_gradients_once_and_the_verdict_gives_its_share_with_the_optimizer_step(
    rl_step, tmp_path
):
    """The gradient-read reference is the sum of the squares of the bound's n gradients (the trace of their Gram);
    with the optimizer step it gives full mode's ratio to bound + optimizer + read, and their share of the bound."""
    trainer = rl_step.trainer_for(2, "linear", "scalar", str(tmp_path))
    batch = trainer.prepare(1).batch
    calls = rl_step.reference_passes(trainer, batch, [rl_step.GRADIENT_READ])
    gradients = jax.tree.leaves(calls[rl_step.BOUND]())
    expected = sum(float(np.sum(np.square(np.asarray(leaf, np.float64)))) for leaf in gradients)
    assert expected > 0
    assert float(calls[rl_step.GRADIENT_READ]()) == pytest.approx(expected, rel=1e-5)
    argv = ["--quick", "--n", "2", "--combiners", "linear,mgda", "--modes", "full"]
    report = rl_step.main([*argv, "--references", "optimizer,gradient-read", "--out", str(tmp_path)])
    rows = {row["contender"]: row for row in report["rows"]}
    assert list(rows) == [rl_step.BASELINE, "mgda/full", rl_step.BOUND, rl_step.OPTIMIZER, rl_step.GRADIENT_READ]
    ms = {label: row["median_ms_per_round"][0] for label, row in rows.items()}
    floor = ms[rl_step.BOUND] + ms[rl_step.OPTIMIZER] + ms[rl_step.GRADIENT_READ]
    full = rows["mgda/full"]["ratio_to_bound_optimizer_and_read"]
    assert full == pytest.approx(ms["mgda/full"] / floor)
    share = (floor - ms[rl_step.BOUND]) / ms[rl_step.BOUND]
    assert rl_step.optimizer_and_read_share(report["rows"]) == {2: pytest.approx(share)}
    assert f"n = 2: {share:.2f}x the bound" in report["verdict"][-1]
    assert f"mgda/full at n=2 {full:.2f}x" in report["verdict"][-1]
    report = rl_step.main([*argv, "--references", "gradient-read", "--out", str(tmp_path)])
    assert rl_step.optimizer_and_read_share(report["rows"]) == {}  # the optimizer step not timed: no share, no line
    assert not any("timed alone" in line for line in report["verdict"])


def test_the_first_call_reports_xla_s_compile_time_apart(rl_step):
    """A new program's first call includes its XLA compilation (too quick for the tests' persistent cache to keep it);
    a call of a compiled program compiles nothing."""
    program = jax.jit(lambda x: jnp.tanh(x) @ x.T)
    argument = jnp.ones((64, 64))
    first = rl_step.timed_first(lambda: program(argument))
    assert 0 < first.xla_compile_s < first.seconds
    assert rl_step.timed_first(lambda: program(argument)).xla_compile_s == 0
