"""plot_runs on synthetic metrics.jsonl files: the expected PNG files, skipped figures, and the numbers drawn."""

import json
import logging

import numpy as np
import pytest

from mojax.plots import Run, cosine_matrix, default_out_dir, final_rewards, plot_runs

OBJECTIVES = ("helpful", "harmless", "concise")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def full_record(step, shift):
    """Every key the figures read, for three objectives; the cosines drift with the step."""
    record = {"step": step, "loss": 1.0 / step, "kl": 0.01 * step * (1 + shift), "interference/index": 0.1 * shift}
    for i, name in enumerate(OBJECTIVES):
        record[f"rewards/{name}/mean"] = 0.1 * step * (i + 1) - shift * i
        record[f"eval/rewards/{name}/mean"] = 0.1 * step * (i + 1) - shift * i + 0.01
        record[f"combiner/weight/{name}"] = (i + 1 + shift) / (6 + 3 * shift)
        record[f"interference/cov/{name}"] = 0.2 * (i - 1) * np.cos(step)
        record[f"interference/frac_neg/{name}"] = 0.1 * (i + 1)
    for a in range(3):
        for b in range(a + 1, 3):
            record[f"combiner/cos/{OBJECTIVES[a]}/{OBJECTIVES[b]}"] = -0.1 * (a + b) + 0.01 * step
    record["interference/cov/concise"] = None  # logged as null (NaN): a blank cell
    return record


def write_run(path, records):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000


def test_two_runs_with_every_key_give_every_figure(tmp_path):
    runs = [
        write_run(tmp_path / name, [full_record(s, shift) for s in range(1, 7)]) for name, shift in (("a", 0), ("b", 1))
    ]
    written = plot_runs(runs)
    names = ["rewards.png", "combiner_weights.png", "interference.png", "gradient_cosine.png", "kl.png", "pareto.png"]
    assert written == [tmp_path / "plots" / name for name in names]
    for path in written:
        assert_png(path)


def test_figures_without_their_keys_are_skipped_and_reported(tmp_path, caplog):
    run = write_run(tmp_path / "run", [{"step": s, "rewards/helpful/mean": 0.1 * s, "loss": 1.0} for s in (1, 2, 3)])
    with caplog.at_level(logging.INFO, logger="mojax.plots"):
        written = plot_runs([run], tmp_path / "out")
    assert written == [tmp_path / "out" / "rewards.png"]
    assert_png(written[0])
    skipped = {"combiner_weights", "interference", "gradient_cosine", "kl", "pareto"}
    assert {name for name in skipped if f"skipped {name}.png" in caplog.text} == skipped
    assert "skipped rewards.png" not in caplog.text


def test_two_objective_pareto_plot_for_runs_with_partial_keys(tmp_path):
    a = write_run(tmp_path / "a", [{"step": 1, "rewards/x/mean": 1.0, "rewards/y/mean": 0.0, "kl": 0.1}])
    b = write_run(tmp_path / "b", [{"step": 1, "rewards/x/mean": 0.0, "rewards/y/mean": 1.0}])
    c = write_run(tmp_path / "c", [{"step": 1, "rewards/x/mean": 0.0, "rewards/y/mean": 0.5, "combiner/weight/x": 1.0}])
    written = plot_runs([a, b, c])
    assert [path.name for path in written] == ["rewards.png", "combiner_weights.png", "kl.png", "pareto.png"]
    for path in written:
        assert_png(path)


def test_default_out_dir_is_the_run_or_the_first_runs_parent(tmp_path):
    assert default_out_dir([tmp_path / "a"]) == tmp_path / "a" / "plots"
    assert default_out_dir([tmp_path / "a", tmp_path / "x" / "b"]) == tmp_path / "plots"


def test_cosine_matrix_averages_the_last_steps_and_ignores_null():
    records = [
        {"step": 1, "combiner/cos/p/q": 0.9},
        {"step": 2, "loss": 1.0},
        {"step": 3, "combiner/cos/p/q": 0.2, "combiner/cos/q/r": float("nan")},
        {"step": 4, "combiner/cos/p/q": -0.4, "combiner/cos/q/r": 0.5},
    ]
    names, matrix = cosine_matrix(records, last_steps=2)
    assert names == ["p", "q", "r"]
    expected = np.array([[1.0, -0.1, np.nan], [-0.1, 1.0, 0.5], [np.nan, 0.5, 1.0]])
    np.testing.assert_allclose(matrix, expected)
    _, everything = cosine_matrix(records, last_steps=10)
    assert everything[0, 1] == pytest.approx((0.9 + 0.2 - 0.4) / 3)


def test_final_rewards_prefer_complete_evaluations_and_skip_null():
    trained = [{"step": 1, "rewards/x/mean": 1.0, "rewards/y/mean": 2.0}, {"step": 2, "rewards/x/mean": None}]
    trained = [{key: np.nan if value is None else value for key, value in r.items()} for r in trained]
    evaluated = trained + [{"step": 2, "eval/rewards/x/mean": 5.0, "eval/rewards/y/mean": 6.0}]
    names, values = final_rewards([Run("a", trained), Run("b", evaluated)])
    assert names == ["x", "y"]
    np.testing.assert_array_equal(values, [[1.0, 2.0], [1.0, 2.0]])
    names, values = final_rewards([Run("a", evaluated), Run("b", evaluated)])
    np.testing.assert_array_equal(values, [[5.0, 6.0], [5.0, 6.0]])


def test_plot_runs_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"plot_runs: `run_dirs` is empty"):
        plot_runs([])
    with pytest.raises(FileNotFoundError):
        plot_runs([tmp_path / "missing"])
