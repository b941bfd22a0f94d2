"""Smoke test of benchmarks/profile_step.py: one layer, one profiled step per side, a consistent report."""

import json
from pathlib import Path

from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"


def _load():
    return load_script(SCRIPT, "profile_step_benchmark")


def test_operation_kinds_follow_xla_fusion_names():
    kind = _load().xla_kind
    assert kind("ynn_fusion.31") == "matmul (library)"
    assert kind("dot.126") == "matmul (Eigen dot)"
    assert kind("bitcast_dynamic-update-slice_fusion.24") == "stacked writes (dynamic-update-slice)"
    assert kind("dynamic-slice_bitcast_fusion.7") == "stacked reads (dynamic-slice)"
    assert kind("copy_bitcast_fusion.5") == "layout copies / transposes"
    assert kind("wrapped_broadcast.14") == kind("broadcast.3") == "zeroing stacked buffers (broadcast)"
    assert kind("broadcast_divide_fusion.9") == "elementwise and other"  # a scalar broadcast inside elementwise work
    assert kind("add_multiply_fusion") == "elementwise and other"


def test_one_layer_run_profiles_both_sides(tmp_path):
    report = _load().main(
        [
            "--layers",
            "1",
            "--vocab",
            "2048",
            "--batch",
            "2x16",
            "--calls",
            "1",
            "--remat",
            "dots",
            "--out",
            str(tmp_path),
        ]
    )
    written = json.loads((tmp_path / "profile_step.json").read_text())
    assert [row["side"] for row in written["rows"]] == ["mojax remat=dots", "torch eager"]
    for row in report["rows"]:
        assert row["wall_ms"] > 0 and row["kinds_ms"]["matmul (library)"] > 0
    text = (tmp_path / "profile_step.md").read_text()
    assert "| kind | mojax remat=dots | torch eager |" in text and "| matmul (library) |" in text
    assert report["rows"][0]["scratch_mb"] > 0 and "| scratch MB (XLA temporaries of the step) |" in text
