"""mojax.host_memory: glibc's malloc keeps XLA:CPU's freed scratch buffers for the next call; compiled programs hold
memory mappings until JAX's caches drop them."""

import gc
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mojax.host_memory import (
    OPT_OUT_VARIABLE,
    SMALL_MODEL_PARAMETERS,
    glibc_version,
    keep_freed_host_memory,
    memory_map_count,
    memory_map_limit,
)

# A program whose 144 MiB of temporaries (the [6144, 6144] tanh(a a^T)) are allocated and freed at every call; the
# child prints the minor page faults of each of CALLS calls but the first.
CALLS = 41
FAULTS_PER_CALL = """
import json, resource, sys
from mojax.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda a: jnp.tanh(a @ a.T) @ a[:, :16])
a = jnp.ones((6144, 256))
temp_pages = f.lower(a).compile().memory_analysis().temp_size_in_bytes // resource.getpagesize()
faults = []
for _ in range(int(sys.argv[1])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "temp_pages": temp_pages, "faults": faults[1:]}))
"""


def faults_per_call() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env.pop(OPT_OUT_VARIABLE, None)
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_CALL, str(CALLS)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(glibc_version() is None, reason="mallopt is glibc's")
def test_freed_scratch_memory_is_reused_without_page_faults():
    """With glibc's defaults every call maps and faults in its temporaries afresh (40 x 37k faults here); with the
    setting the calls reuse the freed heap. The heap still grows by one block of temporaries now and then (a small
    allocation settles in the freed block, and the next call's no longer fits): 0-6 such calls of 40 on an idle
    machine, 10 in a run of the whole suite on 2 busy cores, where other threads' allocations interleave more. So:
    fewer than half of the calls fault their temporaries in, where by default every one does."""
    kept = faults_per_call()
    assert kept["applied"] and kept["temp_pages"] > 30_000
    faulting = [faults for faults in kept["faults"] if faults > kept["temp_pages"] // 2]
    assert len(faulting) < (CALLS - 1) // 2, kept


def test_the_opt_out_variable_keeps_glibcs_defaults(monkeypatch):
    monkeypatch.setenv(OPT_OUT_VARIABLE, "1")
    assert keep_freed_host_memory() is False


def test_glibc_version_is_a_dotted_number_or_none():
    version = glibc_version()
    assert version is None or all(part.isdigit() for part in version.split("."))


def test_the_setting_leaves_small_models_alone_and_applies_to_the_others(monkeypatch):
    """``keep_freed_host_memory_for`` applies the setting from ``SMALL_MODEL_PARAMETERS`` parameters up (smaller
    policies' milliseconds-long programs the single arena's lock slows down), to every model with
    ``MOJAX_RELEASE_HOST_MEMORY=0``."""
    import mojax.host_memory

    calls = []
    monkeypatch.setattr(mojax.host_memory, "keep_freed_host_memory", lambda: calls.append("kept") or True)
    assert mojax.host_memory.keep_freed_host_memory_for(SMALL_MODEL_PARAMETERS - 1) is False
    assert calls == []
    assert mojax.host_memory.keep_freed_host_memory_for(SMALL_MODEL_PARAMETERS) is True
    assert mojax.host_memory.keep_freed_host_memory_for(135_000_000) is True
    assert calls == ["kept", "kept"]
    monkeypatch.setenv(OPT_OUT_VARIABLE, "0")  # small models too
    assert mojax.host_memory.keep_freed_host_memory_for(1) is True
    assert calls == ["kept", "kept", "kept"]


def write_model_config(folder, config) -> str:
    """An HF model folder holding only ``config.json``: all the policy's size needs."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as file:
        json.dump(config.to_hf_dict(), file)
    return str(folder)


def test_the_policys_parameter_count_comes_from_its_config_alone(monkeypatch, tmp_path):
    """``keep_freed_host_memory_for_policy`` decides by the parameters of the model a ``model.path`` names, read from
    its config without weights: the built-in tiny model (78k parameters) stays below the threshold; a folder's
    ``config.json`` of a wider model is above it, one of a narrower model below; ``smollm2`` is the cached file's."""
    import mojax.host_memory
    from mojax.models import ModelConfig
    from mojax.rl.tiny import tiny_model_config
    from mojax.rl.trainer import keep_freed_host_memory_for_policy, policy_model_config

    counts = []
    monkeypatch.setattr(mojax.host_memory, "keep_freed_host_memory", lambda: True)
    monkeypatch.setattr(
        "mojax.rl.trainer.keep_freed_host_memory_for",
        lambda count: counts.append(count) or mojax.host_memory.keep_freed_host_memory_for(count),
    )
    large = ModelConfig.tiny(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, vocab_size=2048)
    small = ModelConfig.tiny()
    assert large.num_params() > SMALL_MODEL_PARAMETERS > small.num_params()
    assert keep_freed_host_memory_for_policy("tiny") is False
    assert keep_freed_host_memory_for_policy(write_model_config(tmp_path / "large", large)) is True
    assert keep_freed_host_memory_for_policy(write_model_config(tmp_path / "small", small)) is False
    assert counts == [tiny_model_config().num_params(), large.num_params(), small.num_params()]
    assert policy_model_config(str(tmp_path / "large")) == large
    monkeypatch.setattr("mojax.data.smollm2_gguf", lambda: tmp_path / "large")  # where the cache would hold it
    assert policy_model_config("smollm2") == large
    with pytest.raises(FileNotFoundError, match="no model at .*the path does not exist"):
        keep_freed_host_memory_for_policy(str(tmp_path / "missing"))


class Built(Exception):
    """Raised by a stand-in trainer: the command line got as far as building it."""


@pytest.mark.parametrize("command, config", [("train", "tiny"), ("dpo", "dpo_tiny")])
def test_the_command_line_keeps_freed_memory_for_its_configs_model_only_when_run_as_the_program(
    monkeypatch, tmp_path, command, config
):
    """``mojax train`` / ``mojax dpo`` run as the program (argv None) hand their config's ``model.path`` to
    ``keep_freed_host_memory_for_policy`` before the trainer is built; ``main([...])`` calls from Python leave the
    process alone. Both turn on the persistent compilation cache before the trainer is built."""
    import mojax.compilation_cache
    import mojax.host_memory
    import mojax.rl.dpo
    import mojax.rl.trainer
    from mojax import cli

    events = []
    monkeypatch.setattr(
        mojax.rl.trainer, "keep_freed_host_memory_for_policy", lambda path: events.append(("kept", path))
    )
    monkeypatch.setattr(mojax.compilation_cache, "enable_persistent_cache", lambda: events.append(("cache", None)))

    def built(config):
        events.append(("built", config.model.path))
        raise Built

    monkeypatch.setattr(mojax.rl.trainer, "Trainer", built)
    monkeypatch.setattr(mojax.rl.dpo, "DPOTrainer", built)
    argv = [command, config, f"output_dir={tmp_path}", "model.path=some/folder"]
    with pytest.raises(Built):
        cli.main(argv)
    assert events == [("cache", None), ("built", "some/folder")]
    monkeypatch.setattr(sys, "argv", ["mojax", *argv])
    with pytest.raises(Built):
        cli.main()
    assert events[2:] == [("kept", "some/folder"), ("cache", None), ("built", "some/folder")]


def test_the_demo_keeps_freed_memory_only_when_asked(monkeypatch, tmp_path):
    """``mojax demo`` run as the program hands the runs' ``model.path`` (the tiny model) to
    ``keep_freed_host_memory_for_policy`` before training; the function called from Python does not."""
    from mojax.rl import demo

    events = []
    monkeypatch.setattr(demo, "keep_freed_host_memory_for_policy", lambda path: events.append(("kept", path)))

    def trained(*args):
        events.append(("trained", None))
        raise Built

    monkeypatch.setattr(demo, "run_method", trained)
    with pytest.raises(Built):
        demo.main(["--output-dir", str(tmp_path), "--methods", "linear"])
    assert events == [("trained", None)]
    with pytest.raises(Built):
        demo.main(["--output-dir", str(tmp_path), "--methods", "linear"], keep_host_memory=True)
    assert events[1:] == [("kept", "tiny"), ("trained", None)]


PROGRAMS = 40


def compiled_programs(count: int) -> list:
    """``count`` jitted functions, each called once (so each compiled to its own program)."""
    programs = [jax.jit(lambda x, k=k: jnp.tanh(x @ x.T + k).sum(0) * jnp.exp(x).mean()) for k in range(count)]
    for program in programs:
        program(jnp.ones((8, 8))).block_until_ready()
    return programs


needs_proc = pytest.mark.skipif(not memory_map_limit(), reason="the mappings are read from Linux's /proc")


@needs_proc
def test_dropping_jaxs_caches_unmaps_the_compiled_programs_of_live_functions():
    """The premise of conftest's release of compiled programs after each test file: the jitted functions stay
    referenced, their programs are unmapped all the same, and a function called again compiles afresh."""
    compiled_programs(2)  # XLA's thread pools and allocator arenas come with the first programs, and stay
    jax.clear_caches()
    gc.collect()
    before = memory_map_count()
    programs = compiled_programs(PROGRAMS)
    grown = memory_map_count() - before
    assert grown >= 3 * PROGRAMS, grown  # code, read-only data and data of each program's kernels
    first = np.asarray(programs[0](jnp.ones((8, 8))))
    jax.clear_caches()
    gc.collect()
    assert memory_map_count() - before < grown / 4, (grown, memory_map_count() - before)
    np.testing.assert_array_equal(np.asarray(programs[0](jnp.ones((8, 8)))), first)
