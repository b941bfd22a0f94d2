"""benchmarks/compile_cache.py: its runs' environments and order, and its report, with a stand-in for ``mojax train``
(fast); one real round on the tiny example (slow: ``test_compilation_cache.py`` runs ``mojax train`` with the cache)."""

import json
import os
from pathlib import Path

import pytest
from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_cache.py"


def _load():
    return load_script(SCRIPT, "compile_cache_benchmark")


def fake_train(calls: list, changed_kind: str | None = None):
    """A stand-in for ``run_train``: records (kind, environment), writes three steps' metrics into the command's
    ``output_dir`` (the first step slower where nothing is cached) and, with the cache on, a cache entry into
    ``TMPDIR``; `changed_kind`'s run logs another reward."""

    def run(command, env):
        cache = Path(env["TMPDIR"]) / f"mojax-xla-cache-{os.getuid()}"
        kind = "off" if env.get("JAX_ENABLE_COMPILATION_CACHE") == "false" else ("warm" if cache.exists() else "cold")
        calls.append((kind, env))
        output_dir = Path(next(arg.split("=", 1)[1] for arg in command if arg.startswith("output_dir=")))
        output_dir.mkdir(parents=True)
        first = 1.0 if kind == "warm" else 4.0
        reward = 0.5 if kind == changed_kind else 0.25
        records = [
            {"step": step, "timing/rollout": seconds, "timing/rewards": 0.0, "timing/update": 0.0, "reward": reward}
            for step, seconds in ((1, first), (2, 0.5), (3, 0.25))
        ]
        records.insert(1, {"step": 1, "eval/reward": 0.0})  # an evaluation record: no timing, not a step
        (output_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        if kind != "off":
            cache.mkdir(exist_ok=True)
            (cache / f"jit_train_step-{len(calls)}-cache").write_bytes(b"x" * 2**20)
        return {"off": 10.0, "cold": 11.0, "warm": 4.0}[kind]

    return run


def test_rounds_alternate_off_first_and_last_in_fresh_folders_without_inherited_cache_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/else")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "7")
    monkeypatch.setenv("MOJAX_TOKENIZER_CACHE", "/kept/elsewhere")
    calls = []
    report = _load().main(["--rounds", "2", "--steps", "3", "--out", str(tmp_path)], run=fake_train(calls))
    assert [kind for kind, _ in calls] == ["off", "cold", "warm", "cold", "warm", "off"]
    for kind, env in calls:
        assert "JAX_COMPILATION_CACHE_DIR" not in env and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in env
        assert (env.get("JAX_ENABLE_COMPILATION_CACHE") == "false") == (kind == "off")
        assert env["MOJAX_TOKENIZER_CACHE"] == ("off" if kind == "off" else os.path.join(env["TMPDIR"], "tokenizers"))
    assert calls[0][1]["TMPDIR"] == calls[2][1]["TMPDIR"] != calls[3][1]["TMPDIR"] == calls[5][1]["TMPDIR"]
    kinds = report["summary"]["kinds"]
    assert kinds["off"]["wall_s"] == (10.0, 10.0, 10.0) and kinds["warm"]["wall_s"] == (4.0, 4.0, 4.0)
    assert kinds["warm"]["first_step_s"][0] == 1.0 and kinds["cold"]["first_step_s"][0] == 4.0
    assert kinds["off"]["later_step_median_s"][0] == pytest.approx(0.375)
    assert kinds["off"]["cache_bytes"] == 0 and kinds["cold"]["cache_bytes"] == 2**20
    assert kinds["warm"]["cache_bytes"] == 2 * 2**20
    assert report["summary"]["same_last_metrics"]
    table = (tmp_path / "compile_cache_tiny.md").read_text()
    assert "| warm | 4.00 (4.00-4.00) | 1.00 (1.00-1.00) | 0.375 (0.375-0.375) | 2.0 | 0.40 |" in table
    assert "in every run of every round: yes" in table
    assert json.loads((tmp_path / "compile_cache_tiny.json").read_text())["steps"] == 3


def test_a_run_that_logs_other_metrics_is_reported(tmp_path):
    report = _load().main(["--rounds", "1", "--out", str(tmp_path), "--name", "x"], run=fake_train([], "warm"))
    assert not report["summary"]["same_last_metrics"]
    assert "in every run of every round: NO" in (tmp_path / "x.md").read_text()


def test_steps_and_rounds_below_one_are_refused():
    with pytest.raises(SystemExit):
        _load().parse_args(["--rounds", "0"])


@pytest.mark.slow
def test_one_real_round_on_the_tiny_example(tmp_path):
    report = _load().main(
        ["--rounds", "1", "--steps", "2", "--set", "eval_steps=0", "--set", "export=false", "--out", str(tmp_path)]
    )
    assert report["summary"]["same_last_metrics"]
    assert report["summary"]["kinds"]["cold"]["cache_bytes"] > 0
