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
from pathlib import Path

DEFAULT_MAX_SIZE_BYTES = 8 * 2**30
"""The cache's default bound; past it JAX evicts the least recently used programs."""

ENTRY_SUFFIX = "-cache"
ACCESS_TIME_SUFFIX = "-atime"
"""JAX's bounded cache keeps a program as ``<key>-cache`` and the time it was last read or written as ``<key>-atime``
(8 bytes, little-endian nanoseconds); an unbounded cache writes the first file only."""


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
    folder safely; without one it writes entries in place, unlocked. Programs that an unbounded cache wrote get an
    access time (:func:`add_missing_access_times`), without which the bounded cache cannot write to their folder.

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
    add_missing_access_times(jax.config.jax_compilation_cache_dir)
    return jax.config.jax_compilation_cache_dir


def add_missing_access_times(directory: str | os.PathLike) -> int:
    """Give each program in a cache folder that has no access time one: its file's modification time.

    JAX's bounded cache reads the access time of every program in the folder before it writes a new one, to choose
    which to evict; a program written while the folder was used unbounded (as mojax's commands did before they set a
    bound) has none, and then every write failed with a warning, so nothing new was cached.

    Args:
      directory: the cache folder (nothing is done when it is not a local folder).

    Returns:
      The number of access times written.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return 0
    written = 0
    for entry in folder.glob(f"*{ENTRY_SUFFIX}"):
        access_time = entry.with_name(entry.name.removesuffix(ENTRY_SUFFIX) + ACCESS_TIME_SUFFIX)
        try:
            if not access_time.exists():
                access_time.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
                written += 1
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
    return written
