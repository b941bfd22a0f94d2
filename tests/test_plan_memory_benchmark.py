"""benchmarks/plan_memory.py's command line: the RL step it plans, and the shapes it refuses before compiling.

The plans themselves compile LLaMA-sized programs on simulated meshes for minutes and are not part of the suite."""

from pathlib import Path

import pytest
from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_memory.py"


@pytest.fixture(scope="module")
def plan_memory():
    return load_script(SCRIPT, "plan_memory_benchmark")


def test_the_rl_options_describe_one_step(plan_memory):
    argv = ["--rl", "16,8,3", "--generations", "2", "--prompts-per-shard", "3", "--microbatches", "2"]
    _, shape = plan_memory.parse_args([*argv, "--minibatches", "3"])
    assert shape == plan_memory.RLShape(16, 8, 3, generations=2, prompts_per_shard=3, microbatches=2, minibatches=3)
    assert shape.completions_per_shard == 6
    assert plan_memory.parse_args(["--models", "tiny"])[1] is None


def test_the_report_names_the_update_splits(plan_memory):
    shape = plan_memory.RLShape(16, 8, 3, generations=4, microbatches=2, minibatches=2)
    text = plan_memory.rl_markdown([], "python benchmarks/plan_memory.py", "a machine", shape, "sequential")
    assert "4 completion(s) of 8 new tokens" in text
    assert "the update in 2 minibatch(es) of 2 micro-batch(es) each" in text


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--rl", "16,8"], "three positive integers"),
        (["--rl", "16,x,3"], "three positive integers"),
        (["--rl", "16,0,3"], "three positive integers"),
        (["--rl", "16,8,3", "--minibatches", "0"], "must be positive"),
        (["--rl", "16,8,3", "--generations", "2", "--minibatches", "4"], "= 4 must divide the completions per shard"),
        (["--rl", "16,8,3", "--generations", "4", "--minibatches", "2", "--microbatches", "4"], "= 8 must divide"),
    ],
)
def test_shapes_the_trainer_would_refuse_are_refused(plan_memory, argv, complaint, capsys):
    with pytest.raises(SystemExit):
        plan_memory.parse_args(argv)
    assert complaint in capsys.readouterr().err
