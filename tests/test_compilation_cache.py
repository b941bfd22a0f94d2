import contextlib
import os
import subprocess
import sys
from pathlib import Path

import jax

from mojax.compilation_cache import DEFAULT_MAX_SIZE_BYTES, default_cache_dir, enable_persistent_cache

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


def test_mojax_train_writes_its_programs_to_the_default_bounded_cache(tmp_path):
    """A ``mojax train`` process with no cache settings of its own writes its train step and its sampler's program to
    ``mojax-xla-cache-<uid>`` in its temporary directory, with JAX's access-time files (written only by a bounded
    cache, which locks every read and write)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
    }
    env["TMPDIR"] = str(tmp_path)
    command = [
        sys.executable,
        "-m",
        "mojax",
        "train",
        "tiny",
        "steps=1",
        "eval_steps=0",
        f"output_dir={tmp_path / 'run'}",
    ]
    run = subprocess.run(
        [*command, "logging.tensorboard=false", "logging.progress=false", "export=false"],
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
