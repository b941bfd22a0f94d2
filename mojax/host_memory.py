"""Keep freed host memory in the process, so XLA:CPU's scratch buffers are not mapped afresh at every call.

An XLA:CPU program allocates its temporaries (hundreds of MB to GBs for a training step) with ``malloc`` when it
starts and frees them when it ends. glibc serves an allocation that large with a fresh ``mmap`` and returns it to
the kernel with ``munmap`` on ``free``, so every page of the scratch memory is faulted in and zeroed by the kernel
again at every call. On SmolLM2-135M's RL update on a 2-core virtual machine that was 0.5 million page faults and
2.6 s of system CPU time per call of the linear step, 1.3 million and 11 s for a full-mode update with its [n, P]
stacked gradients; with the memory kept, none (``benchmarks/RESULTS.md``, "Host memory").

:func:`keep_freed_host_memory` tells glibc's allocator (``mallopt``) to serve every allocation from its heap
(``M_MMAP_MAX`` = 0), never to give the heap's freed top back to the kernel (``M_TRIM_THRESHOLD`` = unlimited) and to
use one arena for all threads (``M_ARENA_MAX`` = 1: other threads' arenas are limited to 64 MiB heaps, and a larger
allocation in one falls back to ``mmap``). A freed scratch buffer is then reused by the next call without a page
fault. The cost: the process keeps its peak heap for its lifetime (its resident memory no longer falls after a
large program), which a training process, whose peak recurs every step, pays anyway; and the heap grows by one
block of temporaries when a small allocation has settled in a freed block that the next call needs (a test program
with 144 MiB of scratch per call levelled off at 3-5 such blocks; the SmolLM2 example's peak memory did not move).

The settings are process-wide and must come before XLA's threads allocate (before the first computation), which is
why the ``mojax`` command line applies them after reading its config and before building anything. Without glibc
(macOS, musl) nothing is changed.

They do not pay for small programs, whose temporaries glibc's defaults already reuse (below its largest mmap
threshold, 32 MiB). With one arena every thread's ``malloc`` takes the same lock, the likely reason why small models'
RL updates took longer with the setting on a 2-core machine: the built-in tiny model's (78k parameters) 1.2-1.9x as
long, those of models of 0.5M and 1.0M parameters 1.16-1.26x, while from 2.0M parameters on full mode's temporaries
passed the threshold and the setting paid (``benchmarks/RESULTS.md``, "The host-memory setting by model size").
:func:`keep_freed_host_memory_for` therefore leaves a policy of fewer than ``SMALL_MODEL_PARAMETERS`` (1.5M) alone; the
command line, the demo and the experiments' scripts call it, through
``mojax.rl.trainer.keep_freed_host_memory_for_policy``, with the parameter count of their config's ``model.path``. The
count stands in for the size of the temporaries, which the batch and the sequence length also set: for a small model
trained on long sequences or large batches, ``MOJAX_RELEASE_HOST_MEMORY=0`` applies the setting whatever the size.

A second limit concerns compiled programs, not scratch memory: XLA:CPU maps each compiled program's kernels into the
process (code, read-only data, data: about three memory mappings per kernel) for as long as a JAX cache or a live
jitted function holds the executable, and Linux caps a process's mappings (``vm.max_map_count``, 65530 by default).
Past the cap an ``mmap`` fails and the process crashes wherever XLA next allocates. A process that compiles programs
by the thousand (a pytest worker late in a run of mojax's test suite came to 62000) can call ``jax.clear_caches()`` to
unmap the programs it no longer calls; :func:`memory_map_count` and :func:`memory_map_limit` tell how close it is.
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP_FREED_MEMORY = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: SIZE_MAX, never trim
OPT_OUT_VARIABLE = "MOJAX_RELEASE_HOST_MEMORY"
KEEP_FOR_EVERY_MODEL = "0"  # OPT_OUT_VARIABLE's value that keeps freed memory for small models too
SMALL_MODEL_PARAMETERS = 1_500_000  # policies with fewer parameters are left alone by keep_freed_host_memory_for


def glibc_version() -> str | None:
    """glibc's version (``"2.36"``) when this process runs on glibc, else None."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return name.split()[-1] if name and name.startswith("glibc") else None


def keep_freed_host_memory() -> bool:
    """Make glibc's ``malloc`` keep and reuse freed memory (see the module docstring); True when applied.

    Not applied (False) without glibc, or when the environment variable ``MOJAX_RELEASE_HOST_MEMORY`` is ``1``
    (keep glibc's defaults, e.g. for a process that must hand memory back after a large one-off program). Call it
    before the first JAX computation: threads that have already allocated keep their own arenas.
    """
    if os.environ.get(OPT_OUT_VARIABLE) == "1" or glibc_version() is None:
        return False
    libc = ctypes.CDLL(None)
    for parameter, value in KEEP_FREED_MEMORY:
        if libc.mallopt(parameter, value) != 1:
            raise OSError(f"mallopt({parameter}, {value}) failed: glibc {glibc_version()} refused the setting")
    return True


def keep_freed_host_memory_for(parameter_count: int) -> bool:
    """:func:`keep_freed_host_memory` for a run whose policy has `parameter_count` parameters, unless it is smaller
    than ``SMALL_MODEL_PARAMETERS`` and ``MOJAX_RELEASE_HOST_MEMORY`` is not ``0``.

    Args:
      parameter_count: the policy's parameters (``ModelConfig.num_params()``; the RL command line and scripts read
        it from the model's config with ``mojax.rl.trainer.keep_freed_host_memory_for_policy``).

    Returns:
      True when the setting was applied; False for a small model (its milliseconds-long programs wait on the single
      arena's lock for longer than keeping their small temporaries saves: see the module docstring), without glibc,
      or with ``MOJAX_RELEASE_HOST_MEMORY=1``. ``MOJAX_RELEASE_HOST_MEMORY=0`` applies it to a small model too (one
      trained on sequences or batches long enough that its temporaries pass 32 MiB).
    """
    keep_small_models = os.environ.get(OPT_OUT_VARIABLE) == KEEP_FOR_EVERY_MODEL
    return (keep_small_models or parameter_count >= SMALL_MODEL_PARAMETERS) and keep_freed_host_memory()


def memory_map_count() -> int:
    """The number of memory mappings of this process (Linux's ``/proc/self/maps``; 0 where there is none)."""
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0


def memory_map_limit() -> int:
    """Linux's cap on a process's memory mappings (``vm.max_map_count``, 65530 by default; 0 where unknown)."""
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return 0
