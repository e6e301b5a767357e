"""Where angel-compile keeps files it builds or fetches once: converted models and text corpora."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "ANGEL_CACHE_DIR"


def cache_root() -> Path:
    """The cache folder: `$ANGEL_CACHE_DIR` when set, else `~/.cache/angel_compile` (not created here)."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured) if configured else Path.home() / ".cache" / "angel_compile"
