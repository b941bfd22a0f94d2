"""Smoke test of benchmarks/matmul_orientation.py: its operand orders compute the same products and gradients."""

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


def test_both_gradient_forms_compute_the_same_weight_gradients():
    module = _load()
    config = module.smollm2_shapes(2, 64)
    calls = module.gradient_contenders(config, rows=5)
    assert set(calls) == {f"{piece}, {form}" for piece in module.GRADIENT_PIECES for form in module.GRADIENT_FORMS}
    layers = calls["projections' weight gradients, einsum"]()
    assert len(layers) == 2 and [g.shape for g in layers[0]] == [w.T.shape for w in module.weights(config)[0]]
    np.testing.assert_allclose(
        np.concatenate(
            [np.ravel(g) for layer in calls["projections' weight gradients, rows_contraction"]() for g in layer]
        ),
        np.concatenate([np.ravel(g) for layer in layers for g in layer]),
        rtol=1e-4,
        atol=1e-4,
    )
    untied, tied = (np.asarray(calls[f"LM head weight gradient {s}, einsum"]()) for s in ("[D, V]", "[V, D]"))
    assert untied.shape == (576, 64) and np.isfinite(untied).all()
    np.testing.assert_array_equal(tied, untied.T)
    for shape, want in (("[D, V]", untied), ("[V, D]", tied)):
        np.testing.assert_allclose(
            calls[f"LM head weight gradient {shape}, rows_contraction"](), want, rtol=1e-4, atol=1e-4
        )


def test_a_small_run_writes_every_cell(tmp_path):
    module = _load()
    argv = [
        "--rows",
        "2,3",
        "--gradient-rows",
        "4",
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
    assert set(report["gradient_rows"]) == {"4"}
    assert len(report["gradient_rows"]["4"]) == len(module.GRADIENT_PIECES) * len(module.GRADIENT_FORMS)
    text = (tmp_path / "matmul_orientation.md").read_text()
    assert text.count("| projections |") == 2 and text.count("| LM head |") == 2
    assert all(text.count(f"| 4 | {piece} |") == 1 for piece in module.GRADIENT_PIECES)
    assert report["command"].endswith("python benchmarks/matmul_orientation.py " + " ".join(argv))
