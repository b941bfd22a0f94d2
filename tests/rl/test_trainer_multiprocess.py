"""The RL trainer run by two processes (``jax.distributed``, 4 CPU devices each) equals one process with 8 devices.

Run by pytest, this file launches itself twice as a child (``python test_trainer_multiprocess.py PID PORT DIR STEPS``).
Each child joins the job, trains the tiny task on the global (fsdp=8) mesh into the shared output folder, and
process 0 saves the final parameters. The two-process run must write the same metrics and reach the same parameters
as the same config trained in the test's own process on its 8 simulated devices (fp32, 1e-5). The children share
the test session's persistent XLA compilation cache (``JAX_COMPILATION_CACHE_DIR`` from the root conftest).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

NUM_PROCESSES = 2
CHILD_TIMEOUT_S = 400
# 4 prompts x 2 generations = 8 completions, one per device of the fsdp=8 mesh.
OVERRIDES = [
    "data.prompts_per_step=4",
    "rollout.num_generations=2",
    "rollout.max_completion_length=6",
    "rollout.max_prompt_length=8",
    "data.num_prompts=8",
    "eval_steps=0",
    "logging.progress=false",
    "logging.tensorboard=false",
    "export=true",
    "mesh.shape={fsdp: 8}",
    "checkpoint.save_seconds=3600",  # step 1 saves by time: process 0 decides, both save
]
COMPARED = ("loss", "grad_norm", "kl", "entropy", "reward", "rewards/a_rate/mean", "rewards/b_count/mean")


def config(output_dir, steps):
    from mojax.rl.config import load_config

    return load_config("tiny", [f"output_dir={output_dir}", f"steps={steps}", *OVERRIDES])


def params_of(trainer):
    from mojax.rl.run import fetch

    return fetch(trainer.state.params)


def child(process_id, port, output_dir, steps):
    """One process of the job: join, train (resuming from output_dir's checkpoint if any), save the parameters."""
    import jax

    from mojax.distributed import initialize

    initialize(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    from mojax.rl.trainer import Trainer

    trainer = Trainer(config(output_dir, steps))
    trainer.train()
    trainer.close()
    leaves = jax.tree.leaves(params_of(trainer))
    if process_id == 0:
        np.savez(Path(output_dir) / "params.npz", *leaves)
    jax.distributed.shutdown()


def launch(output_dir, steps):
    """Run both children to the end (the launcher of tests/test_multihost.py); fail with the first failure's output."""
    from test_multihost import UNSUPPORTED, run_processes

    results = run_processes(__file__, output_dir, steps, timeout=CHILD_TIMEOUT_S)
    failed = [output for code, output in results if code != 0]
    if failed and any(marker in failed[0] for marker in UNSUPPORTED):
        pytest.skip(f"CPU backend lacks multi-process collectives: {failed[0].strip().splitlines()[-1]}")
    assert not failed, failed[0][-4000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same config trained for 3 steps in this process on 8 devices: (run dir, parameters after each step)."""
    import jax

    from mojax.rl.trainer import Trainer

    output_dir = tmp_path_factory.mktemp("one_process")
    params = {}
    trainer = Trainer(
        config(output_dir, 3), callbacks=[lambda step, _: params.update({step: jax.tree.leaves(params_of(trainer))})]
    )
    trainer.train()
    trainer.close()
    return output_dir, params


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The run dir of a two-process run of 2 steps."""
    output_dir = tmp_path_factory.mktemp("two_processes")
    launch(output_dir, steps=2)
    return output_dir


def assert_same_run(two_dir, one_dir, want_params, steps):
    from mojax.rl.logging import read_metrics

    got = np.load(two_dir / "params.npz")
    assert len(got.files) == len(want_params)
    for index, leaf in enumerate(want_params):
        np.testing.assert_allclose(got[f"arr_{index}"], leaf, rtol=1e-5, atol=1e-5)
    got_records, want_records = read_metrics(two_dir), read_metrics(one_dir)[:steps]
    assert [record["step"] for record in got_records] == list(range(1, steps + 1))
    for got_record, want_record in zip(got_records, want_records, strict=True):
        for key in COMPARED:
            np.testing.assert_allclose(got_record[key], want_record[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_two_processes_train_like_one_process_with_8_devices(two_processes, one_process):
    one_dir, params = one_process
    assert_same_run(two_processes, one_dir, params[2], steps=2)
    # Only process 0 writes the reports: one line per step, samples_per_step samples per step, one exported policy.
    assert len((two_processes / "samples.jsonl").read_text().splitlines()) == 2 * 2
    # step 1 saved by time (checkpoint.save_seconds, decided by process 0), step 2 as the last
    assert sorted(int(path.name) for path in (two_processes / "checkpoints").iterdir() if path.name.isdigit()) == [1, 2]
    import jax
    from flax import nnx

    from mojax.models import load_causal_lm

    exported = jax.tree.leaves(nnx.state(load_causal_lm(two_processes / "policy"), nnx.Param))
    trained = np.load(two_processes / "params.npz")
    assert len(exported) == len(trained.files)
    for index, leaf in enumerate(exported):
        np.testing.assert_array_equal(np.asarray(leaf), trained[f"arr_{index}"])


@pytest.mark.slow
def test_two_processes_resume_from_their_checkpoint_like_one_process(two_processes, one_process):
    one_dir, params = one_process
    launch(two_processes, steps=3)  # every process restores the checkpoint both saved at step 2
    assert_same_run(two_processes, one_dir, params[3], steps=3)


if __name__ == "__main__":
    child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
