"""Smoke test of benchmarks/xla_cpu_options.py: a short run on the tiny model writes a consistent report, and the
two compilations of each update agree on the tiny model."""

import json
from pathlib import Path

import pytest
from script_module import load_script

from mojax.xla_cpu import batched_pullback_options

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "xla_cpu_options.py"


@pytest.fixture(scope="module")
def benchmark():
    return load_script(SCRIPT, "xla_cpu_options_benchmark")


def test_a_short_run_times_both_compilations_of_the_pullback_modes(benchmark, tmp_path):
    """Probe and full mode, whose batched pullbacks the options are for (scalar mode runs the same code of the
    script, and the trainer never compiles it with the options)."""
    argv = ["--n", "2", "--combiners", "mgda", "--rounds", "1", "--repeats", "1", "--out", str(tmp_path)]
    report = benchmark.main(argv)
    assert json.loads((tmp_path / "xla_cpu_options.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert [row["contender"] for row in report["rows"]] == ["mgda/probe", "mgda/full"]
    for row in report["rows"]:
        assert row["options_ms"] > 0 and row["defaults_ms"] > 0 and row["ratio"] > 0
        assert all(seconds > 0 for seconds in row["first_call_s"].values())
        assert row["param_difference"] < 1e-4  # the tiny model's updates agree either way
        assert 0 <= row["metric_difference"] < 1e-3
    assert report["compiler_options"] == batched_pullback_options()
    assert report["broadcast_reduce_error"][benchmark.OPTIONS] < 1e-3
    assert "| 2 | mgda/full |" in (tmp_path / "xla_cpu_options.md").read_text()


def test_the_dpo_option_times_the_dpo_step_of_a_preference_config(benchmark, tmp_path):
    argv = ["--dpo", "dpo_tiny", "--set", "steps=1", "--rounds", "1", "--repeats", "1", "--out", str(tmp_path)]
    report = benchmark.main(argv)
    (row,) = report["rows"]
    assert row["contender"] == "dpo step (dpo_tiny)" and row["n"] == 1
    assert row["options_ms"] > 0 and row["defaults_ms"] > 0
    assert row["param_difference"] < 1e-4 and 0 <= row["metric_difference"] < 1e-3
    assert "| 1 | dpo step (dpo_tiny) |" in (tmp_path / "xla_cpu_options.md").read_text()
