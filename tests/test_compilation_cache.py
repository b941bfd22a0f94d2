import contextlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax._src.lru_cache import LRUCache

from mojax.compilation_cache import (
    DEFAULT_MAX_SIZE_BYTES,
    add_missing_access_times,
    default_cache_dir,
    enable_persistent_cache,
)

CACHE_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_compilation_cache_max_size",
    "jax_persistent_cache_min_compile_time_secs",
)


@contextlib.contextmanager
def restored_cache_settings():
    """JAX's cache settings put back as they were after the block (the test session's cache is live: JAX read its
    settings when it opened it, so changing them here does not touch it)."""
    saved = {name: getattr(jax.config, name) for name in CACHE_SETTINGS}
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


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


def test_an_unbounded_cache_gets_the_default_bound_and_a_given_bound_is_kept(tmp_path):
    with restored_cache_settings():
        jax.config.update("jax_compilation_cache_max_size", -1)
        enable_persistent_cache(tmp_path)
        assert jax.config.jax_compilation_cache_max_size == DEFAULT_MAX_SIZE_BYTES
        jax.config.update("jax_compilation_cache_max_size", 12345)
        enable_persistent_cache(tmp_path)
        assert jax.config.jax_compilation_cache_max_size == 12345


def test_the_least_compile_time_cached_is_the_argument_unless_the_environment_sets_it(monkeypatch, tmp_path):
    with restored_cache_settings():
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        enable_persistent_cache(tmp_path, min_compile_time_s=0.25)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "3")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 3.0)
        enable_persistent_cache(tmp_path, min_compile_time_s=0.25)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 3.0


def test_a_folder_an_unbounded_cache_wrote_takes_new_programs_once_its_programs_have_access_times(tmp_path):
    """JAX's own cache classes: a bounded cache cannot write into a folder where an unbounded one left a program
    without an access time, and can once :func:`add_missing_access_times` has given it one."""
    LRUCache(str(tmp_path), max_size=-1).put("jit_old-0", b"old program")
    assert [path.name for path in tmp_path.iterdir()] == ["jit_old-0-cache"]
    bounded = LRUCache(str(tmp_path), max_size=2**20)
    with pytest.raises(FileNotFoundError, match="jit_old-0-atime"):
        bounded.put("jit_new-1", b"new program")
    assert add_missing_access_times(tmp_path) == 1
    assert add_missing_access_times(tmp_path) == 0
    bounded.put("jit_new-1", b"new program")
    assert bounded.get("jit_new-1") == b"new program" and bounded.get("jit_old-0") == b"old program"
    assert add_missing_access_times(tmp_path / "missing") == 0


def test_enabling_the_cache_gives_the_configured_folders_programs_access_times(tmp_path):
    (tmp_path / "jit_old-0-cache").write_bytes(b"old program")
    with restored_cache_settings():
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        enable_persistent_cache()
    assert (tmp_path / "jit_old-0-atime").exists()


def test_mojax_train_writes_its_programs_to_the_default_bounded_cache(tmp_path):
    """A ``mojax train`` process with no cache settings of its own writes its train step and its sampler's program to
    ``mojax-xla-cache-<uid>`` in its temporary directory, with JAX's access-time files (written only by a bounded
    cache, which locks every read and write)."""
    inherited = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAX_ENABLE_COMPILATION_CACHE")
    env = {key: value for key, value in os.environ.items() if not key.startswith(inherited)}
    env["TMPDIR"] = str(tmp_path)
    overrides = ["steps=1", "eval_steps=0", f"output_dir={tmp_path / 'run'}", "logging.tensorboard=false"]
    run = subprocess.run(
        [sys.executable, "-m", "mojax", "train", "tiny", *overrides, "logging.progress=false", "export=false"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    entries = [path.name for path in (tmp_path / f"mojax-xla-cache-{os.getuid()}").iterdir()]
    for program in ("jit_train_step-", "jit__generate_bucket-"):
        cached = [name for name in entries if name.startswith(program) and name.endswith("-cache")]
        assert len(cached) == 1, (program, sorted(entries))
        assert cached[0].replace("-cache", "-atime") in entries
