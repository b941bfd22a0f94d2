"""JAX's persistent compilation cache for the command-line jobs (the demo, the experiments).

Programs that lower to the same HLO (the rollout of every method in the demo, a resumed run's train step) are loaded
from the cache instead of being compiled again: in the same process as well as across processes.
"""

from __future__ import annotations

import os
import tempfile


def default_cache_dir() -> str:
    """``$JAX_COMPILATION_CACHE_DIR`` when set, else ``mojax-xla-cache-<uid>`` in the temporary directory."""
    fallback = os.path.join(tempfile.gettempdir(), f"mojax-xla-cache-{os.getuid()}")
    return os.environ.get("JAX_COMPILATION_CACHE_DIR", fallback)


def enable_persistent_cache(directory: str | os.PathLike | None = None, min_compile_time_s: float = 0.5) -> str:
    """Point JAX's persistent compilation cache at `directory` unless a cache directory is already configured.

    Args:
      directory: the cache folder; default :func:`default_cache_dir`.
      min_compile_time_s: programs that compile faster than this are not written to the cache.

    Returns:
      The cache directory in use (the one configured before, if any).
    """
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", os.fspath(directory or default_cache_dir()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    return jax.config.jax_compilation_cache_dir
