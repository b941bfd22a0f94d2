"""Smoke test of benchmarks/step_matmuls.py: both sides compute every layer's products, equal to numpy's."""

import json
from pathlib import Path

import numpy as np
import pytest
from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_matmuls.py"
pytest.importorskip("torch")


def _load():
    return load_script(SCRIPT, "step_matmuls_benchmark")


def _expected(pass_name: str, x: np.ndarray, dy: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The product in float64 with w [out, in]; the weight gradient laid out [out, in] (transpose it for a kernel)."""
    x, dy, w = (a.astype(np.float64) for a in (x, dy, w))
    return {"forward": x @ w.T, "input gradient": dy @ w, "weight gradient": dy.T @ x}[pass_name]


def test_step_weights_are_the_seven_projections_per_layer_and_the_head():
    module = _load()
    weights = module.step_weights(module.smollm2_shapes(3, 100))
    assert [w.name for w in weights] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ]
    assert [(w.inputs, w.outputs, w.count, w.head) for w in weights[-2:]] == [
        (1536, 576, 3, False),
        (576, 100, 1, True),
    ]
    assert weights[1][1:3] == (576, 192)


@pytest.mark.parametrize("weight", [("k_proj", 3, 5, 2, False), ("lm_head", 4, 7, 1, True)], ids=lambda w: w[0])
@pytest.mark.parametrize("pass_name", ["forward", "input gradient", "weight gradient"])
def test_both_chains_compute_every_layers_product(weight, pass_name):
    module = _load()
    weight = module.Weight(*weight)
    operands = module.layer_operands(weight, tokens=6)
    assert len(operands) == weight.count
    assert weight.count == 1 or not np.array_equal(operands[0][2], operands[-1][2])  # each layer its own weight
    ours = module.mojax_chain(weight, pass_name, operands)()
    theirs = module.torch_chain(pass_name, operands)()
    assert len(ours) == len(theirs) == weight.count
    for (x, dy, w), mine, torchs in zip(operands, ours, theirs, strict=True):
        expected = _expected(pass_name, x, dy, w)
        kernel_layout = pass_name == "weight gradient" and not weight.head  # mojax's kernel gradient is [in, out]
        np.testing.assert_allclose(np.asarray(mine), expected.T if kernel_layout else expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(torchs.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_a_small_run_writes_rows_and_sums(tmp_path):
    module = _load()
    argv = ["--layers", "2", "--vocab", "64", "--tokens", "4", "--weights", "v_proj,lm_head"]
    argv += ["--rounds", "1", "--repeats", "1", "--out", str(tmp_path)]
    report = module.main(argv)
    assert json.loads((tmp_path / "step_matmuls.json").read_text()) == report
    assert [(r["weight"], r["pass"], r["count"]) for r in report["rows"]] == [
        (name, p, count) for name, count in (("v_proj", 2), ("lm_head", 1)) for p in module.PASSES
    ]
    assert all(r["mojax_ms"] > 0 and r["torch_ms"] > 0 and r["ratio_min"] <= r["ratio"] for r in report["rows"])
    total = report["sums"]["all"]
    assert total["mojax_ms"] == pytest.approx(sum(r["count"] * r["mojax_ms"] for r in report["rows"]))
    assert total["mojax_ms"] == pytest.approx(sum(report["sums"][p]["mojax_ms"] for p in module.PASSES))
    assert "| v_proj | weight gradient | 2 |" in (tmp_path / "step_matmuls.md").read_text()
    with pytest.raises(SystemExit, match="unknown"):
        module.main(["--weights", "attention", "--out", str(tmp_path)])
