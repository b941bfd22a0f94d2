"""Test environment for the tests and the doctests: 8 simulated CPU devices, fully offline, deterministic hypothesis.

Hypothesis runs the registered ``mojax`` profile (derandomized, no example database, so every run tries
the same examples); set ``MOJAX_HYPOTHESIS_PROFILE=explore`` to search with fresh random examples.
"""

import gc
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A persistent XLA compilation cache per pytest-xdist worker (a subfolder named after it), shared with the
# subprocesses its tests start: runs of the trainer that build the same program (every resume test does) load it
# instead of compiling it again; no worker reads what the other writes. Without a size cap JAX writes an entry in place
# and unlocked, so the cap is set to turn on JAX's file lock around every read and write, between a worker and its
# tests' subprocesses.
_cache = os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"mojax-xla-cache-{os.getuid()}")
)
_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and os.path.basename(_cache) != _worker:
    _cache = os.path.join(_cache, _worker)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Tokenizers converted from the tests' GGUF files are kept in the temporary folder, not in the user's mojax cache.
os.environ.setdefault("MOJAX_TOKENIZER_CACHE", os.path.join(tempfile.gettempdir(), f"mojax-tokenizers-{os.getuid()}"))

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402 (the environment above must be set before JAX is imported anywhere)

settings.register_profile("mojax", derandomize=True, database=None, max_examples=25, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("MOJAX_HYPOTHESIS_PROFILE", "mojax"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
    """After each test file, drop JAX's in-memory caches of compiled programs.

    Each compiled program holds memory mappings of its code until its executable is dropped, and Linux caps a process's
    mappings (:mod:`mojax.host_memory`). A worker late in a suite run came to 62000 of the default 65530, and past the
    cap it crashed wherever XLA next allocated (compiling, or reading or writing the persistent cache). A later file
    that needs a dropped program loads it from the persistent cache. A file whose programs alone bring the process
    within a quarter of the cap fails at its teardown, named, rather than crash a worker later (the heaviest file,
    tests/rl/test_update.py, reached 27000).
    """
    yield
    import jax

    from mojax.host_memory import memory_map_count, memory_map_limit

    count, limit = memory_map_count(), memory_map_limit()
    jax.clear_caches()
    gc.collect()
    if limit and count > 3 * limit // 4:
        pytest.fail(
            f"{request.node.nodeid}: the process held {count} memory mappings at the end of this file, near the "
            f"kernel's limit of {limit} (vm.max_map_count); split the file or release its compiled programs sooner"
        )
