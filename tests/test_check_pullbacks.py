"""benchmarks/check_pullbacks.py: on the tiny model the batched pullbacks agree with the separate ones under the
compiler options of a step with batched pullbacks, and a corrupted batched row is reported."""

import json
from pathlib import Path

import pytest
from script_module import load_script

from mojax.xla_cpu import batched_pullback_options

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_pullbacks.py"


@pytest.fixture(scope="module")
def check():
    return load_script(SCRIPT, "check_pullbacks_benchmark")


def test_the_tiny_models_batched_pullbacks_agree_with_separate_ones(check, tmp_path):
    report = check.main(["tiny", "--rows", "1,4", "--out", str(tmp_path)])
    assert [row["k"] for row in report["rows"]] == [1, 4]
    assert [len(row["differences"]) for row in report["rows"]] == [1, 4]
    assert all(row["scale"] > 1e-3 and max(row["differences"]) < 1e-4 * row["scale"] for row in report["rows"])
    assert report["compiler_options"] == batched_pullback_options()
    assert report["broadcast_reduce_error"]["options"] < 1e-3
    assert json.loads((tmp_path / "check_pullbacks.json").read_text())["rows"] == report["rows"]
    assert "| 4 | " in (tmp_path / "check_pullbacks.md").read_text()
    assert set(report["batch"]) == {"completions", "prompt tokens", "completion tokens"}


def test_a_wrong_batched_row_shows_in_its_difference(check, tmp_path):
    """The check can fail: a batching that returns the first row's gradient for every row is caught from row 2 on."""
    import jax

    def first_row_everywhere(fn):
        return lambda cotangents: jax.vmap(lambda _: fn(cotangents[0]))(cotangents)

    checked = check.policy_pullbacks("tiny", str(tmp_path), [])
    differences, scale = check.row_differences(
        checked.outputs, checked.params, checked.rows(3), vmap=first_row_everywhere
    )
    assert differences[0] < 1e-4 * scale and min(differences[1:]) > 1e-3 * scale


def test_a_preference_configs_pair_log_probs_are_checked_with_unit_cotangents(check, tmp_path):
    report = check.main(["dpo_tiny", "--dpo", "--rows", "3", "--set", "steps=1", "--out", str(tmp_path)])
    (row,) = report["rows"]
    assert len(row["differences"]) == 3 and row["scale"] > 1e-3 and max(row["differences"]) < 1e-4 * row["scale"]
    assert set(report["batch"]) == {"pairs", "prompt tokens", "response tokens"}
    checked = check.pair_pullbacks("dpo_tiny", str(tmp_path), ["steps=1"])
    pairs = report["batch"]["pairs"]
    assert checked.outputs(checked.params).shape == (2 * pairs,)
    assert checked.rows(3).tolist() == [[float(i == j) for i in range(2 * pairs)] for j in range(3)]
