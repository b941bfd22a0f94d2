"""The experiments under experiments/: their helpers against hand-computed values, and every run.py's --quick mode
in one process. The quick modes run only each config's ``quick_methods`` on the same base, so the sampler and most
compiled updates of one experiment serve the next (each distinct update costs seconds of XLA compilation)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from script_module import load_script

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import shared  # noqa: E402

RESULTS = {
    "01_interference": "interference.json",
    "02_covariance_law": "covariance_law.json",
    "03_lagrangian_collapse": "lagrangian_collapse.json",
    "04_gapo_vs_mgda": "gapo_vs_mgda.json",
    "05_pgapo_front": "pgapo_front.json",
    "06_pama": "pama.json",
    "07_gradient_entanglement": "gradient_entanglement.json",
}

PREFERENCE_EXPERIMENTS = {"07_gradient_entanglement"}
"""Experiments whose configs are DPO trainer configs (mojax.rl.dpo), not RL trainer ones."""

FINITE_AFTER_QUICK = {
    "01_interference": [("summary", "ctwa", "interference_index", "mean"), ("summary", "linear", "frac_neg", "mean")],
    "02_covariance_law": [("summary", "pooled", "all", "correlation")],
    "03_lagrangian_collapse": [
        ("summary", "lagrangian", "lambda_final", "mean"),
        ("summary", "gapo", "constrained_final", "mean"),
    ],
    "04_gapo_vs_mgda": [
        ("summary", "gapo_p1", "final_average", "mean"),
        ("summary", "linear", "final_minimum", "mean"),
    ],
    "05_pgapo_front": [
        ("summary", "p_gapo", "hypervolume", "mean"),
        ("summary", "soup", "hypervolume_with_endpoints", "mean"),
        ("summary", "p_gapo", "points", "1.0", "a_rate", "mean"),
        ("summary", "p_gapo_dominates", "linear", "1.0"),
    ],
    "06_pama": [
        ("summary", "pama", "final_average", "mean"),
        ("timing", "seconds", "pama_solve", 1),
        ("timing", "seconds", "mgda_update", 1),
        ("timing", "log_log_slope", "mgda_solve"),
    ],
    "07_gradient_entanglement": [
        ("summary", "one_token", "dpo_npo", "entanglement/cosine", "mean"),
        ("summary", "one_token", "dpo_npo", "entanglement/agreement_rejected", "mean"),
        ("summary", "one_token", "dpo_npo", "logratios/chosen", "mean"),
    ],
}
"""Per experiment, paths into its results JSON whose values must be finite numbers after the quick mode (2 steps, so
statistics over steps or seeds that need more are left out)."""


def load_run(folder: str):
    """experiments/<folder>/run.py imported by path as a module."""
    return load_script(EXPERIMENTS / folder / "run.py", f"experiment_{folder}")


def test_every_experiment_folder_has_a_readme_configs_and_an_index_line():
    index = (EXPERIMENTS / "README.md").read_text()
    for folder in RESULTS:
        for name in ("README.md", "config.yaml", "config_smollm2.yaml", "run.py"):
            assert (EXPERIMENTS / folder / name).is_file(), f"{folder}/{name}"
        assert "Verdict:" in (EXPERIMENTS / folder / "README.md").read_text()
        assert folder in index


def test_moving_average_matches_a_loop():
    values = np.asarray([[1.0, 3.0, 5.0, 7.0, 9.0], [2.0, 0.0, 2.0, 0.0, 2.0]])
    window = 3
    expected = np.asarray([[np.mean(row[max(0, t - window + 1) : t + 1]) for t in range(row.size)] for row in values])
    np.testing.assert_allclose(shared.moving_average(values, window), expected)
    np.testing.assert_allclose(shared.moving_average(values, 10), np.cumsum(values, axis=1) / np.arange(1, 6))


def test_as_overrides_round_trips_through_load_config(tmp_path):
    from mojax.rl.config import load_config

    overrides = shared.as_overrides(
        {"combiner.name": "ctwa", "combiner.options": {"lr": 2.0}, "objectives.2.threshold": 0.2}
    )
    config = load_config("tiny", [f"output_dir={tmp_path}", *overrides])
    assert config.combiner.name == "ctwa"
    assert dict(config.combiner.options) == {"lr": 2.0}
    assert config.objectives[2].threshold == 0.2


def test_drop_fractions_count_steps_where_some_objective_fell():
    interference = load_run("01_interference")
    means = np.asarray([[0.0, 0.0], [1.0, 1.0], [0.5, 2.0], [0.6, 2.1], [0.6, 2.0]])
    # Pairs: up/up, down/up, up/up, flat/down -> 2 of 4 pairs have a drop.
    assert interference.any_drop_fraction(means) == 0.5
    stds = np.full_like(means, 0.4)
    # Standard error of a difference: sqrt(2 * 0.16 / 2) = 0.4; only the fall of 0.5 exceeds 1 s.e.
    assert interference.significant_drop_fraction(means, stds, batch=2, z=1.0) == 0.25
    np.testing.assert_allclose(interference.block_means(means, 2), [[0.5, 0.5], [0.55, 2.05]])


def test_fit_recovers_a_known_line_and_sign_agreement():
    law = load_run("02_covariance_law")
    predicted = np.asarray([-2.0, -1.0, 1.0, 2.0, 3.0])
    result = law.fit(predicted, 0.5 * predicted + 0.1)
    assert result["slope"] == pytest.approx(0.5)
    assert result["intercept"] == pytest.approx(0.1)
    assert result["correlation"] == pytest.approx(1.0)
    assert result["sign_agreement"] == pytest.approx(1.0)
    flipped = law.fit(predicted, -predicted)
    assert flipped["correlation"] == pytest.approx(-1.0)
    assert flipped["sign_agreement"] == 0.0


def test_every_quick_mode_writes_finite_results(tmp_path):
    for folder, result_name in RESULTS.items():
        out = tmp_path / folder
        returned = load_run(folder).main(["--quick", "--out", str(out)])
        path = out / "results" / result_name
        assert path.is_file(), folder
        written = json.loads(path.read_text())
        assert written["steps"] == returned["steps"] == 2
        assert written["seeds"] == [0]
        assert list(out.glob("*.png")), folder
        for keys in FINITE_AFTER_QUICK[folder]:
            value = functools.reduce(lambda node, key: node[key], keys, written)
            assert isinstance(value, int | float) and np.isfinite(value), (folder, keys, value)


def test_quick_methods_are_methods_of_their_config():
    for folder in RESULTS:
        config = shared.read_config(EXPERIMENTS / folder / "config.yaml")
        assert set(config.get("quick_methods", config["methods"])) <= set(config["methods"]), folder


@pytest.mark.parametrize("folder", sorted(RESULTS))
@pytest.mark.parametrize("name", ["config.yaml", "config_smollm2.yaml"])
def test_every_method_of_every_config_is_a_valid_trainer_config(folder, name, tmp_path):
    from mojax.rl.config import load_config
    from mojax.rl.dpo import load_dpo_config

    load, built_in = (load_dpo_config, "dpo_tiny") if folder in PREFERENCE_EXPERIMENTS else (load_config, "tiny")
    config = shared.read_config(EXPERIMENTS / folder / name)
    assert config["methods"]
    for overrides in config["methods"].values():
        load(built_in, [f"output_dir={tmp_path}", "steps=1", *config["base"], *overrides])


def test_pareto_helpers_of_the_front_experiment():
    front = load_run("05_pgapo_front")
    assert front.dominates([1.0, 2.0], [1.0, 1.0]) and not front.dominates([1.0, 1.0], [1.0, 1.0])
    assert not front.dominates([2.0, 0.0], [1.0, 1.0])
    # Boxes [0, 2] x [0, 1] and [0, 1] x [0, 2]: union area 2 + 2 - 1 = 3; the dominated point adds nothing.
    assert front.front_hypervolume([[2.0, 1.0], [1.0, 2.0], [0.5, 0.5]], [0.0, 0.0]) == pytest.approx(3.0)
    run = {"lambdas": [0.0, 0.5, 1.0], "points": [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]}
    assert front.interior(run, [0.5]) == [[0.5, 0.5]]


def test_log_log_slope_recovers_a_power_law():
    pama = load_run("06_pama")
    counts = [2, 4, 8, 16]
    assert pama.log_log_slope(counts, [3e-4 * n**1.5 for n in counts]) == pytest.approx(1.5)
    assert np.isnan(pama.log_log_slope([2], [1.0]))


def test_entanglement_pairs_keep_the_differing_part_and_the_last_shared_words():
    entanglement = load_run("07_gradient_entanglement")
    row = {
        "prompt": "Rate: A film",
        "chosen": "one two three Overall, it was good.",
        "rejected": "one two three Overall, it was bad.",
    }
    short = entanglement.shorten(row, 3, tiny_alphabet=True)
    assert short == {"prompt": "rate a film", "chosen": "overall, it was good.", "rejected": "overall, it was bad."}
    assert entanglement.shorten(row, None, tiny_alphabet=False) == row
    assert entanglement.sign_pattern(0.2, -0.1) == "chosen up, rejected down"
    assert entanglement.sign_pattern(-0.2, -0.1) == "both down"
    assert entanglement.sign_pattern(0.0, 1.0) == "no change"


def test_final_rewards_are_the_mean_of_the_last_steps_and_aggregate_over_seeds():
    history = [
        {"rewards/a/mean": a, "rewards/b/mean": b, "wall_time": t}
        for a, b, t in [(0.0, 1.0, 9.0), (1.0, 0.0, 2.0), (3.0, 0.5, 4.0)]
    ]
    run = shared.final_rewards_summary(history, ["a", "b"], final_steps=2)
    assert run["final_rewards"] == {"a": 2.0, "b": 0.25}
    assert (run["final_average"], run["final_minimum"], run["seconds_per_step"]) == (1.125, 0.25, 3.0)
    assert run["series"]["rewards"] == [[0.0, 1.0], [1.0, 0.0], [3.0, 0.5]]
    other = {**run, "final_average": 2.125, "final_rewards": {"a": 4.0, "b": 0.25}}
    summary = shared.aggregate_final_rewards([run, other], ["a", "b"])
    assert summary["final_average"] == {"mean": 1.625, "std": 0.5, "n": 2}
    assert summary["final_rewards"]["a"] == {"mean": 3.0, "std": 1.0, "n": 2}
    table = shared.final_rewards_table({"linear": summary}, ["a", "b"]).splitlines()
    assert table[0] == "| method | final a | final b | average | worst objective | s / step |"
    assert table[-1].startswith("| linear | 3.000 ± 1.000 | 0.250 ± 0.000 | 1.625 ± 0.500 |")


@pytest.mark.parametrize("extra, path", [([], "tiny"), (["--set", "model.path=some/folder"], "some/folder")])
def test_setup_keeps_freed_host_memory_for_the_base_model_only_when_run_as_the_program(monkeypatch, extra, path):
    """Run as a script (argv None) an experiment hands its base config's ``model.path`` to
    ``keep_freed_host_memory_for_policy`` (which leaves small models alone) before its first computation; in-process
    calls with an argument list (these tests) leave the process alone."""
    calls = []
    monkeypatch.setattr("mojax.rl.trainer.keep_freed_host_memory_for_policy", calls.append)
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", *extra])
    here = EXPERIMENTS / "01_interference"
    shared.setup(["--quick", *extra], "", here)
    assert calls == []
    shared.setup(None, "", here)
    assert calls == [path]
