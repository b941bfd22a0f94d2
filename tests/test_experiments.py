"""The experiments under experiments/: their helpers against hand-computed values, and every run.py's --quick mode
in one process (so the tiny model, the sampler and the updates compiled by one experiment serve the next; with the
persistent compilation cache warm the whole file takes about 1-2 minutes on 2 CPU cores, cold several)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

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
}


def load_run(folder: str):
    """experiments/<folder>/run.py imported by path as a module."""
    spec = importlib.util.spec_from_file_location(f"experiment_{folder}", EXPERIMENTS / folder / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_every_quick_mode_writes_its_results(tmp_path):
    for folder, result_name in RESULTS.items():
        out = tmp_path / folder
        returned = load_run(folder).main(["--quick", "--out", str(out)])
        path = out / "results" / result_name
        assert path.is_file(), folder
        written = json.loads(path.read_text())
        assert written["steps"] == returned["steps"] == 2
        assert written["seeds"] == [0]
        assert list(out.glob("*.png")), folder


@pytest.mark.parametrize("folder", sorted(RESULTS))
@pytest.mark.parametrize("name", ["config.yaml", "config_smollm2.yaml"])
def test_every_method_of_every_config_is_a_valid_trainer_config(folder, name, tmp_path):
    from mojax.rl.config import load_config

    config = shared.read_config(EXPERIMENTS / folder / name)
    assert config["methods"]
    for overrides in config["methods"].values():
        load_config("tiny", [f"output_dir={tmp_path}", "steps=1", *config["base"], *overrides])
