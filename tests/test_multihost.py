"""Two local processes with 4 CPU devices each run one sharded forward over the global 8-device mesh.

Run by pytest, this file launches itself twice as a child (``python test_multihost.py PID PORT OUT``);
each child joins the job through ``mojax.distributed.initialize``, builds the tiny LLaMA directly
sharded with FSDP + tensor parallelism on a (data=2, fsdp=2, tensor=2) mesh spanning both processes,
and saves the replicated logits. Both must agree with each other and with the same forward run in
one process. Collectives across processes on CPU go through Gloo in this jax build.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
CHILD_TIMEOUT_S = 300
UNSUPPORTED = ("UNIMPLEMENTED", "not supported", "Unsupported", "collectives_implementation")


def global_batch():
    """The [8, 12] token ids every process agrees on."""
    return np.random.default_rng(0).integers(0, 256, size=(8, 12), dtype=np.int32)


def sharded_logits():
    """Logits of the tiny LLaMA created sharded (fsdp_tp) on the global mesh, replicated to every process."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from mojax.models import LlamaForCausalLM, ModelConfig
    from mojax.models.sharding import batch_sharding, create_sharded, make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = create_sharded(lambda: LlamaForCausalLM(ModelConfig.tiny(), rngs=nnx.Rngs(0)), mesh, "fsdp_tp")
    batch = global_batch()
    ids = jax.make_array_from_callback(batch.shape, batch_sharding(mesh), lambda index: batch[index])
    graphdef, state = nnx.split(model)
    forward = jax.jit(
        lambda state, ids: nnx.merge(graphdef, state)(ids)[0], out_shardings=NamedSharding(mesh, PartitionSpec())
    )
    return np.asarray(forward(state, ids))


def child(process_id, port, out_dir):
    """One process of the job: join, run the sharded forward, save the logits."""
    import jax

    from mojax.distributed import initialize

    initialize(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    np.save(Path(out_dir) / f"logits_{process_id}.npy", sharded_logits())
    jax.distributed.shutdown()


def free_port():
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(script, *args, timeout=CHILD_TIMEOUT_S):
    """Run ``python script PROCESS_ID PORT *args`` as NUM_PROCESSES children of one job (LOCAL_DEVICES CPU devices
    each, the repository on the path) to the end; returns their (returncode, output) pairs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), *map(str, args)],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    results = []
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, output))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_two_processes_agree_on_a_sharded_forward(tmp_path):
    try:
        results = run_processes(__file__, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"multi-process forward did not finish within {CHILD_TIMEOUT_S} s")
    failed = [output for code, output in results if code != 0]
    if failed and any(marker in failed[0] for marker in UNSUPPORTED):
        pytest.skip(f"CPU backend lacks multi-process collectives: {failed[0].strip().splitlines()[-1]}")
    assert not failed, failed[0][-3000:]
    first, second = (np.load(tmp_path / f"logits_{i}.npy") for i in range(NUM_PROCESSES))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, sharded_logits(), rtol=1e-5, atol=1e-5)


def test_initialize_rejects_partial_or_bad_arguments():
    from mojax.distributed import initialize

    with pytest.raises(ValueError, match="missing"):
        initialize("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match="host:port"):
        initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match="num_processes"):
        initialize("127.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match="process_id"):
        initialize("127.0.0.1:1234", 2, 2)


if __name__ == "__main__":
    child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
