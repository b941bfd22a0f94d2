"""Smoke test of benchmarks/model.py on the tiny sizes: both sides agree, and every ratio comes from its rounds."""

import json
from pathlib import Path

import pytest
from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model.py"
pytest.importorskip("torch")


def test_a_smoke_run_times_both_sides_in_the_same_rounds(tmp_path):
    module = load_script(SCRIPT, "model_benchmark")
    argv = ["--smoke", "--rounds", "2", "--repeats", "1", "--out", str(tmp_path)]
    report = module.main(argv)
    assert report["command"].endswith("python benchmarks/model.py " + " ".join(argv))
    assert [r["op"] for r in report["results"]] == ["forward", "forward+backward", "decode (greedy, KV cache)"]
    for r in report["results"]:
        assert len(r["mojax_round_medians_ms"]) == len(r["torch_round_medians_ms"]) == 2
        ratios = [t / m for t, m in zip(r["torch_round_medians_ms"], r["mojax_round_medians_ms"], strict=True)]
        assert r["ratio_min"] == pytest.approx(min(ratios)) and r["ratio_max"] == pytest.approx(max(ratios))
        assert r["ratio_min"] <= r["ratio_mojax_over_torch"] <= r["ratio_max"]
    (decode,) = [r for r in report["results"] if "weight_bytes" in r]
    assert (
        decode["op"] == "decode (greedy, KV cache)" and decode["weight_bytes"] == 4 * report["parity"][0]["parameters"]
    )
    new_tokens = 4  # the smoke decode's (2, 8, 4)
    assert decode["ratio_ceiling"] == pytest.approx(decode["torch_median_ms"] / (new_tokens * decode["read_median_ms"]))
    assert decode["mojax_weight_gb_per_s"] == pytest.approx(
        decode["weight_bytes"] * new_tokens / decode["mojax_median_ms"] / 1e6
    )
    (parity,) = report["parity"]
    assert parity["max_abs_logits_diff"] < 1e-4 and parity["greedy_tokens_equal_fraction"] == 1.0
    assert parity["loss_mojax"] == pytest.approx(parity["loss_torch"], abs=1e-5)
    assert json.loads((tmp_path / "model.json").read_text())["results"] == report["results"]
    assert (tmp_path / "model.md").read_text().count("| tiny (V 256, d 64, 2 layers) |") == 5  # 3 ops, reads, parity
