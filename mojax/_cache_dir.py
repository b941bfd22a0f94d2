"""The mojax cache folder, apart from :mod:`mojax.data` so that the models' loaders can use it without importing the
data libraries."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The mojax cache: ``$MOJAX_CACHE`` when set, else ``~/.cache/mojax``.

    Returns:
      The cache folder (not created here).
    """
    configured = os.environ.get("MOJAX_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mojax"
