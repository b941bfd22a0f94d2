"""JAX's persistent compilation cache for the command-line jobs (``mojax train``, ``mojax dpo``, the demo, the
experiments).

Programs that lower to the same HLO (a rerun's or a resumed run's rollout and train step, the rollout of every method
in the demo) are loaded from the cache instead of being compiled again: in the same process as well as across
processes. ``JAX_COMPILATION_CACHE_DIR`` moves the cache, ``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off (JAX's
own settings).
"""

from __future__ import annotations

import os
import tempfile

DEFAULT_MAX_SIZE_BYTES = 8 * 2**30
"""The cache's default bound; past it JAX evicts the least recently used programs."""


def default_cache_dir() -> str:
    """``$JAX_COMPILATION_CACHE_DIR`` when set, else ``mojax-xla-cache-<uid>`` in the temporary directory."""
    fallback = os.path.join(tempfile.gettempdir(), f"mojax-xla-cache-{os.getuid()}")
    return os.environ.get("JAX_COMPILATION_CACHE_DIR", fallback)


def enable_persistent_cache(directory: str | os.PathLike | None = None, min_compile_time_s: float = 0.1) -> str:
    """Point JAX's persistent compilation cache at `directory` unless a cache directory is already configured, and
    cache the programs that compile in `min_compile_time_s` or longer unless the environment sets that
    (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``).

    An unbounded cache (JAX's default size, -1) gets :data:`DEFAULT_MAX_SIZE_BYTES`: with a bound JAX evicts old
    programs and holds a file lock around every read and write, so runs started side by side (a sweep) share one
    folder safely; without one it writes entries in place, unlocked.

    Args:
      directory: the cache folder; default :func:`default_cache_dir`.
      min_compile_time_s: programs that compile faster than this are not written to the cache.

    Returns:
      The cache directory in use (the one configured before, if any).
    """
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", os.fspath(directory or default_cache_dir()))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    if jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", DEFAULT_MAX_SIZE_BYTES)
    return jax.config.jax_compilation_cache_dir
