"""`make demo`: the bandit shows interference under linear weights, and MGDA and CTWA protect the degraded objective."""

import json

import numpy as np
import pytest

from mojax import demo

HARMLESS = demo.OBJECTIVES.index("harmless")


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    """Linear, MGDA and CTWA trained for 200 steps from the same start and sample stream."""
    out = tmp_path_factory.mktemp("demo")
    rows = demo.run(steps=200, batch=32, group=8, lr=0.05, seed=0, out_dir=out, selected=("linear", "mgda", "ctwa"))
    return {row["method"]: row for row in rows}, out


def test_linear_scalarisation_degrades_harmlessness(demo_rows):
    rows, _ = demo_rows
    linear = rows["linear"]
    assert linear["final_expected_rewards"][HARMLESS] < linear["initial_expected_rewards"][HARMLESS] - 0.03
    assert np.mean(linear["final_expected_rewards"]) > np.mean(linear["initial_expected_rewards"]) + 0.2


@pytest.mark.parametrize("method", ["mgda", "ctwa"])
def test_adaptive_methods_protect_the_degraded_objective(demo_rows, method):
    rows, _ = demo_rows
    assert rows[method]["final_expected_rewards"][HARMLESS] > rows["linear"]["final_expected_rewards"][HARMLESS] + 0.05


def test_ctwa_raises_the_weight_of_the_degraded_objective(demo_rows):
    rows, _ = demo_rows
    weights = rows["ctwa"]["final_weights"]
    assert weights[HARMLESS] == max(weights)
    assert weights[HARMLESS] > weights[0] * 1.1


def test_outputs_are_written(demo_rows):
    rows, out = demo_rows
    saved = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in saved["methods"]] == list(rows)
    assert all(np.isfinite(row["final_expected_rewards"]).all() for row in saved["methods"])
    svg = (out / "trajectories.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == len(rows) * len(demo.OBJECTIVES)


def test_every_listed_method_builds():
    assert len({m.name for m in demo.methods(3)}) == len(demo.methods(3)) == 11


@pytest.mark.parametrize("argv", [["--group", "1"], ["--methods", "adam"], ["--steps", "0"]])
def test_bad_command_line_is_refused(argv, capsys):
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert "error" in capsys.readouterr().err
