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


def test_a_wrong_batched_row_shows_in_its_difference(check, tmp_path):
    """The check can fail: a batching that returns the first row's gradient for every row is caught from row 2 on."""
    import jax

    from mojax.rl.config import load_config
    from mojax.rl.trainer import Trainer

    def first_row_everywhere(fn):
        return lambda cotangents: jax.vmap(lambda _: fn(cotangents[0]))(cotangents)

    trainer = Trainer(load_config("tiny", [f"output_dir={tmp_path}", "logging.tensorboard=false", "export=false"]))
    differences, scale = check.row_differences(trainer, trainer.prepare(1).batch, 3, vmap=first_row_everywhere)
    assert differences[0] < 1e-4 * scale and min(differences[1:]) > 1e-3 * scale
