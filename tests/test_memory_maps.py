"""Compiled programs and the process's memory mappings: XLA:CPU maps each compiled program's code into the process
until nothing holds its executable, and Linux caps a process's mappings (vm.max_map_count, 65530 by default)."""

import gc

import jax
import jax.numpy as jnp
import pytest

from conftest import memory_map_count, memory_map_limit

PROGRAMS = 40


def compiled_programs(count: int) -> list:
    """``count`` jitted functions, each called once (so each compiled to its own program)."""
    programs = [jax.jit(lambda x, k=k: jnp.tanh(x @ x.T + k).sum(0) * jnp.exp(x).mean()) for k in range(count)]
    for program in programs:
        program(jnp.ones((8, 8))).block_until_ready()
    return programs


needs_proc = pytest.mark.skipif(not memory_map_limit(), reason="the mappings are read from Linux's /proc")


@needs_proc
def test_dropping_jaxs_caches_unmaps_the_compiled_programs():
    """The premise of conftest's release of compiled programs after each test file."""
    compiled_programs(2)  # XLA's thread pools and allocator arenas come with the first programs, and stay
    jax.clear_caches()
    gc.collect()
    before = memory_map_count()
    programs = compiled_programs(PROGRAMS)
    grown = memory_map_count() - before
    assert grown >= 3 * PROGRAMS, grown  # code, read-only data and data of each program's kernels
    jax.clear_caches()
    gc.collect()
    assert memory_map_count() - before < grown / 4, (grown, memory_map_count() - before)
    assert all(callable(program) for program in programs)  # the functions lived on while their programs were dropped
