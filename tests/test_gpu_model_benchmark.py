"""Smoke test of benchmarks/gpu_model.py (part 1 of benchmarks/gpu.sh) on the CPU: its rates follow its times and
its training step trains."""

import json
import math
import subprocess
from pathlib import Path

import pytest
from script_module import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    return load_script(BENCHMARKS / "gpu_model.py", "gpu_model_benchmark")


@pytest.mark.parametrize(
    ("kind", "tflops", "expected"),
    [("NVIDIA H200", None, 989e12), ("NVIDIA A100-SXM4-80GB", None, 312e12), ("cpu", 2.5, 2.5e12)],
)
def test_peak_flops_by_device_kind_or_given(kind, tflops, expected):
    assert _load().peak_flops(kind, tflops) == expected


def test_peak_flops_of_an_unknown_part_is_nan():
    assert math.isnan(_load().peak_flops("cpu"))


def test_smoke_run_reports_rates_that_follow_its_times(tmp_path):
    module = _load()
    report = module.main(["--smoke", "--repeats", "1", "--peak-tflops", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_model.json").read_text()) == report
    row, fused = report["rows"]  # off a GPU the kernels are mojax's and XLA's fused attention
    assert (row["attention"], fused["attention"]) == ("mojax", "xla")
    config, (batch, length), (d_batch, _, new) = module.sizes(smoke=True)["tiny"]
    train_s, forward_s = row["train_step_ms"] / 1e3, row["forward_ms"] / 1e3
    flops = config.forward_flops(batch * length, length)
    assert row["train_mfu"] == pytest.approx(3 * flops / train_s / 2e12, rel=1e-9)
    assert row["forward_mfu"] == pytest.approx(flops / forward_s / 2e12, rel=1e-9)
    assert row["train_tokens_per_s"] == pytest.approx(batch * length / train_s, rel=1e-9)
    assert row["decode_tokens_per_s"] == pytest.approx(d_batch * new / (row["decode_ms"] / 1e3), rel=1e-9)
    assert row["loss_last_step"] < row["loss_first_step"]  # the same batch every step: AdamW fits it
    assert f"| tiny | mojax | {config.num_params():,} | {batch}x{length} |" in (tmp_path / "gpu_model.md").read_text()
    for op in ("train_step", "forward", "decode"):  # the PyTorch peer, timed in the same process
        assert row[f"torch_over_mojax_{op}"] == pytest.approx(row[f"torch_{op}_ms"] / row[f"{op}_ms"], rel=1e-9)
    # the second kernel: the same weights and batch, so the same first loss; decode (through the cache) timed once
    assert fused["loss_first_step"] == pytest.approx(row["loss_first_step"], rel=1e-5)
    assert "decode_ms" not in fused and "torch_over_mojax_decode" not in fused
    assert fused["torch_train_step_ms"] == row["torch_train_step_ms"]  # one peer per config
    assert fused["torch_over_mojax_forward"] == pytest.approx(fused["torch_forward_ms"] / fused["forward_ms"], rel=1e-9)
    assert row["torch_loss_last_step"] < row["torch_loss_first_step"]
    assert row["torch_loss_first_step"] == pytest.approx(math.log(config.vocab_size), rel=0.1)  # random weights


def test_no_torch_leaves_the_peer_out(tmp_path):
    report = _load().main(["--smoke", "--repeats", "1", "--no-torch", "--attention", "mojax", "--out", str(tmp_path)])
    assert not any(key.startswith("torch") for key in report["rows"][0])
    assert "PyTorch eager" not in (tmp_path / "gpu_model.md").read_text()


def test_an_unknown_attention_kernel_is_refused(capsys):
    with pytest.raises(SystemExit):
        _load().parse_args(["--attention", "mojax,flash"])
    assert "--attention has flash; expected names from mojax, xla, cudnn" in capsys.readouterr().err


def test_gpu_sh_is_valid_bash_and_runs_both_parts():
    script = BENCHMARKS / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert all(part in text for part in ("gpu_model.py", "smollm2_shaped.py", "rl_step.py"))
