"""Smoke test of benchmarks/profile_decode.py: a one-layer model, one profiled call, a consistent report."""

import json
import math
from pathlib import Path

import pytest
from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_decode.py"


def _load():
    return load_script(SCRIPT, "profile_decode_benchmark")


def test_operation_kinds_follow_the_source_of_each_operation():
    module = _load()
    kind = module.operation_kind
    assert kind("jit(f)/while/body/dot_general", 2048, "f32[64,1536]{1,0}") == "matmul: projections"
    assert kind("jit(f)/while/body/bkgts,bksd->bkgtd/dot_general", 2048, "") == "matmul: attention"
    assert kind("jit(f)/while/body/pkqs,pksd->pkqd/dot_general", 2048, "f32[2,2,12,16]") == "matmul: attention"
    assert kind("jit(f)/while/body/...d,vd->...v/dot_general", 2048, "f32[64,2048]{1,0}") == "matmul: LM head"
    assert kind("jit(f)/while/body/dot_general", 2048, "f32[2048,16]{1,0}") == "matmul: LM head"  # by columns
    assert kind("jit(f)/while/body/dot_general", 2048, "f32[20480,16]{1,0}") == "matmul: projections"
    assert kind("jit(f)/while/body/dynamic_update_slice", 2048, "") == "KV cache writes (dynamic-update-slice)"
    assert kind("jit(f)/while/body/slice", 2048, "") == "slices copied out (a layer's cache or weights)"
    assert kind("jit(f)/while/body/squeeze", 2048, "") == "slices copied out (a layer's cache or weights)"
    assert kind("jit(f)/while/body/reduce_max", 2048, "") == "elementwise and other"
    hlo = '  %ynn_fusion.3 = f32[4,8]{1,0} fusion(%a), kind=kCustom, metadata={op_name="jit(f)/dot_general" x=1}\n'
    assert module.instructions(hlo + "  ROOT %t = (f32[4]) tuple(%b)\n") == {
        "ynn_fusion.3": ("f32[4,8]{1,0}", "jit(f)/dot_general"),
        "t": ("(f32[4])", ""),
    }


def test_one_layer_run_splits_prefill_and_decode_steps(tmp_path):
    argv = ["--layers", "1", "--vocab", "2048", "--prompts", "2", "--generations", "2", "--prompt-tokens", "8"]
    module = _load()
    report = module.main([*argv, "--new-tokens", "4", "--calls", "1", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "profile_decode.json").read_text())
    assert written["profile"] == report["profile"] and report["profile"]["wall_ms"] > 0
    # the step's time is a difference of two timings (its sign is the machine's business at these sizes); its rate
    # is the mean decode step's matmul FLOPs (4 rows, contexts 9, 10, 11) over that time
    step_flops = sum(module.smollm2_shapes(1, 2048).forward_flops(4, 8 + i) for i in (1, 2, 3)) / 3
    rate, step_ms = report["profile"]["decode_step_gflops"], report["profile"]["decode_step_wall_ms"]
    assert math.isfinite(step_ms) and rate * step_ms * 1e6 == pytest.approx(step_flops, rel=1e-9)
    step = report["profile"]["decode_step_ms"]
    assert step["matmul: projections"] > 0 and step["matmul: LM head"] > 0 and step["matmul: attention"] > 0
    assert report["profile"]["prefill_and_setup_ms"]["matmul: projections"] > 0
    text = (tmp_path / "profile_decode.md").read_text()
    assert "| kind | one decode step, ms | prefill and setup, ms |" in text and "| matmul: LM head |" in text
    assert "One decode step, wall time" in text
