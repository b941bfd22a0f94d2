"""examples/bandit.py: the bandit shows interference under linear weights, and MGDA and CTWA protect the degraded objective."""

import json
from pathlib import Path

import numpy as np
import pytest
from script_module import load_script

from mojax.combiners import REGISTRY

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bandit.py"


bandit = load_script(EXAMPLE, "bandit_example")
HARMLESS = bandit.OBJECTIVES.index("harmless")


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    """Linear, MGDA and CTWA trained for 200 steps from the same start and sample stream."""
    out = tmp_path_factory.mktemp("bandit")
    rows = bandit.run(steps=200, batch=32, group=8, lr=0.05, seed=0, out_dir=out, selected=("linear", "mgda", "ctwa"))
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
    assert (out / "trajectories.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_methods_are_the_registry_entries():
    assert [method.name for method in bandit.methods(3)] == list(REGISTRY)


@pytest.mark.parametrize("argv", [["--group", "1"], ["--methods", "adam"], ["--steps", "0"]])
def test_bad_command_line_is_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bandit.main(argv)
    assert "error" in capsys.readouterr().err
