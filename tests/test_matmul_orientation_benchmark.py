"""Smoke test of benchmarks/matmul_orientation.py: its three operand orders compute the same products."""

import json
from pathlib import Path

import numpy as np
from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "matmul_orientation.py"


def _load():
    return load_script(SCRIPT, "matmul_orientation_benchmark")


def test_every_form_computes_the_same_projections_and_logits():
    module = _load()
    calls = module.contenders(module.smollm2_shapes(2, 64), rows=3)
    assert set(calls) == {f"{piece}, {form}" for piece in ("projections", "LM head") for form in module.FORMS}
    for piece in ("projections", "LM head"):
        rows = np.asarray(calls[f"{piece}, rows"]())
        assert rows.shape == ((3, 576) if piece == "projections" else (3, 64)) and np.isfinite(rows).all()
        for form in module.COLUMN_FORMS:
            np.testing.assert_allclose(calls[f"{piece}, {form}"](), rows, rtol=1e-4, atol=1e-5)


def test_a_small_run_writes_every_cell(tmp_path):
    module = _load()
    argv = [
        "--rows",
        "2,3",
        "--layers",
        "1",
        "--vocab",
        "64",
        "--rounds",
        "1",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    report = module.main(argv)
    written = json.loads((tmp_path / "matmul_orientation.json").read_text())
    assert written["rows"] == report["rows"] and set(report["rows"]) == {"2", "3"}
    for cells in report["rows"].values():
        assert len(cells) == 2 * len(module.FORMS)
        assert all(0 < c["min_ms"] <= c["ms"] <= c["max_ms"] for c in cells.values())
    text = (tmp_path / "matmul_orientation.md").read_text()
    assert text.count("| projections |") == 2 and text.count("| LM head |") == 2
    assert report["command"] == "python benchmarks/matmul_orientation.py " + " ".join(argv)
