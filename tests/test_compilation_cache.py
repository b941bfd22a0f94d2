import os

import jax

from mojax.compilation_cache import default_cache_dir, enable_persistent_cache


def test_an_already_configured_cache_directory_is_kept(tmp_path):
    configured = jax.config.jax_compilation_cache_dir
    assert configured is not None  # the root conftest configures the test session's cache
    assert enable_persistent_cache(tmp_path) == configured
    assert jax.config.jax_compilation_cache_dir == configured


def test_the_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert default_cache_dir().endswith("mojax-xla-cache-" + str(os.getuid()))
